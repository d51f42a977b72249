//! `sdrs bench`: times the text encoder, one UNet step, the VAE and TAESD decodes and a whole
//! generation, for real-size SD1.5/SDXL models built in the process from seeded random weights (no
//! download) or for a model folder, and prints seconds, GFLOP/s (counted from the configuration),
//! peak memory and the kernels in use, as a table or JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use sdrs_clip::{ClipTextConfig, ClipTextModel};
use sdrs_kernels::attention::AttentionMode;
use sdrs_kernels::KernelOptions;
use sdrs_pipeline::random_weights::RandomWeights;
use sdrs_pipeline::stable_diffusion::{activation_dtype, tiny_autoencoder_dtype};
use sdrs_pipeline::weights::{find_weights, read_json, var_builder};
use sdrs_pipeline::{BuiltinModel, LoadOptions, ModelFiles, Request, StableDiffusion};
use sdrs_taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use sdrs_tooling::flops::{clip_flops, unet_flops, vae_decode_flops};
use sdrs_unet::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig};

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

    /// Compute dtype: auto (bf16 on CPUs with native bf16 dot products, else f32; f16 on GPUs),
    /// f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// Attention kernel: auto, naive, sliced, sliced:N or flash.
    #[arg(long, default_value = "auto", value_parser = crate::generate::parse_attention)]
    pub attention: AttentionMode,

    /// Device: cpu, cuda[:N], metal or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Worker threads for the CPU kernels (default: the number of physical cores).
    #[arg(long)]
    pub threads: Option<usize>,

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
}

/// One measured part.
#[derive(Debug, Clone)]
struct Measurement {
    part: String,
    seconds: Vec<f64>,
    flops: Option<f64>,
    peak_rss: Option<u64>,
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
        })
    }
}

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

    fn has(&self, component: &str) -> bool {
        let path = format!("{component}/config.json");
        match self {
            Self::Builtin(model) => model.file(&path).is_some(),
            Self::Folder(root) => root.join(path).is_file(),
        }
    }

    fn config<T: serde::de::DeserializeOwned>(&self, component: &str) -> Result<T> {
        let path = format!("{component}/config.json");
        let value = match self {
            Self::Builtin(model) => model
                .json(&path)
                .with_context(|| format!("{} has no built-in {path}", model.name()))?,
            Self::Folder(root) => read_json(&root.join(&path))?,
        };
        serde_json::from_value(value).with_context(|| format!("cannot read {path}"))
    }

    /// The weights of `component`, in the dtype and weight variant a generation would load.
    fn weights(
        &self,
        component: &'static str,
        seed: u64,
        options: &LoadOptions,
    ) -> Result<sdrs_kernels::VarBuilder<'static>> {
        let (dtype, device) = (options.dtype, &options.device);
        let vb = match self {
            Self::Builtin(_) => {
                RandomWeights::for_component(seed, component).into_var_builder(dtype, device)
            }
            Self::Folder(root) => {
                let files = find_weights(&root.join(component), options.variant.as_deref())?;
                var_builder(component, &files, dtype, device)?
            }
        };
        Ok(sdrs_kernels::VarBuilder::new(vb, options.kernels))
    }
}

/// The models of one pipeline, built once and timed part by part.
struct Models {
    encoders: Vec<(ClipTextModel, ClipTextConfig)>,
    unet: UNet2DConditionModel,
    unet_config: UNet2DConditionConfig,
    vae: AutoencoderKL,
    vae_config: AutoencoderKLConfig,
}

impl Models {
    fn build(source: &Source, seed: u64, options: &LoadOptions) -> Result<Self> {
        let mut encoders = Vec::new();
        for name in ["text_encoder", "text_encoder_2"] {
            if source.has(name) {
                let config: ClipTextConfig = source.config(name)?;
                let vb = source.weights(name, seed, options)?;
                encoders.push((ClipTextModel::new(vb, &config)?, config));
            }
        }
        let unet_config: UNet2DConditionConfig = source.config("unet")?;
        let unet = UNet2DConditionModel::new(source.weights("unet", seed, options)?, &unet_config)?;
        let vae_config: AutoencoderKLConfig = source.config("vae")?;
        let vae = AutoencoderKL::new(source.weights("vae", seed, options)?, &vae_config)?;
        Ok(Self {
            encoders,
            unet,
            unet_config,
            vae,
            vae_config,
        })
    }

    fn sdxl(&self) -> bool {
        self.unet_config.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The text conditioning for `batch` prompts as the pipelines build it: the last hidden state
    /// for SD1.x, the concatenated penultimate layers and the pooled projection for SDXL.
    fn encode(&self, ids: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let mut states = Vec::new();
        let mut pooled = None;
        for (model, _) in &self.encoders {
            let output = model.forward(ids)?;
            if self.sdxl() {
                states.push(output.hidden_states[output.hidden_states.len() - 2].clone());
                pooled = output.text_embeds.or(Some(output.pooled));
            } else {
                states.push(output.last_hidden_state);
            }
        }
        Ok((Tensor::cat(&states, 2)?, pooled))
    }

    /// SDXL's added conditions: the pooled embedding and the size/crop (or aesthetic) time ids,
    /// sized from the UNet config.
    fn added(&self, pooled: Option<&Tensor>, batch: usize) -> Result<Option<AddedConditions>> {
        let Some(pooled) = pooled else {
            return Ok(None);
        };
        let projection = self
            .unet_config
            .projection_class_embeddings_input_dim
            .unwrap_or(0);
        let time_dim = self.unet_config.addition_time_embed_dim.unwrap_or(1).max(1);
        let ids = projection.saturating_sub(pooled.dim(1)?) / time_dim;
        let time_ids = Tensor::ones((batch, ids), pooled.dtype(), pooled.device())?;
        Ok(Some(AddedConditions {
            text_embeds: pooled.clone(),
            time_ids,
        }))
    }
}

pub fn run(args: BenchArgs) -> Result<std::process::ExitCode> {
    let kernel_options = system::kernel_options(args.attention)?;
    // The parts run on the thread pool a pipeline loaded with these options would have.
    let pool = LoadOptions::default()
        .with_threads(args.threads)
        .thread_pool()?;
    let threads = pool.current_num_threads();
    pool.install(|| measure(args, kernel_options, threads))
}

fn measure(
    args: BenchArgs,
    kernel_options: KernelOptions,
    threads: usize,
) -> Result<std::process::ExitCode> {
    let source = Source::parse(&args.model)?;
    let device = sdrs_pipeline::parse_device(&args.device)?;
    let dtype = sdrs_pipeline::resolve_dtype(&args.dtype, &device, &kernel_options)?;
    let parts = selected_parts(&args.parts)?;
    if args.batch == 0 || args.runs == 0 || args.steps == 0 {
        bail!("--batch, --runs and --steps must be at least 1");
    }
    let unet_config: UNet2DConditionConfig = source.config("unet")?;
    let vae_config: AutoencoderKLConfig = source.config("vae")?;
    let scale = 1 << vae_config.block_out_channels.len().saturating_sub(1);
    let size = args
        .size
        .unwrap_or(unet_config.sample_size.unwrap_or(64) * scale);
    if size == 0 || size % scale != 0 {
        bail!("--size {size} must be a positive multiple of {scale}");
    }
    let latent = size / scale;
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
    let header = format!(
        "{}, {size}x{size}, batch {} (UNet batch {} with guidance), {precision}, {threads} threads, {kernels}",
        source.name(),
        args.batch,
        2 * args.batch,
    );
    eprintln!("sdrs bench: {header}");

    let mut results = Vec::new();
    let unet_batch = 2 * args.batch;
    let tokens = 77;
    let ids = Tensor::zeros((unet_batch, tokens), DType::U32, &device)?;
    let latents = Tensor::randn(0f32, 1.0, (unet_batch, 4, latent, latent), &device)?
        .to_dtype(activations)?;
    // A model folder's weights are read as a generation reads them (fp16 files for half precision).
    let options = LoadOptions::new(device.clone(), dtype, None)
        .with_kernels(kernel_options)
        .with_threads(Some(threads));
    // The whole generation runs first, so that its peak memory is its own (the process's
    // high-water mark only grows; later parts report theirs on top of it).
    if parts.contains(&"generate") {
        results.push(whole_generation(&source, &args, &options, size)?);
    }
    let needs_models = parts.iter().any(|p| ["text", "unet", "vae"].contains(p));
    if needs_models {
        eprintln!("building the models...");
        let models = Models::build(&source, args.seed, &options)?;
        if parts.contains(&"text") {
            let flops: f64 = models
                .encoders
                .iter()
                .map(|(_, cfg)| clip_flops(cfg, unet_batch, tokens))
                .sum();
            let seconds = time_runs(args.runs, || models.encode(&ids).map(|_| ()))?;
            results.push(measured("text encoder", seconds, Some(flops)));
        }
        if parts.contains(&"unet") {
            let (context, pooled) = models.encode(&ids)?;
            let context = context.to_dtype(activations)?;
            let added = models.added(pooled.as_ref(), unet_batch)?;
            let timestep = Tensor::new(&[500f32], &device)?;
            let flops = unet_flops(&models.unet_config, unet_batch, latent, latent, tokens)?;
            let seconds = time_runs(args.runs, || {
                models
                    .unet
                    .forward(&latents, &timestep, &context, added.as_ref())?;
                Ok(())
            })?;
            results.push(measured("UNet step", seconds, Some(flops)));
        }
        if parts.contains(&"vae") {
            let one = latents.narrow(0, 0, args.batch)?;
            let flops = vae_decode_flops(&models.vae_config, args.batch, latent, latent);
            let seconds = time_runs(args.runs, || {
                models.vae.decode(&one)?;
                Ok(())
            })?;
            results.push(measured("VAE decode", seconds, Some(flops)));
        }
    }
    if parts.contains(&"taesd") {
        // TAESD proper: no TAEF2 pooled branch.
        let weights = RandomWeights::new(args.seed).without(&["pool"]);
        let tiny = AutoencoderTiny::new(
            sdrs_kernels::VarBuilder::new(
                weights.into_var_builder(tiny_autoencoder_dtype(dtype, &device), &device),
                kernel_options,
            ),
            &AutoencoderTinyConfig::default(),
        )?;
        let one = latents.narrow(0, 0, args.batch)?;
        let seconds = time_runs(args.runs, || {
            tiny.decode(&one)?;
            Ok(())
        })?;
        results.push(measured("TAESD decode", seconds, None));
    }

    let json = serde_json::json!({
        "model": source.name(),
        "size": size,
        "batch": args.batch,
        "dtype": sdrs_pipeline::dtype_name(dtype),
        "activation_dtype": sdrs_pipeline::dtype_name(activations),
        "device": args.device,
        "threads": threads,
        "kernels": kernels,
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
    let start = Instant::now();
    let pipeline = match source {
        Source::Builtin(model) => {
            StableDiffusion::random(&ModelFiles::Builtin(*model), args.seed, options)?
        }
        Source::Folder(root) => StableDiffusion::load(root, options)?,
    };
    let loading = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut request = Request::new(
        &pipeline,
        "a photograph of an astronaut riding a horse",
        pipeline.scheduler_config().clone(),
    );
    request.width = size;
    request.height = size;
    request.steps = args.steps;
    request.seed = Some(args.seed);
    pipeline.generate_once(&request, &mut |_| {})?;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "whole generation: {loading:.1} s to load the models, {seconds:.1} s to generate ({} steps)",
        args.steps
    );
    let mut measurement = measured(
        &format!("whole generation ({} steps, 1 image)", args.steps),
        vec![seconds],
        None,
    );
    measurement.peak_rss = system::peak_rss();
    Ok(measurement)
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

/// One untimed warm-up run (weight packing, allocator growth), then `runs` timed ones.
fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f()?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}

fn measured(part: &str, seconds: Vec<f64>, flops: Option<f64>) -> Measurement {
    let measurement = Measurement {
        part: part.to_string(),
        seconds,
        flops,
        peak_rss: system::peak_rss(),
    };
    eprintln!("{part}: {:.3} s", measurement.median());
    measurement
}

fn print_table(header: &str, results: &[Measurement]) {
    println!("{header}");
    println!("| part | median s | min s | max s | GFLOP | GFLOP/s | peak RSS |");
    println!("|---|---|---|---|---|---|---|");
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_string());
    for m in results {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
            m.part,
            m.median(),
            m.min(),
            m.max(),
            or_dash(m.flops.map(|f| format!("{:.0}", f / 1e9))),
            or_dash(m.gflops_per_second().map(|g| format!("{g:.1}"))),
            or_dash(m.peak_rss.map(|b| format!("{:.2} GB", b as f64 / 1e9))),
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
