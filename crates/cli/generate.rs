//! `sdrs generate`: text to image. Flag names follow stable-diffusion.cpp's `sd-cli`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use sdrs_kernels::attention::AttentionMode;
use sdrs_pipeline::stable_diffusion::tiny_autoencoder_dtype;
use sdrs_pipeline::{InitImage, LoadOptions, ModelFamily, Request, StableDiffusion};
use sdrs_schedulers::{Sampler, SigmaSchedule};
use sdrs_taesd::AutoencoderTiny;

use crate::input::{read_init_image, InitPicture};
use crate::output::{write_png_atomically, Parameters, PendingImage};
use crate::progress::step_bar;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model: a short name (sd15, sdxl, sdxl-refiner), a Hugging Face repo id `org/name`
    /// (optionally `org/name@revision`; downloaded into the Hugging Face cache on first use), a
    /// folder in the diffusers layout, or a single original-layout `.safetensors` checkpoint.
    #[arg(short = 'm', long = "model", default_value = "sd15")]
    pub model: String,

    /// For a single-file checkpoint: a diffusers folder of the same family whose configs,
    /// tokenizers and scheduler are used (its weights are not read). Without it, SD1.5 and SDXL
    /// checkpoints of the published shapes use built-in configs; SD2.x ones need it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Weight variant to read and download where the model has it (`fp16`:
    /// `*.fp16.safetensors`); the plain files fill any gap. Default: fp16 when computing in f16
    /// or bf16, else the plain files.
    #[arg(long, value_parser = crate::hub::parse_variant)]
    pub variant: Option<String>,

    /// What to draw.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: String,

    /// What to steer away from.
    #[arg(short = 'n', long = "negative-prompt")]
    pub negative_prompt: Option<String>,

    /// SDXL: the prompt for the second text encoder (default: the prompt).
    #[arg(long = "prompt-2")]
    pub prompt_2: Option<String>,

    /// SDXL: the negative prompt for the second text encoder (default: the negative prompt).
    #[arg(long = "negative-prompt-2")]
    pub negative_prompt_2: Option<String>,

    /// Image-to-image: the starting picture (PNG); resized to the output size when they differ.
    #[arg(short = 'i', long = "init-img")]
    pub init_img: Option<PathBuf>,

    /// Image-to-image: how far to move away from the starting picture, in (0, 1].
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,

    /// SDXL: a refiner model that finishes the base model's last steps (named as `-m` is, e.g.
    /// `sdxl-refiner`).
    #[arg(long)]
    pub refiner: Option<String>,

    /// SDXL: the fraction of the steps the base model runs before the refiner takes over.
    #[arg(long = "refiner-start", default_value_t = 0.8)]
    pub refiner_start: f64,

    /// SDXL refiner: the aesthetic score to condition on.
    #[arg(long = "aesthetic-score", default_value_t = 6.0)]
    pub aesthetic_score: f64,

    /// SDXL refiner: the aesthetic score of the negative branch.
    #[arg(long = "negative-aesthetic-score", default_value_t = 2.5)]
    pub negative_aesthetic_score: f64,

    /// SDXL micro-conditioning: the original size `WxH` (default: the output size).
    #[arg(long = "original-size", value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,

    /// SDXL micro-conditioning: the target size `WxH` (default: the output size).
    #[arg(long = "target-size", value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,

    /// SDXL micro-conditioning: the crop's top-left corner `TOP,LEFT` (default: 0,0).
    #[arg(long = "crop-coords", value_parser = parse_coords, default_value = "0,0")]
    pub crop_coords: (usize, usize),

    /// Number of denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 turns guidance off (default: 7.5 for SD1.x/2.x, 5 for SDXL).
    #[arg(long = "cfg-scale")]
    pub cfg_scale: Option<f64>,

    /// Image width in pixels, a multiple of 8 (default: the size the model was trained at).
    #[arg(short = 'W', long)]
    pub width: Option<usize>,

    /// Image height in pixels, a multiple of 8 (default: the size the model was trained at).
    #[arg(short = 'H', long)]
    pub height: Option<usize>,

    /// Seed of the torch-compatible generator; -1 (the default) picks a random one, printed and stored.
    #[arg(short = 's', long, default_value_t = -1, allow_negative_numbers = true)]
    pub seed: i64,

    /// Sampler, by stable-diffusion.cpp name (`euler`, `dpm++2m`, `ddim`, ...) or AUTOMATIC1111 label (`DPM++ 2M Karras`).
    #[arg(long = "sampling-method", default_value = "dpm++2m")]
    pub sampling_method: String,

    /// Sigma schedule: discrete, karras or exponential (default: karras for DPM++ 2M, else the sampler's own).
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Use CLIP's N-th layer from the end (1 = last, 2 = penultimate, as in AUTOMATIC1111).
    #[arg(long = "clip-skip")]
    pub clip_skip: Option<usize>,

    /// Decode with a tiny autoencoder (TAESD, TAESDXL, ...): `taesd`, `taesdxl`, a Hugging Face
    /// repo id, or a folder in the diffusers layout or with the original
    /// `*_encoder/_decoder.safetensors` files.
    #[arg(long)]
    pub vae: Option<String>,

    /// Write a preview of the image being sampled to this PNG (replaced atomically), decoded with
    /// `--vae` when given, else with a cheap linear projection of the latents.
    #[arg(long)]
    pub preview: Option<PathBuf>,

    /// With `--preview`: update it every N steps.
    #[arg(long = "preview-every", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub preview_every: u64,

    /// Output PNG; the generation parameters go into its `parameters` text chunk.
    #[arg(short = 'o', long, default_value = "output.png")]
    pub output: PathBuf,

    /// Device: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: auto (bf16 on CPUs with native bf16 dot products, f32 on other CPUs, f16 on
    /// GPUs), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// Attention kernel: auto, naive, sliced, sliced:N (N batch x head slices at a time) or flash.
    #[arg(long, default_value = "auto", value_parser = parse_attention)]
    pub attention: AttentionMode,

    /// Worker threads for the CPU kernels (default: the number of physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The sampler and schedule the flags ask for: an explicit `--scheduler` wins over a schedule implied
/// by the sampler label (`DPM++ 2M Karras`), which wins over the default (Karras for DPM++ 2M).
pub fn resolve_sampler(method: &str, scheduler: Option<&str>) -> Result<(Sampler, SigmaSchedule)> {
    let (sampler, implied) = Sampler::from_name(method)?;
    let schedule = match scheduler {
        Some(name) => SigmaSchedule::from_name(name)?,
        None => implied.unwrap_or(if sampler == Sampler::Dpmpp2m {
            SigmaSchedule::Karras
        } else {
            SigmaSchedule::Discrete
        }),
    };
    Ok((sampler, schedule))
}

/// `1024x768` -> (1024, 768) as (width, height).
fn parse_size(text: &str) -> std::result::Result<(usize, usize), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected WIDTHxHEIGHT such as 1024x1024, got {text:?}"))?;
    let number = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("expected WIDTHxHEIGHT such as 1024x1024, got {text:?}"))
    };
    Ok((number(w)?, number(h)?))
}

/// `0,64` -> (0, 64) as (top, left).
fn parse_coords(text: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = text
        .split_once(',')
        .ok_or_else(|| format!("expected TOP,LEFT such as 0,0, got {text:?}"))?;
    let number = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("expected TOP,LEFT such as 0,0, got {text:?}"))
    };
    Ok((number(a)?, number(b)?))
}

/// `-1` (or any negative value) asks for a random seed.
fn resolve_seed(seed: i64) -> u64 {
    if seed >= 0 {
        return seed as u64;
    }
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    // AUTOMATIC1111 draws seeds below 2^32; staying in that range keeps them easy to type.
    hasher.finish() & 0xFFFF_FFFF
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let (sampler, schedule) = resolve_sampler(&args.sampling_method, args.scheduler.as_deref())?;
    if args.steps == 0 {
        bail!("--steps must be at least 1, got 0");
    }
    for (flag, value) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = value {
            if v == 0 || v % 8 != 0 {
                bail!("{flag} must be a positive multiple of 8, got {v}");
            }
        }
    }
    if !(args.strength > 0.0 && args.strength <= 1.0) {
        bail!("--strength must be in (0, 1], got {}", args.strength);
    }
    if !(args.refiner_start > 0.0 && args.refiner_start < 1.0) {
        bail!(
            "--refiner-start must be strictly between 0 and 1, got {}",
            args.refiner_start
        );
    }
    let kernels = crate::system::kernel_options(args.attention)?;
    let pending = PendingImage::reserve(&args.output)?;
    let device = sdrs_pipeline::parse_device(&args.device)?;
    let dtype = sdrs_pipeline::resolve_dtype(&args.dtype, &device, &kernels)?;
    // The same variant is downloaded and read (see `LoadOptions::new`).
    let options = LoadOptions::new(device, dtype, args.variant.clone())
        .with_kernels(kernels)
        .with_threads(args.threads);
    let seed = resolve_seed(args.seed);
    eprintln!("seed {seed}");

    if let Some(preview) = &args.preview {
        // Fail before any work if the preview cannot be written either.
        drop(PendingImage::reserve(preview)?);
    }
    let mut pipeline = load_model(&args.model, args.config.as_deref(), &options)?;
    if let Some(vae_ref) = &args.vae {
        let vae = crate::hub::local_model(vae_ref, options.variant.as_deref())
            .with_context(|| format!("--vae {vae_ref}"))?;
        if !vae.is_dir() {
            bail!(
                "--vae {}: not a folder (give a tiny autoencoder such as taesd, taesdxl or a local copy of madebyollin/taesd)",
                vae.display()
            );
        }
        let dtype = tiny_autoencoder_dtype(options.dtype, &options.device);
        let tiny = AutoencoderTiny::from_dir(&vae, dtype, &options.device, options.kernels)
            .with_context(|| format!("cannot load the tiny autoencoder at {}", vae.display()))?;
        pipeline.set_tiny_autoencoder(tiny)?;
    }
    let init = match &args.init_img {
        Some(path) => Some(read_init_image(path)?),
        None => None,
    };
    let (width, height) = output_size(&pipeline, &args, init.as_ref())?;
    let mut request = Request::new(
        &pipeline,
        &args.prompt,
        sampler.config(pipeline.scheduler_config(), schedule)?,
    );
    request.prompt_2 = args.prompt_2.clone();
    request.negative_prompt = args.negative_prompt.clone();
    request.negative_prompt_2 = args.negative_prompt_2.clone();
    request.width = width;
    request.height = height;
    request.steps = args.steps;
    if let Some(scale) = args.cfg_scale {
        request.guidance_scale = scale;
    }
    request.clip_skip = args.clip_skip;
    request.seed = Some(seed);
    request.original_size = args.original_size.map(|(w, h)| (h, w));
    request.target_size = args.target_size.map(|(w, h)| (h, w));
    request.crops_coords_top_left = args.crop_coords;
    request.aesthetic_score = args.aesthetic_score;
    request.negative_aesthetic_score = args.negative_aesthetic_score;
    let mut extra = Vec::new();
    if let Some(image) = init {
        let image = image.resized(width, height)?;
        request.init_image = InitImage::Pixels(image.to_tensor(pipeline.device())?);
        request.strength = args.strength;
        extra.push(("Denoising strength".to_string(), args.strength.to_string()));
    }

    let bar = step_bar(0);
    let started = std::time::Instant::now();
    let mut steps_done = 0usize;
    let mut preview_failed = false;
    let mut on_step = |p: &sdrs_pipeline::StepProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        steps_done += 1;
        if let Some(path) = &args.preview {
            let due = p.step as u64 % args.preview_every == 0 || p.step == p.total;
            if due && !preview_failed {
                let written = p
                    .preview()
                    .map_err(anyhow::Error::from)
                    .and_then(|image| write_png_atomically(path, &image));
                if let Err(error) = written {
                    // A preview is a convenience: say why once and carry on sampling.
                    bar.suspend(|| eprintln!("warning: no preview: {error:#}"));
                    preview_failed = true;
                }
            }
        }
    };
    let image = match &args.refiner {
        None => pipeline.generate_once(&request, &mut on_step)?,
        Some(refiner_ref) => {
            if pipeline.family() != ModelFamily::SdxlBase {
                bail!(
                    "--refiner needs an SDXL base model, but {} is {}",
                    args.model,
                    pipeline.family().name()
                );
            }
            // Checked (and downloaded) before the base model runs, loaded after it is freed, so
            // that only one of the two models is in memory at a time.
            let refiner_path = crate::hub::local_model(refiner_ref, options.variant.as_deref())
                .with_context(|| format!("--refiner {refiner_ref}"))?;
            let family = ModelFamily::detect_model(&refiner_path)
                .with_context(|| format!("--refiner {refiner_ref}"))?;
            if family != ModelFamily::SdxlRefiner {
                bail!(
                    "--refiner {} is {}, not an SDXL refiner",
                    refiner_ref,
                    family.name()
                );
            }
            request.denoising_end = Some(args.refiner_start);
            let latents = pipeline.denoise_once(&request, &mut on_step)?;
            let refiner = open_model(&refiner_path, None, &options)?;
            let mut refine = request.clone();
            refine.scheduler = sampler.config(refiner.scheduler_config(), schedule)?;
            refine.init_image = InitImage::Latents(latents);
            refine.latents = None;
            refine.denoising_end = None;
            refine.denoising_start = Some(args.refiner_start);
            extra.push(("Refiner".to_string(), model_name(refiner_ref)));
            extra.push((
                "Refiner switch at".to_string(),
                args.refiner_start.to_string(),
            ));
            refiner.generate_once(&refine, &mut on_step)?
        }
    };
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "generated in {elapsed:.1}s: {steps_done} denoising steps ({} including text encoding and decoding)",
        crate::progress::speed_text(steps_done as f64 / elapsed.max(1e-9))
    );

    let parameters = Parameters {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt.unwrap_or_default(),
        steps: args.steps,
        sampler: sampler.a1111_label().to_string(),
        schedule_type: schedule.a1111_label().map(str::to_string),
        cfg_scale: request.guidance_scale,
        seed,
        width,
        height,
        model: model_name(&args.model),
        clip_skip: args.clip_skip,
        extra,
    };
    let path = pending.write(&image, &parameters)?;
    eprintln!("saved {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// A model reference (see `--model`) loaded: a diffusers folder (downloaded from Hugging Face
/// first for a repo id, with the weight variant of `options` where the repo has it), or a
/// single `.safetensors` checkpoint with the configs of `config`, else the built-in ones.
fn load_model(
    reference: &str,
    config: Option<&Path>,
    options: &LoadOptions,
) -> Result<StableDiffusion> {
    let model = crate::hub::local_model(reference, options.variant.as_deref())?;
    open_model(&model, config, options)
}

/// [`load_model`] for a model already on disk.
fn open_model(
    model: &Path,
    config: Option<&Path>,
    options: &LoadOptions,
) -> Result<StableDiffusion> {
    let loaded = if model.is_file() {
        match config {
            Some(config) => StableDiffusion::load_single_file(model, config, options),
            None => StableDiffusion::load_single_file_builtin(model, options),
        }
    } else if model.is_dir() {
        StableDiffusion::load(model, options)
    } else {
        bail!(
            "model {} is neither a diffusers folder (with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) nor a .safetensors file",
            model.display()
        );
    };
    loaded.with_context(|| format!("cannot load the model at {}", model.display()))
}

/// The output size: the flags, else the init image's size (rounded down to a multiple of 8, as
/// diffusers does), else the model's native size.
fn output_size(
    pipeline: &StableDiffusion,
    args: &GenerateArgs,
    init: Option<&InitPicture>,
) -> Result<(usize, usize)> {
    let native = pipeline.default_size();
    let factor = pipeline.vae_scale_factor();
    let (default_w, default_h) = match init {
        Some(image) => (
            image.width - image.width % factor,
            image.height - image.height % factor,
        ),
        None => (native, native),
    };
    let size = (
        args.width.unwrap_or(default_w),
        args.height.unwrap_or(default_h),
    );
    if size.0 == 0 || size.1 == 0 {
        bail!("the init image is smaller than {factor}x{factor} pixels");
    }
    if let Some(image) = init {
        if (image.width, image.height) != size {
            eprintln!(
                "resizing the init image from {}x{} to {}x{}",
                image.width, image.height, size.0, size.1
            );
        }
    }
    Ok(size)
}

/// The model's name as AUTOMATIC1111 shows it: the folder's (or file's) name without extension;
/// for a repo id, the repo's name without the revision.
fn model_name(reference: &str) -> String {
    let path = Path::new(reference);
    let path = if path.exists() {
        path
    } else {
        Path::new(reference.split('@').next().unwrap_or(reference))
    };
    let is_weights_file = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("ckpt"));
    let name = if is_weights_file {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// clap's parser for `--attention`.
pub fn parse_attention(value: &str) -> Result<AttentionMode, String> {
    value.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(extra: &[&str]) -> GenerateArgs {
        let mut argv = vec!["x", "-m", "model", "-p", "a cat"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn defaults_follow_the_sd15_defaults() {
        let args = parse(&[]);
        assert_eq!(args.steps, 25);
        assert_eq!(args.cfg_scale, None);
        assert_eq!(args.seed, -1);
        assert_eq!(args.width, None);
        assert_eq!(args.negative_prompt, None);
        let (sampler, schedule) =
            resolve_sampler(&args.sampling_method, args.scheduler.as_deref()).unwrap();
        assert_eq!(sampler, Sampler::Dpmpp2m);
        assert_eq!(schedule, SigmaSchedule::Karras);
    }

    #[test]
    fn sd_cli_short_flags_parse() {
        let args = parse(&[
            "-n", "blurry", "-W", "768", "-H", "512", "-s", "42", "-o", "o.png", "--steps", "4",
        ]);
        assert_eq!(args.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!((args.width, args.height), (Some(768), Some(512)));
        assert_eq!(args.seed, 42);
        assert_eq!(args.output, PathBuf::from("o.png"));
        assert_eq!(args.steps, 4);
    }

    #[test]
    fn attention_and_dtype_default_to_auto_and_bad_modes_are_refused() {
        let args = parse(&[]);
        assert_eq!(args.attention, AttentionMode::Auto);
        assert_eq!(args.dtype, "auto");
        let args = parse(&["--attention", "sliced:2"]);
        assert_eq!(args.attention, AttentionMode::Sliced(Some(2)));
        let argv = ["x", "-m", "m", "-p", "p", "--attention", "fastest"];
        let error = Wrapper::try_parse_from(argv).err().unwrap().to_string();
        assert!(error.contains("sliced:N"), "{error}");
    }

    #[test]
    fn threads_default_to_the_physical_cores_and_parse() {
        assert_eq!(parse(&[]).threads, None);
        assert_eq!(parse(&["--threads", "3"]).threads, Some(3));
        let argv = ["x", "-m", "m", "-p", "p", "--threads", "many"];
        assert!(Wrapper::try_parse_from(argv).is_err());
    }

    #[test]
    fn explicit_scheduler_overrides_the_label_and_default() {
        let (s, k) = resolve_sampler("euler", None).unwrap();
        assert_eq!((s, k), (Sampler::Euler, SigmaSchedule::Discrete));
        let (_, k) = resolve_sampler("DPM++ 2M Karras", None).unwrap();
        assert_eq!(k, SigmaSchedule::Karras);
        let (_, k) = resolve_sampler("dpm++2m", Some("discrete")).unwrap();
        assert_eq!(k, SigmaSchedule::Discrete);
        assert!(resolve_sampler("euler", Some("sideways")).is_err());
    }

    #[test]
    fn unknown_sampler_lists_the_accepted_names() {
        let err = resolve_sampler("warp-drive", None).unwrap_err().to_string();
        assert!(err.contains("warp-drive") && err.contains("euler"), "{err}");
    }

    #[test]
    fn sizes_and_crop_coordinates_parse() {
        assert_eq!(parse_size("1024x768"), Ok((1024, 768)));
        assert_eq!(parse_size("64X32"), Ok((64, 32)));
        assert!(parse_size("1024").unwrap_err().contains("1024"));
        assert_eq!(parse_coords("0,64"), Ok((0, 64)));
        assert!(parse_coords("a,b").is_err());
        let args = parse(&["--original-size", "2048x1536", "--crop-coords", "8,16"]);
        assert_eq!(args.original_size, Some((2048, 1536)));
        assert_eq!(args.crop_coords, (8, 16));
        assert_eq!(parse(&[]).crop_coords, (0, 0));
    }

    #[test]
    fn preview_flags_parse_and_zero_is_rejected() {
        let args = parse(&[
            "--preview",
            "p.png",
            "--preview-every",
            "5",
            "--vae",
            "taesd",
        ]);
        assert_eq!(args.preview, Some(PathBuf::from("p.png")));
        assert_eq!(args.preview_every, 5);
        assert_eq!(args.vae.as_deref(), Some("taesd"));
        assert_eq!(parse(&[]).preview_every, 1);
        let argv = ["x", "-m", "m", "-p", "a", "--preview-every", "0"];
        assert!(Wrapper::try_parse_from(argv).is_err());
    }

    #[test]
    fn img2img_and_refiner_flags_have_diffusers_defaults() {
        let args = parse(&[]);
        assert_eq!(args.strength, 0.75);
        assert_eq!(args.refiner_start, 0.8);
        assert_eq!(args.aesthetic_score, 6.0);
        assert_eq!(args.negative_aesthetic_score, 2.5);
        let args = parse(&["-i", "in.png", "--strength", "0.5", "--refiner", "r"]);
        assert_eq!(args.init_img, Some(PathBuf::from("in.png")));
        assert_eq!(args.strength, 0.5);
        assert_eq!(args.refiner.as_deref(), Some("r"));
    }

    #[test]
    fn negative_seed_is_random_and_below_2_pow_32() {
        assert_eq!(resolve_seed(7), 7);
        let a = resolve_seed(-1);
        assert!(a <= u32::MAX as u64);
    }

    #[test]
    fn model_name_is_the_folder_or_file_stem() {
        assert_eq!(model_name("/m/tiny-sd15"), "tiny-sd15");
        assert_eq!(model_name("/m/rv.safetensors"), "rv");
        assert_eq!(model_name("/m/sd-v1.5"), "sd-v1.5");
        assert_eq!(model_name("org/my-model@v2"), "my-model");
        assert_eq!(model_name("sd15"), "sd15");
    }

    #[test]
    fn model_defaults_to_sd15_and_variant_is_optional() {
        let args = Wrapper::try_parse_from(["x", "-p", "a cat"]).unwrap().args;
        assert_eq!(args.model, "sd15");
        assert_eq!(args.variant, None);
        assert_eq!(args.config, None);
        let args = parse(&["--variant", "fp16"]);
        assert_eq!(args.variant.as_deref(), Some("fp16"));
        let argv = ["x", "-p", "p", "--variant", "fp16/../x"];
        assert!(Wrapper::try_parse_from(argv).is_err());
        let args = parse(&["--config", "cfg"]);
        assert_eq!(args.config, Some(PathBuf::from("cfg")));
    }
}
