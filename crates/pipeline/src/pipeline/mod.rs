//! Stable Diffusion pipelines (SD1.x/2.x, SDXL base, SDXL refiner) for models in the diffusers folder
//! layout: text-to-image and image-to-image, following diffusers' `pipeline_stable_diffusion.py`,
//! `pipeline_stable_diffusion_img2img.py`, `pipeline_stable_diffusion_xl.py` and
//! `pipeline_stable_diffusion_xl_img2img.py` step for step, including the order in which the
//! generator is drawn from.

mod conditioning;
pub mod preview;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdrs_clip::ClipTextModel;
use sdrs_schedulers::{NoNoise, NoiseSource, TorchGenerator};
use sdrs_unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sdrs_vae::AutoencoderKL;

use candle_nn::VarBuilder;
use sdrs_kernels::KernelOptions;

use crate::bench::RandomWeights;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model_files::{builtin_for_checkpoint, ModelFiles};
use crate::single_file::CheckpointFamily;
use crate::weights::{find_weights, var_builder};
pub use conditioning::MicroConditioning;
use conditioning::{Conditioning, Prompts, TextEncoder, TextEncoders};
use sdrs_taesd::AutoencoderTiny;

/// Which kind of Stable Diffusion model a folder holds, detected from its own files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD1.x and SD2.x: one CLIP text encoder.
    Sd,
    /// SDXL base: two text encoders and micro-conditioning.
    SdxlBase,
    /// SDXL refiner: the second text encoder and aesthetic-score conditioning.
    SdxlRefiner,
}

impl ModelFamily {
    /// SDXL when the UNet takes `text_time` added conditions; the refiner when the model has no
    /// first text encoder (or says it wants aesthetic scores).
    pub fn detect(root: &Path) -> Result<Self> {
        Self::detect_in(&ModelFiles::Folder(root.to_path_buf()))
    }

    /// The family of a diffusers folder or of a single checkpoint file, from its configs or its
    /// tensor names alone (no weights are read).
    pub fn detect_model(path: &Path) -> Result<Self> {
        if path.is_file() {
            Ok(Checkpoint::open(path)?.family().into())
        } else {
            Self::detect(path)
        }
    }

    /// [`Self::detect`] for any source of configs.
    pub fn detect_in(files: &ModelFiles) -> Result<Self> {
        let unet = files.json("unet/config.json")?;
        let sdxl = unet["addition_embed_type"].as_str() == Some("text_time");
        if !sdxl {
            if files.has_dir("text_encoder") {
                return Ok(Self::Sd);
            }
            return Err(Error::MissingFile {
                path: files.location("text_encoder"),
                what: "a Stable Diffusion 1.x/2.x model needs its text encoder".to_string(),
            });
        }
        let aesthetics = files
            .optional_json("model_index.json")?
            .is_some_and(|index| index["requires_aesthetics_score"].as_bool() == Some(true));
        if aesthetics || !files.has_file("text_encoder/config.json") {
            Ok(Self::SdxlRefiner)
        } else {
            Ok(Self::SdxlBase)
        }
    }

    /// The name used in messages and metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sd => "SD1.x/2.x",
            Self::SdxlBase => "SDXL",
            Self::SdxlRefiner => "SDXL refiner",
        }
    }

    /// diffusers' default guidance scale for this family's pipeline.
    pub fn default_guidance_scale(&self) -> f64 {
        match self {
            Self::Sd => 7.5,
            Self::SdxlBase | Self::SdxlRefiner => 5.0,
        }
    }
}

impl From<CheckpointFamily> for ModelFamily {
    fn from(family: CheckpointFamily) -> Self {
        match family {
            CheckpointFamily::Sd15 | CheckpointFamily::Sd2 => ModelFamily::Sd,
            CheckpointFamily::SdxlBase => ModelFamily::SdxlBase,
            CheckpointFamily::SdxlRefiner => ModelFamily::SdxlRefiner,
        }
    }
}

pub use sdrs_kernels::dispatch::{activation_dtype, small_model_dtype as tiny_autoencoder_dtype};

/// How a model is loaded: where it computes, in which dtype, which weight variant to prefer, and
/// how its layers compute (kernel options and CPU threads, kept by this pipeline alone).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// A weight-file variant such as `fp16` (`model.fp16.safetensors`), tried before the plain files.
    pub variant: Option<String>,
    /// Attention mode and CPU kernel level of every layer.
    pub kernels: KernelOptions,
    /// Worker threads of the pipeline's own thread pool; `None`: the physical cores.
    pub threads: Option<usize>,
}

impl LoadOptions {
    /// Options for computing in `dtype` on `device`, reading weight `variant` when given, else
    /// the `fp16` files for half-precision compute (the plain files fill any gap): the rule
    /// downloads and loads share, so a cache holding both kinds loads what a run fetched.
    pub fn new(device: Device, dtype: DType, variant: Option<String>) -> Self {
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let variant = variant.or_else(|| half.then(|| "fp16".to_string()));
        Self {
            device,
            dtype,
            variant,
            kernels: KernelOptions::default(),
            threads: None,
        }
    }

    /// The same options with these kernel options.
    pub fn with_kernels(mut self, kernels: KernelOptions) -> Self {
        self.kernels = kernels;
        self
    }

    /// The same options with `threads` CPU worker threads (`None`: the physical cores).
    pub fn with_threads(mut self, threads: Option<usize>) -> Self {
        self.threads = threads;
        self
    }

    /// The pipeline's thread pool: `threads` workers, or one per physical core.
    pub fn thread_pool(&self) -> Result<Arc<rayon::ThreadPool>> {
        let threads = match self.threads {
            Some(0) => {
                return Err(Error::InvalidParameter {
                    name: "threads",
                    value: "0".to_string(),
                    expected: "at least 1 (or none for the physical cores)".to_string(),
                })
            }
            Some(n) => n,
            None => num_cpus::get_physical().max(1),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sdrs-worker-{i}"))
            .build()
            .map_err(|e| Error::InvalidParameter {
                name: "threads",
                value: threads.to_string(),
                expected: format!("a count the system can start threads for ({e})"),
            })?;
        Ok(Arc::new(pool))
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::new(Device::Cpu, DType::F32, None)
    }
}

/// Where the denoising starts from.
#[derive(Debug, Clone, Default)]
pub enum InitImage {
    /// Pure noise (text-to-image).
    #[default]
    None,
    /// Image-to-image: `[1, 3, H, W]` in `[0, 1]`, encoded by the VAE and noised to `strength`.
    Pixels(Tensor),
    /// Latents another pipeline returned (SDXL base -> refiner), already scaled for the UNet.
    Latents(Tensor),
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
    /// Explicit initial noise `[1, C, H/8, W/8]` (before `init_noise_sigma` scaling) for text-to-image.
    pub latents: Option<Tensor>,
    pub init_image: InitImage,
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
}

impl Request {
    /// A request with diffusers' defaults for `pipeline`: its native size, 25 steps... see the fields.
    pub fn new(pipeline: &StableDiffusion, prompt: &str, scheduler: serde_json::Value) -> Self {
        let size = pipeline.default_size();
        Self {
            prompt: prompt.to_string(),
            prompt_2: None,
            negative_prompt: None,
            negative_prompt_2: None,
            width: size,
            height: size,
            steps: 25,
            guidance_scale: pipeline.family().default_guidance_scale(),
            scheduler,
            clip_skip: None,
            seed: None,
            latents: None,
            init_image: InitImage::None,
            strength: 0.3,
            denoising_start: None,
            denoising_end: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
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
    /// A preview of the current latents, `[1, 3, H, W]` in `[0, 1]`: decoded by the tiny
    /// autoencoder when the pipeline has one, otherwise by a cheap linear projection.
    /// Computed only when asked for.
    pub fn preview(&self) -> Result<Tensor> {
        self.pipeline.preview(self.latents)
    }
}

/// A loaded Stable Diffusion model of any supported family.
pub struct StableDiffusion {
    root: PathBuf,
    family: ModelFamily,
    /// `None` only inside a one-shot run ([`Self::generate_once`]) once the prompts are encoded.
    text: Option<TextEncoders>,
    /// `None` only inside a one-shot run once the denoising is done.
    unet: Option<UNet2DConditionModel>,
    unet_config: UNet2DConditionConfig,
    vae: AutoencoderKL,
    vae_dtype: DType,
    /// Decodes instead of the full VAE when set (fast final decode and previews).
    tiny_vae: Option<AutoencoderTiny>,
    scheduler_config: serde_json::Value,
    device: Device,
    dtype: DType,
    kernels: KernelOptions,
    /// This pipeline's CPU workers: every computation runs inside it.
    pool: Arc<rayon::ThreadPool>,
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
            &ModelFiles::Folder(root.to_path_buf()),
            &Weights::Folder(root.to_path_buf()),
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
            &ModelFiles::Folder(config_dir.to_path_buf()),
            &Weights::Checkpoint(checkpoint),
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
            &ModelFiles::Builtin(model),
            &Weights::Checkpoint(checkpoint),
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

    /// A model with the configs of `files` (e.g. [`ModelFiles::Builtin`] for the published
    /// architectures) and seeded random weights built in the process: what `sdrs bench` measures,
    /// the real shapes and pipeline with no weight files.
    pub fn random(files: &ModelFiles, seed: u64, options: &LoadOptions) -> Result<Self> {
        let root = files.location("").join("<random weights>");
        Self::load_with(&root, files, &Weights::Random(seed), options)
    }

    /// `root` is what [`Self::root`] reports: the folder, or the single checkpoint file.
    fn load_with(
        root: &Path,
        files: &ModelFiles,
        weights: &Weights,
        options: &LoadOptions,
    ) -> Result<Self> {
        let family = ModelFamily::detect_in(files)?;
        let pool = options.thread_pool()?;
        let device = &options.device;
        let dtype = options.dtype;
        let variant = options.variant.as_deref();
        let load = |component: &'static str,
                    dtype: DType|
         -> Result<(sdrs_kernels::VarBuilder<'static>, PathBuf)> {
            let (vb, path) = weights.component(files, component, variant, dtype, device)?;
            Ok((sdrs_kernels::VarBuilder::new(vb, options.kernels), path))
        };
        let text_encoder = |tokenizer: &str, encoder: &'static str| -> Result<TextEncoder> {
            let tokenizer = files.tokenizer(tokenizer)?;
            let config = files.text_config(encoder)?;
            let (vb, path) = load(encoder, dtype)?;
            let model = ClipTextModel::new(vb, &config)
                .map_err(|e| with_weights_context(encoder, path, e))?;
            Ok(TextEncoder { tokenizer, model })
        };
        let text = match family {
            ModelFamily::Sd => {
                TextEncoders::Sd(Box::new(text_encoder("tokenizer", "text_encoder")?))
            }
            ModelFamily::SdxlBase | ModelFamily::SdxlRefiner => {
                let index = files
                    .optional_json("model_index.json")?
                    .unwrap_or(serde_json::Value::Null);
                let mut encoders = Vec::new();
                if family == ModelFamily::SdxlBase {
                    encoders.push(text_encoder("tokenizer", "text_encoder")?);
                }
                encoders.push(text_encoder("tokenizer_2", "text_encoder_2")?);
                TextEncoders::Sdxl {
                    encoders,
                    // diffusers' defaults: base true, refiner false.
                    force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"]
                        .as_bool()
                        .unwrap_or(family == ModelFamily::SdxlBase),
                    requires_aesthetics_score: family == ModelFamily::SdxlRefiner,
                }
            }
        };

        let unet_config = files.unet_config()?;
        let (vb, path) = load("unet", dtype)?;
        let unet = UNet2DConditionModel::new(vb, &unet_config)
            .map_err(|e| with_weights_context("unet", path, e))?;

        let vae_config = files.vae_config()?;
        // diffusers runs the VAE in f32 when the model is f16 and the VAE says it overflows in f16.
        let vae_dtype = if dtype == DType::F16 && vae_config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let (vb, path) = load("vae", vae_dtype)?;
        let vae = AutoencoderKL::new(vb, &vae_config)
            .map_err(|e| with_weights_context("vae", path, e))?;

        let scheduler_config = files.json("scheduler/scheduler_config.json")?;

        Ok(Self {
            root: root.to_path_buf(),
            family,
            text: Some(text),
            unet: Some(unet),
            unet_config,
            vae,
            vae_dtype,
            tiny_vae: None,
            scheduler_config,
            device: device.clone(),
            dtype,
            kernels: options.kernels,
            pool,
        })
    }

    /// The kernel options every layer of this pipeline computes with.
    pub fn kernels(&self) -> KernelOptions {
        self.kernels
    }

    /// Runs `work` on this pipeline's thread pool (the kernels' parallel loops use its workers).
    fn in_pool<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        self.pool.install(work)
    }
    /// The dtype the VAE's activations flow in.
    fn vae_activations(&self) -> DType {
        activation_dtype(self.vae_dtype, &self.device)
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
        1 << self.vae.config().block_out_channels.len().saturating_sub(1)
    }

    /// The size the UNet was trained at, in pixels: diffusers' default width and height.
    pub fn default_size(&self) -> usize {
        // diffusers falls back to 64 latents (SD1.5) when the config has no sample size.
        self.unet_config.sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs a whole generation and returns images `[1, 3, H, W]` in `[0, 1]` (f32).
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
            self.unet = None;
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

    /// Checks the request and encodes its prompts (and SDXL's micro-conditioning).
    fn encode_prompts(&self, request: &Request) -> Result<Conditioning> {
        self.check_request(request)?;
        let guided = request.guidance_scale > 1.0;
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
            guided,
        };
        let text = self.text.as_ref().ok_or(Error::Released {
            component: "text encoders",
        })?;
        text.encode(
            &prompts,
            &micro,
            activation_dtype(self.dtype, &self.device),
            &self.device,
        )
    }

    fn denoise_with(
        &self,
        request: &Request,
        conditioning: &Conditioning,
        progress: &mut (dyn FnMut(&StepProgress) + Send),
    ) -> Result<Tensor> {
        let guided = request.guidance_scale > 1.0;
        let (height, width) = (request.height, request.width);
        let unet = self
            .unet
            .as_ref()
            .ok_or(Error::Released { component: "UNet" })?;

        let mut scheduler = sdrs_schedulers::from_config(&request.scheduler, request.steps)?;
        let num_train_timesteps = request.scheduler["num_train_timesteps"]
            .as_f64()
            .unwrap_or(1000.0);
        let all_timesteps = scheduler.timesteps().to_vec();
        let factor = self.vae_scale_factor();
        let shape = (
            1,
            self.unet_config.in_channels,
            height / factor,
            width / factor,
        );
        let mut generator = request.seed.map(TorchGenerator::new);

        // Which timesteps to run and the latents to start from, drawing from the generator in
        // diffusers' order: initial noise (text-to-image), or the VAE sample then the noise (img2img).
        let (start, mut latents) = match &request.init_image {
            InitImage::None => {
                let noise = match (&request.latents, generator.as_mut()) {
                    (Some(latents), _) => {
                        check_shape("latents", latents, shape)?;
                        latents.to_device(&self.device)?.to_dtype(DType::F32)?
                    }
                    (None, Some(generator)) => {
                        generator.randn(&shape.into(), DType::F32, &self.device)?
                    }
                    (None, None) => return Err(no_seed()),
                };
                (0, (noise * scheduler.init_noise_sigma())?)
            }
            InitImage::Pixels(image) => {
                let start = match request.denoising_start {
                    Some(fraction) => denoising_start_index(
                        &all_timesteps,
                        fraction,
                        num_train_timesteps,
                        scheduler.order(),
                    ),
                    None => {
                        strength_start_index(request.steps, request.strength, scheduler.order())?
                    }
                };
                let generator = generator.as_mut().ok_or_else(no_seed)?;
                let image = image.to_device(&self.device)?.to_dtype(DType::F32)?;
                check_shape("init image", &image, (1, 3, height, width))?;
                let dist = self
                    .vae
                    .encode(&((image * 2.0)? - 1.0)?.to_dtype(self.vae_activations())?)?;
                let sample_noise = generator.randn(dist.mean.shape(), DType::F32, &self.device)?;
                let encoded = dist.sample_with(&sample_noise.to_dtype(self.vae_activations())?)?;
                let init = self.scale_latents(&encoded.to_dtype(DType::F32)?)?;
                let latents = if request.denoising_start.is_some() {
                    init
                } else {
                    let noise = generator.randn(init.shape(), DType::F32, &self.device)?;
                    let t = all_timesteps.get(start).copied().unwrap_or_default();
                    scheduler.add_noise(&init, &noise, t)?
                };
                (start, latents)
            }
            InitImage::Latents(init) => {
                check_shape("init latents", init, shape)?;
                let init = init.to_device(&self.device)?.to_dtype(DType::F32)?;
                match request.denoising_start {
                    // Continue from another pipeline's latents: no noise is added.
                    Some(fraction) => (
                        denoising_start_index(
                            &all_timesteps,
                            fraction,
                            num_train_timesteps,
                            scheduler.order(),
                        ),
                        init,
                    ),
                    None => {
                        let start = strength_start_index(
                            request.steps,
                            request.strength,
                            scheduler.order(),
                        )?;
                        let generator = generator.as_mut().ok_or_else(no_seed)?;
                        let noise = generator.randn(init.shape(), DType::F32, &self.device)?;
                        let t = all_timesteps.get(start).copied().unwrap_or_default();
                        (start, scheduler.add_noise(&init, &noise, t)?)
                    }
                }
            }
        };
        if start > 0 {
            scheduler.set_begin_index(start);
        }
        let mut timesteps: Vec<f64> = all_timesteps[start.min(all_timesteps.len())..].to_vec();
        if let Some(fraction) = request.denoising_end {
            let cutoff = (num_train_timesteps - fraction * num_train_timesteps).round();
            timesteps.retain(|&t| t >= cutoff);
        }
        if timesteps.is_empty() {
            return Err(Error::InvalidParameter {
                name: "strength",
                value: format!("{} with {} steps", request.strength, request.steps),
                expected: "a combination that leaves at least one denoising step".to_string(),
            });
        }

        let mut no_noise = NoNoise;
        let noise: &mut dyn NoiseSource = match generator.as_mut() {
            Some(generator) => generator,
            None => &mut no_noise,
        };
        let batch = if guided { 2 } else { 1 };
        for (index, &t) in timesteps.iter().enumerate() {
            let model_input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_input = scheduler.scale_model_input(&model_input, t)?;
            let t_batch = Tensor::full(t as f32, batch, &self.device)?;
            let noise_pred = unet
                .forward(
                    &model_input.to_dtype(activation_dtype(self.dtype, &self.device))?,
                    &t_batch,
                    &conditioning.embeddings,
                    conditioning.added.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let noise_pred = if guided {
                let uncond = noise_pred.narrow(0, 0, 1)?;
                let cond = noise_pred.narrow(0, 1, 1)?;
                (&uncond + ((cond - &uncond)? * request.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = scheduler.step(&noise_pred, t, &latents, noise)?;
            progress(&StepProgress {
                step: index + 1,
                total: timesteps.len(),
                timestep: t,
                latents: &latents,
                pipeline: self,
            });
        }
        Ok(latents)
    }

    /// VAE latents -> UNet latents (`(z - shift) * scale`, or with `latents_mean`/`latents_std`).
    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let config = self.vae.config();
        let z = match self.latents_stats(z)? {
            Some((mean, std)) => z.broadcast_sub(&mean)?.broadcast_div(&std)?,
            None => match config.shift_factor {
                Some(shift) => (z - shift)?,
                None => z.clone(),
            },
        };
        Ok((z * config.scaling_factor)?)
    }

    /// Decodes with a tiny autoencoder (TAESD and kin) instead of the full VAE from now on; its
    /// latent channels must match the UNet's.
    pub fn set_tiny_autoencoder(&mut self, tiny: AutoencoderTiny) -> Result<()> {
        let (found, expected) = (tiny.config().latent_channels, self.unet_config.in_channels);
        if found != expected {
            return Err(Error::InvalidParameter {
                name: "tiny autoencoder",
                value: format!("{} ({found} latent channels)", tiny.variant()),
                expected: format!("one for {expected}-channel latents, as this model makes"),
            });
        }
        self.tiny_vae = Some(tiny);
        Ok(())
    }

    /// A cheap preview of UNet latents `[1, C, h, w]`: the tiny autoencoder when there is one,
    /// else a per-pixel linear map from latent channels to RGB (at latent resolution).
    pub fn preview(&self, latents: &Tensor) -> Result<Tensor> {
        if self.tiny_vae.is_some() {
            return self.decode(latents);
        }
        let factors = preview::latent_rgb_factors(self.family, latents.dim(1)?)?;
        preview::linear_preview(latents, &factors)
    }

    /// Decodes latents into images `[B, 3, H, W]` in `[0, 1]` (f32), with the tiny autoencoder
    /// when one is set, else the model's VAE.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.in_pool(|| self.decode_here(latents))
    }

    /// [`Self::decode`] on the calling thread's pool.
    fn decode_here(&self, latents: &Tensor) -> Result<Tensor> {
        if let Some(tiny) = &self.tiny_vae {
            // A tiny autoencoder is trained on the latents as the UNet sees them (diffusers'
            // AutoencoderTiny has scaling factor 1).
            let z = latents
                .to_device(tiny.device())?
                .to_dtype(activation_dtype(tiny.dtype(), tiny.device()))?;
            let image = tiny.decode(&(z / tiny.config().scaling_factor)?)?;
            return Ok(((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?);
        }
        let config = self.vae.config();
        let latents = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        let z = (latents / config.scaling_factor)?;
        let z = match self.latents_stats(&z)? {
            Some((mean, std)) => z.broadcast_mul(&std)?.broadcast_add(&mean)?,
            None => match config.shift_factor {
                Some(shift) => (z + shift)?,
                None => z,
            },
        };
        let image = self.vae.decode(&z.to_dtype(self.vae_activations())?)?;
        Ok(((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// The VAE's per-channel `latents_mean` and `latents_std` as `[1, C, 1, 1]`, when it has them.
    fn latents_stats(&self, like: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let config = self.vae.config();
        match (&config.latents_mean, &config.latents_std) {
            (Some(mean), Some(std)) => {
                let channels = mean.len();
                let as_tensor = |v: &Vec<f64>| -> Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    Ok(Tensor::from_vec(v, (1, channels, 1, 1), like.device())?)
                };
                Ok(Some((as_tensor(mean)?, as_tensor(std)?)))
            }
            _ => Ok(None),
        }
    }

    fn check_request(&self, request: &Request) -> Result<()> {
        let factor = self.vae_scale_factor();
        for (name, value) in [("width", request.width), ("height", request.height)] {
            if value == 0 || value % factor != 0 {
                return Err(Error::InvalidParameter {
                    name,
                    value: value.to_string(),
                    expected: format!("a positive multiple of {factor}"),
                });
            }
        }
        if request.steps == 0 {
            return Err(Error::InvalidParameter {
                name: "steps",
                value: "0".to_string(),
                expected: "at least 1".to_string(),
            });
        }
        if !request.guidance_scale.is_finite() {
            return Err(Error::InvalidParameter {
                name: "guidance scale",
                value: request.guidance_scale.to_string(),
                expected: "a finite number".to_string(),
            });
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
        Ok(())
    }
}

/// diffusers' img2img `get_timesteps`: skip the first `steps - int(steps * strength)` steps.
fn strength_start_index(steps: usize, strength: f64, order: usize) -> Result<usize> {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    if init_timestep == 0 {
        return Err(Error::InvalidParameter {
            name: "strength",
            value: format!("{strength} with {steps} steps"),
            expected: "steps x strength of at least 1".to_string(),
        });
    }
    Ok((steps - init_timestep) * order)
}

/// diffusers' SDXL img2img `get_timesteps` with `denoising_start`: run the timesteps below the
/// cutoff (one more for second-order schedulers when the count is even).
fn denoising_start_index(
    timesteps: &[f64],
    fraction: f64,
    num_train_timesteps: f64,
    order: usize,
) -> usize {
    let cutoff = (num_train_timesteps - fraction * num_train_timesteps).round();
    let mut count = timesteps.iter().filter(|&&t| t < cutoff).count();
    if order == 2 && count % 2 == 0 {
        count += 1;
    }
    timesteps.len().saturating_sub(count)
}

fn check_shape(
    what: &'static str,
    tensor: &Tensor,
    shape: (usize, usize, usize, usize),
) -> Result<()> {
    if tensor.dims() != [shape.0, shape.1, shape.2, shape.3] {
        return Err(Error::InvalidParameter {
            name: what,
            value: format!("of shape {:?}", tensor.dims()),
            expected: format!("shape {:?}", [shape.0, shape.1, shape.2, shape.3]),
        });
    }
    Ok(())
}

fn no_seed() -> Error {
    Error::InvalidParameter {
        name: "seed",
        value: "none".to_string(),
        expected: "a seed (or explicit initial latents)".to_string(),
    }
}

/// Gives a component's construction error the weight file it came from (a missing tensor or a
/// tensor of the wrong shape for the config).
fn with_weights_context<E: Into<Error>>(component: &'static str, path: PathBuf, error: E) -> Error {
    match error.into() {
        Error::Candle(source) => Error::Weights {
            component,
            path,
            source,
        },
        other => other,
    }
}

/// Where the component weights come from.
enum Weights {
    /// Each component's own files in this diffusers folder.
    Folder(PathBuf),
    /// One original-layout checkpoint for every component.
    Checkpoint(Checkpoint),
    /// Seeded random weights of the configured shapes (benchmarks).
    Random(u64),
}

impl Weights {
    /// The weights of `component` as a `VarBuilder`, and the file they come from (for messages).
    /// The component's config comes from `files` (a single checkpoint has none of its own).
    fn component(
        &self,
        files: &ModelFiles,
        component: &'static str,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, PathBuf)> {
        match self {
            Weights::Folder(root) => {
                let dir = root.join(component);
                let files = find_weights(&dir, variant)?;
                let vb = var_builder(component, &files, dtype, device)?;
                Ok((vb, files.first().cloned().unwrap_or(dir)))
            }
            Weights::Checkpoint(checkpoint) => {
                let config = files.json(&format!("{component}/config.json"))?;
                let vb = checkpoint.var_builder(component, &config, dtype, device)?;
                Ok((vb, checkpoint.path().to_path_buf()))
            }
            Weights::Random(seed) => Ok((
                RandomWeights::for_component(*seed, component).into_var_builder(dtype, device),
                PathBuf::from("<random weights>"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn strength_skips_the_first_steps_like_diffusers() {
        assert_eq!(strength_start_index(10, 0.6, 1).unwrap(), 4);
        assert_eq!(strength_start_index(10, 1.0, 1).unwrap(), 0);
        assert_eq!(strength_start_index(25, 0.75, 1).unwrap(), 7);
        assert_eq!(strength_start_index(10, 0.6, 2).unwrap(), 8);
        assert!(strength_start_index(3, 0.2, 1).is_err());
    }

    #[test]
    fn denoising_start_runs_the_timesteps_below_the_cutoff() {
        let timesteps: Vec<f64> = (0..10).map(|i| 901.0 - 100.0 * i as f64).collect();
        // cutoff 200: 101 and 1 remain.
        assert_eq!(denoising_start_index(&timesteps, 0.8, 1000.0, 1), 8);
        // second-order schedulers take one more when the count is even.
        assert_eq!(denoising_start_index(&timesteps, 0.8, 1000.0, 2), 7);
    }
}
