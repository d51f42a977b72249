//! `sdrs bench`: times the text encoder, one UNet step, the VAE and TAESD decodes and a whole
//! generation, for real-size SD1.5/SDXL models built in the process from seeded random weights (no
//! download) or for a model folder, and prints seconds, GFLOP/s (counted from the configuration),
//! peak memory and the kernels in use, as a table or JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use sdrs_kernels::attention::AttentionMode;
use sdrs_pipeline::components::TinyAutoencoder;
use sdrs_pipeline::pipeline::{activation_dtype, tiny_autoencoder_dtype};
use sdrs_pipeline::random_weights::RandomWeights;
use sdrs_pipeline::{
    BuiltinModel, DeviceChoice, DtypeChoice, GpuMemoryPeak, LatentDecoder, LoadOptions, ModelFiles,
    NativeSize, Request, StableDiffusion,
};
use sdrs_taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use sdrs_tooling::flops::{clip_flops, unet_flops, vae_decode_flops};

use crate::system;

/// The parts `--parts` can select (the whole generation runs first, the others in this order).
const PARTS: [&str; 5] = ["text", "unet", "vae", "taesd", "generate"];

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: a built-in architecture with seeded random weights (sd15, sdxl,
    /// sdxl-refiner) or a diffusers model folder with its own weights.
    #[arg(short = 'm', long = "model", default_value = "sd15")]
    pub model: String,

    /// Image width and height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub size: Option<usize>,

    /// Images per batch; with classifier-free guidance the UNet sees twice as many.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,

    /// Compute dtype: auto (bf16 on CPUs whose bf16 dot products measure faster than f32, else
    /// f32; f16 on GPUs), f32, bf16 or f16.
    #[arg(long, default_value = "auto", value_parser = crate::generate::parse_dtype)]
    pub dtype: DtypeChoice,

    /// Attention kernel: auto, naive, sliced, sliced:N or flash.
    #[arg(long, default_value = "auto", value_parser = crate::generate::parse_attention)]
    pub attention: AttentionMode,

    /// Device: cpu, cuda[:N], metal or auto.
    #[arg(long, default_value = "cpu", value_parser = crate::generate::parse_device)]
    pub device: DeviceChoice,

    /// Worker threads for the CPU kernels (default: the number of physical cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Quantize the UNet's and text encoders' weights at load, as `generate --quantize` does
    /// (`kmeans6`, `kmeans4:grouped16`, `int8`, `q8_0`, ...): full-size models measured
    /// without writing them.
    #[arg(long, value_parser = crate::generate::parse_quantize)]
    pub quantize: Option<sdrs_quant::QuantSpec>,

    /// A mixed-bit recipe applied at load (see `generate --recipe`).
    #[arg(long)]
    pub recipe: Option<PathBuf>,

    /// Comma-separated parts to run: text, unet, vae, taesd, generate (default: all).
    #[arg(long, value_delimiter = ',')]
    pub parts: Vec<String>,

    /// Timed runs of each part after one untimed warm-up run; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,

    /// Denoising steps of the whole generation.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,

    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Also write the results as JSON to this file (`-` for standard output instead of the table).
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write a Chrome trace of the parts (text encoding, each step, the decodes...) to this JSON
    /// file, for chrome://tracing or Perfetto (default: the file `SDRS_TRACE` names, else none).
    #[arg(long)]
    pub trace: Option<PathBuf>,

    #[command(flatten)]
    pub vae_tiling: crate::vae_tiling::VaeTilingArgs,
}

/// One measured part.
#[derive(Debug, Clone)]
struct Measurement {
    part: String,
    seconds: Vec<f64>,
    flops: Option<f64>,
    peak_rss: Option<u64>,
    /// Peak GPU memory in use during the part (CUDA); `None` on the CPU.
    peak_gpu_memory: Option<u64>,
}

impl Measurement {
    fn median(&self) -> f64 {
        let mut sorted = self.seconds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn min(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn max(&self) -> f64 {
        self.seconds.iter().copied().fold(0.0, f64::max)
    }

    fn gflops_per_second(&self) -> Option<f64> {
        self.flops.map(|flops| flops / 1e9 / self.median())
    }

    /// Guided denoising steps per second, for the UNet step (one step = the UNet at batch 2).
    fn iterations_per_second(&self) -> Option<f64> {
        (self.part == UNET_STEP).then(|| 1.0 / self.median())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "part": self.part,
            "median_s": self.median(),
            "min_s": self.min(),
            "max_s": self.max(),
            "runs": self.seconds.len(),
            "gflop": self.flops.map(|f| f / 1e9),
            "gflop_per_s": self.gflops_per_second(),
            "peak_rss_bytes": self.peak_rss,
            "peak_gpu_memory_bytes": self.peak_gpu_memory,
            "it_per_s": self.iterations_per_second(),
        })
    }
}

/// The name of the UNet step's row.
const UNET_STEP: &str = "UNet step";

/// CLIP's context length, which every prompt is padded to.
const TOKENS: usize = 77;

/// The prompts every part encodes; with a negative prompt both branches are encoded for every
/// family (an SDXL base zeroes a missing one instead).
const PROMPT: &str = "a photograph of an astronaut riding a horse";
const NEGATIVE_PROMPT: &str = "blurry, low quality";

/// Where the configs and weights come from.
enum Source {
    Builtin(BuiltinModel),
    Folder(PathBuf),
}

impl Source {
    fn parse(model: &str) -> Result<Self> {
        if let Some(builtin) = BuiltinModel::from_name(model) {
            return Ok(Self::Builtin(builtin));
        }
        let path = PathBuf::from(model);
        if path.join("unet").join("config.json").is_file() {
            return Ok(Self::Folder(path));
        }
        bail!(
            "--model {model} is neither a built-in architecture ({}) nor a diffusers model folder",
            BuiltinModel::names()
        )
    }

    fn name(&self) -> String {
        match self {
            Self::Builtin(model) => format!("{} (random weights)", model.name()),
            Self::Folder(path) => path.display().to_string(),
        }
    }

    fn files(&self) -> ModelFiles {
        match self {
            Self::Builtin(model) => ModelFiles::Builtin(*model),
            Self::Folder(root) => ModelFiles::Folder(root.clone()),
        }
    }

    /// The pipeline a generation loads: for a built-in architecture, its shapes with seeded
    /// random weights; for a folder, its own weights (in the variant a generation reads).
    fn pipeline(&self, seed: u64, options: &LoadOptions) -> Result<StableDiffusion> {
        Ok(match self {
            Self::Builtin(_) => StableDiffusion::random(&self.files(), seed, options)?,
            Self::Folder(root) => StableDiffusion::load(root, options)?,
        })
    }
}

/// One image's request as `sdrs generate` makes it: the model's defaults, `size`, `steps`.
fn bench_request(pipeline: &StableDiffusion, size: usize, steps: usize, seed: u64) -> Request {
    let mut request = Request::new(pipeline, PROMPT, pipeline.scheduler_config().clone());
    request.negative_prompt = Some(NEGATIVE_PROMPT.to_string());
    request.width = size;
    request.height = size;
    request.steps = steps;
    request.seed = Some(seed);
    request
}

pub fn run(args: BenchArgs) -> Result<std::process::ExitCode> {
    let _trace = crate::trace::start(args.trace.as_deref())?;
    let kernel_options = system::kernel_options(args.attention)?;
    let source = Source::parse(&args.model)?;
    let selection = args.device.select()?;
    eprintln!("{}", selection.message());
    let device = selection.device.clone();
    let dtype = args.dtype.resolve(&device, &kernel_options);
    let parts = selected_parts(&args.parts)?;
    if args.batch == 0 || args.runs == 0 || args.steps == 0 {
        bail!("--batch, --runs and --steps must be at least 1");
    }
    let files = source.files();
    let native = NativeSize::of(&files)?;
    let scale = native.vae_scale_factor;
    let size = args.size.unwrap_or(native.pixels);
    if size == 0 || !size.is_multiple_of(scale) {
        bail!("--size {size} must be a positive multiple of {scale}");
    }
    // Every part computes on the thread pool a pipeline loaded with these options has; a model
    // folder's weights are read as a generation reads them (fp16 files for half precision).
    let (quantize, recipe) = crate::quantize::resolve(args.quantize, args.recipe.as_deref())?;
    let options = LoadOptions::new(device.clone(), dtype, None)
        .with_kernels(kernel_options)
        .with_threads(args.threads)
        .with_quantize(quantize, recipe.clone())
        .with_vae_tiling(args.vae_tiling.options());
    let quantization = match (quantize, &recipe) {
        (Some(spec), Some(_)) => format!("{spec} recipe"),
        (Some(spec), None) => spec.to_string(),
        (None, _) => "none".to_string(),
    };
    let pool = options.thread_pool()?;
    let threads = pool.current_num_threads();
    // Activations flow as the pipeline runs them: f32 on the CPU around half-precision weights.
    let activations = activation_dtype(dtype, &device);
    let probe = Tensor::zeros((1, 1, 1, 1), activations, &device)?;
    let attention = kernel_options.attention_for(&probe);
    let kernels = format!(
        "{}, attention {attention}",
        system::kernel_description(&kernel_options)
    );
    let precision = if activations == dtype {
        sdrs_pipeline::dtype_name(dtype).to_string()
    } else {
        format!(
            "{} weights, {} activations",
            sdrs_pipeline::dtype_name(dtype),
            sdrs_pipeline::dtype_name(activations)
        )
    };
    let quantized = if quantize.is_some() {
        format!(", quantized {quantization}")
    } else {
        String::new()
    };
    let header = format!(
        "{}, {size}x{size}, batch {} (UNet batch {} with guidance), {precision}{quantized}, {threads} threads, {kernels}",
        source.name(),
        args.batch,
        2 * args.batch,
    );
    eprintln!("sdrs bench: {header}");

    let mut results = Vec::new();
    // The whole generation runs first, so that its peak memory is its own (the process's
    // high-water mark only grows; later parts report theirs on top of it).
    if parts.contains(&"generate") {
        results.push(whole_generation(&source, &args, &options, size)?);
    }
    if parts.iter().any(|p| ["text", "unet", "vae"].contains(p)) {
        eprintln!("building the models...");
        let pipeline = source.pipeline(args.seed, &options)?;
        results.extend(component_parts(&pipeline, &files, &args, &parts, size)?);
    }
    if parts.contains(&"taesd") {
        let seconds = pool.install(|| taesd_decode(&args, &options, size / scale))?;
        results.push(measured("TAESD decode", seconds, None));
    }

    let json = serde_json::json!({
        "model": source.name(),
        "size": size,
        "batch": args.batch,
        "dtype": sdrs_pipeline::dtype_name(dtype),
        "activation_dtype": sdrs_pipeline::dtype_name(activations),
        "device": args.device.to_string(),
        "device_description": selection.description,
        "threads": threads,
        "kernels": kernels,
        "quantization": quantization,
        "results": results.iter().map(Measurement::json).collect::<Vec<_>>(),
    });
    match args.json.as_deref() {
        Some(path) if path.as_os_str() == "-" => {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        other => {
            print_table(&header, &results);
            if let Some(path) = other {
                std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The text encoder, one UNet step and the VAE decode of `pipeline`, as a generation calls them
/// (each on the pipeline's thread pool), for the `parts` asked for.
fn component_parts(
    pipeline: &StableDiffusion,
    files: &ModelFiles,
    args: &BenchArgs,
    parts: &[&str],
    size: usize,
) -> Result<Vec<Measurement>> {
    let mut results = Vec::new();
    let latent = size / pipeline.vae_scale_factor();
    let unet_batch = 2 * args.batch;
    let request = bench_request(pipeline, size, args.steps, args.seed);
    if parts.contains(&"text") {
        let mut flops = 0.0;
        for encoder in ["text_encoder", "text_encoder_2"] {
            if files.has_file(&format!("{encoder}/config.json")) {
                flops += clip_flops(&files.text_config(encoder)?, unet_batch, TOKENS);
            }
        }
        // Each image's prompts (negative and positive) encoded as a generation does.
        let seconds = pipeline.in_pool(|| {
            time_runs(args.runs, pipeline.device(), || {
                for _ in 0..args.batch {
                    pipeline.encode_prompts(&request)?;
                }
                Ok(())
            })
        })?;
        results.push(measured("text encoder", seconds, Some(flops)));
    }
    if parts.contains(&"unet") {
        let conditioning = pipeline.encode_prompts(&request)?.for_batch(args.batch)?;
        let denoiser = pipeline.denoiser()?;
        let shape = (unet_batch, denoiser.in_channels(), latent, latent);
        let sample =
            Tensor::randn(0f32, 1.0, shape, denoiser.device())?.to_dtype(denoiser.dtype())?;
        let timestep = Tensor::full(500f32, unet_batch, denoiser.device())?;
        let flops = unet_flops(&files.unet_config()?, unet_batch, latent, latent, TOKENS)?;
        let seconds = pipeline.in_pool(|| {
            time_runs(args.runs, pipeline.device(), || {
                denoiser.forward(
                    &sample,
                    &timestep,
                    &conditioning.embeddings,
                    conditioning.added.as_ref(),
                )?;
                Ok(())
            })
        })?;
        results.push(measured(UNET_STEP, seconds, Some(flops)));
    }
    if parts.contains(&"vae") {
        let flops = vae_decode_flops(&files.vae_config()?, args.batch, latent, latent);
        let channels = pipeline.vae_decoder().latent_channels();
        let latents = random_latents(args.batch, channels, latent, pipeline.device())?;
        let seconds = time_runs(args.runs, pipeline.device(), || {
            pipeline.decode(&latents)?;
            Ok(())
        })?;
        results.push(measured("VAE decode", seconds, Some(flops)));
    }
    Ok(results)
}

/// Times a TAESD decode of `args.batch` latents of `latent` x `latent`, as `--vae` makes a
/// generation decode, with seeded random weights (TAESD proper: no TAEF2 pooled branch).
fn taesd_decode(args: &BenchArgs, options: &LoadOptions, latent: usize) -> Result<Timed> {
    let (dtype, device) = (options.dtype, &options.device);
    let weights = RandomWeights::new(args.seed).without(&["pool"]);
    let tiny = TinyAutoencoder::new(AutoencoderTiny::new(
        sdrs_kernels::VarBuilder::new(
            weights.into_var_builder(tiny_autoencoder_dtype(dtype, device), device),
            options.kernels,
        ),
        &AutoencoderTinyConfig::default(),
    )?);
    let latents = random_latents(args.batch, tiny.latent_channels(), latent, device)?;
    time_runs(args.runs, device, || {
        tiny.decode(&latents)?;
        Ok(())
    })
}

/// Standard normal latents `[batch, channels, latent, latent]` in f32.
fn random_latents(
    batch: usize,
    channels: usize,
    latent: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    Ok(Tensor::randn(
        0f32,
        1.0,
        (batch, channels, latent, latent),
        device,
    )?)
}

/// The whole text-to-image path as `sdrs generate` runs it, in a fresh state: load the model
/// (built from random weights for a built-in architecture), encode the prompts, run `steps`
/// guided steps with the model's scheduler and decode one image, each model freed after its last
/// use ([`StableDiffusion::generate_once`]). Its peak memory counts from the start of loading.
fn whole_generation(
    source: &Source,
    args: &BenchArgs,
    options: &LoadOptions,
    size: usize,
) -> Result<Measurement> {
    system::reset_peak_rss();
    let gpu_memory = GpuMemoryPeak::start(&options.device);
    let start = Instant::now();
    let pipeline = source.pipeline(args.seed, options)?;
    let loading = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let request = bench_request(&pipeline, size, args.steps, args.seed);
    pipeline.generate_once(&request, &mut |_| {})?;
    options.device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "whole generation: {loading:.1} s to load the models, {seconds:.1} s to generate ({} steps)",
        args.steps
    );
    let timed = Timed {
        seconds: vec![seconds],
        peak_gpu_memory: gpu_memory.map(GpuMemoryPeak::finish),
    };
    Ok(measured(
        &format!("whole generation ({} steps, 1 image)", args.steps),
        timed,
        None,
    ))
}

fn selected_parts(requested: &[String]) -> Result<Vec<&'static str>> {
    if requested.is_empty() {
        return Ok(PARTS.to_vec());
    }
    requested
        .iter()
        .map(|name| {
            PARTS
                .iter()
                .find(|part| **part == name.trim())
                .copied()
                .with_context(|| {
                    format!(
                        "unknown part {name:?} in --parts: expected some of {}",
                        PARTS.join(", ")
                    )
                })
        })
        .collect()
}

/// The timed runs of one part.
struct Timed {
    seconds: Vec<f64>,
    /// Peak GPU memory in use during the runs (CUDA); `None` on the CPU.
    peak_gpu_memory: Option<u64>,
}

/// One untimed warm-up run (weight packing, allocator growth, kernel loading), then `runs`
/// timed ones, each waiting for `device` to finish its queued work (GPUs run asynchronously).
fn time_runs(
    runs: usize,
    device: &candle_core::Device,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timed> {
    let gpu_memory = GpuMemoryPeak::start(device);
    f()?;
    device.synchronize()?;
    let seconds = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(Timed {
        seconds,
        peak_gpu_memory: gpu_memory.map(GpuMemoryPeak::finish),
    })
}

fn measured(part: &str, timed: Timed, flops: Option<f64>) -> Measurement {
    let measurement = Measurement {
        part: part.to_string(),
        seconds: timed.seconds,
        flops,
        peak_rss: system::peak_rss(),
        peak_gpu_memory: timed.peak_gpu_memory,
    };
    eprintln!("{part}: {:.3} s", measurement.median());
    measurement
}

fn print_table(header: &str, results: &[Measurement]) {
    println!("{header}");
    println!(
        "| part | median s | min s | max s | it/s | GFLOP | GFLOP/s | peak RSS | peak GPU memory |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_string());
    for m in results {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |",
            m.part,
            m.median(),
            m.min(),
            m.max(),
            or_dash(m.iterations_per_second().map(|i| format!("{i:.2}"))),
            or_dash(m.flops.map(|f| format!("{:.0}", f / 1e9))),
            or_dash(m.gflops_per_second().map(|g| format!("{g:.1}"))),
            or_dash(m.peak_rss.map(|b| format!("{:.2} GB", b as f64 / 1e9))),
            or_dash(
                m.peak_gpu_memory
                    .map(|b| format!("{:.2} GB", b as f64 / 1e9))
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_checked_by_name() {
        assert_eq!(selected_parts(&[]).unwrap(), PARTS.to_vec());
        let picked = selected_parts(&["unet".into(), "vae".into()]).unwrap();
        assert_eq!(picked, vec!["unet", "vae"]);
        let error = selected_parts(&["unets".into()]).unwrap_err().to_string();
        assert!(
            error.contains("\"unets\"") && error.contains("taesd"),
            "{error}"
        );
    }

    #[test]
    fn median_min_and_max_of_the_runs() {
        let m = Measurement {
            part: "x".into(),
            seconds: vec![3.0, 1.0, 2.0],
            flops: Some(4e9),
            peak_rss: None,
            peak_gpu_memory: None,
        };
        assert_eq!((m.median(), m.min(), m.max()), (2.0, 1.0, 3.0));
        assert_eq!(m.gflops_per_second(), Some(2.0));
    }

    #[test]
    fn unknown_models_name_the_built_in_ones() {
        let error = Source::parse("sd14").err().unwrap().to_string();
        assert!(error.contains("sd15, sdxl, sdxl-refiner"), "{error}");
    }
}
