//! Core ML as a backend: the pipeline's component traits ([`PromptEncoder`], [`Denoiser`],
//! [`LatentDecoder`], [`LatentEncoder`]) over `sdrs-coreml`'s glue, and a [`StableDiffusion`]
//! assembled from an Apple Stable Diffusion resources folder (as `StableDiffusionPipeline.swift`
//! and `StableDiffusionXLPipeline.swift` load one) with our tokenizers and schedulers. Tensors
//! cross to Core ML on the CPU device, in f32; what Core ML cannot do (textual inversion, LoRA,
//! VAE tiling, another size than the compiled one) is an error naming the limit.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdrs_clip::ClipTokenizer;
use sdrs_coreml::runtime::text_encoder::HiddenLayer;
use sdrs_coreml::runtime::{
    default_scaling_factor, BundleKind, CoreMlModel, ModelFactory, ModelFile, MultiArray,
    Resources, TextEncoderGlue, UnetGlue, UnetInputs, VaeGlue,
};
use sdrs_schedulers::NoiseSource;

use crate::builtin::BuiltinModel;
use crate::error::{Error, Result};

use super::components::{
    AddedConditions, Denoiser, LatentDecoder, LatentEncoder, PromptEncoder, TextEmbeddings,
    TextLayer,
};
use super::conditioning::TextEncoders;
use super::prompt::TokenRules;
use super::{LoadOptions, ModelFamily, NativeSize, StableDiffusion};

/// How a resources folder is turned into a pipeline beyond what the folder says.
#[derive(Debug, Clone, Default)]
pub struct CoreMlOptions {
    /// The VAE's scaling factor; `None`: the published autoencoder's of the folder's family
    /// ([`default_scaling_factor`]), as the folders carry none.
    pub scaling_factor: Option<f64>,
    /// The diffusers scheduler config; `None`: the published model's of the family.
    pub scheduler_config: Option<serde_json::Value>,
}

fn to_array(tensor: &Tensor) -> Result<MultiArray> {
    let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let shape = tensor.dims().to_vec();
    Ok(MultiArray::from_f32(
        &shape,
        tensor.flatten_all()?.to_vec1::<f32>()?,
    )?)
}

fn to_tensor(array: &MultiArray) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        array.to_f32(),
        array.shape.clone(),
        &Device::Cpu,
    )?)
}

/// A Core ML text encoder with our CLIP tokenizer built from the folder's `vocab.json` and
/// `merges.txt`.
pub struct CoreMlPromptEncoder {
    glue: TextEncoderGlue,
    tokenizer: ClipTokenizer,
    rules: TokenRules,
}

impl CoreMlPromptEncoder {
    /// `pad_token`: `<|endoftext|>` for CLIP's tokenizer, `!` for SDXL's second (OpenCLIP's).
    pub fn new(
        model: Arc<dyn CoreMlModel>,
        resources: &Resources,
        pad_token: &str,
    ) -> Result<Self> {
        let glue = TextEncoderGlue::new(model)?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let tokenizer = ClipTokenizer::from_vocab_merges(
            &read(&resources.vocab)?,
            &read(&resources.merges)?,
            pad_token,
            glue.context_length(),
        )?;
        let rules = TokenRules {
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
            pad: tokenizer.pad_id(),
            comma: tokenizer.token_to_id(",</w>"),
            context_length: tokenizer.max_length(),
        };
        Ok(Self {
            glue,
            tokenizer,
            rules,
        })
    }

    /// Whether `layer` is the one the compiled model outputs: `last_hidden_state` is the
    /// normalized last layer (clip skip 1), `hidden_embeds` the raw penultimate (clip skip 2).
    fn check_layer(&self, layer: TextLayer) -> Result<()> {
        let fits = match (self.glue.hidden_layer(), layer) {
            (HiddenLayer::Last, TextLayer::Normalized { clip_skip }) => clip_skip <= 1,
            (HiddenLayer::Penultimate, TextLayer::Raw { clip_skip }) => clip_skip == 2,
            _ => false,
        };
        if fits {
            return Ok(());
        }
        let available = match self.glue.hidden_layer() {
            HiddenLayer::Last => "clip skip 1 (its last_hidden_state output)",
            HiddenLayer::Penultimate => "clip skip 2 (its hidden_embeds output)",
        };
        Err(Error::InvalidParameter {
            name: "clip skip",
            value: format!("{layer:?}"),
            expected: format!(
                "{available}: the Core ML {} has that layer compiled in",
                self.glue.name()
            ),
        })
    }
}

impl PromptEncoder for CoreMlPromptEncoder {
    fn encode(&self, prompt: &str, layer: TextLayer, pooled: bool) -> Result<TextEmbeddings> {
        self.encode_ids(&self.tokenizer.encode(prompt)?, layer, pooled)
    }

    fn add_embedding(&mut self, token: &str, _vectors: &Tensor) -> Result<Vec<u32>> {
        Err(Error::InvalidParameter {
            name: "textual-inversion embedding",
            value: token.to_string(),
            expected: format!(
                "none: the Core ML {} has its token embeddings compiled in",
                self.glue.name()
            ),
        })
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.tokenize(text)?)
    }

    fn token_rules(&self) -> TokenRules {
        self.rules
    }

    fn encode_ids(&self, ids: &[u32], layer: TextLayer, pooled: bool) -> Result<TextEmbeddings> {
        self.check_layer(layer)?;
        let context = self.glue.context_length();
        if ids.is_empty() || ids.len() > context {
            return Err(Error::InvalidParameter {
                name: "token ids",
                value: format!("{} ids", ids.len()),
                expected: format!("1 to {context}, the compiled text encoder's context"),
            });
        }
        // The model takes exactly its context: pad after the ids (CLIP's causal attention keeps
        // the earlier positions as they are) and return the positions asked for.
        let mut row = ids.to_vec();
        row.resize(context, self.rules.pad);
        let out = self.glue.encode(&row)?;
        let hidden_state = to_tensor(&out.hidden)?.narrow(1, 0, ids.len())?;
        let pooled = if pooled {
            let pooled = out.pooled.ok_or_else(|| Error::InvalidParameter {
                name: "pooled embedding",
                value: self.glue.name().to_string(),
                expected: "a text encoder with a pooled_outputs output".to_string(),
            })?;
            Some(to_tensor(&pooled)?)
        } else {
            None
        };
        Ok(TextEmbeddings {
            hidden_state,
            pooled,
        })
    }
}

/// The Core ML UNet (whole or chunked) as the denoiser.
pub struct CoreMlDenoiser {
    glue: UnetGlue,
    device: Device,
}

impl CoreMlDenoiser {
    pub fn new(chunks: Vec<Arc<dyn CoreMlModel>>) -> Result<Self> {
        Ok(Self {
            glue: UnetGlue::new(chunks)?,
            device: Device::Cpu,
        })
    }

    /// The compiled `sample` shape `[B, C, h, w]`.
    pub fn sample_shape(&self) -> &[usize] {
        self.glue.sample_shape()
    }
}

impl Denoiser for CoreMlDenoiser {
    fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let batch = latents.dim(0)?;
        // A scalar timestep is the same for every row.
        let timestep = match timestep.rank() {
            0 => timestep
                .to_dtype(DType::F32)?
                .broadcast_as(batch)?
                .contiguous()?,
            _ => timestep.clone(),
        };
        let inputs = UnetInputs {
            sample: to_array(latents)?,
            timestep: to_array(&timestep)?,
            encoder_hidden_states: to_array(context)?,
            time_ids: added.map(|a| to_array(&a.time_ids)).transpose()?,
            text_embeds: added.map(|a| to_array(&a.text_embeds)).transpose()?,
        };
        let out = self.glue.predict(&inputs)?;
        to_tensor(&out)?
            .to_device(latents.device())
            .map_err(Error::from)
    }

    fn in_channels(&self) -> usize {
        self.glue.sample_shape().get(1).copied().unwrap_or(0)
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// The Core ML VAE decoder (and encoder, when the folder has one).
#[derive(Clone)]
pub struct CoreMlAutoencoder {
    glue: Arc<VaeGlue>,
}

impl CoreMlAutoencoder {
    pub fn new(glue: VaeGlue) -> Self {
        Self {
            glue: Arc::new(glue),
        }
    }
}

impl LatentDecoder for CoreMlAutoencoder {
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let image = self.glue.decode(&to_array(latents)?)?;
        to_tensor(&image)
    }

    fn latent_channels(&self) -> usize {
        self.glue.latent_shape().get(1).copied().unwrap_or(0)
    }

    fn scale_factor(&self) -> usize {
        let (latent, image) = (self.glue.latent_shape(), self.glue.image_shape());
        match (latent.get(2), image.get(2)) {
            (Some(&h), Some(&hh)) if h > 0 => hh / h,
            _ => 8,
        }
    }

    fn name(&self) -> String {
        "Core ML VAEDecoder".to_string()
    }
}

impl LatentEncoder for CoreMlAutoencoder {
    fn encode(&self, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let moments = self.glue.encode_moments(&to_array(image)?)?;
        let (b, c2, h, w) = match moments.shape.as_slice() {
            &[b, c2, h, w] => (b, c2, h, w),
            other => {
                return Err(Error::InvalidParameter {
                    name: "VAEEncoder output",
                    value: format!("{other:?}"),
                    expected: "[B, 2C, h, w]".to_string(),
                })
            }
        };
        // Drawn where diffusers draws the latent distribution's sample, of the mean's shape.
        let drawn = noise.randn(&(b, c2 / 2, h, w).into(), DType::F32, &Device::Cpu)?;
        let latents = self.glue.sample(&moments, &to_array(&drawn)?)?;
        to_tensor(&latents)
    }
}

/// The Core ML models of `resources`, built by `factory`.
pub struct CoreMlComponents {
    pub text: Vec<CoreMlPromptEncoder>,
    pub unet: CoreMlDenoiser,
    pub vae: CoreMlAutoencoder,
}

impl CoreMlComponents {
    pub fn load(
        resources: &Resources,
        factory: &ModelFactory<'_>,
        options: &CoreMlOptions,
    ) -> Result<Self> {
        let build = |file: &ModelFile| -> Result<Arc<dyn CoreMlModel>> {
            let _span = tracing::info_span!("load_coreml", model = file.name.as_str()).entered();
            Ok(factory(file)?)
        };
        let mut text = Vec::new();
        // The refiner conditions on the second encoder alone.
        let first = match resources.kind {
            BundleKind::SdxlRefiner => None,
            BundleKind::Sd | BundleKind::Sdxl => resources.text_encoder.as_ref(),
        };
        if let Some(file) = first {
            text.push(CoreMlPromptEncoder::new(
                build(file)?,
                resources,
                "<|endoftext|>",
            )?);
        }
        if let Some(file) = &resources.text_encoder_2 {
            // SDXL's second tokenizer (OpenCLIP's) pads with `!`.
            text.push(CoreMlPromptEncoder::new(build(file)?, resources, "!")?);
        }
        let unet = CoreMlDenoiser::new(
            resources
                .unet
                .iter()
                .map(build)
                .collect::<Result<Vec<_>>>()?,
        )?;
        let scaling = options
            .scaling_factor
            .unwrap_or_else(|| default_scaling_factor(resources.kind));
        let vae = VaeGlue::new(
            build(&resources.vae_decoder)?,
            resources.vae_encoder.as_ref().map(build).transpose()?,
            scaling,
        )?;
        Ok(Self {
            text,
            unet,
            vae: CoreMlAutoencoder::new(vae),
        })
    }
}

fn family_of(kind: BundleKind) -> ModelFamily {
    match kind {
        BundleKind::Sd => ModelFamily::Sd,
        BundleKind::Sdxl => ModelFamily::SdxlBase,
        BundleKind::SdxlRefiner => ModelFamily::SdxlRefiner,
    }
}

impl StableDiffusion {
    /// A pipeline over the Core ML models of the resources folder `folder`, each built by
    /// `factory` (Core ML's on Apple platforms: `apple_factory`); `options` gives the thread
    /// pool and kernels of what still runs in candle (guidance, schedulers, previews). Its size
    /// is the compiled one; LoRAs, textual inversion and VAE tiling are errors.
    pub fn load_coreml(
        folder: &Path,
        factory: &ModelFactory<'_>,
        options: &LoadOptions,
        coreml: &CoreMlOptions,
    ) -> Result<Self> {
        let _span = tracing::info_span!("load_coreml_folder").entered();
        if !options.loras.is_empty() {
            return Err(Error::InvalidParameter {
                name: "LoRA",
                value: format!("{} file(s)", options.loras.len()),
                expected: "none: Core ML models have their weights compiled in".to_string(),
            });
        }
        let resources = Resources::discover(folder)?;
        let family = family_of(resources.kind);
        let CoreMlComponents {
            mut text,
            unet,
            vae,
        } = CoreMlComponents::load(&resources, factory, coreml)?;
        let text = match family {
            ModelFamily::Sd => {
                TextEncoders::Sd(Box::new(text.pop().ok_or_else(|| Error::MissingFile {
                    path: folder.join("TextEncoder.mlmodelc"),
                    what: "the text encoder".to_string(),
                })?))
            }
            ModelFamily::SdxlBase | ModelFamily::SdxlRefiner => TextEncoders::Sdxl {
                encoders: text
                    .into_iter()
                    .map(|e| Box::new(e) as Box<dyn PromptEncoder>)
                    .collect(),
                // diffusers' defaults: base true, refiner false (the folders carry no
                // model_index.json to say otherwise).
                force_zeros_for_empty_prompt: family == ModelFamily::SdxlBase,
                requires_aesthetics_score: family == ModelFamily::SdxlRefiner,
            },
        };
        let latent_channels = vae.latent_channels();
        let unet_in_channels = unet.in_channels();
        super::inpaint::is_inpainting_unet(unet_in_channels, latent_channels)?;
        let vae_scale_factor = vae.scale_factor();
        let native = NativeSize {
            pixels: unet.sample_shape().get(3).copied().unwrap_or(0) * vae_scale_factor,
            vae_scale_factor,
        };
        let scheduler_config = match &coreml.scheduler_config {
            Some(config) => config.clone(),
            None => {
                let builtin = match family {
                    ModelFamily::Sd => BuiltinModel::Sd15,
                    ModelFamily::SdxlBase => BuiltinModel::SdxlBase,
                    ModelFamily::SdxlRefiner => BuiltinModel::SdxlRefiner,
                };
                builtin
                    .json("scheduler/scheduler_config.json")
                    .ok_or_else(|| Error::MissingFile {
                        path: format!(
                            "<built-in {}>/scheduler/scheduler_config.json",
                            builtin.name()
                        )
                        .into(),
                        what: "the published model's scheduler config".to_string(),
                    })?
            }
        };
        Ok(Self {
            root: folder.to_path_buf(),
            family,
            text: Some(text),
            latent_channels,
            unet_in_channels,
            denoiser: Some(Box::new(unet)),
            native,
            vae_decoder: Box::new(vae.clone()),
            vae_encoder: Box::new(vae),
            vae: None,
            fast_decoder: None,
            memory_check: options.memory_check,
            memory_limit: options.memory_limit,
            scheduler_config,
            device: Device::Cpu,
            dtype: DType::F32,
            kernels: options.kernels,
            pool: options.thread_pool()?,
            embeddings: Vec::new(),
            source: None,
        })
    }
}

/// Core ML's own models (Apple platforms): each file loaded for `units`, packages compiled
/// once into `sdrs_coreml::runtime::apple::default_cache_dir()`.
#[cfg(target_vendor = "apple")]
pub fn apple_factory(
    units: sdrs_coreml::runtime::ComputeUnits,
) -> impl Fn(&ModelFile) -> sdrs_coreml::Result<Arc<dyn CoreMlModel>> {
    let cache = sdrs_coreml::runtime::apple::default_cache_dir();
    move |file: &ModelFile| -> sdrs_coreml::Result<Arc<dyn CoreMlModel>> {
        Ok(Arc::new(sdrs_coreml::runtime::apple::AppleModel::load(
            file, units, &cache,
        )?))
    }
}

#[cfg(test)]
mod tests {
    //! Against `../shared/fixtures/coreml/` through stand-ins (Linux has no Core ML), and the
    //! recorded references against our own candle components on the fixture models the bundles
    //! were converted from (`tests/fixtures/tiny-sd15`, `tiny-sdxl`).

    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use sdrs_coreml::runtime::features::read_safetensors;
    use sdrs_coreml::runtime::unet::from_bc1s;
    use sdrs_coreml::runtime::{ArrayDtype, FeatureInfo, StandIn};

    use super::*;
    use crate::pipeline::{InitImage, Request};

    const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

    fn fixture_dir(sub: &str) -> Option<PathBuf> {
        sdrs_fixtures::extended(sub)
    }

    fn tiny(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    /// The stand-in of `reference/<kind>/<file.name>`, declaring what the package declares.
    fn standin(coreml: &Path, kind: &str, file: &ModelFile, tolerance: f32) -> StandIn {
        let reference = coreml.join("reference").join(kind);
        let description = file.describe().unwrap();
        StandIn::from_files(
            &file.name,
            &reference.join(format!("{}.inputs.safetensors", file.name)),
            &reference.join(format!("{}.outputs.safetensors", file.name)),
            tolerance,
        )
        .unwrap()
        .with_description(description.inputs, description.outputs)
    }

    fn recorded(coreml: &Path, kind: &str, file: &str) -> HashMap<String, MultiArray> {
        read_safetensors(&coreml.join("reference").join(kind).join(file)).unwrap()
    }

    fn tensor(array: &MultiArray) -> Tensor {
        to_tensor(array).unwrap()
    }

    /// A denoiser on a recorded `Unet.inputs.safetensors` (BC1S context back in our layout, SDXL's
    /// extra inputs when recorded).
    fn forward_recorded(denoiser: &dyn Denoiser, inputs: &HashMap<String, MultiArray>) -> Tensor {
        let added = inputs.get("time_ids").map(|time_ids| AddedConditions {
            text_embeds: tensor(&inputs["text_embeds"]),
            time_ids: tensor(time_ids),
        });
        denoiser
            .forward(
                &tensor(&inputs["sample"]),
                &tensor(&inputs["timestep"]),
                &tensor(&from_bc1s(&inputs["encoder_hidden_states"]).unwrap()),
                added.as_ref(),
            )
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn our_tokenizers_feed_the_recorded_ids_and_get_the_recorded_states() {
        let Some(coreml) = fixture_dir("coreml") else {
            return;
        };
        for (kind, layer) in [
            ("sd15", TextLayer::Normalized { clip_skip: 1 }),
            ("sdxl", TextLayer::Raw { clip_skip: 2 }),
        ] {
            let resources = Resources::discover(&coreml.join(kind)).unwrap();
            let encoders = [
                (resources.text_encoder.clone(), "<|endoftext|>", "last"),
                (resources.text_encoder_2.clone(), "!", "second"),
            ];
            for (file, pad, _) in encoders {
                let Some(file) = file else { continue };
                // Tolerance 0: the stand-in checks every id.
                let model = Arc::new(standin(&coreml, kind, &file, 0.0));
                let encoder = CoreMlPromptEncoder::new(model.clone(), &resources, pad).unwrap();
                let out = encoder.encode(PROMPT, layer, true).unwrap();
                let want = recorded(&coreml, kind, &format!("{}.outputs.safetensors", file.name));
                let hidden = want
                    .get("last_hidden_state")
                    .or(want.get("hidden_embeds"))
                    .unwrap();
                assert_eq!(max_diff(&out.hidden_state, &tensor(hidden)), 0.0);
                assert_eq!(
                    max_diff(&out.pooled.unwrap(), &tensor(&want["pooled_outputs"])),
                    0.0
                );
                // The other padding gives other ids: the stand-in refuses them.
                let other = if pad == "!" { "<|endoftext|>" } else { "!" };
                let wrong = CoreMlPromptEncoder::new(model, &resources, other).unwrap();
                let message = wrong.encode(PROMPT, layer, false).unwrap_err().to_string();
                assert!(message.contains("input_ids"), "{message}");
                // Only the compiled layer is there.
                let message = encoder
                    .encode(PROMPT, TextLayer::Normalized { clip_skip: 3 }, false)
                    .unwrap_err()
                    .to_string();
                assert!(message.contains("compiled in"), "{message}");
                assert!(encoder
                    .encode_ids(&vec![0; 78], layer, false)
                    .unwrap_err()
                    .to_string()
                    .contains("77"));
            }
        }
    }

    #[test]
    fn the_denoiser_adapter_gives_the_recorded_prediction() {
        let Some(coreml) = fixture_dir("coreml") else {
            return;
        };
        for kind in ["sd15", "sdxl"] {
            let resources = Resources::discover(&coreml.join(kind)).unwrap();
            let model = standin(&coreml, kind, &resources.unet[0], 0.0);
            let denoiser = CoreMlDenoiser::new(vec![Arc::new(model)]).unwrap();
            let inputs = recorded(&coreml, kind, "Unet.inputs.safetensors");
            let out = forward_recorded(&denoiser, &inputs);
            let want = &recorded(&coreml, kind, "Unet.outputs.safetensors")["noise_pred"];
            assert_eq!(max_diff(&out, &tensor(want)), 0.0);
            assert_eq!(denoiser.in_channels(), inputs["sample"].shape[1]);
        }
    }

    /// A model answering zeros of its declared outputs, recording the dtypes and shapes fed.
    struct Zeros {
        name: String,
        inputs: Vec<FeatureInfo>,
        outputs: Vec<FeatureInfo>,
        calls: AtomicUsize,
        fed: Mutex<Vec<(String, ArrayDtype, Vec<usize>)>>,
    }

    impl CoreMlModel for Zeros {
        fn name(&self) -> &str {
            &self.name
        }
        fn inputs(&self) -> &[FeatureInfo] {
            &self.inputs
        }
        fn outputs(&self) -> &[FeatureInfo] {
            &self.outputs
        }
        fn predict(
            &self,
            inputs: &HashMap<String, MultiArray>,
        ) -> sdrs_coreml::Result<HashMap<String, MultiArray>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut fed = self.fed.lock().unwrap();
            for (name, value) in inputs {
                fed.push((name.clone(), value.dtype(), value.shape.clone()));
            }
            self.outputs
                .iter()
                .map(|f| {
                    let n = f.shape.iter().product();
                    Ok((
                        f.name.clone(),
                        MultiArray::from_f32_as(f.dtype, &f.shape, &vec![0.0; n])?,
                    ))
                })
                .collect()
        }
    }

    #[test]
    fn a_pipeline_runs_from_a_resources_folder_and_refuses_what_core_ml_cannot_do() {
        let Some(coreml) = fixture_dir("coreml") else {
            return;
        };
        for kind in ["sd15", "sdxl"] {
            let built: Mutex<Vec<Arc<Zeros>>> = Mutex::new(Vec::new());
            let factory = |file: &ModelFile| -> sdrs_coreml::Result<Arc<dyn CoreMlModel>> {
                let description = file.describe()?;
                let model = Arc::new(Zeros {
                    name: file.name.clone(),
                    inputs: description.inputs,
                    outputs: description.outputs,
                    calls: AtomicUsize::new(0),
                    fed: Mutex::new(Vec::new()),
                });
                built.lock().unwrap().push(model.clone());
                Ok(model)
            };
            let options = LoadOptions {
                threads: Some(1),
                ..LoadOptions::default()
            };
            let pipeline = StableDiffusion::load_coreml(
                &coreml.join(kind),
                &factory,
                &options,
                &CoreMlOptions::default(),
            )
            .unwrap();
            let unet = built
                .lock()
                .unwrap()
                .iter()
                .find(|m| m.name == "Unet")
                .unwrap()
                .clone();
            let declared = unet.inputs.clone();
            let size = declared.iter().find(|f| f.name == "sample").unwrap().shape[3] * 8;
            assert_eq!(pipeline.default_size(), size);
            assert_eq!(
                pipeline.family(),
                if kind == "sd15" {
                    ModelFamily::Sd
                } else {
                    ModelFamily::SdxlBase
                }
            );
            let mut request = Request::new(&pipeline, PROMPT, pipeline.scheduler_config().clone());
            request.steps = 2;
            request.seed = Some(7);
            request.negative_prompt = Some("blurry".to_string());
            let mut steps = 0;
            let image = pipeline.generate(&request, &mut |_| steps += 1).unwrap();
            assert_eq!(image.dims(), [1, 3, size, size]);
            // One guided pair per model evaluation (PNDM's warm-up evaluates more than the
            // steps), in the declared dtypes and shapes.
            assert!(steps >= 2);
            assert_eq!(unet.calls.load(Ordering::SeqCst), steps);
            for (name, dtype, shape) in unet.fed.lock().unwrap().iter() {
                let feature = declared.iter().find(|f| &f.name == name).unwrap();
                assert_eq!((dtype, shape), (&feature.dtype, &feature.shape), "{name}");
            }

            // Unguided: one row, padded to the compiled pair.
            request.guidance_scale = 1.0;
            pipeline.generate(&request, &mut |_| {}).unwrap();
            assert_eq!(unet.calls.load(Ordering::SeqCst), 2 * steps);

            // Image-to-image needs a VAEEncoder (the SDXL bundle has none).
            let mut img2img = request.clone();
            img2img.init_image =
                InitImage::Pixels(Tensor::full(0.5f32, (1, 3, size, size), &Device::Cpu).unwrap());
            img2img.strength = 0.5;
            match kind {
                "sd15" => assert_eq!(
                    pipeline.generate(&img2img, &mut |_| {}).unwrap().dims(),
                    [1, 3, size, size]
                ),
                _ => {
                    let message = pipeline
                        .generate(&img2img, &mut |_| {})
                        .unwrap_err()
                        .to_string();
                    assert!(message.contains("VAEEncoder"), "{message}");
                }
            }

            // Another size than the compiled one.
            let mut big = request.clone();
            big.width = size * 2;
            let message = pipeline
                .generate(&big, &mut |_| {})
                .unwrap_err()
                .to_string();
            assert!(message.contains("compiled for"), "{message}");
        }
        let message = StableDiffusion::load_coreml(
            &coreml.join("sd15-chunked"),
            &|_: &ModelFile| -> sdrs_coreml::Result<Arc<dyn CoreMlModel>> {
                unreachable!("nothing is built from an incomplete folder")
            },
            &LoadOptions::default(),
            &CoreMlOptions::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(message.contains("TextEncoder"), "{message}");
    }

    fn zeros_factory(file: &ModelFile) -> sdrs_coreml::Result<Arc<dyn CoreMlModel>> {
        let description = file.describe()?;
        Ok(Arc::new(Zeros {
            name: file.name.clone(),
            inputs: description.inputs,
            outputs: description.outputs,
            calls: AtomicUsize::new(0),
            fed: Mutex::new(Vec::new()),
        }))
    }

    #[test]
    fn a_refiner_folder_conditions_on_the_second_encoder_and_the_aesthetic_score() {
        let Some(coreml) = fixture_dir("coreml") else {
            return;
        };
        // Compiled bundles holding only metadata.json: the SDXL ones, with the UNet's inputs
        // made a refiner's (one encoder's width, 5 time ids).
        let dir = tempfile::tempdir().unwrap();
        for (name, source) in [
            ("TextEncoder2", "sdxl__TextEncoder2"),
            ("Unet", "sdxl__Unet"),
            ("VAEDecoder", "sdxl__VAEDecoder"),
        ] {
            let bundle = dir.path().join(format!("{name}.mlmodelc"));
            std::fs::create_dir_all(&bundle).unwrap();
            let text = std::fs::read_to_string(
                coreml
                    .join("metadata")
                    .join(format!("{source}.metadata.json")),
            )
            .unwrap();
            let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
            if name == "Unet" {
                let width = |name: &str| {
                    let desc = ModelFile {
                        name: name.to_string(),
                        path: coreml.join("sdxl").join(format!("{name}.mlpackage")),
                        format: sdrs_coreml::runtime::ModelFormat::Package,
                    }
                    .describe()
                    .unwrap();
                    desc.outputs
                        .iter()
                        .find(|f| f.name == "hidden_embeds")
                        .unwrap()
                        .shape[2]
                };
                let (total, second) = (
                    width("TextEncoder") + width("TextEncoder2"),
                    width("TextEncoder2"),
                );
                for input in json[0]["inputSchema"].as_array_mut().unwrap() {
                    let shape = input["shape"].as_str().unwrap().to_string();
                    let shape = match input["name"].as_str().unwrap() {
                        "time_ids" => shape.replace(", 6]", ", 5]"),
                        "encoder_hidden_states" => {
                            shape.replace(&format!(", {total}, 1,"), &format!(", {second}, 1,"))
                        }
                        _ => shape,
                    };
                    input["shape"] = serde_json::Value::String(shape);
                }
            }
            std::fs::write(bundle.join("metadata.json"), json.to_string()).unwrap();
        }
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(coreml.join("sdxl").join(file), dir.path().join(file)).unwrap();
        }
        let built: Mutex<Vec<Arc<Zeros>>> = Mutex::new(Vec::new());
        let factory = |file: &ModelFile| -> sdrs_coreml::Result<Arc<dyn CoreMlModel>> {
            let description = file.describe()?;
            let model = Arc::new(Zeros {
                name: file.name.clone(),
                inputs: description.inputs,
                outputs: description.outputs,
                calls: AtomicUsize::new(0),
                fed: Mutex::new(Vec::new()),
            });
            built.lock().unwrap().push(model.clone());
            Ok(model)
        };
        let pipeline = StableDiffusion::load_coreml(
            dir.path(),
            &factory,
            &LoadOptions::default(),
            &CoreMlOptions::default(),
        )
        .unwrap();
        assert_eq!(pipeline.family(), ModelFamily::SdxlRefiner);
        let mut request = Request::new(&pipeline, PROMPT, pipeline.scheduler_config().clone());
        request.steps = 2;
        request.seed = Some(3);
        pipeline.generate(&request, &mut |_| {}).unwrap();
        let unet = built
            .lock()
            .unwrap()
            .iter()
            .find(|m| m.name == "Unet")
            .unwrap()
            .clone();
        assert!(unet.calls.load(Ordering::SeqCst) >= 2);
        let fed = unet.fed.lock().unwrap();
        let time_ids = fed.iter().find(|(name, _, _)| name == "time_ids").unwrap();
        assert_eq!(time_ids.2[1], 5);
    }

    #[test]
    fn lora_embeddings_and_vae_tiling_are_refused() {
        let Some(coreml) = fixture_dir("coreml") else {
            return;
        };
        let mut pipeline = StableDiffusion::load_coreml(
            &coreml.join("sd15"),
            &zeros_factory,
            &LoadOptions::default(),
            &CoreMlOptions::default(),
        )
        .unwrap();
        assert!(pipeline.loras().is_empty());
        let lora = crate::LoraFile::new("x.safetensors", 1.0);
        let message = pipeline.set_loras(&[lora]).unwrap_err().to_string();
        assert!(message.contains("Core ML"), "{message}");
        let message = pipeline
            .set_vae_tiling(&Default::default())
            .unwrap_err()
            .to_string();
        assert!(message.contains("Core ML"), "{message}");
        let file = crate::loading::embeddings::EmbeddingFile {
            path: PathBuf::from("emb.pt"),
            vectors: crate::loading::embeddings::EmbeddingVectors::Single(
                Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap(),
            ),
            token_in_file: None,
            sha256: String::new(),
        };
        let message = pipeline
            .add_embedding("emb", &file)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("compiled in"), "{message}");
    }

    /// The recorded references (Apple's converted modules, fp32) against our candle components
    /// on the model the bundles were converted from: the conventions agree when these match.
    #[test]
    fn the_recorded_references_match_our_candle_components() {
        let Some(coreml) = fixture_dir("coreml") else {
            return;
        };
        for (kind, model) in [("sd15", "tiny-sd15"), ("sdxl", "tiny-sdxl")] {
            let pipeline = StableDiffusion::load(&tiny(model), &LoadOptions::default()).unwrap();
            let mut request = Request::new(&pipeline, PROMPT, pipeline.scheduler_config().clone());
            request.negative_prompt = Some(String::new());
            request.guidance_scale = 5.0;
            let conditioning = pipeline.encode_prompts(&request).unwrap();
            let unet_in = recorded(&coreml, kind, "Unet.inputs.safetensors");
            // The positive row against the text encoders' recorded f32 outputs.
            let positive = conditioning.embeddings.narrow(0, 1, 1).unwrap();
            let hidden = if kind == "sd15" {
                tensor(
                    &recorded(&coreml, kind, "TextEncoder.outputs.safetensors")
                        ["last_hidden_state"],
                )
            } else {
                let one =
                    &recorded(&coreml, kind, "TextEncoder.outputs.safetensors")["hidden_embeds"];
                let two =
                    &recorded(&coreml, kind, "TextEncoder2.outputs.safetensors")["hidden_embeds"];
                Tensor::cat(&[tensor(one), tensor(two)], 2).unwrap()
            };
            let text_diff = max_diff(&positive, &hidden);
            println!("{kind}: text encoder hidden state max |diff| {text_diff}");
            // Measured 1.2e-6 (sd15) / 1.1e-6 (sdxl): f32 summation order only.
            assert!(text_diff < 1e-5, "{kind}: {text_diff}");
            if let Some(added) = &conditioning.added {
                let pooled =
                    &recorded(&coreml, kind, "TextEncoder2.outputs.safetensors")["pooled_outputs"];
                let pooled_diff =
                    max_diff(&added.text_embeds.narrow(0, 1, 1).unwrap(), &tensor(pooled));
                assert!(pooled_diff < 1e-4, "{kind}: pooled {pooled_diff}");
                assert_eq!(
                    max_diff(&added.time_ids, &tensor(&unet_in["time_ids"])),
                    0.0
                );
            } else {
                // SD: the negative row is the empty prompt's, as the Unet reference was fed.
                let bc1s = from_bc1s(&unet_in["encoder_hidden_states"]).unwrap();
                let diff = max_diff(&conditioning.embeddings, &tensor(&bc1s));
                // The recorded UNet input is f16: half an f16 step of values below 8.
                assert!(diff < 4e-3, "{kind}: {diff}");
            }

            // The UNet on the recorded inputs (f16 values, computed in f32 as the trace was).
            let denoiser = pipeline.denoiser().unwrap();
            let noise = forward_recorded(denoiser, &unet_in);
            let want = &recorded(&coreml, kind, "Unet.outputs.safetensors")["noise_pred"];
            let unet_diff = max_diff(&noise, &tensor(want));
            println!("{kind}: UNet noise_pred max |diff| {unet_diff}");
            // Measured 2.1e-5 / 2.3e-5: Apple's split-einsum attention and conv-for-linear UNet
            // against the standard one, which the fixtures record as 1.9e-5 / 2.4e-5 for
            // diffusers' (`diffusers_vs_apple_unet` in reference/<kind>/_index.json).
            assert!(unet_diff < 5e-5, "{kind}: {unet_diff}");

            // The VAE decoder: z = latents / scale in, [-1, 1] out.
            let z = &recorded(&coreml, kind, "VAEDecoder.inputs.safetensors")["z"];
            let scale = default_scaling_factor(if kind == "sd15" {
                BundleKind::Sd
            } else {
                BundleKind::Sdxl
            });
            let latents = (tensor(z) * scale).unwrap();
            let image = pipeline.vae_decoder().decode(&latents).unwrap();
            let want = &recorded(&coreml, kind, "VAEDecoder.outputs.safetensors")["image"];
            let want = ((tensor(want) / 2.0).unwrap() + 0.5)
                .unwrap()
                .clamp(0f32, 1f32)
                .unwrap();
            let vae_diff = max_diff(&image, &want);
            println!("{kind}: VAE image max |diff| {vae_diff}");
            // Measured 4.6e-6 / 3.5e-6 (f32 summation order).
            assert!(vae_diff < 2e-5, "{kind}: {vae_diff}");
        }
    }
}
