//! Single-file checkpoints (original LDM / Stability "civitai" layout) mapped onto the diffusers key space.
//!
//! Follows diffusers `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`) and the name
//! conversion of stable-diffusion.cpp `model.cpp`. Only names and shapes are handled here: the result is a plan
//! saying where each diffusers tensor comes from, which a loader then carries out on the real tensors. Every
//! block count comes from the component's diffusers config, never from the published model sizes, and that
//! config is parsed as the model crate's own (`sdrs_unet::UNet2DConditionConfig`, `sdrs_vae::AutoencoderKLConfig`,
//! `sdrs_clip::ClipTextConfig`) and checked as the model checks it, so a plan exists exactly for the configs the
//! models accept.
//!
//! This file holds what all components share (errors, [`CheckpointFamily`] and its detection, [`Source`], the
//! plan builder, [`component_plan`]); the key translations live in `unet.rs`, `vae.rs` and `text_encoders.rs`.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

mod text_encoders;
mod unet;
mod vae;

use text_encoders::{text_encoder_plan, TextEncoder};
use unet::unet_plan;
use vae::vae_plan;

/// Everything that can go wrong while reading a single-file checkpoint's layout.
#[derive(Debug, thiserror::Error)]
pub enum SingleFileError {
    /// Neither the text-encoder prefixes nor the UNet shapes tell which model this is.
    #[error("cannot tell which model this checkpoint holds: {reason}")]
    UnknownFamily { reason: String },

    /// The component name is not one this family of checkpoints carries.
    #[error("a {family:?} checkpoint has no component `{component}` (it has {available:?})")]
    UnknownComponent {
        component: String,
        family: CheckpointFamily,
        available: &'static [&'static str],
    },

    /// The component's diffusers config JSON does not parse into its model crate's config struct.
    #[error("cannot read the {component} config: {source}")]
    Config {
        component: String,
        #[source]
        source: serde_json::Error,
    },

    /// The UNet config is one `sdrs_unet` refuses (the error building the model would give; boxed, as the
    /// model crates' errors are much larger than this enum's other variants).
    #[error("the unet config is not one the UNet accepts: {source}")]
    UnetConfig {
        #[source]
        source: Box<sdrs_unet::Error>,
    },

    /// The VAE config is one `sdrs_vae` refuses (the error building the model would give).
    #[error("the vae config is not one the VAE accepts: {source}")]
    VaeConfig {
        #[source]
        source: Box<sdrs_vae::Error>,
    },

    /// A text encoder's config is one `sdrs_clip` refuses (the error building it would give).
    #[error("the {component} config is not one the CLIP text encoder accepts: {source}")]
    TextEncoderConfig {
        component: String,
        #[source]
        source: Box<sdrs_clip::Error>,
    },

    /// A checkpoint key whose position does not exist in the config (wrong config for this checkpoint).
    #[error("checkpoint key `{key}` does not fit the {component} config: {reason}")]
    ConfigMismatch {
        component: String,
        key: String,
        reason: String,
    },

    /// A checkpoint key under the component's prefix that no rule translates.
    #[error("checkpoint key `{key}` has no diffusers counterpart in the {component}")]
    UnmappedKey { component: String, key: String },

    /// Two checkpoint keys claim the same diffusers tensor.
    #[error("diffusers key `{diffusers_key}` of the {component} comes from both `{first}` and `{second}`")]
    DuplicateTarget {
        component: String,
        diffusers_key: String,
        first: String,
        second: String,
    },

    /// The config needs a tensor that the checkpoint does not provide.
    #[error("diffusers key `{diffusers_key}` of the {component} has no source under `{prefix}` in the checkpoint")]
    MissingKey {
        component: String,
        diffusers_key: String,
        prefix: String,
    },

    /// A checkpoint tensor whose shape does not allow the planned slice, transpose or reshape.
    #[error("checkpoint tensor `{key}` has shape {shape:?}, expected {expected}")]
    BadShape {
        key: String,
        shape: Vec<usize>,
        expected: String,
    },
}

pub type Result<T> = std::result::Result<T, SingleFileError>;

/// Which model the checkpoint holds, from its keys (and shapes where needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointFamily {
    Sd15,
    Sd2,
    SdxlBase,
    SdxlRefiner,
}

impl CheckpointFamily {
    /// The diffusers components a checkpoint of this family carries, as `component_plan` names them.
    pub fn components(self) -> &'static [&'static str] {
        match self {
            Self::Sd15 | Self::Sd2 => &["unet", "vae", "text_encoder"],
            Self::SdxlBase => &["unet", "vae", "text_encoder", "text_encoder_2"],
            Self::SdxlRefiner => &["unet", "vae", "text_encoder_2"],
        }
    }
}

/// Where one diffusers tensor comes from in the single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The checkpoint tensor as it is.
    Rename(String),
    /// Part `index` of `parts` equal pieces of the checkpoint tensor along dim 0 (OpenCLIP's fused
    /// `in_proj_weight` / `in_proj_bias` hold q, k and v in that order).
    Slice {
        key: String,
        index: usize,
        parts: usize,
    },
    /// The 2-D checkpoint tensor transposed (OpenCLIP's `text_projection` is `[hidden, proj]`, a Linear weight
    /// is `[proj, hidden]`).
    Transpose(String),
    /// The checkpoint tensor's data (row-major, unchanged) seen with another shape (1x1 convolutions stored
    /// where diffusers has linear layers, or the reverse).
    Reshape { key: String, shape: Vec<usize> },
}

impl Source {
    /// The checkpoint key this tensor is read from.
    pub fn key(&self) -> &str {
        match self {
            Self::Rename(key) | Self::Transpose(key) => key,
            Self::Slice { key, .. } | Self::Reshape { key, .. } => key,
        }
    }

    /// The diffusers tensor's shape, given the checkpoint tensor's shape.
    pub fn target_shape(&self, source_shape: &[usize]) -> Result<Vec<usize>> {
        let bad = |expected: String| SingleFileError::BadShape {
            key: self.key().to_string(),
            shape: source_shape.to_vec(),
            expected,
        };
        match self {
            Self::Rename(_) => Ok(source_shape.to_vec()),
            Self::Slice { index, parts, .. } => match source_shape.split_first() {
                Some((&rows, rest)) if *parts > 0 && index < parts && rows % parts == 0 => {
                    let mut shape = vec![rows / parts];
                    shape.extend_from_slice(rest);
                    Ok(shape)
                }
                _ => Err(bad(format!(
                    "a dim 0 divisible into {parts} parts to take part {index}"
                ))),
            },
            Self::Transpose(_) => match source_shape {
                [rows, cols] => Ok(vec![*cols, *rows]),
                _ => Err(bad("a 2-D tensor to transpose".to_string())),
            },
            Self::Reshape { shape, .. } => {
                let numel = |dims: &[usize]| dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
                let (from, to) = (numel(source_shape), numel(shape));
                if from.is_some() && from == to {
                    Ok(shape.clone())
                } else {
                    Err(bad(format!("as many elements as {shape:?}")))
                }
            }
        }
    }
}

// Prefixes of the original checkpoint layouts.
const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const SD15_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const SD2_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
const REFINER_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// Cross-attention context widths of the published models, used only when no text encoder is in the file.
const SD15_CONTEXT_DIM: usize = 768;
const SD2_CONTEXT_DIM: usize = 1024;
const SDXL_BASE_CONTEXT_DIM: usize = 2048;
const SDXL_REFINER_CONTEXT_DIM: usize = 1280;
/// Input widths of the published SDXL `label_emb` (pooled text embedding + 6 or 5 time ids of 256 each).
const SDXL_BASE_ADM_IN: usize = 2816;
const SDXL_REFINER_ADM_IN: usize = 2560;

/// Which model the checkpoint holds, from its keys (and shapes where needed).
///
/// The text encoders' prefixes decide; a UNet-only file falls back on the cross-attention context width (and
/// SDXL's `label_emb` input width), then on whether the transformer projections are linear (SD2) or 1x1
/// convolutions (SD1.x).
pub fn detect_family(keys_and_shapes: &[(String, Vec<usize>)]) -> Result<CheckpointFamily> {
    let has_prefix = |prefix: &str| keys_and_shapes.iter().any(|(k, _)| k.starts_with(prefix));
    if has_prefix(SDXL_OPEN_CLIP_PREFIX) {
        return Ok(CheckpointFamily::SdxlBase);
    }
    if has_prefix(REFINER_OPEN_CLIP_PREFIX) {
        return Ok(CheckpointFamily::SdxlRefiner);
    }
    if has_prefix(SD2_OPEN_CLIP_PREFIX) {
        return Ok(CheckpointFamily::Sd2);
    }
    if has_prefix(SD15_CLIP_PREFIX) {
        return Ok(CheckpointFamily::Sd15);
    }
    detect_family_from_unet(keys_and_shapes)
}

fn detect_family_from_unet(keys_and_shapes: &[(String, Vec<usize>)]) -> Result<CheckpointFamily> {
    let unet: Vec<(&str, &[usize])> = keys_and_shapes
        .iter()
        .filter_map(|(k, s)| k.strip_prefix(UNET_PREFIX).map(|r| (r, s.as_slice())))
        .collect();
    if unet.is_empty() {
        return Err(SingleFileError::UnknownFamily {
            reason: format!(
                "no text-encoder keys (`{SD15_CLIP_PREFIX}`, `{SD2_OPEN_CLIP_PREFIX}`, `conditioner.embedders.*`) \
                 and no `{UNET_PREFIX}` keys"
            ),
        });
    }
    let context_dim = unet
        .iter()
        .find(|(k, s)| k.ends_with("attn2.to_k.weight") && s.len() == 2)
        .and_then(|(_, s)| s.get(1).copied());
    let adm_in = unet
        .iter()
        .find(|(k, _)| *k == "label_emb.0.0.weight")
        .and_then(|(_, s)| s.get(1).copied());
    let projection_rank = unet
        .iter()
        .find(|(k, _)| k.ends_with("proj_in.weight"))
        .map(|(_, s)| s.len());
    let unknown = || {
        SingleFileError::UnknownFamily {
        reason: format!(
            "no text-encoder keys, and the UNet's context width {context_dim:?}, label_emb input width {adm_in:?} \
             and projection rank {projection_rank:?} match no published model"
        ),
    }
    };
    if adm_in.is_some() {
        return match (context_dim, adm_in) {
            (Some(SDXL_BASE_CONTEXT_DIM), _) | (_, Some(SDXL_BASE_ADM_IN)) => {
                Ok(CheckpointFamily::SdxlBase)
            }
            (Some(SDXL_REFINER_CONTEXT_DIM), _) | (_, Some(SDXL_REFINER_ADM_IN)) => {
                Ok(CheckpointFamily::SdxlRefiner)
            }
            _ => Err(unknown()),
        };
    }
    match (context_dim, projection_rank) {
        (Some(SD15_CONTEXT_DIM), _) => Ok(CheckpointFamily::Sd15),
        (Some(SD2_CONTEXT_DIM), _) => Ok(CheckpointFamily::Sd2),
        // SD2's LDM config sets `use_linear_in_transformer`; SD1.x keeps 1x1 convolutions.
        (_, Some(2)) => Ok(CheckpointFamily::Sd2),
        (_, Some(4)) => Ok(CheckpointFamily::Sd15),
        _ => Err(unknown()),
    }
}

/// The plan for one diffusers component: each diffusers key with where its tensor comes from in the single file,
/// sorted by diffusers key.
///
/// `component` is `"unet"`, `"vae"`, `"text_encoder"` or `"text_encoder_2"`; `config` is that component's
/// diffusers/transformers `config.json`, which supplies every block and layer count. Keys outside the component's
/// prefix (other components, `model_ema.*`, scheduler buffers) are ignored; a key under the prefix that does not
/// fit the config is an error, and so is a tensor the config needs but the file lacks.
pub fn component_plan(
    family: CheckpointFamily,
    component: &str,
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let unknown_component = || SingleFileError::UnknownComponent {
        component: component.to_string(),
        family,
        available: family.components(),
    };
    match component {
        "unet" => unet_plan(config, checkpoint_keys),
        "vae" => vae_plan(config, checkpoint_keys),
        "text_encoder" | "text_encoder_2" => {
            let encoder = match (family, component) {
                (CheckpointFamily::Sd15, "text_encoder") => TextEncoder::Clip(SD15_CLIP_PREFIX),
                (CheckpointFamily::Sd2, "text_encoder") => {
                    TextEncoder::OpenClip(SD2_OPEN_CLIP_PREFIX)
                }
                (CheckpointFamily::SdxlBase, "text_encoder") => TextEncoder::Clip(SDXL_CLIP_PREFIX),
                (CheckpointFamily::SdxlBase, "text_encoder_2") => {
                    TextEncoder::OpenClip(SDXL_OPEN_CLIP_PREFIX)
                }
                (CheckpointFamily::SdxlRefiner, "text_encoder_2") => {
                    TextEncoder::OpenClip(REFINER_OPEN_CLIP_PREFIX)
                }
                _ => return Err(unknown_component()),
            };
            text_encoder_plan(component, encoder, config, checkpoint_keys)
        }
        _ => Err(unknown_component()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Plan assembly shared by all components.

/// Collects diffusers key -> source, refusing two sources for one key and impossible shapes.
struct PlanBuilder<'a> {
    component: &'a str,
    shapes: HashMap<&'a str, &'a [usize]>,
    entries: BTreeMap<String, Source>,
}

impl<'a> PlanBuilder<'a> {
    fn new(component: &'a str, checkpoint_keys: &'a [(String, Vec<usize>)]) -> Self {
        Self {
            component,
            shapes: checkpoint_keys
                .iter()
                .map(|(k, s)| (k.as_str(), s.as_slice()))
                .collect(),
            entries: BTreeMap::new(),
        }
    }

    fn insert(&mut self, diffusers_key: String, source: Source) -> Result<()> {
        if let Some(shape) = self.shapes.get(source.key()) {
            source.target_shape(shape)?;
        }
        if let Some(previous) = self.entries.get(&diffusers_key) {
            return Err(SingleFileError::DuplicateTarget {
                component: self.component.to_string(),
                first: previous.key().to_string(),
                second: source.key().to_string(),
                diffusers_key,
            });
        }
        self.entries.insert(diffusers_key, source);
        Ok(())
    }

    /// Checks that every tensor the config needs has a source, and hands back the plan.
    fn finish(self, required: &[String], prefix: &str) -> Result<Vec<(String, Source)>> {
        if let Some(missing) = required.iter().find(|k| !self.entries.contains_key(*k)) {
            return Err(SingleFileError::MissingKey {
                component: self.component.to_string(),
                diffusers_key: missing.clone(),
                prefix: prefix.to_string(),
            });
        }
        Ok(self.entries.into_iter().collect())
    }
}

fn parse_config<T: for<'de> Deserialize<'de>>(
    component: &str,
    config: &serde_json::Value,
) -> Result<T> {
    T::deserialize(config).map_err(|source| SingleFileError::Config {
        component: component.to_string(),
        source,
    })
}

/// `head.tail` with the remaining key segments, or `None` when nothing (no parameter name) follows.
fn join(head: &str, tail: &[&str]) -> Option<String> {
    if tail.is_empty() || tail.iter().any(|s| s.is_empty()) {
        None
    } else {
        Some(format!("{head}.{}", tail.join(".")))
    }
}

fn parse_index(segment: &str) -> Option<usize> {
    // Reject "+1" and the like: only plain decimal indices appear in module paths.
    if segment.bytes().all(|b| b.is_ascii_digit()) {
        segment.parse().ok()
    } else {
        None
    }
}

fn with_bias(module: &str) -> [String; 2] {
    [format!("{module}.weight"), format!("{module}.bias")]
}

/// Source for a weight that diffusers holds as a linear layer (`linear == true`, `[out, in]`) or as a 1x1
/// convolution (`[out, in, 1, 1]`), whichever layout the checkpoint stores.
fn projection_source(key: &str, shape: &[usize], linear: bool) -> Result<Source> {
    match (shape, linear) {
        ([out, inp, 1, 1], true) => Ok(Source::Reshape {
            key: key.to_string(),
            shape: vec![*out, *inp],
        }),
        ([out, inp], false) => Ok(Source::Reshape {
            key: key.to_string(),
            shape: vec![*out, *inp, 1, 1],
        }),
        ([_, _], true) | ([_, _, 1, 1], false) => Ok(Source::Rename(key.to_string())),
        _ => Err(SingleFileError::BadShape {
            key: key.to_string(),
            shape: shape.to_vec(),
            expected: "a linear weight [out, in] or a 1x1 convolution weight [out, in, 1, 1]"
                .to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        names
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect()
    }

    #[test]
    fn projection_layout_follows_use_linear_projection() {
        let key = "k";
        assert_eq!(
            projection_source(key, &[8, 8, 1, 1], true).unwrap(),
            Source::Reshape {
                key: key.into(),
                shape: vec![8, 8]
            }
        );
        assert_eq!(
            projection_source(key, &[8, 8], false).unwrap(),
            Source::Reshape {
                key: key.into(),
                shape: vec![8, 8, 1, 1]
            }
        );
        assert_eq!(
            projection_source(key, &[8, 8], true).unwrap(),
            Source::Rename(key.into())
        );
        assert_eq!(
            projection_source(key, &[8, 8, 1, 1], false).unwrap(),
            Source::Rename(key.into())
        );
        assert!(projection_source(key, &[8, 8, 3, 3], true).is_err());
    }

    #[test]
    fn family_from_text_encoder_prefixes() {
        let w: &[usize] = &[1];
        let cases = [
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                CheckpointFamily::Sd15,
            ),
            (
                "cond_stage_model.transformer.final_layer_norm.weight",
                CheckpointFamily::Sd15,
            ),
            (
                "cond_stage_model.model.ln_final.weight",
                CheckpointFamily::Sd2,
            ),
            (
                "conditioner.embedders.1.model.ln_final.weight",
                CheckpointFamily::SdxlBase,
            ),
            (
                "conditioner.embedders.0.model.ln_final.weight",
                CheckpointFamily::SdxlRefiner,
            ),
        ];
        for (key, family) in cases {
            let ckpt = keys(&[("model.diffusion_model.out.2.weight", w), (key, w)]);
            assert_eq!(detect_family(&ckpt).unwrap(), family, "{key}");
        }
        // SDXL base has both embedders; the OpenCLIP one decides.
        let both = keys(&[
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                w,
            ),
            ("conditioner.embedders.1.model.ln_final.weight", w),
        ]);
        assert_eq!(detect_family(&both).unwrap(), CheckpointFamily::SdxlBase);
    }

    type Names<'a> = &'a [(&'a str, &'a [usize])];

    #[test]
    fn family_from_unet_shapes() {
        let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
        let label = "model.diffusion_model.label_emb.0.0.weight";
        let proj = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
        let cases: [(Names, CheckpointFamily); 6] = [
            (&[(to_k, &[320, 768])], CheckpointFamily::Sd15),
            (&[(to_k, &[320, 1024])], CheckpointFamily::Sd2),
            (
                &[(to_k, &[640, 2048]), (label, &[1280, 2816])],
                CheckpointFamily::SdxlBase,
            ),
            (
                &[(to_k, &[768, 1280]), (label, &[1536, 2560])],
                CheckpointFamily::SdxlRefiner,
            ),
            (
                &[(to_k, &[32, 32]), (proj, &[32, 32, 1, 1])],
                CheckpointFamily::Sd15,
            ),
            (
                &[(to_k, &[32, 32]), (proj, &[32, 32])],
                CheckpointFamily::Sd2,
            ),
        ];
        for (names, family) in cases {
            assert_eq!(detect_family(&keys(names)).unwrap(), family, "{names:?}");
        }
        assert!(matches!(
            detect_family(&keys(&[(label, &[128, 80]), (to_k, &[64, 64])])),
            Err(SingleFileError::UnknownFamily { .. })
        ));
        assert!(matches!(
            detect_family(&keys(&[(
                "first_stage_model.quant_conv.weight",
                &[8, 8, 1, 1]
            )])),
            Err(SingleFileError::UnknownFamily { .. })
        ));
    }

    #[test]
    fn source_target_shapes() {
        let s = Source::Slice {
            key: "w".into(),
            index: 2,
            parts: 3,
        };
        assert_eq!(s.target_shape(&[96, 32]).unwrap(), vec![32, 32]);
        assert!(s.target_shape(&[95, 32]).is_err());
        assert!(s.target_shape(&[]).is_err());
        let bad_index = Source::Slice {
            key: "w".into(),
            index: 3,
            parts: 3,
        };
        assert!(bad_index.target_shape(&[96]).is_err());
        assert_eq!(
            Source::Transpose("t".into()).target_shape(&[3, 5]).unwrap(),
            vec![5, 3]
        );
        assert!(Source::Transpose("t".into())
            .target_shape(&[3, 5, 1])
            .is_err());
        let r = Source::Reshape {
            key: "r".into(),
            shape: vec![4, 4],
        };
        assert_eq!(r.target_shape(&[4, 4, 1, 1]).unwrap(), vec![4, 4]);
        assert!(r.target_shape(&[4, 4, 3, 3]).is_err());
        assert_eq!(
            Source::Rename("n".into()).target_shape(&[7]).unwrap(),
            vec![7]
        );
    }
}
