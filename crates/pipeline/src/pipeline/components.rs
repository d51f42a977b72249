//! The components a pipeline runs against, as traits: a prompt encoder (one text encoder with its
//! tokenizer), a denoiser (the UNet), a latent decoder and a latent encoder (the autoencoders); and
//! their candle implementations over `sdrs-clip`, `sdrs-unet`, `sdrs-vae` and `sdrs-taesd`, built
//! from a model's files. Another backend (Core ML, ...) implements the same traits; only tensors
//! cross them.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs_clip::{ClipTextModel, ClipTokenizer};
use sdrs_kernels::dispatch::activation_dtype;
use sdrs_kernels::weight::QuantizedSource;
use sdrs_schedulers::NoiseSource;
use sdrs_taesd::AutoencoderTiny;
use sdrs_unet::UNet2DConditionModel;
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::loading::lora::LoraSet;
use crate::loading::quantize::{Chain, QuantizeAtLoad, QUANTIZED_COMPONENTS};
use crate::model_files::ModelFiles;
use crate::random_weights::RandomWeights;
use crate::weights::{find_weights, var_builder};

use super::conditioning::TextEncoders;
use super::family::ModelFamily;
use super::prompt::TokenRules;
use super::vae_tiling::{VaePass, VaeTilingPolicy};
use crate::loading::LoadOptions;

/// Which hidden state of a text encoder a pipeline conditions on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayer {
    /// The output `clip_skip` layers from the end (1 or 0: the last, `last_hidden_state`), after
    /// the final layer norm: SD1.x/2.x with AUTOMATIC1111's clip skip.
    Normalized { clip_skip: usize },
    /// The raw output `clip_skip` layers from the end, not normalized: SDXL (2: the penultimate).
    Raw { clip_skip: usize },
}

/// One prompt encoded by one text encoder.
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    /// The hidden state asked for, `[1, tokens, hidden]`.
    pub hidden_state: Tensor,
    /// The projected pooled embedding `[1, projection_dim]`, when asked for.
    pub pooled: Option<Tensor>,
}

/// One text encoder with its tokenizer: a prompt in, its embeddings out. The family's rules (which
/// encoders, which layer, negative prompts, SDXL's concatenation) are the pipeline's, not the
/// encoder's.
pub trait PromptEncoder: Send + Sync {
    /// Tokenizes `prompt` (padded or truncated to the encoder's context) and encodes it: the
    /// hidden state `layer` names and, with `pooled`, the projected pooled embedding (an error
    /// when the encoder has no projection).
    fn encode(&self, prompt: &str, layer: TextLayer, pooled: bool) -> Result<TextEmbeddings>;

    /// Adds a textual-inversion embedding: `vectors` `[n, hidden]` under the name `token`, which
    /// then stands for its `n` vectors in prompts (see `ClipTokenizer::add_embedding_token`).
    /// Returns the token ids it was given. A `hidden` that is not the encoder's width, or a name
    /// the tokenizer already has, is an error, and nothing is added then.
    fn add_embedding(&mut self, token: &str, vectors: &Tensor) -> Result<Vec<u32>>;

    /// The ids of `text` without begin/end tokens, neither truncated nor padded.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>>;

    /// The special ids and the context length, for cutting a long prompt into chunks.
    fn token_rules(&self) -> TokenRules;

    /// Encodes ids the caller tokenized (one chunk: at most the encoder's context), as
    /// [`Self::encode`] encodes a prompt's.
    fn encode_ids(&self, ids: &[u32], layer: TextLayer, pooled: bool) -> Result<TextEmbeddings>;
}

/// SDXL's extra conditions (diffusers' `added_cond_kwargs`).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// The pooled, projected text embedding of the last text encoder, `[B, D]`.
    pub text_embeds: Tensor,
    /// Original size, crop offset and target size (the refiner: aesthetic score), `[B, n]`.
    pub time_ids: Tensor,
}

/// The noise-prediction network: the UNet, or anything that predicts what it predicts.
pub trait Denoiser: Send + Sync {
    /// The model output (noise, or v) for `latents` `[B, C, h, w]` at `timestep` `[B]`,
    /// conditioned on `context` `[B, tokens, D]` and, for SDXL, `added`. Inputs come in
    /// [`Self::dtype`]; the output may be in any float dtype.
    fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor>;

    /// The latent channels `C` the model takes.
    fn in_channels(&self) -> usize;

    /// The dtype its inputs and conditioning are given in.
    fn dtype(&self) -> DType;

    /// Where its inputs live.
    fn device(&self) -> &Device;

    /// The estimated peak of one forward's activations over `rows` latents of `height` x
    /// `width`, in bytes; `None` where it is not known (another runtime's model).
    fn peak_activation_bytes(&self, _rows: usize, _height: usize, _width: usize) -> Option<u64> {
        None
    }
}

/// Latents to pixels: the VAE's decoder, or a tiny autoencoder's.
pub trait LatentDecoder: Send + Sync {
    /// UNet latents `[B, C, h, w]` (scaled as the scheduler keeps them) to images
    /// `[B, 3, h * f, w * f]` in `[0, 1]`, f32.
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;

    /// The latent channels `C` it decodes.
    fn latent_channels(&self) -> usize;

    /// The pixels `f` one latent covers along each side.
    fn scale_factor(&self) -> usize;

    /// What it is, for messages (`AutoencoderKL`, `TAESD`, ...).
    fn name(&self) -> String;

    /// The estimated peak of decoding `batch` latents of `height` x `width` with
    /// `available_bytes` free, in bytes, and whether the decode is tiled; `None` where it is not
    /// known.
    fn peak_bytes(
        &self,
        _batch: usize,
        _height: usize,
        _width: usize,
        _available_bytes: Option<u64>,
    ) -> Option<(u64, bool)> {
        None
    }
}

/// Pixels to latents: the VAE's encoder, or a tiny autoencoder's.
pub trait LatentEncoder: Send + Sync {
    /// Images `[B, 3, H, W]` in `[0, 1]` to UNet latents (scaled as the scheduler keeps them),
    /// f32. An encoder that samples its latent distribution (the VAE) draws that noise from
    /// `noise`, at the point of the generator's sequence where diffusers draws it.
    fn encode(&self, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor>;

    /// The estimated peak of encoding `batch` images of `height` x `width` pixels with
    /// `available_bytes` free, in bytes, and whether the encode is tiled; `None` where it is not
    /// known.
    fn peak_bytes(
        &self,
        _batch: usize,
        _height: usize,
        _width: usize,
        _available_bytes: Option<u64>,
    ) -> Option<(u64, bool)> {
        None
    }
}

/// A CLIP text encoder (`sdrs-clip`) with its tokenizer.
pub struct ClipPromptEncoder {
    /// The model folder's component name (`text_encoder_2`), for messages.
    component: &'static str,
    tokenizer: ClipTokenizer,
    rules: TokenRules,
    model: ClipTextModel,
    device: Device,
}

impl ClipPromptEncoder {
    pub fn new(
        component: &'static str,
        tokenizer: ClipTokenizer,
        model: ClipTextModel,
        device: &Device,
    ) -> Self {
        let rules = TokenRules {
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
            // The pad token's id is A1111's `id_pad`: CLIP's tokenizers pad with `eos`, the
            // OpenCLIP encoders' (SD2.x, SDXL's second) with `!`, id 0, as A1111 pads them.
            pad: tokenizer.pad_id(),
            comma: tokenizer.token_to_id(",</w>"),
            context_length: tokenizer.max_length(),
        };
        Self {
            component,
            tokenizer,
            rules,
            model,
            device: device.clone(),
        }
    }

    /// The index into `hidden_states` (0: the embeddings, `i`: layer `i`) of the state
    /// `clip_skip` layers from the end.
    fn index_from_end(&self, clip_skip: usize) -> Result<usize> {
        let layers = self.model.num_hidden_layers();
        match (layers + 1).checked_sub(clip_skip) {
            Some(index) if clip_skip >= 1 => Ok(index),
            _ => Err(Error::InvalidParameter {
                name: "clip skip",
                value: clip_skip.to_string(),
                expected: format!("from 1 to {} for this text encoder", layers + 1),
            }),
        }
    }
}

impl PromptEncoder for ClipPromptEncoder {
    fn encode(&self, prompt: &str, layer: TextLayer, pooled: bool) -> Result<TextEmbeddings> {
        self.encode_ids(&self.tokenizer.encode(prompt)?, layer, pooled)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.tokenize(text)?)
    }

    fn token_rules(&self) -> TokenRules {
        self.rules
    }

    fn encode_ids(&self, ids: &[u32], layer: TextLayer, pooled: bool) -> Result<TextEmbeddings> {
        let ids = Tensor::from_slice(ids, (1, ids.len()), &self.device)?;
        if !pooled {
            // Only the layers up to the one used are run.
            let hidden_state = match layer {
                TextLayer::Normalized { clip_skip } if clip_skip <= 1 => {
                    self.model.forward(&ids)?.last_hidden_state
                }
                TextLayer::Normalized { clip_skip } => {
                    self.model.forward_clip_skip(&ids, clip_skip)?
                }
                TextLayer::Raw { clip_skip } => self
                    .model
                    .hidden_state(&ids, self.index_from_end(clip_skip)?)?,
            };
            return Ok(TextEmbeddings {
                hidden_state,
                pooled: None,
            });
        }
        // The pooled projection needs every layer: run them all once and pick the state.
        let out = self.model.forward(&ids)?;
        let hidden_state = match layer {
            TextLayer::Normalized { clip_skip } if clip_skip <= 1 => out.last_hidden_state,
            TextLayer::Normalized { clip_skip } => self
                .model
                .final_layer_norm(&out.hidden_states[self.index_from_end(clip_skip)?])?,
            TextLayer::Raw { clip_skip } => {
                out.hidden_states[self.index_from_end(clip_skip)?].clone()
            }
        };
        let embeds = out.text_embeds.ok_or_else(|| Error::MissingFile {
            path: format!("{}/model.safetensors", self.component).into(),
            what:
                "text_projection.weight (SDXL's second text encoder is CLIPTextModelWithProjection)"
                    .to_string(),
        })?;
        Ok(TextEmbeddings {
            hidden_state,
            pooled: Some(embeds),
        })
    }

    fn add_embedding(&mut self, token: &str, vectors: &Tensor) -> Result<Vec<u32>> {
        let hidden = self.model.hidden_size();
        let dims = vectors.dims().to_vec();
        if !matches!(dims.as_slice(), [n, d] if *n > 0 && *d == hidden) {
            return Err(Error::InvalidParameter {
                name: "embedding",
                value: format!("{token:?} of shape {dims:?}"),
                expected: format!(
                    "[n, {hidden}] vectors: {} has hidden size {hidden}, the embedding {}",
                    self.component,
                    dims.last().copied().unwrap_or(0)
                ),
            });
        }
        // Added on a copy first, so that a refused token leaves the encoder as it was.
        let mut tokenizer = self.tokenizer.clone();
        let ids = tokenizer.add_embedding_token(token, dims[0])?;
        let next_row = self.model.vocab_size() as u32;
        if ids[0] != next_row {
            return Err(Error::InvalidParameter {
                name: "embedding",
                value: format!("{token:?} (token id {})", ids[0]),
                expected: format!(
                    "the next id of {}, {next_row}: its tokenizer and its token embeddings \
                     have different sizes",
                    self.component
                ),
            });
        }
        self.model.add_token_embeddings(vectors)?;
        self.tokenizer = tokenizer;
        Ok(ids)
    }
}

/// diffusers' `UNet2DConditionModel` (`sdrs-unet`), fed activations in the dtype the kernels
/// compute in on its device.
pub struct UNetDenoiser {
    model: UNet2DConditionModel,
    activations: DType,
    device: Device,
}

impl UNetDenoiser {
    /// `weights` is the dtype the model's weights were loaded in.
    pub fn new(model: UNet2DConditionModel, weights: DType, device: &Device) -> Self {
        Self {
            model,
            activations: activation_dtype(weights, device),
            device: device.clone(),
        }
    }
}

impl Denoiser for UNetDenoiser {
    fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        // Tensors are reference counted: the copy shares the conditioning's storage.
        let added = added.map(|added| sdrs_unet::AddedConditions {
            text_embeds: added.text_embeds.clone(),
            time_ids: added.time_ids.clone(),
        });
        Ok(self
            .model
            .forward(latents, timestep, context, added.as_ref())?)
    }

    fn in_channels(&self) -> usize {
        self.model.config().in_channels
    }

    fn dtype(&self) -> DType {
        self.activations
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn peak_activation_bytes(&self, rows: usize, height: usize, width: usize) -> Option<u64> {
        let elements =
            sdrs_unet::memory::peak_activation_elements(self.model.config(), rows, height, width)
                .ok()?;
        Some(elements.saturating_mul(self.activations.size_in_bytes() as u64))
    }
}

/// diffusers' `AutoencoderKL` (`sdrs-vae`) with the model's latent scaling (`scaling_factor`,
/// `shift_factor` or `latents_mean`/`latents_std`), as encoder and decoder of UNet latents,
/// tiled as its [`VaeTilingPolicy`] says. Clones share the weights and the policy.
#[derive(Clone)]
pub struct KlAutoencoder {
    model: AutoencoderKL,
    activations: DType,
    device: Device,
    tiling: Arc<RwLock<VaeTilingPolicy>>,
}

impl KlAutoencoder {
    /// `weights` is the dtype the model's weights were loaded in.
    pub fn new(model: AutoencoderKL, weights: DType, device: &Device) -> Self {
        Self {
            model,
            activations: activation_dtype(weights, device),
            device: device.clone(),
            tiling: Arc::default(),
        }
    }

    /// Tiles the decodes and encodes of this autoencoder and of its clones as `policy` says.
    pub fn set_tiling(&self, policy: VaeTilingPolicy) {
        *self.tiling.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// The VAE's config.
    pub fn config(&self) -> &AutoencoderKLConfig {
        self.model.config()
    }

    /// The estimated peak of a `pass` over images of `[batch, height, width]` pixels with
    /// `available_bytes` free, and whether it is tiled.
    fn pass_peak_bytes(
        &self,
        pass: VaePass,
        shape: (usize, usize, usize),
        available_bytes: Option<u64>,
    ) -> (u64, bool) {
        let policy = self.tiling.read().unwrap_or_else(|e| e.into_inner());
        policy.peak_bytes(
            self.model.config(),
            pass,
            shape,
            self.activations,
            available_bytes,
        )
    }

    /// The tiles for a `pass` over images of `[batch, height, width]` pixels, if any.
    fn tiles_for(
        &self,
        pass: VaePass,
        shape: (usize, usize, usize),
    ) -> Option<sdrs_vae::VaeTiling> {
        let policy = self.tiling.read().unwrap_or_else(|e| e.into_inner());
        policy.tiles_for(
            self.model.config(),
            pass,
            shape,
            self.activations,
            &self.device,
        )
    }

    /// The VAE's per-channel `latents_mean` and `latents_std` as `[1, C, 1, 1]`, when it has them.
    fn latents_stats(&self, like: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let config = self.model.config();
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

    /// VAE latents -> UNet latents (`(z - shift) * scale`, or with `latents_mean`/`latents_std`).
    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let config = self.model.config();
        let z = match self.latents_stats(z)? {
            Some((mean, std)) => z.broadcast_sub(&mean)?.broadcast_div(&std)?,
            None => match config.shift_factor {
                Some(shift) => (z - shift)?,
                None => z.clone(),
            },
        };
        Ok((z * config.scaling_factor)?)
    }

    /// UNet latents -> VAE latents, the inverse of [`Self::scale_latents`].
    fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let config = self.model.config();
        let z = (latents / config.scaling_factor)?;
        Ok(match self.latents_stats(&z)? {
            Some((mean, std)) => z.broadcast_mul(&std)?.broadcast_add(&mean)?,
            None => match config.shift_factor {
                Some(shift) => (z + shift)?,
                None => z,
            },
        })
    }
}

/// Refuses `tensor` (f32) when it holds a NaN or an infinite value, naming the `stage`.
fn check_all_finite(tensor: &Tensor, stage: &'static str) -> Result<()> {
    // A NaN or infinite value makes the f32 sum non-finite; so can a sum of huge finite values,
    // which would clamp to a blank image as well.
    if tensor.sum_all()?.to_scalar::<f32>()?.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite { stage })
    }
}

fn check_finite(image: &Tensor) -> Result<()> {
    // A NaN or infinite value makes the f32 sum non-finite; finite f16-range values cannot.
    if image.sum_all()?.to_scalar::<f32>()?.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name: "dtype",
            value: "f16".to_string(),
            expected: "a dtype the VAE does not overflow in: its decode in f16 gave NaN or \
                       infinite values (its config has force_upcast false); run with --dtype \
                       f32 or bf16"
                .to_string(),
        })
    }
}

impl LatentDecoder for KlAutoencoder {
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("vae_decode").entered();
        let latents = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        check_all_finite(&latents, "final latents")?;
        let z = self.unscale_latents(&latents)?.to_dtype(self.activations)?;
        let (batch, _, height, width) = z.dims4()?;
        let factor = vae_scale_factor(self.model.config());
        let image = match self.tiles_for(VaePass::Decode, (batch, height * factor, width * factor))
        {
            Some(tiling) => self.model.decode_tiled(&z, &tiling)?,
            None => self.model.decode(&z)?,
        }
        .to_dtype(DType::F32)?;
        if self.activations == DType::F16 {
            check_finite(&image)?;
        }
        check_all_finite(&image, "decoded image")?;
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    fn latent_channels(&self) -> usize {
        self.model.config().latent_channels
    }

    fn scale_factor(&self) -> usize {
        vae_scale_factor(self.model.config())
    }

    fn name(&self) -> String {
        "AutoencoderKL".to_string()
    }

    fn peak_bytes(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        available_bytes: Option<u64>,
    ) -> Option<(u64, bool)> {
        let factor = vae_scale_factor(self.model.config());
        let pixels = (batch, height * factor, width * factor);
        Some(self.pass_peak_bytes(VaePass::Decode, pixels, available_bytes))
    }
}

impl LatentEncoder for KlAutoencoder {
    fn encode(&self, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let _span = tracing::info_span!("vae_encode").entered();
        let image = image.to_device(&self.device)?.to_dtype(DType::F32)?;
        let image = ((image * 2.0)? - 1.0)?.to_dtype(self.activations)?;
        let (batch, _, height, width) = image.dims4()?;
        let dist = match self.tiles_for(VaePass::Encode, (batch, height, width)) {
            Some(tiling) => self.model.encode_tiled(&image, &tiling)?,
            None => self.model.encode(&image)?,
        };
        let sample_noise = noise.randn(dist.mean.shape(), DType::F32, &self.device)?;
        let encoded = dist.sample_with(&sample_noise.to_dtype(self.activations)?)?;
        self.scale_latents(&encoded.to_dtype(DType::F32)?)
    }

    fn peak_bytes(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        available_bytes: Option<u64>,
    ) -> Option<(u64, bool)> {
        Some(self.pass_peak_bytes(VaePass::Encode, (batch, height, width), available_bytes))
    }
}

/// How many pixels one latent of this VAE covers along each side: one halving per down block
/// after the first (diffusers' `2 ** (len(vae.config.block_out_channels) - 1)`).
pub fn vae_scale_factor(config: &AutoencoderKLConfig) -> usize {
    1 << config.block_out_channels.len().saturating_sub(1)
}

/// A tiny autoencoder (TAESD and kin, `sdrs-taesd`): a fast decoder of UNet latents, and an
/// encoder when its encoder half is loaded. It is trained on the latents as the UNet sees them
/// (diffusers' `AutoencoderTiny` has scaling factor 1) and encodes deterministically.
pub struct TinyAutoencoder {
    model: AutoencoderTiny,
    activations: DType,
}

impl TinyAutoencoder {
    pub fn new(model: AutoencoderTiny) -> Self {
        let activations = activation_dtype(model.dtype(), model.device());
        Self { model, activations }
    }

    pub fn has_encoder(&self) -> bool {
        self.model.has_encoder()
    }
}

impl LatentDecoder for TinyAutoencoder {
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("tiny_decode").entered();
        check_all_finite(&latents.to_dtype(DType::F32)?, "final latents")?;
        let z = latents
            .to_device(self.model.device())?
            .to_dtype(self.activations)?;
        let image = self
            .model
            .decode(&(z / self.model.config().scaling_factor)?)?
            .to_dtype(DType::F32)?;
        check_all_finite(&image, "decoded image")?;
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    fn latent_channels(&self) -> usize {
        self.model.config().latent_channels
    }

    fn scale_factor(&self) -> usize {
        self.model.config().decoder_upsampling_factor()
    }

    fn name(&self) -> String {
        self.model.variant().to_string()
    }
}

impl LatentEncoder for TinyAutoencoder {
    fn encode(&self, image: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let _span = tracing::info_span!("tiny_encode").entered();
        let image = image
            .to_device(self.model.device())?
            .to_dtype(self.activations)?;
        let latents = self.model.encode(&((image * 2.0)? - 1.0)?)?;
        Ok((latents.to_dtype(DType::F32)? * self.model.config().scaling_factor)?)
    }
}

/// Where the component weights come from.
pub(crate) enum Weights {
    /// Each component's own files in this diffusers folder.
    Folder(PathBuf),
    /// One original-layout checkpoint for every component.
    Checkpoint(Checkpoint),
    /// Seeded random weights of the configured shapes (benchmarks).
    Random(u64),
}

impl Weights {
    /// The weights of `component` as a `VarBuilder`, the file they come from (for messages),
    /// and where its quantized layer weights come from: a GGUF file's blocks, a quantized
    /// folder's matrices, and what `options` asks to quantize at load (in that order). The
    /// component's config comes from `files` (a single checkpoint has none of its own). With
    /// `loras`, the layers they change load dense with the deltas merged (quantized at load
    /// after merging; the stored quantized sources do not answer for them).
    fn component(
        &self,
        files: &ModelFiles,
        component: &'static str,
        dtype: DType,
        options: &LoadOptions,
        loras: Option<&Arc<LoraSet>>,
    ) -> Result<ComponentWeights> {
        let device = &options.device;
        let variant = options.variant.as_deref();
        let mut sources: Vec<Arc<dyn QuantizedSource>> = Vec::new();
        let (vb, path) = match self {
            Weights::Folder(root) => {
                let dir = root.join(component);
                let files = find_weights(&dir, variant)?;
                let (vb, stored) = var_builder(component, &files, dtype, device)?;
                sources.extend(stored);
                (vb, files.first().cloned().unwrap_or(dir))
            }
            Weights::Checkpoint(checkpoint) => {
                let config = files.json(&format!("{component}/config.json"))?;
                let vb = checkpoint.var_builder(component, &config, dtype, device)?;
                sources.extend(checkpoint.quantized_source(component, &config, dtype)?);
                (vb, checkpoint.path().to_path_buf())
            }
            Weights::Random(seed) => (
                RandomWeights::for_component(*seed, component).into_var_builder(dtype, device),
                PathBuf::from("<random weights>"),
            ),
        };
        let (vb, mut sources) = match loras.filter(|loras| loras.touches(component)) {
            Some(loras) => (
                loras.wrap(component, vb),
                sources
                    .into_iter()
                    .map(|source| loras.without_merged(component, source))
                    .collect(),
            ),
            None => (vb, sources),
        };
        if let Some(spec) = options.quantize {
            if QUANTIZED_COMPONENTS.contains(&component) {
                sources.push(Arc::new(QuantizeAtLoad::new(
                    component,
                    vb.clone(),
                    spec,
                    options.recipe.clone(),
                    dtype,
                )));
            }
        }
        let quantized = match sources.len() {
            0 => None,
            1 => sources.pop(),
            _ => Some(Arc::new(Chain(sources)) as Arc<dyn QuantizedSource>),
        };
        Ok(ComponentWeights {
            vb,
            path,
            quantized,
        })
    }
}

/// What [`Weights::component`] opens.
struct ComponentWeights {
    vb: VarBuilder<'static>,
    path: PathBuf,
    quantized: Option<Arc<dyn QuantizedSource>>,
}

/// The candle components of one model, built from its configs and weights.
pub(crate) struct CandleComponents {
    pub text: TextEncoders,
    pub unet: UNetDenoiser,
    pub vae: KlAutoencoder,
}

impl CandleComponents {
    /// Builds the text encoders `family` has, the UNet and the VAE, in `options`' dtype (the VAE
    /// in f32 where diffusers upcasts it), with `options`' LoRAs merged.
    pub fn load(
        files: &ModelFiles,
        family: ModelFamily,
        weights: &Weights,
        options: &LoadOptions,
    ) -> Result<Self> {
        let device = &options.device;
        let dtype = options.dtype;
        let loras = LoraSet::open(
            &options.loras,
            &files.unet_config()?,
            options.lora_ignore_unmatched,
        )?;
        let text = load_text_encoders(files, family, weights, options, loras.as_ref())?;
        let unet = load_unet(files, weights, options, loras.as_ref())?;
        if let Some(loras) = &loras {
            loras.check_matched(&lora_components(family))?;
        }

        let vae_config = files.vae_config()?;
        let vae_dtype = vae_dtype(dtype, &vae_config);
        let (vb, path) = load_component(files, weights, "vae", vae_dtype, options, None)?;
        let vae = AutoencoderKL::new(vb, &vae_config)
            .map_err(|e| with_weights_context("vae", path, e))?;
        let vae = KlAutoencoder::new(vae, vae_dtype, device);
        vae.set_tiling(options.vae_tiling.resolve(&vae_config)?);

        Ok(Self { text, unet, vae })
    }
}

/// The components of a `family` model a LoRA can change: its text encoders and the UNet.
pub(crate) fn lora_components(family: ModelFamily) -> Vec<&'static str> {
    match family {
        ModelFamily::Sd => vec!["text_encoder", "unet"],
        ModelFamily::SdxlBase => vec!["text_encoder", "text_encoder_2", "unet"],
        ModelFamily::SdxlRefiner => vec!["text_encoder_2", "unet"],
    }
}

/// One component's builder (see [`Weights::component`]) with the kernel options, and the file
/// its weights come from.
fn load_component(
    files: &ModelFiles,
    weights: &Weights,
    component: &'static str,
    dtype: DType,
    options: &LoadOptions,
    loras: Option<&Arc<LoraSet>>,
) -> Result<(sdrs_kernels::VarBuilder<'static>, PathBuf)> {
    let _span = tracing::info_span!("load_weights", component).entered();
    let weights = weights.component(files, component, dtype, options, loras)?;
    let mut vb = sdrs_kernels::VarBuilder::new(weights.vb, options.kernels);
    if let Some(source) = weights.quantized {
        vb = vb.with_quantized(source);
    }
    Ok((vb, weights.path))
}

/// The text encoders `family` has, with `loras` merged.
pub(crate) fn load_text_encoders(
    files: &ModelFiles,
    family: ModelFamily,
    weights: &Weights,
    options: &LoadOptions,
    loras: Option<&Arc<LoraSet>>,
) -> Result<TextEncoders> {
    let (device, dtype) = (&options.device, options.dtype);
    let text_encoder = |tokenizer: &str, encoder: &'static str| -> Result<Box<dyn PromptEncoder>> {
        let tokenizer = files.tokenizer(tokenizer)?;
        let config = files.text_config(encoder)?;
        let (vb, path) = load_component(files, weights, encoder, dtype, options, loras)?;
        let model =
            ClipTextModel::new(vb, &config).map_err(|e| with_weights_context(encoder, path, e))?;
        Ok(Box::new(ClipPromptEncoder::new(
            encoder, tokenizer, model, device,
        )))
    };
    Ok(match family {
        ModelFamily::Sd => TextEncoders::Sd(text_encoder("tokenizer", "text_encoder")?),
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
    })
}

/// The UNet, with `loras` merged.
pub(crate) fn load_unet(
    files: &ModelFiles,
    weights: &Weights,
    options: &LoadOptions,
    loras: Option<&Arc<LoraSet>>,
) -> Result<UNetDenoiser> {
    let unet_config = files.unet_config()?;
    let (vb, path) = load_component(files, weights, "unet", options.dtype, options, loras)?;
    let unet = UNet2DConditionModel::new(vb, &unet_config)
        .map_err(|e| with_weights_context("unet", path, e))?;
    Ok(UNetDenoiser::new(unet, options.dtype, &options.device))
}

/// The dtype the VAE of a model computing in `dtype` runs in: f32 when the model is f16 and the
/// VAE's config says it overflows in f16 (`force_upcast`, as SD1.5's and SDXL's do), as diffusers
/// upcasts it; otherwise `dtype` (bf16 has f32's range). A f16 VAE that still overflows is caught
/// by the NaN check of [`KlAutoencoder`]'s decode.
pub fn vae_dtype(dtype: DType, config: &AutoencoderKLConfig) -> DType {
    if dtype == DType::F16 && config.force_upcast {
        DType::F32
    } else {
        dtype
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

#[cfg(test)]
mod tests {
    use super::*;
    use sdrs_schedulers::NoNoise;
    use sdrs_taesd::AutoencoderTinyConfig;

    #[test]
    fn a_force_upcast_vae_decodes_in_f32_under_f16_only() {
        let mut config = AutoencoderKLConfig::default();
        assert!(config.force_upcast);
        assert_eq!(vae_dtype(DType::F16, &config), DType::F32);
        assert_eq!(vae_dtype(DType::BF16, &config), DType::BF16);
        config.force_upcast = false;
        assert_eq!(vae_dtype(DType::F16, &config), DType::F16);
    }

    #[test]
    fn an_overflowed_decode_is_refused_not_saved_black() {
        let fine = Tensor::new(&[0.5f32, -1.0, 1.0], &Device::Cpu).unwrap();
        assert!(check_finite(&fine).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let image = Tensor::new(&[0.5f32, bad], &Device::Cpu).unwrap();
            let message = check_finite(&image).unwrap_err().to_string();
            assert!(message.contains("--dtype f32"), "{message}");
        }
    }

    fn tiny() -> TinyAutoencoder {
        let weights = RandomWeights::new(3).without(&["pool"]);
        let vb = sdrs_kernels::VarBuilder::new(
            weights.into_var_builder(DType::F32, &Device::Cpu),
            Default::default(),
        );
        TinyAutoencoder::new(AutoencoderTiny::new(vb, &AutoencoderTinyConfig::default()).unwrap())
    }

    #[test]
    fn the_tiny_autoencoder_decodes_to_unit_range_pixels_at_its_scale() {
        let tiny = tiny();
        assert_eq!((tiny.latent_channels(), tiny.scale_factor()), (4, 8));
        assert!(tiny.name().starts_with("TAESD"), "{}", tiny.name());
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 2, 3), &Device::Cpu).unwrap();
        let image = tiny.decode(&latents).unwrap();
        assert_eq!(image.dims(), [1, 3, 16, 24]);
        let (lo, hi) = (
            image.min_all().unwrap().to_scalar::<f32>().unwrap(),
            image.max_all().unwrap().to_scalar::<f32>().unwrap(),
        );
        assert!(
            (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi),
            "{lo} {hi}"
        );
    }

    #[test]
    fn the_tiny_encoder_is_deterministic_and_draws_no_noise() {
        let tiny = tiny();
        assert!(tiny.has_encoder());
        let image = Tensor::full(0.5f32, (1, 3, 16, 16), &Device::Cpu).unwrap();
        // NoNoise errors if drawn from: the tiny encoder must not ask.
        let latents = tiny.encode(&image, &mut NoNoise).unwrap();
        assert_eq!(latents.dims(), [1, 4, 2, 2]);
        assert_eq!(latents.dtype(), DType::F32);
    }
}
