//! Stable Diffusion pipelines (SD1.x/2.x, SDXL base, SDXL refiner): text-to-image and
//! image-to-image, following diffusers' `pipeline_stable_diffusion.py`,
//! `pipeline_stable_diffusion_img2img.py`, `pipeline_stable_diffusion_xl.py` and
//! `pipeline_stable_diffusion_xl_img2img.py` step for step (inpainting: [`inpaint`]), including
//! the order in which the generator is drawn from. A pipeline runs against its [`components`] (prompt encoders, denoiser,
//! latent decoder and encoder); loading builds the candle ones from a model's files.

pub mod components;
mod conditioning;
#[cfg(feature = "coreml")]
pub mod coreml;
mod denoise;
pub mod extra_networks;
pub(crate) mod family;
pub mod inpaint;
pub mod preview;
pub mod prompt;
pub mod refiner;
mod textual_inversion;
pub mod vae_tiling;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::KernelOptions;
use sdrs_schedulers::{NoNoise, NoiseSource, TorchGenerator};
use sdrs_taesd::AutoencoderTiny;
use sdrs_unet::UNet2DConditionConfig;
use sdrs_vae::AutoencoderKLConfig;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model_files::{builtin_for_checkpoint, ModelFiles};

use components::{
    vae_scale_factor, CandleComponents, Denoiser, KlAutoencoder, LatentDecoder, LatentEncoder,
    TinyAutoencoder, Weights,
};
use conditioning::{Prompts, TextEncoders};

pub use conditioning::{Conditioning, MicroConditioning};
pub use family::ModelFamily;
pub use inpaint::Inpainting;
pub use refiner::Refiner;
pub use textual_inversion::EmbeddingDir;

pub use crate::loading::{LoadOptions, LoraFile};
pub use sdrs_kernels::dispatch::{activation_dtype, small_model_dtype as tiny_autoencoder_dtype};

/// Where the denoising starts from.
#[derive(Debug, Clone, Default)]
pub enum InitImage {
    /// Pure noise (text-to-image).
    #[default]
    None,
    /// Image-to-image: `[1, 3, H, W]` in `[0, 1]`, encoded by the VAE and noised to `strength`
    /// (inpainting too, with [`Request::mask`]).
    Pixels(Tensor),
    /// Latents another pipeline returned (SDXL base -> refiner), already scaled for the UNet.
    Latents(Tensor),
}

/// How the prompts of a request are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// AUTOMATIC1111's: `(text)`, `[text]`, `(text:w)` weights, `\(` escapes and `BREAK`; a prompt
    /// of any length, in chunks of 75 tokens ([`prompt`]). A prompt with none of these and at
    /// most 75 tokens is encoded exactly as [`Self::Plain`] encodes it.
    #[default]
    A1111,
    /// diffusers': the text as it is, truncated to the text encoder's 77 tokens.
    Plain,
}

impl PromptSyntax {
    /// Every syntax, by [`Self::name`].
    pub const ALL: [PromptSyntax; 2] = [PromptSyntax::A1111, PromptSyntax::Plain];

    /// `a1111` or `plain`.
    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::A1111 => "a1111",
            PromptSyntax::Plain => "plain",
        }
    }

    /// The syntax [`Self::name`] calls `name` (case-insensitive).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|syntax| syntax.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::InvalidParameter {
                name: "prompt syntax",
                value: name.to_string(),
                expected: "a1111 or plain".to_string(),
            })
    }
}

/// One generation request. [`Request::new`] fills in diffusers' defaults for a model.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// SDXL's second prompt (for `text_encoder_2`); the first prompt when absent.
    pub prompt_2: Option<String>,
    /// `None` is not the same as `""` for SDXL models with `force_zeros_for_empty_prompt`.
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
    /// How the prompts are read: AUTOMATIC1111's weights and long prompts (the default), or
    /// diffusers' plain text.
    pub prompt_syntax: PromptSyntax,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; at 1.0 or below the unconditional pass is skipped.
    pub guidance_scale: f64,
    /// The full diffusers scheduler config (with `_class_name`) to sample with.
    pub scheduler: serde_json::Value,
    /// AUTOMATIC1111 meaning: 1 uses CLIP's last layer, 2 the penultimate, ... (SDXL defaults to 2).
    pub clip_skip: Option<usize>,
    /// Seed of the torch-compatible generator for the initial latents, the VAE encoding and each
    /// step's noise, drawn in diffusers' order.
    pub seed: Option<u64>,
    /// Explicit initial noise `[1, C, H/8, W/8]` (before `init_noise_sigma` scaling) for
    /// text-to-image, and for inpainting, which starts from it as diffusers does (at any strength).
    pub latents: Option<Tensor>,
    pub init_image: InitImage,
    /// Inpainting: which part of the init image ([`InitImage::Pixels`] only) to repaint, a
    /// grayscale `[1, 1, H, W]` in `[0, 1]` (white: repaint), binarised at 0.5 and resized to the
    /// output size when its size differs (see [`inpaint::process_mask`]).
    pub mask: Option<Tensor>,
    /// Image-to-image: how much of the schedule to run, in `(0, 1]`.
    pub strength: f64,
    /// Start part-way through the schedule (a fraction, as diffusers' `denoising_start`).
    pub denoising_start: Option<f64>,
    /// Stop part-way through the schedule (a fraction, as diffusers' `denoising_end`).
    pub denoising_end: Option<f64>,
    /// SDXL micro-conditioning; `None` fields default to the output size and `(0, 0)`.
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
    /// Images denoised together in one UNet batch (diffusers' `num_images_per_prompt`). Image `i`
    /// draws from its own generator seeded `seed + i` (AUTOMATIC1111's rule), so each is the image
    /// that seed gives alone; explicit `latents` and init latents then have `batch_size` rows.
    pub batch_size: usize,
    /// Stops the generation before its next denoising step once another thread sets it (a
    /// server's interrupt): the call then returns [`Error::Cancelled`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The most images one request may batch together.
pub const MAX_BATCH_SIZE: usize = 64;

/// Where a generation's memory peaks ([`StableDiffusion::estimate_peak_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryStage {
    Unet,
    VaeEncode,
    VaeDecode,
}

impl MemoryStage {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "the UNet's activations",
            Self::VaeEncode => "the VAE encode",
            Self::VaeDecode => "the VAE decode",
        }
    }
}

/// A generation's estimated peak memory beyond the loaded models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The stage it peaks in.
    pub stage: MemoryStage,
    pub peak_bytes: u64,
    /// Whether that stage is a tiled VAE pass.
    pub tiled: bool,
    /// The memory available when it was estimated; `None` where the platform does not say.
    pub available_bytes: Option<u64>,
}

/// The widest and tallest image a request may ask for: 16384 pixels is a 2048x2048 latent, far
/// past what any released model was trained at; larger values can only be mistakes and would
/// ask for more memory than exists before the first step.
pub const MAX_SIDE: usize = 16384;

/// The largest guidance scale (in magnitude) a request may ask for: far above the 1 to 30 anyone
/// uses, and low enough that the guided noise stays finite.
pub const MAX_GUIDANCE_SCALE: f64 = 1000.0;

impl Request {
    /// A request with diffusers' defaults for `pipeline`: its native size, 25 steps... see the fields.
    pub fn new(pipeline: &StableDiffusion, prompt: &str, scheduler: serde_json::Value) -> Self {
        let size = pipeline.default_size();
        Self {
            prompt: prompt.to_string(),
            prompt_2: None,
            negative_prompt: None,
            negative_prompt_2: None,
            prompt_syntax: PromptSyntax::default(),
            width: size,
            height: size,
            steps: 25,
            guidance_scale: pipeline.family().default_guidance_scale(),
            scheduler,
            clip_skip: None,
            seed: None,
            latents: None,
            init_image: InitImage::None,
            mask: None,
            strength: 0.3,
            denoising_start: None,
            denoising_end: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            aesthetic_score: 6.0,
            cancel: None,
            negative_aesthetic_score: 2.5,
            batch_size: 1,
        }
    }

    /// The seed of image `index` of the batch: `seed + index`.
    pub fn image_seed(&self, index: usize) -> Option<u64> {
        self.seed.and_then(|seed| seed.checked_add(index as u64))
    }

    /// The request for image `index` of the batch alone: its own seed, and its row of explicit
    /// latents or init latents (the whole tensor when it has one row).
    fn image(&self, index: usize) -> Result<Self> {
        let row = |t: &Tensor| -> Result<Tensor> {
            Ok(if t.dim(0)? == 1 {
                t.clone()
            } else {
                t.narrow(0, index, 1)?
            })
        };
        let mut one = self.clone();
        one.batch_size = 1;
        one.seed = self.image_seed(index);
        one.latents = self.latents.as_ref().map(row).transpose()?;
        if let InitImage::Latents(latents) = &self.init_image {
            one.init_image = InitImage::Latents(row(latents)?);
        }
        Ok(one)
    }
}

/// What the progress callback sees after each denoising step.
pub struct StepProgress<'a> {
    /// 1-based index of the model evaluation just finished.
    pub step: usize,
    /// Number of model evaluations in this generation.
    pub total: usize,
    pub timestep: f64,
    /// The latents after this step (scaled as the scheduler keeps them).
    pub latents: &'a Tensor,
    pipeline: &'a StableDiffusion,
}

impl StepProgress<'_> {
    /// A preview of the current latents, `[batch_size, 3, H, W]` in `[0, 1]`: decoded by the tiny
    /// autoencoder when the pipeline has one, otherwise by a cheap linear projection.
    /// Computed only when asked for.
    pub fn preview(&self) -> Result<Tensor> {
        self.pipeline.preview(self.latents)
    }
}

/// The size a model was trained at and its VAE's scale factor, from its configs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeSize {
    /// diffusers' default width and height, in pixels.
    pub pixels: usize,
    /// How many pixels one latent covers along each side (8 for every published VAE).
    pub vae_scale_factor: usize,
}

impl NativeSize {
    /// The size of the model whose configs `files` holds (no weights are read).
    pub fn of(files: &ModelFiles) -> Result<Self> {
        Ok(Self::from_configs(
            &files.unet_config()?,
            &files.vae_config()?,
        ))
    }

    pub fn from_configs(unet: &UNet2DConditionConfig, vae: &AutoencoderKLConfig) -> Self {
        let vae_scale_factor = vae_scale_factor(vae);
        Self {
            // diffusers falls back to 64 latents (SD1.5) when the config has no sample size.
            pixels: unet.sample_size.unwrap_or(64) * vae_scale_factor,
            vae_scale_factor,
        }
    }
}

/// A loaded Stable Diffusion model of any supported family.
pub struct StableDiffusion {
    root: PathBuf,
    family: ModelFamily,
    /// `None` only inside a one-shot run ([`Self::generate_once`]) once the prompts are encoded.
    text: Option<TextEncoders>,
    /// `None` only inside a one-shot run once the denoising is done.
    denoiser: Option<Box<dyn Denoiser>>,
    /// The latent channels the denoiser works in (kept when a one-shot run frees it).
    latent_channels: usize,
    /// The UNet's input channels: the latent channels, or `2C + 1` for an inpainting UNet.
    unet_in_channels: usize,
    native: NativeSize,
    /// The model's own VAE, both halves (the encoder for image-to-image).
    vae_decoder: Box<dyn LatentDecoder>,
    vae_encoder: Box<dyn LatentEncoder>,
    /// The same VAE, to set its tiling ([`Self::set_vae_tiling`]); `None` for another backend's.
    vae: Option<KlAutoencoder>,
    /// Decodes instead of the VAE when set (a tiny autoencoder: fast final decode and previews).
    fast_decoder: Option<Box<dyn LatentDecoder>>,
    scheduler_config: serde_json::Value,
    device: Device,
    dtype: DType,
    kernels: KernelOptions,
    /// This pipeline's CPU workers: every computation runs inside it.
    pool: Arc<rayon::ThreadPool>,
    /// The textual-inversion embeddings loaded into the text encoders, in load order.
    embeddings: Vec<crate::loading::embeddings::LoadedEmbedding>,
    /// What the components were loaded from, to reload them with other LoRAs; `None` for
    /// components that cannot be rebuilt with them (Core ML's).
    source: Option<Source>,
    /// Whether a request whose estimated peak exceeds the memory available is refused before it
    /// starts ([`Self::check_memory`]); on by default.
    memory_check: bool,
    /// The most a request may take when less than the memory available, in bytes.
    memory_limit: Option<u64>,
}

/// Where a pipeline's components come from and how they were loaded.
struct Source {
    files: ModelFiles,
    weights: Weights,
    options: LoadOptions,
}

impl StableDiffusion {
    /// Loads every component from a diffusers folder (`model_index.json`, `tokenizer*/`,
    /// `text_encoder*/`, `unet/`, `vae/`, `scheduler/`).
    pub fn load(root: &Path, options: &LoadOptions) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingFile {
                path: root.to_path_buf(),
                what: "a model folder in the diffusers layout".to_string(),
            });
        }
        Self::load_with(
            root,
            ModelFiles::Folder(root.to_path_buf()),
            Weights::Folder(root.to_path_buf()),
            options,
        )
    }

    /// Loads a single original-layout checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
    /// ...), with the configs, tokenizers and scheduler of `config_dir` (a diffusers folder of the
    /// same family, whose weights are not read).
    pub fn load_single_file(
        checkpoint: &Path,
        config_dir: &Path,
        options: &LoadOptions,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(checkpoint)?;
        let expected = ModelFamily::detect(config_dir)?;
        let found = ModelFamily::from(checkpoint.family());
        if found != expected {
            return Err(Error::InvalidParameter {
                name: "config folder",
                value: config_dir.display().to_string(),
                expected: format!(
                    "the configs of a {} model, as {} holds one (this folder is {})",
                    found.name(),
                    checkpoint.path().display(),
                    expected.name()
                ),
            });
        }
        if !config_dir.is_dir() {
            return Err(Error::MissingFile {
                path: config_dir.to_path_buf(),
                what: "a model folder in the diffusers layout".to_string(),
            });
        }
        Self::load_with(
            config_dir,
            ModelFiles::Folder(config_dir.to_path_buf()),
            Weights::Checkpoint(checkpoint),
            options,
        )
    }

    /// Loads a single original-layout checkpoint of SD1.5, SDXL base or SDXL refiner with the
    /// built-in configs of the published model of its family (detected from its keys) and the
    /// built-in CLIP vocabulary: no config folder, no network. A checkpoint whose shapes differ
    /// from the published model's, or an SD2.x one, needs [`Self::load_single_file`].
    pub fn load_single_file_builtin(checkpoint: &Path, options: &LoadOptions) -> Result<Self> {
        let checkpoint = Checkpoint::open(checkpoint)?;
        let path = checkpoint.path().to_path_buf();
        let model =
            builtin_for_checkpoint(checkpoint.family()).ok_or_else(|| Error::NoBuiltinConfig {
                path: path.clone(),
                family: "SD2.x",
            })?;
        Self::load_with(
            &path,
            ModelFiles::Builtin(model),
            Weights::Checkpoint(checkpoint),
            options,
        )
        .map_err(|source| match source {
            Error::SingleFile { .. } | Error::Weights { .. } => Error::NotPublishedShapes {
                path,
                model: model.name(),
                source: Box::new(source),
            },
            other => other,
        })
    }

    /// Loads whatever `model` is: a diffusers folder ([`Self::load`]), or a single checkpoint
    /// with the configs of `config` (a diffusers folder of the same family,
    /// [`Self::load_single_file`]), else the built-in ones ([`Self::load_single_file_builtin`]).
    pub fn open(model: &Path, config: Option<&Path>, options: &LoadOptions) -> Result<Self> {
        if model.is_file() {
            match config {
                Some(config) => Self::load_single_file(model, config, options),
                None => Self::load_single_file_builtin(model, options),
            }
        } else if model.is_dir() {
            Self::load(model, options)
        } else {
            Err(Error::MissingFile {
                path: model.to_path_buf(),
                what: "a diffusers model folder (with model_index.json, unet/, vae/, \
                       text_encoder/, tokenizer/, scheduler/) or a .safetensors checkpoint"
                    .to_string(),
            })
        }
    }

    /// A model with the configs of `files` (e.g. [`ModelFiles::Builtin`] for the published
    /// architectures) and seeded random weights built in the process: what `sdrs bench` measures,
    /// the real shapes and pipeline with no weight files.
    pub fn random(files: &ModelFiles, seed: u64, options: &LoadOptions) -> Result<Self> {
        let root = files.location("").join("<random weights>");
        Self::load_with(&root, files.clone(), Weights::Random(seed), options)
    }

    /// `root` is what [`Self::root`] reports: the folder, or the single checkpoint file.
    fn load_with(
        root: &Path,
        files: ModelFiles,
        weights: Weights,
        options: &LoadOptions,
    ) -> Result<Self> {
        let _span = tracing::info_span!("load_model").entered();
        let family = ModelFamily::detect_in(&files)?;
        let pool = options.thread_pool()?;
        let native = NativeSize::of(&files)?;
        let CandleComponents { text, unet, vae } =
            CandleComponents::load(&files, family, &weights, options)?;
        let scheduler_config = files.json("scheduler/scheduler_config.json")?;
        let latent_channels = LatentDecoder::latent_channels(&vae);
        inpaint::is_inpainting_unet(unet.in_channels(), latent_channels)?;
        Ok(Self {
            root: root.to_path_buf(),
            family,
            text: Some(text),
            latent_channels,
            unet_in_channels: unet.in_channels(),
            denoiser: Some(Box::new(unet)),
            native,
            vae_decoder: Box::new(vae.clone()),
            vae_encoder: Box::new(vae.clone()),
            vae: Some(vae),
            fast_decoder: None,
            memory_check: options.memory_check,
            memory_limit: options.memory_limit,
            scheduler_config,
            device: options.device.clone(),
            dtype: options.dtype,
            kernels: options.kernels,
            pool,
            source: Some(Source {
                files,
                weights,
                options: options.clone(),
            }),
            embeddings: Vec::new(),
        })
    }

    /// The LoRAs merged into this pipeline's weights.
    pub fn loras(&self) -> &[LoraFile] {
        self.source
            .as_ref()
            .map_or(&[], |source| &source.options.loras)
    }

    /// Merges `loras` instead of the LoRAs loaded so far (none: the model's own weights): the
    /// text encoders and the UNet that either set changes are rebuilt from the model's weights
    /// (the VAE stays), so the result is exactly what loading with `loras` gives. While the new
    /// components build, the old ones are still held (peak: both). On an error the pipeline
    /// keeps its former LoRAs.
    pub fn set_loras(&mut self, loras: &[LoraFile]) -> Result<()> {
        if self.text.is_none() || self.denoiser.is_none() {
            return Err(Error::Released {
                component: "text encoders or UNet",
            });
        }
        let Some(source) = &self.source else {
            return Err(Error::InvalidParameter {
                name: "LoRA",
                value: format!("{} file(s)", loras.len()),
                expected: "none: this pipeline's weights are compiled in (Core ML)".to_string(),
            });
        };
        let mut options = source.options.clone();
        options.loras = loras.to_vec();
        let Source { files, weights, .. } = source;
        let pool = self.pool.clone();
        let old = crate::loading::lora::LoraSet::open(
            &source.options.loras,
            &files.unet_config()?,
            true,
        )?;
        let (text, unet) = pool.install(|| -> Result<_> {
            let new = crate::loading::lora::LoraSet::open(
                &options.loras,
                &files.unet_config()?,
                options.lora_ignore_unmatched,
            )?;
            let touched = |component: &str| {
                [&old, &new]
                    .iter()
                    .any(|set| set.as_ref().is_some_and(|set| set.touches(component)))
            };
            let mut built = Vec::new();
            let all = components::lora_components(self.family);
            let text_touched = all
                .iter()
                .any(|c| c.starts_with("text_encoder") && touched(c));
            let text = if text_touched {
                built.extend(all.iter().filter(|c| c.starts_with("text_encoder")));
                Some(components::load_text_encoders(
                    files,
                    self.family,
                    weights,
                    &options,
                    new.as_ref(),
                )?)
            } else {
                None
            };
            let unet = if touched("unet") {
                built.push("unet");
                Some(components::load_unet(
                    files,
                    weights,
                    &options,
                    new.as_ref(),
                )?)
            } else {
                None
            };
            if let Some(new) = &new {
                // A component the new set changes is always among those rebuilt.
                new.check_matched(&built)?;
            }
            Ok((text, unet))
        })?;
        let text_rebuilt = text.is_some();
        if let Some(text) = text {
            self.text = Some(text);
        }
        if let Some(unet) = unet {
            self.denoiser = Some(Box::new(unet));
        }
        if let Some(source) = &mut self.source {
            source.options = options;
        }
        if text_rebuilt {
            // The rebuilt text encoders get the embeddings the old ones had, under the same ids.
            self.reload_embeddings()?;
        }
        Ok(())
    }

    /// The kernel options every layer of this pipeline computes with.
    pub fn kernels(&self) -> KernelOptions {
        self.kernels
    }

    /// Runs `work` on this pipeline's thread pool (the kernels' parallel loops use its workers).
    /// The pipeline's own methods do; a caller driving the components itself
    /// ([`Self::denoiser`], ...) wraps its calls in this to compute with the same threads.
    pub fn in_pool<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        self.pool.install(work)
    }

    /// The number of worker threads of this pipeline's pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The folder the model was loaded from (the checkpoint file for a single file loaded with the
    /// built-in configs).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The model's own `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> &serde_json::Value {
        &self.scheduler_config
    }

    /// How many pixels one latent covers along each side (8 for every published VAE).
    pub fn vae_scale_factor(&self) -> usize {
        self.native.vae_scale_factor
    }

    /// The size the UNet was trained at, in pixels: diffusers' default width and height.
    pub fn default_size(&self) -> usize {
        self.native.pixels
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The denoiser (the UNet); an error once a one-shot run has freed it.
    pub fn denoiser(&self) -> Result<&dyn Denoiser> {
        self.denoiser
            .as_deref()
            .ok_or(Error::Released { component: "UNet" })
    }

    /// The model's own VAE decoder (whatever [`Self::set_latent_decoder`] set decodes instead).
    pub fn vae_decoder(&self) -> &dyn LatentDecoder {
        self.vae_decoder.as_ref()
    }

    /// The model's VAE encoder, which image-to-image starts from.
    pub fn vae_encoder(&self) -> &dyn LatentEncoder {
        self.vae_encoder.as_ref()
    }

    /// Runs a whole generation and returns images `[batch_size, 3, H, W]` in `[0, 1]` (f32).
    pub fn generate(
        &self,
        request: &Request,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        self.in_pool(|| {
            let latents = self.denoise(request, progress)?;
            self.decode(&latents)
        })
    }

    /// [`Self::generate`] for a single image, freeing each model after its last use: the text
    /// encoders once the prompts are encoded, the UNet before the VAE decodes. The peak memory
    /// is then that of the models still needed plus one stage's activations, not of every model
    /// (stable-diffusion.cpp's command line does the same). The image is the same.
    pub fn generate_once(
        mut self,
        request: &Request,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        let pool = self.pool.clone();
        pool.install(move || {
            let latents = self.denoise_releasing(request, progress)?;
            self.denoiser = None;
            sdrs_kernels::memory::release_freed_memory();
            self.decode(&latents)
        })
    }

    /// [`Self::denoise`] for a single image, freeing the text encoders once the prompts are
    /// encoded and everything else when it returns (for a refiner that continues from the latents).
    pub fn denoise_once(
        mut self,
        request: &Request,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        let pool = self.pool.clone();
        pool.install(move || self.denoise_releasing(request, progress))
    }

    fn denoise_releasing(
        &mut self,
        request: &Request,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        let conditioning = self.encode_prompts(request)?;
        self.text = None;
        sdrs_kernels::memory::release_freed_memory();
        self.denoise_with(request, &conditioning, progress)
    }

    /// The denoising loop; returns the final latents as the scheduler keeps them (what diffusers
    /// returns with `output_type="latent"`, and what a refiner continues from).
    pub fn denoise(
        &self,
        request: &Request,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        self.in_pool(|| {
            let conditioning = self.encode_prompts(request)?;
            self.denoise_with(request, &conditioning, progress)
        })
    }

    /// Checks the request and encodes its prompts (and SDXL's micro-conditioning) into what the
    /// denoiser is conditioned on: the negative row first when guided.
    pub fn encode_prompts(&self, request: &Request) -> Result<Conditioning> {
        self.in_pool(|| {
            self.check_request(request)?;
            let (height, width) = (request.height, request.width);
            let micro = MicroConditioning {
                original_size: request.original_size.unwrap_or((height, width)),
                crops_coords_top_left: request.crops_coords_top_left,
                target_size: request.target_size.unwrap_or((height, width)),
                aesthetic_score: request.aesthetic_score,
                negative_aesthetic_score: request.negative_aesthetic_score,
            };
            let prompts = Prompts {
                prompt: &request.prompt,
                prompt_2: request.prompt_2.as_deref(),
                negative: request.negative_prompt.as_deref(),
                negative_2: request.negative_prompt_2.as_deref(),
                clip_skip: request.clip_skip,
                syntax: request.prompt_syntax,
                guided: request.guidance_scale > 1.0,
            };
            let text = self.text.as_ref().ok_or(Error::Released {
                component: "text encoders",
            })?;
            let denoiser = self.denoiser()?;
            text.encode(&prompts, &micro, denoiser.dtype(), denoiser.device())
        })
    }

    /// Inpainting: the processed mask, the masked image and the latents a request with a mask
    /// starts from, drawn from its generator as [`Self::generate`] draws them (for checks against
    /// diffusers' intermediates). An error for a request without a mask.
    pub fn inpainting_start(&self, request: &Request) -> Result<Inpainting> {
        self.in_pool(|| {
            self.check_request(request)?;
            if request.mask.is_none() {
                return Err(Error::InvalidParameter {
                    name: "mask",
                    value: "none".to_string(),
                    expected: "a mask: only an inpainting request has a mask to process"
                        .to_string(),
                });
            }
            let mut scheduler = sdrs_schedulers::from_config(&request.scheduler, request.steps)?;
            let mut generator = request.seed.map(TorchGenerator::new);
            let start = self.start(request, scheduler.as_mut(), generator.as_mut())?;
            start.inpainting.ok_or_else(|| Error::InvalidParameter {
                name: "init image",
                value: "none".to_string(),
                expected: "an init image (InitImage::Pixels) to inpaint".to_string(),
            })
        })
    }

    /// Where `request` starts on a fresh `scheduler`, drawing from `generator` (see
    /// [`denoise::start`]).
    fn start(
        &self,
        request: &Request,
        scheduler: &mut dyn sdrs_schedulers::Scheduler,
        generator: Option<&mut TorchGenerator>,
    ) -> Result<denoise::Start> {
        let factor = self.vae_scale_factor();
        let shape = (
            1,
            self.latent_channels,
            request.height / factor,
            request.width / factor,
        );
        denoise::start(
            request,
            scheduler,
            shape,
            self.unet_in_channels,
            generator,
            self.vae_encoder.as_ref(),
            &self.device,
        )
    }

    /// Whether requests are checked against the memory available before they start
    /// ([`Self::check_memory`]); on by default. Off, a request too large for the machine runs
    /// until an allocation fails (or the system swaps).
    pub fn set_memory_check(&mut self, on: bool, limit: Option<u64>) {
        self.memory_check = on;
        self.memory_limit = limit;
    }

    /// The estimated peak memory of `request` beyond what is already loaded, in bytes, with the
    /// stage it peaks in: the UNet's activations at the guidance batch, the VAE's encode (an
    /// init image) and decode as their tiling will run them, and the final images. `None` when a
    /// component cannot estimate its own (Core ML).
    pub fn estimate_peak_bytes(&self, request: &Request) -> Result<Option<MemoryEstimate>> {
        let available_bytes = match (
            vae_tiling::memory_available(&self.device),
            self.memory_limit,
        ) {
            (Some(available), Some(limit)) => Some(available.min(limit)),
            (available, limit) => available.or(limit),
        };
        let factor = self.vae_scale_factor();
        let (batch, height, width) = (request.batch_size, request.height, request.width);
        let (latent_h, latent_w) = (height / factor, width / factor);
        let rows = batch.saturating_mul(if request.guidance_scale > 1.0 { 2 } else { 1 });
        let Some(unet) = self
            .denoiser()?
            .peak_activation_bytes(rows, latent_h, latent_w)
        else {
            return Ok(None);
        };
        let decoder = self.fast_decoder.as_ref().unwrap_or(&self.vae_decoder);
        let Some((decode, decode_tiled)) =
            decoder.peak_bytes(batch, latent_h, latent_w, available_bytes)
        else {
            return Ok(None);
        };
        let mut stages = vec![
            (MemoryStage::Unet, unet, false),
            (MemoryStage::VaeDecode, decode, decode_tiled),
        ];
        if matches!(request.init_image, InitImage::Pixels(_)) {
            match self
                .vae_encoder
                .peak_bytes(batch, height, width, available_bytes)
            {
                Some((encode, tiled)) => stages.push((MemoryStage::VaeEncode, encode, tiled)),
                None => return Ok(None),
            }
        }
        // The images as f32 and as the 8-bit pixels they are saved from.
        let images = (batch as u64)
            .saturating_mul(height as u64)
            .saturating_mul(width as u64)
            .saturating_mul(3 * 4 + 3);
        let (stage, bytes, tiled) = stages
            .into_iter()
            .max_by_key(|&(_, bytes, _)| bytes)
            .unwrap_or((MemoryStage::Unet, 0, false));
        Ok(Some(MemoryEstimate {
            stage,
            peak_bytes: bytes.saturating_add(images),
            tiled,
            available_bytes,
        }))
    }

    /// Refuses `request` when its estimated peak ([`Self::estimate_peak_bytes`]) exceeds the
    /// memory available (Linux's `MemAvailable` on the CPU, the free memory of a CUDA device, or
    /// the pipeline's memory limit when lower), with both numbers and the largest size of the same shape that would fit. Nothing is
    /// refused where the memory available is not known, or with [`Self::set_memory_check`] off.
    pub fn check_memory(&self, request: &Request) -> Result<()> {
        if !self.memory_check {
            return Ok(());
        }
        let Some(estimate) = self.estimate_peak_bytes(request)? else {
            return Ok(());
        };
        let Some(available) = estimate.available_bytes else {
            return Ok(());
        };
        if estimate.peak_bytes <= available {
            return Ok(());
        }
        let factor = self.vae_scale_factor();
        // Activations grow with the area: the same shape scaled by the root of the ratio.
        let scale = (available as f64 / estimate.peak_bytes as f64).sqrt();
        let fit = |side: usize| ((side as f64 * scale) as usize / factor * factor).max(factor);
        let mut advice = format!(
            "at most about {}x{} would fit",
            fit(request.width),
            fit(request.height)
        );
        if request.batch_size > 1 {
            advice.push_str(", or a smaller batch");
        }
        if matches!(
            estimate.stage,
            MemoryStage::VaeDecode | MemoryStage::VaeEncode
        ) && !estimate.tiled
        {
            advice.push_str(
                "; or tile the VAE (`--vae-tiling`, or leave its tiling on auto), whose untiled \
                 pass is the peak",
            );
        }
        Err(Error::OutOfMemory {
            what: format!(
                "a {}x{} image (batch {}, {} activations)",
                request.width,
                request.height,
                request.batch_size,
                self.denoiser()?.dtype().as_str()
            ),
            stage: estimate.stage.name(),
            estimate_bytes: estimate.peak_bytes,
            available_bytes: available,
            advice,
        })
    }

    /// The start latents, then the steps, for one request.
    fn denoise_with(
        &self,
        request: &Request,
        conditioning: &Conditioning,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        self.check_memory(request)?;
        let denoiser = self.denoiser()?;
        let mut scheduler = sdrs_schedulers::from_config(&request.scheduler, request.steps)?;
        // Each image of the batch starts as it would alone, from its own generator; the
        // scheduler's begin index is the same for all.
        let mut generators = Vec::with_capacity(request.batch_size);
        let mut starts = Vec::with_capacity(request.batch_size);
        for index in 0..request.batch_size {
            let image = request.image(index)?;
            let mut generator = image.seed.map(TorchGenerator::new);
            starts.push(self.start(&image, scheduler.as_mut(), generator.as_mut())?);
            generators.extend(generator);
        }
        let start = denoise::Start::batch(starts)?;
        let conditioning = conditioning.for_batch(request.batch_size)?;
        let total = start.timesteps.len();
        let mut no_noise = NoNoise;
        let mut batch_noise = BatchNoise(generators);
        let noise: &mut dyn NoiseSource = if request.seed.is_some() {
            &mut batch_noise
        } else {
            &mut no_noise
        };
        denoise::run(
            denoiser,
            scheduler.as_mut(),
            start,
            &conditioning,
            request.guidance_scale,
            noise,
            &mut |step, timestep, latents| {
                progress(&StepProgress {
                    step,
                    total,
                    timestep,
                    latents,
                    pipeline: self,
                });
                match &request.cancel {
                    Some(cancel) if cancel.load(std::sync::atomic::Ordering::SeqCst) => {
                        Err(Error::Cancelled)
                    }
                    _ => Ok(()),
                }
            },
        )
    }

    /// Tiles the VAE's decodes and encodes as `tiling` says from now on (at load:
    /// [`LoadOptions::vae_tiling`]); a tile size or overlap out of range is an error.
    pub fn set_vae_tiling(&mut self, tiling: &vae_tiling::VaeTilingOptions) -> Result<()> {
        let vae = self.vae.as_ref().ok_or_else(|| Error::InvalidParameter {
            name: "VAE tiling",
            value: "set".to_string(),
            expected: "none: this pipeline's VAE runs whole (Core ML)".to_string(),
        })?;
        vae.set_tiling(tiling.resolve(vae.config())?);
        Ok(())
    }

    /// Tiles the VAE's decodes and encodes with exactly these tiles from now on (diffusers'
    /// `enable_tiling()` with its attributes set by hand); `None` turns tiling off.
    pub fn set_vae_tiles(&mut self, tiles: Option<sdrs_vae::VaeTiling>) {
        if let Some(vae) = &self.vae {
            vae.set_tiling(match tiles {
                Some(tiles) => vae_tiling::VaeTilingPolicy::Always(tiles),
                None => vae_tiling::VaeTilingPolicy::Off,
            });
        }
    }

    /// Decodes with a tiny autoencoder (TAESD and kin) instead of the full VAE from now on; its
    /// latent channels must match the UNet's.
    pub fn set_tiny_autoencoder(&mut self, tiny: AutoencoderTiny) -> Result<()> {
        self.set_latent_decoder(Box::new(TinyAutoencoder::new(tiny)))
    }

    /// Decodes final images and previews with `decoder` instead of the model's VAE from now on;
    /// its latent channels must match the UNet's.
    pub fn set_latent_decoder(&mut self, decoder: Box<dyn LatentDecoder>) -> Result<()> {
        let (found, expected) = (decoder.latent_channels(), self.latent_channels);
        if found != expected {
            return Err(Error::InvalidParameter {
                name: "decoder",
                value: format!("{} ({found} latent channels)", decoder.name()),
                expected: format!("one for {expected}-channel latents, as this model makes"),
            });
        }
        self.fast_decoder = Some(decoder);
        Ok(())
    }

    /// A cheap preview of UNet latents `[1, C, h, w]`: the tiny autoencoder when there is one,
    /// else a per-pixel linear map from latent channels to RGB (at latent resolution).
    pub fn preview(&self, latents: &Tensor) -> Result<Tensor> {
        if self.fast_decoder.is_some() {
            return self.decode(latents);
        }
        let factors = preview::latent_rgb_factors(self.family.latent_space(), latents.dim(1)?)?;
        preview::linear_preview(latents, &factors)
    }

    /// Decodes latents into images `[B, 3, H, W]` in `[0, 1]` (f32), with the tiny autoencoder
    /// when one is set, else the model's VAE.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let decoder = self.fast_decoder.as_ref().unwrap_or(&self.vae_decoder);
        self.in_pool(|| decoder.decode(latents))
    }

    /// How many tokens of `prompt` do not fit in one pass of the (first) text encoder, whose
    /// context holds 75 between its begin and end tokens: what [`PromptSyntax::Plain`] cuts off
    /// (the AUTOMATIC1111 syntax encodes the rest in further chunks). 0 when it fits, or once a
    /// one-shot run has freed the encoders.
    pub fn tokens_over_context(&self, prompt: &str) -> Result<usize> {
        let encoder = match &self.text {
            Some(TextEncoders::Sd(encoder)) => Some(encoder),
            Some(TextEncoders::Sdxl { encoders, .. }) => encoders.first(),
            None => None,
        };
        Ok(match encoder {
            Some(encoder) => encoder
                .tokenize(prompt)?
                .len()
                .saturating_sub(encoder.token_rules().chunk_length()),
            None => 0,
        })
    }

    /// Checks `request` against this model without running anything: the size a positive
    /// multiple of the VAE's factor, at least one step, a finite guidance scale, the strength in
    /// `(0, 1]`, the denoising fractions strictly between 0 and 1, and a mask exactly when an
    /// inpainting UNet needs one (with pixels to repaint). Every generation does.
    pub fn check_request(&self, request: &Request) -> Result<()> {
        let factor = self.vae_scale_factor();
        for (name, value) in [("width", request.width), ("height", request.height)] {
            if value > MAX_SIDE {
                return Err(Error::InvalidParameter {
                    name,
                    value: value.to_string(),
                    expected: format!("at most {MAX_SIDE} pixels"),
                });
            }
            if value == 0 || value % factor != 0 {
                return Err(Error::InvalidParameter {
                    name,
                    value: value.to_string(),
                    expected: format!("a positive multiple of {factor}"),
                });
            }
        }
        if !(1..=MAX_BATCH_SIZE).contains(&request.batch_size) {
            return Err(Error::InvalidParameter {
                name: "batch size",
                value: request.batch_size.to_string(),
                expected: format!("from 1 to {MAX_BATCH_SIZE}"),
            });
        }
        if request.seed.is_some() && request.image_seed(request.batch_size - 1).is_none() {
            return Err(Error::InvalidParameter {
                name: "seed",
                value: format!(
                    "{} with a batch of {}",
                    request.seed.unwrap_or_default(),
                    request.batch_size
                ),
                expected: format!(
                    "at most {} so that every image's seed fits in 64 bits",
                    u64::MAX - (request.batch_size as u64 - 1)
                ),
            });
        }
        for (what, tensor) in [
            ("latents", request.latents.as_ref()),
            (
                "init latents",
                match &request.init_image {
                    InitImage::Latents(latents) => Some(latents),
                    _ => None,
                },
            ),
        ] {
            if let Some(tensor) = tensor {
                let rows = tensor.dim(0)?;
                if rows != 1 && rows != request.batch_size {
                    return Err(Error::InvalidParameter {
                        name: what,
                        value: format!("with {rows} rows"),
                        expected: format!("1 or the batch size, {}", request.batch_size),
                    });
                }
            }
        }
        if request.steps == 0 {
            return Err(Error::InvalidParameter {
                name: "steps",
                value: "0".to_string(),
                expected: "at least 1".to_string(),
            });
        }
        if !(request.guidance_scale.is_finite()
            && request.guidance_scale.abs() <= MAX_GUIDANCE_SCALE)
        {
            return Err(Error::InvalidParameter {
                name: "guidance scale",
                value: request.guidance_scale.to_string(),
                expected: format!(
                    "a finite number from -{MAX_GUIDANCE_SCALE} to {MAX_GUIDANCE_SCALE}"
                ),
            });
        }
        for (name, value) in [
            ("aesthetic score", request.aesthetic_score),
            ("negative aesthetic score", request.negative_aesthetic_score),
        ] {
            if !value.is_finite() {
                return Err(Error::InvalidParameter {
                    name,
                    value: value.to_string(),
                    expected: "a finite number".to_string(),
                });
            }
        }
        if !(request.strength > 0.0 && request.strength <= 1.0) {
            return Err(Error::InvalidParameter {
                name: "strength",
                value: request.strength.to_string(),
                expected: "a number in (0, 1]".to_string(),
            });
        }
        for (name, value) in [
            ("denoising start", request.denoising_start),
            ("denoising end", request.denoising_end),
        ] {
            if let Some(v) = value {
                if !(v > 0.0 && v < 1.0) {
                    return Err(Error::InvalidParameter {
                        name,
                        value: v.to_string(),
                        expected: "a fraction strictly between 0 and 1".to_string(),
                    });
                }
            }
        }
        self.check_mask(request)
    }

    /// A mask needs an init image in pixels and no `denoising_start`; an inpainting UNet needs
    /// a mask.
    fn check_mask(&self, request: &Request) -> Result<()> {
        let inpainting_unet = self.unet_in_channels != self.latent_channels;
        let Some(mask) = &request.mask else {
            if inpainting_unet {
                return Err(Error::InvalidParameter {
                    name: "mask",
                    value: "none".to_string(),
                    expected: format!(
                        "a mask and an init image: this UNet takes {} input channels (an \
                         inpainting model: latents, mask, masked-image latents)",
                        self.unet_in_channels
                    ),
                });
            }
            return Ok(());
        };
        let refused = match &request.init_image {
            InitImage::Pixels(_) if request.denoising_start.is_some() => Some(
                "no denoising start: a refiner cannot continue an inpainting (the mask applies \
                 to a whole schedule)",
            ),
            InitImage::Pixels(_) => None,
            InitImage::None => Some("an init image to repaint: a mask applies to one"),
            InitImage::Latents(_) => Some(
                "an init image in pixels: a mask applies to a picture, not to another \
                 pipeline's latents",
            ),
        };
        if let Some(expected) = refused {
            return Err(Error::InvalidParameter {
                name: "mask",
                value: format!("of shape {:?}", mask.dims()),
                expected: expected.to_string(),
            });
        }
        Ok(())
    }
}

/// The noise of a batch whose image `i` draws from generator `i`: each row is what that image's
/// generator gives alone.
struct BatchNoise(Vec<TorchGenerator>);

impl NoiseSource for BatchNoise {
    fn randn(
        &mut self,
        shape: &candle_core::Shape,
        dtype: DType,
        device: &Device,
    ) -> sdrs_schedulers::Result<Tensor> {
        let dims = shape.dims();
        match dims.first() {
            Some(&rows) if rows == self.0.len() && rows > 1 => {
                let mut one = dims.to_vec();
                one[0] = 1;
                let rows = self
                    .0
                    .iter_mut()
                    .map(|generator| generator.randn(&one.as_slice().into(), dtype, device))
                    .collect::<sdrs_schedulers::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&rows, 0)?)
            }
            _ => match self.0.as_mut_slice() {
                [generator] => generator.randn(shape, dtype, device),
                _ => {
                    let mut expected = dims.to_vec();
                    if let Some(rows) = expected.first_mut() {
                        *rows = self.0.len();
                    }
                    Err(sdrs_schedulers::Error::NoiseShape {
                        expected,
                        found: dims.to_vec(),
                    })
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_sd15(limit: Option<u64>) -> StableDiffusion {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd15");
        let options =
            LoadOptions::new(Device::Cpu, DType::F32, None).with_memory_check(true, limit);
        StableDiffusion::load(&root, &options).unwrap()
    }

    #[test]
    fn a_request_beyond_the_memory_limit_is_refused_with_both_numbers_and_what_fits() {
        let mut pipeline = tiny_sd15(Some(1_000_000_000));
        let mut request = Request::new(&pipeline, "a cat", pipeline.scheduler_config().clone());
        request.width = 16384;
        request.height = 8192;
        let estimate = pipeline.estimate_peak_bytes(&request).unwrap().unwrap();
        assert_eq!(estimate.stage, MemoryStage::Unet);
        assert!(estimate.available_bytes.unwrap() <= 1_000_000_000);
        let message = pipeline.check_memory(&request).unwrap_err().to_string();
        for part in [
            "16384x8192",
            "the UNet's activations",
            "1.0 GB is available",
            "would fit",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        // What it says fits does, and the estimate grows with the area.
        let fits = message
            .split("at most about ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap();
        let (w, h) = fits.split_once('x').unwrap();
        request.width = w.parse().unwrap();
        request.height = h.parse().unwrap();
        assert!(request.width > request.height, "{fits}");
        pipeline.check_memory(&request).unwrap();
        // The native size fits; off, nothing is refused.
        let native = Request::new(&pipeline, "a cat", pipeline.scheduler_config().clone());
        pipeline.check_memory(&native).unwrap();
        request.width = 16384;
        request.height = 16384;
        pipeline.set_memory_check(false, None);
        pipeline.check_memory(&request).unwrap();
    }

    #[test]
    fn half_precision_prefers_the_fp16_files_unless_a_variant_is_given() {
        let variant = |dtype, given: Option<&str>| {
            LoadOptions::new(Device::Cpu, dtype, given.map(str::to_string)).variant
        };
        assert_eq!(variant(DType::F32, None), None);
        assert_eq!(variant(DType::BF16, None).as_deref(), Some("fp16"));
        assert_eq!(variant(DType::F16, None).as_deref(), Some("fp16"));
        assert_eq!(variant(DType::F32, Some("ema")).as_deref(), Some("ema"));
        assert_eq!(variant(DType::BF16, Some("ema")).as_deref(), Some("ema"));
    }

    #[test]
    fn the_native_size_is_the_sample_size_in_pixels() {
        let files = ModelFiles::Builtin(crate::BuiltinModel::SdxlBase);
        let native = NativeSize::of(&files).unwrap();
        assert_eq!(
            native,
            NativeSize {
                pixels: 1024,
                vae_scale_factor: 8
            }
        );
        let mut unet = files.unet_config().unwrap();
        unet.sample_size = None;
        let native = NativeSize::from_configs(&unet, &files.vae_config().unwrap());
        assert_eq!(native.pixels, 512, "diffusers' 64-latent fallback");
    }
}
