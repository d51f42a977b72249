//! `sdrs roundtrip`: encodes an image to latents and decodes it back with an autoencoder (a tiny
//! one, or a pipeline's full VAE), and prints how close the result is (MAE, RMSE, PSNR).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sdrs_kernels::KernelOptions;
use sdrs_taesd::AutoencoderTiny;
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig, VaeTiling};

use crate::input::read_picture;
use crate::output::write_png_atomically;
use crate::vae_tiling::VaeTilingArgs;

#[derive(Debug, Args)]
pub struct RoundtripArgs {
    /// The autoencoder: a tiny autoencoder folder (diffusers layout or the original
    /// `*_encoder/_decoder.safetensors` files), a VAE folder, or a pipeline folder (its `vae/`).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,

    /// The picture to encode and decode (PNG, JPEG or WebP); sides are cropped to a multiple of 8.
    pub image: PathBuf,

    /// Also write the decoded picture here.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,

    /// Device: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// With a full VAE: `--vae-tiling` encodes and decodes in tiles (no automatic choice here).
    #[command(flatten)]
    pub vae_tiling: crate::vae_tiling::VaeTilingArgs,
}

/// The two kinds of autoencoder a round trip can use.
enum Autoencoder {
    /// The VAE, the dtype its weights were loaded in, and its tiles when tiled.
    Full(Box<AutoencoderKL>, DType, Option<VaeTiling>),
    Tiny(Box<AutoencoderTiny>),
}

impl Autoencoder {
    /// `vae/` of a pipeline, a folder whose config is an `AutoencoderKL`, or a tiny autoencoder.
    fn load(
        path: &Path,
        dtype: DType,
        device: &Device,
        kernels: KernelOptions,
        tiling: &VaeTilingArgs,
    ) -> Result<Self> {
        if !path.is_dir() {
            bail!("autoencoder {} is not a folder", path.display());
        }
        let dir = if path.join("vae").join("config.json").is_file() {
            path.join("vae")
        } else {
            path.to_path_buf()
        };
        let config_path = dir.join("config.json");
        let is_kl = config_path.is_file()
            && std::fs::read_to_string(&config_path)
                .map(|text| text.contains("\"AutoencoderKL\""))
                .unwrap_or(false);
        if is_kl {
            let config = AutoencoderKLConfig::from_file(&config_path)?;
            let files = sdrs_pipeline::weights::find_weights(&dir, None)?;
            let (vb, _) = sdrs_pipeline::weights::var_builder("vae", &files, dtype, device)?;
            let vb = sdrs_kernels::VarBuilder::new(vb, kernels);
            let tiles = tiling.tiles(&config)?;
            return Ok(Self::Full(
                Box::new(AutoencoderKL::new(vb, &config)?),
                dtype,
                tiles,
            ));
        }
        if tiling.vae_tiling {
            bail!("--vae-tiling needs a full VAE (AutoencoderKL), not a tiny autoencoder");
        }
        let dtype = sdrs_pipeline::stable_diffusion::tiny_autoencoder_dtype(dtype, device);
        Ok(Self::Tiny(Box::new(AutoencoderTiny::from_dir(
            &dir, dtype, device, kernels,
        )?)))
    }

    /// `[1, 3, H, W]` in `[0, 1]` -> latents -> `[1, 3, H, W]` in `[0, 1]` (clamped).
    fn round_trip(&self, image: &Tensor) -> Result<Tensor> {
        let decoded = match self {
            // The distribution's mean: a round trip measures the autoencoder, not the sampling noise.
            Self::Full(vae, dtype, tiles) => {
                let image = ((image * 2.0)? - 1.0)?.to_dtype(*dtype)?;
                let decoded = match tiles {
                    Some(tiles) => {
                        vae.decode_tiled(&vae.encode_tiled(&image, tiles)?.mean, tiles)?
                    }
                    None => vae.decode(&vae.encode(&image)?.mean)?,
                };
                ((decoded.to_dtype(DType::F32)? + 1.0)? / 2.0)?
            }
            Self::Tiny(tiny) => {
                let latents = tiny.encode_unit(&image.to_dtype(tiny.dtype())?)?;
                tiny.decode_unit(&latents)?.to_dtype(DType::F32)?
            }
        };
        Ok(decoded.clamp(0f32, 1f32)?)
    }
}

pub fn run(args: RoundtripArgs) -> Result<ExitCode> {
    if let Some(output) = &args.output {
        drop(crate::output::PendingImage::reserve(output)?);
        crate::output::remove_temporary_files_on_signals();
    }
    let device = sdrs_pipeline::parse_device(&args.device)?;
    let dtype = sdrs_pipeline::parse_dtype(&args.dtype)?;
    let kernels = crate::system::kernel_options(Default::default())?;
    let autoencoder = Autoencoder::load(&args.model, dtype, &device, kernels, &args.vae_tiling)
        .with_context(|| format!("cannot load the autoencoder at {}", args.model.display()))?;
    let picture = read_picture(&args.image, "the input image")?;
    let (width, height) = (
        picture.width - picture.width % 8,
        picture.height - picture.height % 8,
    );
    if width == 0 || height == 0 {
        bail!(
            "{} is {}x{}; a round trip needs at least 8x8 pixels",
            args.image.display(),
            picture.width,
            picture.height
        );
    }
    let image = picture.to_tensor(&device)?;
    let image = image.narrow(2, 0, height)?.narrow(3, 0, width)?;
    if (width, height) != (picture.width, picture.height) {
        eprintln!(
            "cropping {}x{} to {width}x{height} (a multiple of 8)",
            picture.width, picture.height
        );
    }
    let decoded = autoencoder.round_trip(&image)?;
    let metrics = sdrs_taesd::compare_images(&decoded, &image)?;
    println!("MAE  {:.6}", metrics.mae);
    println!("RMSE {:.6}", metrics.rmse);
    println!("PSNR {:.3} dB", metrics.psnr_db);
    if let Some(output) = &args.output {
        write_png_atomically(output, &decoded)?;
        eprintln!("saved {}", output.display());
    }
    Ok(ExitCode::SUCCESS)
}
