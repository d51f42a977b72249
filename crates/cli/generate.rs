//! `sdrs generate`: text to image. Flag names follow stable-diffusion.cpp's `sd-cli`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sdrs_kernels::attention::AttentionMode;
use sdrs_kernels::KernelOptions;
use sdrs_pipeline::loading::quantize::Recipe;
use sdrs_pipeline::stable_diffusion::tiny_autoencoder_dtype;
use sdrs_pipeline::{
    DeviceChoice, DtypeChoice, InitImage, LoadOptions, PromptSyntax, Refiner, Request,
    StableDiffusion, StepProgress,
};
use sdrs_quant::QuantSpec;
use sdrs_schedulers::{Sampler, SigmaSchedule};
use sdrs_taesd::AutoencoderTiny;

use crate::input::{read_init_image, read_mask, InitPicture, MaskPicture};
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

    /// Image-to-image and inpainting: how far to move away from the starting picture, in (0, 1]
    /// (default 0.75). Only with `-i`: without an init image it is an error, not ignored.
    #[arg(long)]
    pub strength: Option<f64>,

    /// Inpainting, with `-i`: a mask picture (PNG, JPEG or WebP, made grayscale); white is
    /// repainted, black kept (binarised at 50% gray). Resized to the output size when they
    /// differ. Inpainting models (a 9-channel UNet) need it; other models blend their latents.
    #[arg(long)]
    pub mask: Option<PathBuf>,

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
    /// With several images, image k (counted over all batches) uses seed + k, as AUTOMATIC1111 does.
    /// Other negative values are refused.
    #[arg(short = 's', long, default_value_t = -1, allow_negative_numbers = true, value_parser = parse_seed)]
    pub seed: i64,

    /// Number of batches to generate one after the other (AUTOMATIC1111's batch count). Images
    /// after the first are saved beside `-o` with their index: out.png, out-1.png, out-2.png, ...
    #[arg(short = 'b', long = "batch-count", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_count: u64,

    /// Images denoised together in one UNet batch (faster per image where memory allows).
    #[arg(long = "batch-size", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=sdrs_pipeline::stable_diffusion::MAX_BATCH_SIZE as u64))]
    pub batch_size: u64,

    /// Sampler, by stable-diffusion.cpp name (`euler`, `dpm++2m`, `ddim`, ...) or AUTOMATIC1111 label (`DPM++ 2M Karras`).
    #[arg(long = "sampling-method", default_value = "dpm++2m", value_parser = parse_sampler)]
    pub sampling_method: SamplerName,

    /// Sigma schedule: discrete, karras or exponential (default: karras for DPM++ 2M, else the sampler's own).
    #[arg(long, value_parser = parse_schedule)]
    pub scheduler: Option<SigmaSchedule>,

    /// Use CLIP's N-th layer from the end (1 = last, 2 = penultimate, as in AUTOMATIC1111).
    /// 0 is refused (AUTOMATIC1111 reads it as 1; give 1).
    #[arg(long = "clip-skip", value_parser = parse_clip_skip)]
    pub clip_skip: Option<usize>,

    /// How prompts are read: `a1111` (AUTOMATIC1111's `(word)`, `[word]`, `(word:1.3)` weights,
    /// `\(` escapes, `BREAK`, and prompts of any length in 75-token chunks) or `plain`
    /// (diffusers': the text as it is, cut at 77 tokens, with a warning when it is cut).
    #[arg(long = "prompt-syntax", default_value = "a1111", value_parser = parse_prompt_syntax)]
    pub prompt_syntax: PromptSyntax,

    /// Decode with a tiny autoencoder (TAESD, TAESDXL, ...): `taesd`, `taesdxl`, a Hugging Face
    /// repo id, or a folder in the diffusers layout or with the original
    /// `*_encoder/_decoder.safetensors` files.
    #[arg(long)]
    pub vae: Option<String>,

    /// Write a preview of the image being sampled to this PNG (replaced atomically), decoded with
    /// `--vae` when given, else with a cheap linear projection of the latents (of a batch: its
    /// first image).
    #[arg(long)]
    pub preview: Option<PathBuf>,

    /// With `--preview`: update it every N steps.
    #[arg(long = "preview-every", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub preview_every: u64,

    /// Output PNG; the generation parameters go into its `parameters` text chunk.
    #[arg(short = 'o', long, default_value = "output.png")]
    pub output: PathBuf,

    /// Device: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,

    /// Compute dtype: auto (bf16 on CPUs whose bf16 dot products measure faster than f32, f32
    /// on other CPUs, f16 on GPUs), f32, f16 or bf16.
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: DtypeChoice,

    /// Attention kernel: auto, naive, sliced, sliced:N (N batch x head slices at a time) or flash.
    #[arg(long, default_value = "auto", value_parser = parse_attention)]
    pub attention: AttentionMode,

    /// Worker threads for the CPU kernels (default: the number of physical cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Quantize the UNet's and text encoders' weights as they load, and keep them compressed:
    /// kmeans<bits> (1, 2, 3, 4, 6, 8; `kmeans4:grouped16` for a table per 16 output channels),
    /// int8, int8:zp, int4:block<B>, or a GGUF type (q8_0, q5_1, q5_0, q4_1, q4_0, q6_k ... q2_k).
    #[arg(long, value_parser = parse_quantize)]
    pub quantize: Option<QuantSpec>,

    /// A mixed-bit recipe (`sdrs quantize --analyze` writes one): per-layer palettization bits,
    /// applied at load; its method is the `--quantize` default.
    #[arg(long)]
    pub recipe: Option<PathBuf>,

    /// A folder of textual-inversion embeddings (`.safetensors`, `.pt`, `.bin`, sub-folders
    /// too), each used in prompts by its file stem, as AUTOMATIC1111 loads them; the image's
    /// parameters record the `TI hashes` of those the prompts use. Default: an `embeddings`
    /// folder beside a local model (next to its folder or checkpoint) when there is one.
    #[arg(long)]
    pub embedding_dir: Option<PathBuf>,

    /// Write a Chrome trace of the run (text encoding, each step, the decode...) to this JSON
    /// file, for chrome://tracing or Perfetto (default: the file `SDRS_TRACE` names, else none).
    #[arg(long)]
    pub trace: Option<PathBuf>,

    #[command(flatten)]
    pub vae_tiling: crate::vae_tiling::VaeTilingArgs,

    /// Run even when the estimated peak memory (the UNet's activations, the VAE's untiled pass,
    /// the images) exceeds the memory available. By default such a request is refused before it
    /// starts, with both numbers and the largest size that would fit; with swap, or an estimate
    /// that is too cautious for a model, this runs it anyway.
    #[arg(long)]
    pub no_memory_check: bool,

    /// The most memory a run may take, e.g. `8G`, `512M` or a number of bytes (default: what
    /// the system reports available): a larger request is refused before it starts.
    #[arg(long, value_name = "SIZE", value_parser = crate::system::parse_bytes)]
    pub memory_limit: Option<u64>,

    /// Merge a LoRA into the UNet and text encoders: `file.safetensors` or
    /// `file.safetensors:WEIGHT` (default weight 1). Repeatable. kohya/A1111 (LoCon included),
    /// diffusers/PEFT, LyCORIS LoHa and LoKr files; the prompt's `<lora:name:weight>` tags add
    /// more from --lora-model-dir.
    #[arg(long = "lora", value_parser = crate::lora::parse_lora)]
    pub lora: Vec<sdrs_pipeline::LoraFile>,

    /// Where the prompt's `<lora:name>` / `<lora:name:weight>` tags are looked up
    /// (`name.safetensors`). Default: a `loras` folder beside the model (for a local model),
    /// else `./loras`.
    #[arg(long = "lora-model-dir")]
    pub lora_model_dir: Option<PathBuf>,

    /// Merge the modules of a LoRA that match a layer and ignore the rest, instead of refusing
    /// a LoRA with modules this model does not have.
    #[arg(long = "lora-ignore-unmatched")]
    pub lora_ignore_unmatched: bool,

    /// What runs the models: candle (ours, on --device) or coreml (macOS/iOS: --model is an
    /// Apple Core ML Stable Diffusion resources folder, at the size it was compiled for).
    #[arg(long, default_value = "candle", value_parser = crate::coreml_backend::parse_backend)]
    pub backend: crate::coreml_backend::Backend,

    /// With --backend coreml: the processors Core ML may use (all, cpu-and-ne, cpu-and-gpu,
    /// cpu-only).
    #[arg(long = "compute-units", default_value = "all", value_parser = crate::coreml_backend::parse_compute_units)]
    pub compute_units: crate::coreml_backend::ComputeUnits,
}

/// A sampler as `--sampling-method` names it, with the schedule its label implies
/// (`DPM++ 2M Karras`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerName {
    pub sampler: Sampler,
    pub implied_schedule: Option<SigmaSchedule>,
}

impl SamplerName {
    /// The schedule to sample with: an explicit `--scheduler` wins over the one the label implies,
    /// which wins over the default (Karras for DPM++ 2M, else the sampler's own).
    pub fn schedule(&self, explicit: Option<SigmaSchedule>) -> SigmaSchedule {
        explicit
            .or(self.implied_schedule)
            .unwrap_or(if self.sampler == Sampler::Dpmpp2m {
                SigmaSchedule::Karras
            } else {
                SigmaSchedule::Discrete
            })
    }
}

/// clap's parser for `--sampling-method`: an unknown name lists the accepted ones.
pub fn parse_sampler(name: &str) -> Result<SamplerName, String> {
    let (sampler, implied_schedule) = Sampler::from_name(name).map_err(|e| e.to_string())?;
    Ok(SamplerName {
        sampler,
        implied_schedule,
    })
}

/// clap's parser for `--prompt-syntax`.
pub fn parse_prompt_syntax(name: &str) -> Result<PromptSyntax, String> {
    PromptSyntax::from_name(name).map_err(|e| e.to_string())
}

/// clap's parser for `--scheduler`.
pub fn parse_schedule(name: &str) -> Result<SigmaSchedule, String> {
    SigmaSchedule::from_name(name).map_err(|e| e.to_string())
}

/// clap's parser for `--device`: the name only; the device is opened once the flags are read.
pub fn parse_device(name: &str) -> Result<DeviceChoice, String> {
    name.parse()
        .map_err(|e: sdrs_pipeline::Error| e.to_string())
}

/// clap's parser for `--dtype`.
/// `--quantize`: a [`QuantSpec`] (`kmeans6`, `kmeans4:grouped16`, `int8`, `q8_0`, ...).
pub fn parse_quantize(text: &str) -> Result<QuantSpec, String> {
    text.parse().map_err(|e: sdrs_quant::Error| e.to_string())
}

pub fn parse_dtype(name: &str) -> Result<DtypeChoice, String> {
    name.parse()
        .map_err(|e: sdrs_pipeline::Error| e.to_string())
}

/// `1024x768` -> (1024, 768) as (width, height).
/// The strength when none is given (diffusers' img2img default).
const DEFAULT_STRENGTH: f64 = 0.75;

/// `-s`: a seed, or -1 for a random one; other negative values are more likely typos than wishes.
fn parse_seed(text: &str) -> std::result::Result<i64, String> {
    let seed: i64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if seed < -1 {
        return Err(format!(
            "{seed}: a seed is from 0 to {}, or -1 for a random one",
            i64::MAX
        ));
    }
    Ok(seed)
}

/// `--clip-skip`: 1 or more.
fn parse_clip_skip(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err(
            "0: the layer from the end is counted from 1 (1 = the last layer, \
                       2 = the penultimate; AUTOMATIC1111 reads 0 as 1)"
                .to_string(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number of 1 or more")),
    }
}

/// Flag combinations that would otherwise be silently ignored.
fn check_flag_combinations(args: &GenerateArgs) -> Result<()> {
    if let (Some(strength), None) = (args.strength, &args.init_img) {
        bail!(
            "--strength {strength} needs an init image (-i/--init-img): without one there is \
             nothing to move away from"
        );
    }
    Ok(())
}

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

/// A seed for `-1`, drawn from the clock. AUTOMATIC1111 draws seeds below 2^32; staying in that
/// range keeps them easy to type.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish() & 0xFFFF_FFFF
}

/// What the flags ask for, resolved; the model's own defaults (size, guidance scale) come once it
/// is loaded. Values the library checks (the size, the steps, the strength) are passed on as given.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device: Device,
    pub dtype: DType,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    pub seed: u64,
    /// `-W`, `-H`; `None`: the init image's size, else the model's.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub kernels: KernelOptions,
    pub threads: Option<usize>,
    /// `--quantize` (or the recipe's method) and the recipe's per-layer bits.
    pub quantize: Option<QuantSpec>,
    pub recipe: Option<Arc<Recipe>>,
    /// `--vae-tiling`, `--vae-tile-size`, `--vae-tile-overlap`.
    pub vae_tiling: sdrs_pipeline::vae_tiling::VaeTilingOptions,
    /// Refuse requests that would not fit in memory (not `--no-memory-check`).
    pub memory_check: bool,
    /// `--memory-limit`.
    pub memory_limit: Option<u64>,
    /// The device line for the user (which device, and why `auto` did not take a GPU).
    pub device_message: String,
}

impl Settings {
    /// `kernels` are the command line's kernel options (`--attention`, `SDRS_CPU_FEATURES`);
    /// `random_seed` is the seed a negative `--seed` stands for.
    pub fn resolve(args: &GenerateArgs, kernels: KernelOptions, random_seed: u64) -> Result<Self> {
        let selection = args.device.select()?;
        let device = selection.device.clone();
        let (quantize, recipe) = crate::quantize::resolve(args.quantize, args.recipe.as_deref())?;
        Ok(Self {
            dtype: args.dtype.resolve(&device, &kernels),
            device_message: selection.message(),
            device,
            sampler: args.sampling_method.sampler,
            schedule: args.sampling_method.schedule(args.scheduler),
            seed: u64::try_from(args.seed).unwrap_or(random_seed),
            width: args.width,
            height: args.height,
            kernels,
            threads: args.threads,
            quantize,
            recipe,
            vae_tiling: args.vae_tiling.options(),
            memory_check: !args.no_memory_check,
            memory_limit: args.memory_limit,
        })
    }

    /// How the models are loaded; the same weight variant is downloaded and read (see
    /// [`LoadOptions::new`]).
    pub fn load_options(&self, variant: Option<String>) -> LoadOptions {
        LoadOptions::new(self.device.clone(), self.dtype, variant)
            .with_kernels(self.kernels)
            .with_threads(self.threads)
            .with_quantize(self.quantize, self.recipe.clone())
            .with_vae_tiling(self.vae_tiling.clone())
            .with_memory_check(self.memory_check, self.memory_limit)
    }
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    check_flag_combinations(&args)?;
    crate::coreml_backend::check(&args)?;
    let _trace = crate::trace::start(args.trace.as_deref())?;
    let kernels = crate::system::kernel_options(args.attention)?;
    let settings = Settings::resolve(&args, kernels, random_seed())?;
    let pending = reserve_outputs(&args, image_count(&args))?;
    crate::output::remove_temporary_files_on_signals();
    eprintln!("{}", settings.device_message);
    eprintln!("seed {}", settings.seed);
    let options = settings.load_options(args.variant.clone());
    // Checked (and downloaded) before the base model loads; loaded only once it is freed.
    let refiner = match &args.refiner {
        Some(reference) => Some(plan_refiner(reference, &args, &settings, &options)?),
        None => None,
    };
    let loras = crate::lora::resolve(
        &args.prompt,
        &args.lora,
        args.lora_model_dir.as_deref(),
        &args.model,
    )?;
    // The refiner (planned above) gets no LoRAs: they are made for the base model.
    let options = options.with_loras(loras.files.clone(), args.lora_ignore_unmatched);
    let mut pipeline = match args.backend {
        crate::coreml_backend::Backend::Candle => {
            load_model(&args.model, args.config.as_deref(), &options)?
        }
        crate::coreml_backend::Backend::CoreMl => crate::coreml_backend::load(&args, &options)?,
    };
    if let (Some(refiner), Some(reference)) = (&refiner, &args.refiner) {
        refiner
            .check_base(&pipeline)
            .with_context(|| format!("--refiner {reference}"))?;
    }
    if let Some(reference) = &args.vae {
        attach_tiny_autoencoder(&mut pipeline, reference, &options)?;
    }
    // Core ML's text encoders take no embeddings: no default folder is looked for.
    let embedding_dir =
        crate::embeddings::embedding_dir(args.embedding_dir.as_deref(), &args.model)
            .filter(|_| args.backend == crate::coreml_backend::Backend::Candle);
    if let Some(dir) = &embedding_dir {
        let report = crate::embeddings::load(&mut pipeline, dir)?;
        let names: Vec<&str> = report.loaded.iter().map(|e| e.token.as_str()).collect();
        eprintln!(
            "textual inversion embeddings loaded ({}): {}",
            names.len(),
            names.join(", ")
        );
        for (path, reason) in &report.skipped {
            eprintln!("skipped the embedding {}: {reason}", path.display());
        }
    }
    let init = match &args.init_img {
        Some(path) => Some(read_init_image(path)?),
        None => None,
    };
    let mask = match &args.mask {
        Some(path) => Some(read_mask(path)?),
        None => None,
    };
    let mut request = build_request(&pipeline, &args, &settings, init, mask)?;
    warn_cut_prompts(&pipeline, &args)?;
    request.prompt = loras.prompt.clone();
    let requests = batch_requests(&request, args.batch_count as usize)?;
    let others = [
        &args.negative_prompt,
        &args.prompt_2,
        &args.negative_prompt_2,
    ];
    let texts: Vec<&str> = std::iter::once(&args.prompt)
        .chain(others.into_iter().flatten())
        .map(String::as_str)
        .collect();
    let ti_hashes = crate::embeddings::ti_hashes(&pipeline.embeddings_used(&texts));

    let started = Instant::now();
    let (batches, steps) = sample(pipeline, &requests, refiner.as_ref(), &args)?;
    let elapsed = started.elapsed().as_secs_f64();
    let images = requests.len() * request.batch_size;
    let what = if images > 1 {
        format!("{images} images")
    } else {
        "the image".to_string()
    };
    eprintln!(
        "generated {what} in {elapsed:.1}s: {steps} denoising steps ({} including text encoding and decoding)",
        crate::progress::speed_text(steps as f64 / elapsed.max(1e-9))
    );
    let lora_hashes = loras.hashes()?;
    let mut pending = pending.into_iter();
    for (batch, (request, images)) in requests.iter().zip(&batches).enumerate() {
        for position in 0..request.batch_size {
            let index = batch * request.batch_size + position;
            let Some(output) = pending.next() else {
                bail!("no output was reserved for image {index}");
            };
            let mut parameters = parameters(&args, &settings, request);
            if let Some(hashes) = &lora_hashes {
                parameters
                    .extra
                    .push(("Lora hashes".to_string(), hashes.clone()));
            }
            parameters.extra.extend(ti_hashes.iter().cloned());
            parameters.seed = request.image_seed(position).unwrap_or(settings.seed);
            if request.batch_size > 1 {
                parameters
                    .extra
                    .push(("Batch size".to_string(), request.batch_size.to_string()));
                parameters
                    .extra
                    .push(("Batch pos".to_string(), position.to_string()));
            }
            let path = output.write(&images.get(position)?, &parameters)?;
            eprintln!("saved {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How many images the flags ask for: batch count x batch size.
fn image_count(args: &GenerateArgs) -> usize {
    (args.batch_count * args.batch_size) as usize
}

/// Where image `index` of a run goes: `-o` itself for the first, then `-o` with `-<index>` before
/// its extension (out.png, out-1.png, out-2.png, ...).
pub fn output_path(output: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match output.extension() {
        Some(extension) => format!("{stem}-{index}.{}", extension.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    output.with_file_name(name)
}

/// The request of each batch: batch `j` starts at seed `seed + j * batch size`.
fn batch_requests(request: &Request, count: usize) -> Result<Vec<Request>> {
    (0..count)
        .map(|batch| {
            let mut next = request.clone();
            next.seed = request
                .seed
                .and_then(|seed| seed.checked_add((batch * request.batch_size) as u64));
            if next.seed.is_none() && request.seed.is_some() {
                bail!(
                    "--seed {} is too large for {} images: every image's seed must fit in 64 bits",
                    request.seed.unwrap_or_default(),
                    count * request.batch_size
                );
            }
            Ok(next)
        })
        .collect()
}

/// Reserves every output (and checks the preview path can be written), so that none fails after
/// the work is done.
fn reserve_outputs(args: &GenerateArgs, images: usize) -> Result<Vec<PendingImage>> {
    let pending = (0..images)
        .map(|index| PendingImage::reserve(&output_path(&args.output, index)))
        .collect::<Result<Vec<_>>>()?;
    if let Some(preview) = &args.preview {
        drop(PendingImage::reserve(preview)?);
    }
    Ok(pending)
}

/// The `--refiner` model resolved (downloaded for a repo id) and checked to be a refiner, with
/// `--refiner-start` as its switch; it samples as the base does.
fn plan_refiner(
    reference: &str,
    args: &GenerateArgs,
    settings: &Settings,
    options: &LoadOptions,
) -> Result<Refiner> {
    let path = crate::hub::local_model(reference, options.variant.as_deref())
        .with_context(|| format!("--refiner {reference}"))?;
    let refiner = Refiner::new(&path, args.refiner_start, options)
        .map_err(|e| with_flag_or(e, || format!("--refiner {reference}")))?;
    Ok(refiner.with_sampler(settings.sampler, settings.schedule))
}

/// Decodes with the tiny autoencoder `--vae` names (downloaded for a repo id).
fn attach_tiny_autoencoder(
    pipeline: &mut StableDiffusion,
    reference: &str,
    options: &LoadOptions,
) -> Result<()> {
    let vae = crate::hub::local_model(reference, options.variant.as_deref())
        .with_context(|| format!("--vae {reference}"))?;
    if !vae.is_dir() {
        bail!(
            "--vae {}: not a folder (give a tiny autoencoder such as taesd, taesdxl or a local copy of madebyollin/taesd)",
            vae.display()
        );
    }
    let dtype = tiny_autoencoder_dtype(options.dtype, &options.device);
    let tiny = AutoencoderTiny::from_dir(&vae, dtype, &options.device, options.kernels)
        .with_context(|| format!("cannot load the tiny autoencoder at {}", vae.display()))?;
    pipeline
        .set_tiny_autoencoder(tiny)
        .with_context(|| format!("--vae {reference}"))
}

/// The library request for the flags, checked by the library before the init image is
/// prepared.
fn build_request(
    pipeline: &StableDiffusion,
    args: &GenerateArgs,
    settings: &Settings,
    init: Option<InitPicture>,
    mask: Option<MaskPicture>,
) -> Result<Request> {
    if mask.is_some() && init.is_none() {
        bail!("--mask needs the picture to repaint: give it with -i/--init-img");
    }
    if mask.is_some() && args.refiner.is_some() {
        bail!("--mask cannot be used with --refiner: a refiner cannot continue an inpainting");
    }
    let init_size = init.as_ref().map(|image| (image.width, image.height));
    let (width, height) = output_size(
        pipeline.default_size(),
        pipeline.vae_scale_factor(),
        (settings.width, settings.height),
        init_size,
    )?;
    let scheduler = settings
        .sampler
        .config(pipeline.scheduler_config(), settings.schedule)?;
    let mut request = Request::new(pipeline, &args.prompt, scheduler);
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
    request.prompt_syntax = args.prompt_syntax;
    request.seed = Some(settings.seed);
    request.batch_size = args.batch_size as usize;
    request.original_size = args.original_size.map(|(w, h)| (h, w));
    request.target_size = args.target_size.map(|(w, h)| (h, w));
    request.crops_coords_top_left = args.crop_coords;
    request.aesthetic_score = args.aesthetic_score;
    request.negative_aesthetic_score = args.negative_aesthetic_score;
    // A first Ctrl-C / SIGTERM stops the run at the end of a step (see `output`).
    request.cancel = Some(crate::output::stop_flag());
    // Checked even without an init image, so that a bad value is never silently ignored.
    request.strength = args.strength.unwrap_or(DEFAULT_STRENGTH);
    match pipeline.check_request(&request) {
        // The mask's rules are checked once the mask and the init image are set.
        Err(sdrs_pipeline::Error::InvalidParameter { name: "mask", .. }) => {}
        checked => checked.map_err(with_flag)?,
    }
    if let Some(mask) = mask {
        if (mask.width, mask.height) != (width, height) {
            eprintln!(
                "resizing the mask from {}x{} to {width}x{height}",
                mask.width, mask.height
            );
        }
        request.mask = Some(mask.resized(width, height)?.to_tensor(pipeline.device())?);
    }
    if let Some(image) = init {
        if init_size != Some((width, height)) {
            eprintln!(
                "resizing the init image from {}x{} to {width}x{height}",
                image.width, image.height
            );
        }
        let image = image.resized(width, height)?;
        request.init_image = InitImage::Pixels(image.to_tensor(pipeline.device())?);
    }
    pipeline.check_request(&request).map_err(with_flag)?;
    Ok(request)
}

/// With `--prompt-syntax plain`, prompts longer than the text encoder's context are cut as
/// diffusers cuts them: said once per prompt, since AUTOMATIC1111 users expect long prompts to
/// count (its syntax, the default, encodes them in chunks).
fn warn_cut_prompts(pipeline: &StableDiffusion, args: &GenerateArgs) -> Result<()> {
    if args.prompt_syntax != PromptSyntax::Plain {
        return Ok(());
    }
    let prompts = [
        ("prompt", Some(&args.prompt)),
        ("negative prompt", args.negative_prompt.as_ref()),
    ];
    for (what, text) in prompts {
        let Some(text) = text else { continue };
        let over = pipeline.tokens_over_context(text).map_err(with_flag)?;
        if over > 0 {
            eprintln!(
                "warning: the {what} is {over} tokens longer than the 75 the text encoder takes; \
                 with --prompt-syntax plain they are cut off (the default a1111 syntax keeps them)"
            );
        }
    }
    Ok(())
}

/// Runs the generations (base then refiner when there is one) with a progress bar, writing the
/// preview as it goes; returns each request's images and the number of denoising steps run.
fn sample(
    pipeline: StableDiffusion,
    requests: &[Request],
    refiner: Option<&Refiner>,
    args: &GenerateArgs,
) -> Result<(Vec<Tensor>, usize)> {
    let bar = step_bar(0);
    let mut steps = 0usize;
    let mut preview_failed = false;
    let mut on_step = |p: &StepProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        steps += 1;
        if let Some(path) = &args.preview {
            let due = (p.step as u64).is_multiple_of(args.preview_every) || p.step == p.total;
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
    let sampling = crate::output::Sampling::start();
    let images = match (refiner, requests) {
        // One run frees each model after its last use.
        (None, [request]) => pipeline
            .generate_once(request, &mut on_step)
            .map(|i| vec![i]),
        (Some(refiner), [request]) => refiner
            .generate_once(pipeline, request, &mut on_step)
            .map(|i| vec![i]),
        (None, _) => {
            // One model for every batch, kept loaded between them.
            let mut images = Vec::with_capacity(requests.len());
            for request in requests {
                images.push(
                    pipeline
                        .generate(request, &mut on_step)
                        .map_err(with_flag)?,
                );
            }
            Ok(images)
        }
        (Some(refiner), _) => refiner.generate_all_once(pipeline, requests, &mut on_step),
    }
    .map_err(with_flag)?;
    drop(sampling);
    // A signal after the last step check (during the decode): stopped all the same, unsaved.
    if crate::output::stop_requested() {
        return Err(sdrs_pipeline::Error::Cancelled.into());
    }
    bar.finish_and_clear();
    Ok((images, steps))
}

/// The PNG's `parameters`, as AUTOMATIC1111 records them.
fn parameters(args: &GenerateArgs, settings: &Settings, request: &Request) -> Parameters {
    let mut extra = Vec::new();
    if args.init_img.is_some() {
        extra.push((
            "Denoising strength".to_string(),
            args.strength.unwrap_or(DEFAULT_STRENGTH).to_string(),
        ));
    }
    if let Some(spec) = settings.quantize {
        let recipe = if settings.recipe.is_some() {
            " recipe"
        } else {
            ""
        };
        extra.push(("Quantization".to_string(), format!("{spec}{recipe}")));
    }
    if args.prompt_syntax != PromptSyntax::default() {
        // Not an AUTOMATIC1111 field: says the prompt above is not to be read in its syntax.
        let syntax = args.prompt_syntax.name().to_string();
        extra.push(("Prompt syntax".to_string(), syntax));
    }
    if let Some(refiner) = &args.refiner {
        extra.push(("Refiner".to_string(), model_name(refiner)));
        extra.push((
            "Refiner switch at".to_string(),
            args.refiner_start.to_string(),
        ));
    }
    extra.extend(crate::coreml_backend::parameters(args));
    Parameters {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone().unwrap_or_default(),
        steps: args.steps,
        sampler: settings.sampler.a1111_label().to_string(),
        schedule_type: settings.schedule.a1111_label().map(str::to_string),
        cfg_scale: request.guidance_scale,
        seed: settings.seed,
        width: request.width,
        height: request.height,
        model: model_name(&args.model),
        clip_skip: args.clip_skip,
        extra,
    }
}

/// The flag that sets a library request parameter, to name it in messages.
fn flag_for(parameter: &str) -> Option<&'static str> {
    Some(match parameter {
        "width" => "--width",
        "height" => "--height",
        "steps" => "--steps",
        "strength" => "--strength",
        "mask" => "--mask",
        "guidance scale" => "--cfg-scale",
        "clip skip" => "--clip-skip",
        "refiner switch" | "denoising start" | "denoising end" => "--refiner-start",
        "threads" => "--threads",
        "batch size" => "--batch-size",
        "VAE tile size" => "--vae-tile-size",
        "VAE tile overlap" => "--vae-tile-overlap",
        "LoRA" | "LoRA weight" => "--lora",
        "prompt LoRA tag" => "--prompt",
        _ => return None,
    })
}

/// A library error, prefixed with the flag behind the parameter it names, when there is one.
fn with_flag(error: sdrs_pipeline::Error) -> anyhow::Error {
    with_flag_or(error, String::new)
}

/// [`with_flag`], else with the `context` given (when not empty).
fn with_flag_or(error: sdrs_pipeline::Error, context: impl FnOnce() -> String) -> anyhow::Error {
    let flag = match &error {
        sdrs_pipeline::Error::InvalidParameter { name, .. } => flag_for(name),
        _ => None,
    };
    match flag {
        Some(flag) => anyhow::Error::new(error).context(flag),
        None => match context() {
            context if context.is_empty() => error.into(),
            context => anyhow::Error::new(error).context(context),
        },
    }
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
    StableDiffusion::open(&model, config, options)
        .map_err(with_flag)
        .with_context(|| format!("cannot load the model at {}", model.display()))
}

/// The output size `(width, height)`: the flags, else the init image's size rounded down to a
/// multiple of the VAE's `factor` (as diffusers does), else the model's `native` size.
fn output_size(
    native: usize,
    factor: usize,
    flags: (Option<usize>, Option<usize>),
    init: Option<(usize, usize)>,
) -> Result<(usize, usize)> {
    let (default_w, default_h) = match init {
        Some((w, h)) => (w - w % factor, h - h % factor),
        None => (native, native),
    };
    let size = (flags.0.unwrap_or(default_w), flags.1.unwrap_or(default_h));
    let too_small = (flags.0.is_none() && default_w == 0) || (flags.1.is_none() && default_h == 0);
    if init.is_some() && too_small {
        bail!("the init image is smaller than {factor}x{factor} pixels");
    }
    if too_small {
        bail!(
            "the model's unet config gives no image size (sample_size 0): give the size with \
             -W and -H"
        );
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

/// clap's parser for `--attention`: an unknown mode lists the accepted ones.
pub fn parse_attention(value: &str) -> Result<AttentionMode, String> {
    value.parse()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateArgs,
    }

    /// `generate -m model -p "a cat"` with `extra` flags (for the tests of other modules too).
    pub(crate) fn parse(extra: &[&str]) -> GenerateArgs {
        let mut argv = vec!["x", "-m", "model", "-p", "a cat"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).unwrap().args
    }

    fn parse_error(extra: &[&str]) -> String {
        let mut argv = vec!["x", "-m", "model", "-p", "a cat"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).err().unwrap().to_string()
    }

    fn settings(extra: &[&str]) -> Settings {
        Settings::resolve(&parse(extra), KernelOptions::default(), 1234).unwrap()
    }

    #[test]
    fn defaults_follow_the_sd15_defaults() {
        let args = parse(&[]);
        assert_eq!(args.steps, 25);
        assert_eq!(args.cfg_scale, None);
        assert_eq!(args.seed, -1);
        assert_eq!(args.width, None);
        assert_eq!(args.negative_prompt, None);
        assert_eq!(args.trace, None);
        let settings = settings(&["--device", "cpu"]);
        assert_eq!(settings.sampler, Sampler::Dpmpp2m);
        assert_eq!(settings.schedule, SigmaSchedule::Karras);
    }

    #[test]
    fn settings_resolve_the_flags() {
        let settings = settings(&[
            "--device",
            "cpu",
            "--dtype",
            "f16",
            "--sampling-method",
            "euler",
            "-s",
            "42",
            "-W",
            "768",
            "--threads",
            "3",
            "--attention",
            "naive",
        ]);
        assert!(settings.device.is_cpu());
        assert_eq!(settings.dtype, DType::F16);
        assert_eq!(
            (settings.sampler, settings.schedule),
            (Sampler::Euler, SigmaSchedule::Discrete)
        );
        assert_eq!(settings.seed, 42);
        assert_eq!((settings.width, settings.height), (Some(768), None));
        let options = settings.load_options(None);
        assert_eq!(options.threads, Some(3));
        assert_eq!(
            options.variant.as_deref(),
            Some("fp16"),
            "half precision reads fp16 files"
        );
    }

    #[test]
    fn auto_dtype_is_the_kernels_choice_and_negative_seeds_are_random() {
        let settings = settings(&["--device", "cpu", "-s", "-1"]);
        let kernels = KernelOptions::default();
        assert_eq!(settings.dtype, kernels.default_dtype(&Device::Cpu));
        assert_eq!(settings.seed, 1234, "the random seed given");
    }

    #[test]
    fn bad_devices_dtypes_and_samplers_are_refused_by_the_parser_with_the_choices() {
        let error = parse_error(&["--device", "tpu"]);
        assert!(error.contains("tpu") && error.contains("cuda:N"), "{error}");
        let error = parse_error(&["--dtype", "int8"]);
        assert!(error.contains("int8") && error.contains("bf16"), "{error}");
        let error = parse_error(&["--sampling-method", "warp-drive"]);
        assert!(
            error.contains("warp-drive") && error.contains("euler"),
            "{error}"
        );
        let error = parse_error(&["--scheduler", "sideways"]);
        assert!(
            error.contains("sideways") && error.contains("karras"),
            "{error}"
        );
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
        assert_eq!(args.dtype, DtypeChoice::Auto);
        assert_eq!(args.device, DeviceChoice::Auto);
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
    fn memory_limit_and_no_memory_check_reach_the_load_options() {
        let options = settings(&[]).load_options(None);
        assert!(options.memory_check);
        assert_eq!(options.memory_limit, None);
        let options = settings(&["--memory-limit", "8G", "--no-memory-check"]).load_options(None);
        assert!(!options.memory_check);
        assert_eq!(options.memory_limit, Some(8_000_000_000));
        let argv = ["x", "-m", "m", "-p", "p", "--memory-limit", "lots"];
        assert!(Wrapper::try_parse_from(argv).is_err());
    }

    #[test]
    fn explicit_scheduler_overrides_the_label_and_default() {
        let euler = parse_sampler("euler").unwrap();
        assert_eq!(euler.sampler, Sampler::Euler);
        assert_eq!(euler.schedule(None), SigmaSchedule::Discrete);
        let karras = parse_sampler("DPM++ 2M Karras").unwrap();
        assert_eq!(karras.schedule(None), SigmaSchedule::Karras);
        let dpm = parse_sampler("dpm++2m").unwrap();
        assert_eq!(
            dpm.schedule(Some(SigmaSchedule::Discrete)),
            SigmaSchedule::Discrete
        );
        assert_eq!(
            karras.schedule(Some(SigmaSchedule::Exponential)),
            SigmaSchedule::Exponential
        );
    }

    #[test]
    fn unknown_sampler_lists_the_accepted_names() {
        let err = parse_sampler("warp-drive").unwrap_err();
        assert!(err.contains("warp-drive") && err.contains("euler"), "{err}");
    }

    #[test]
    fn the_output_size_is_the_flags_then_the_init_image_then_the_model() {
        assert_eq!(output_size(512, 8, (None, None), None).unwrap(), (512, 512));
        assert_eq!(
            output_size(512, 8, (Some(768), None), None).unwrap(),
            (768, 512)
        );
        // The init image, rounded down to the VAE's factor.
        assert_eq!(
            output_size(512, 8, (None, None), Some((70, 50))).unwrap(),
            (64, 48)
        );
        assert_eq!(
            output_size(512, 8, (None, Some(32)), Some((70, 50))).unwrap(),
            (64, 32)
        );
        let error = output_size(512, 8, (None, None), Some((7, 50))).unwrap_err();
        assert!(error.to_string().contains("8x8"), "{error}");
        // An explicit size wins even over a tiny image; the library checks it.
        assert_eq!(
            output_size(512, 8, (Some(0), Some(16)), Some((7, 5))).unwrap(),
            (0, 16)
        );
    }

    #[test]
    fn sample_size_zero_without_w_h_does_not_mention_an_init_image() {
        let message = output_size(0, 8, (None, None), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("sample_size 0")
                && message.contains("-W")
                && !message.contains("init"),
            "{message}"
        );
        assert_eq!(
            output_size(0, 8, (Some(64), Some(64)), None).unwrap(),
            (64, 64)
        );
    }

    #[test]
    fn library_parameter_errors_name_their_flag() {
        let invalid = |name| sdrs_pipeline::Error::InvalidParameter {
            name,
            value: "100".to_string(),
            expected: "a positive multiple of 8".to_string(),
        };
        let message = crate::describe(&with_flag(invalid("width")));
        assert_eq!(
            message,
            "--width: invalid width 100: a positive multiple of 8"
        );
        assert!(crate::describe(&with_flag(invalid("guidance scale"))).starts_with("--cfg-scale: "));
        assert!(
            crate::describe(&with_flag(invalid("refiner switch"))).starts_with("--refiner-start: ")
        );
        // Others keep their own message, or take the context given.
        assert_eq!(
            crate::describe(&with_flag(invalid("seed"))),
            "invalid seed 100: a positive multiple of 8"
        );
        let wrong = sdrs_pipeline::Error::WrongFamily {
            role: "the refiner",
            path: "r".into(),
            found: "SDXL",
            expected: "an SDXL refiner",
        };
        assert_eq!(
            crate::describe(&with_flag_or(wrong, || "--refiner r".to_string())),
            "--refiner r: the refiner r is SDXL, not an SDXL refiner"
        );
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
    fn the_mask_flag_parses_and_mask_errors_name_it() {
        assert_eq!(parse(&[]).mask, None);
        let args = parse(&["-i", "in.png", "--mask", "mask.png"]);
        assert_eq!(args.mask, Some(PathBuf::from("mask.png")));
        let error = sdrs_pipeline::Error::InvalidParameter {
            name: "mask",
            value: "none".to_string(),
            expected: "a mask".to_string(),
        };
        assert!(crate::describe(&with_flag(error)).starts_with("--mask: "));
    }

    #[test]
    fn img2img_and_refiner_flags_have_diffusers_defaults() {
        let args = parse(&[]);
        assert_eq!(args.strength, None);
        assert_eq!(args.refiner_start, 0.8);
        assert_eq!(args.aesthetic_score, 6.0);
        assert_eq!(args.negative_aesthetic_score, 2.5);
        let args = parse(&["-i", "in.png", "--strength", "0.5", "--refiner", "r"]);
        assert_eq!(args.init_img, Some(PathBuf::from("in.png")));
        assert_eq!(args.strength, Some(0.5));
        assert_eq!(args.refiner.as_deref(), Some("r"));
    }

    #[test]
    fn seed_minus_two_is_refused_not_taken_as_random() {
        let message = parse_error(&["-s", "-2"]);
        assert!(
            message.contains("-2") && message.contains("-1"),
            "{message}"
        );
        assert_eq!(parse(&["-s", "-1"]).seed, -1);
        assert_eq!(parse(&["-s", "0"]).seed, 0);
    }

    #[test]
    fn clip_skip_zero_is_refused() {
        let message = parse_error(&["--clip-skip", "0"]);
        assert!(
            message.contains("--clip-skip") && message.contains("0"),
            "{message}"
        );
        assert_eq!(parse(&["--clip-skip", "2"]).clip_skip, Some(2));
    }

    #[test]
    fn strength_without_an_init_image_is_an_error_not_ignored() {
        let message = check_flag_combinations(&parse(&["--strength", "0.3"]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("--strength 0.3") && message.contains("-i"),
            "{message}"
        );
        check_flag_combinations(&parse(&["--strength", "0.3", "-i", "x.png"])).unwrap();
        check_flag_combinations(&parse(&[])).unwrap();
    }

    #[test]
    fn prompt_syntax_defaults_to_a1111_and_takes_plain() {
        assert_eq!(parse(&[]).prompt_syntax, PromptSyntax::A1111);
        let args = parse(&["--prompt-syntax", "plain"]);
        assert_eq!(args.prompt_syntax, PromptSyntax::Plain);
        assert_eq!(
            parse(&["--prompt-syntax", "A1111"]).prompt_syntax,
            PromptSyntax::A1111
        );
        let error = parse_error(&["--prompt-syntax", "compel"]);
        assert!(
            error.contains("compel") && error.contains("a1111 or plain"),
            "{error}"
        );
    }

    #[test]
    fn random_seeds_are_below_2_pow_32() {
        assert!(random_seed() <= u32::MAX as u64);
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
