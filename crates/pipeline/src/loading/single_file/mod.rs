//! Single-file checkpoints (original LDM / Stability "civitai" layout) mapped onto the diffusers key space.
//!
//! Follows diffusers `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`) and the name
//! conversion of stable-diffusion.cpp `model.cpp`. Only names and shapes are handled here: the result is a plan
//! saying where each diffusers tensor comes from, which a loader then carries out on the real tensors. Every
//! block count comes from the component's diffusers config, never from the published model sizes.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

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

    /// The component's diffusers config JSON does not parse into the fields we read.
    #[error("cannot read the {component} config: {source}")]
    Config {
        component: String,
        #[source]
        source: serde_json::Error,
    },

    /// The config parses but describes something inconsistent (list lengths that disagree, ...).
    #[error("invalid {component} config: {reason}")]
    InvalidConfig { component: String, reason: String },

    /// The config asks for an architecture that original-layout checkpoints do not hold.
    #[error("unsupported {component} config: `{field}` = {value}")]
    UnsupportedConfig {
        component: String,
        field: &'static str,
        value: String,
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

fn invalid_config(component: &str, reason: String) -> SingleFileError {
    SingleFileError::InvalidConfig {
        component: component.to_string(),
        reason,
    }
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

// ---------------------------------------------------------------------------------------------------------------
// UNet: `model.diffusion_model.*` (openaimodel.py `UNetModel`) -> diffusers `UNet2DConditionModel`.

/// `layers_per_block`: one count for every block, or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

/// `transformer_layers_per_block`: one count, one per block, or one per attention of each block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TransformerLayers {
    One(usize),
    Each(Vec<usize>),
    EachLayer(Vec<Vec<usize>>),
}

/// The fields of diffusers' `UNet2DConditionModel` config that shape the key layout (defaults as diffusers').
#[derive(Debug, Clone, Deserialize)]
struct UnetConfig {
    #[serde(default = "UnetConfig::default_block_out_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "UnetConfig::default_down_block_types")]
    down_block_types: Vec<String>,
    #[serde(default = "UnetConfig::default_up_block_types")]
    up_block_types: Vec<String>,
    #[serde(default = "UnetConfig::default_mid_block_type")]
    mid_block_type: Option<String>,
    #[serde(default = "UnetConfig::default_layers_per_block")]
    layers_per_block: PerBlock,
    #[serde(default = "UnetConfig::default_transformer_layers_per_block")]
    transformer_layers_per_block: TransformerLayers,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    #[serde(default)]
    use_linear_projection: Option<bool>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    num_class_embeds: Option<usize>,
}

impl UnetConfig {
    fn default_block_out_channels() -> Vec<usize> {
        vec![320, 640, 1280, 1280]
    }
    fn default_down_block_types() -> Vec<String> {
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    fn default_up_block_types() -> Vec<String> {
        [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    fn default_mid_block_type() -> Option<String> {
        Some(MID_CROSS_ATTN.to_string())
    }
    fn default_layers_per_block() -> PerBlock {
        PerBlock::One(2)
    }
    fn default_transformer_layers_per_block() -> TransformerLayers {
        TransformerLayers::One(1)
    }
}

const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";

/// One down block of the UNet.
#[derive(Debug, Clone)]
struct UnetLevel {
    /// Resnets in the down block (the up block at the same depth has one more).
    down_layers: usize,
    /// Transformer depth of each down attention, or `None` for a block without attention.
    down_attention: Option<Vec<usize>>,
}

/// What an LDM `input_blocks.{i}` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputSlot {
    ConvIn,
    Layer { block: usize, layer: usize },
    Downsample { block: usize },
}

/// What an LDM `output_blocks.{i}` holds: layer `layer` of up block `block`, the upsampler following the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OutputSlot {
    block: usize,
    layer: usize,
    has_upsampler: bool,
}

/// The config turned into the tables the key translation needs.
#[derive(Debug, Clone)]
struct UnetLayout {
    block_out_channels: Vec<usize>,
    /// Down blocks in diffusers order.
    down: Vec<UnetLevel>,
    /// Up blocks in diffusers order (deepest first): resnet count and attention depths.
    up: Vec<(usize, Option<Vec<usize>>)>,
    /// Transformer depth of the mid-block attention, `None` without a mid block.
    mid_attention: Option<usize>,
    inputs: Vec<InputSlot>,
    outputs: Vec<OutputSlot>,
    linear_projection: bool,
    label_embedding: LabelEmbedding,
}

/// What the LDM `label_emb` becomes in diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelEmbedding {
    None,
    /// SDXL `addition_embed_type: "text_time"`: `label_emb.0.{0,2}` -> `add_embedding.linear_{1,2}`.
    AddEmbedding,
    /// `class_embed_type: "timestep" | "projection"`: `label_emb.0.{0,2}` -> `class_embedding.linear_{1,2}`.
    ClassProjection,
    /// `num_class_embeds` without a class embed type: `label_emb.weight` -> `class_embedding.weight`.
    ClassTable,
}

const COMPONENT_UNET: &str = "unet";
const COMPONENT_VAE: &str = "vae";

impl UnetLayout {
    fn from_config(cfg: &UnetConfig) -> Result<Self> {
        let component = COMPONENT_UNET;
        let n = cfg.block_out_channels.len();
        if n == 0 {
            return Err(invalid_config(
                component,
                "`block_out_channels` is empty".to_string(),
            ));
        }
        for (field, len) in [
            ("down_block_types", cfg.down_block_types.len()),
            ("up_block_types", cfg.up_block_types.len()),
        ] {
            if len != n {
                return Err(invalid_config(
                    component,
                    format!("`{field}` has {len} entries, `block_out_channels` has {n}"),
                ));
            }
        }
        let layers: Vec<usize> = match &cfg.layers_per_block {
            PerBlock::One(l) => vec![*l; n],
            PerBlock::Each(v) if v.len() == n => v.clone(),
            PerBlock::Each(v) => {
                return Err(invalid_config(
                    component,
                    format!("`layers_per_block` has {} entries for {n} blocks", v.len()),
                ))
            }
        };

        // Transformer depth of down block `b`'s attention `j`.
        let down_depth = |b: usize, j: usize| -> Result<usize> {
            match &cfg.transformer_layers_per_block {
                TransformerLayers::One(d) => Some(*d),
                TransformerLayers::Each(v) => v.get(b).copied(),
                TransformerLayers::EachLayer(v) => v.get(b).and_then(|l| l.get(j)).copied(),
            }
            .ok_or_else(|| {
                invalid_config(
                    component,
                    format!("`transformer_layers_per_block` has no entry for down block {b}, attention {j}"),
                )
            })
        };
        // diffusers reverses the per-block depths for the up path unless it is given explicitly.
        let up_depth = |b: usize, j: usize| -> Result<usize> {
            let found = match (&cfg.reverse_transformer_layers_per_block, &cfg.transformer_layers_per_block) {
                (Some(rev), _) => rev.get(b).and_then(|l| l.get(j)).copied(),
                (None, TransformerLayers::One(d)) => Some(*d),
                (None, TransformerLayers::Each(v)) => n.checked_sub(b + 1).and_then(|i| v.get(i)).copied(),
                (None, TransformerLayers::EachLayer(_)) => {
                    return Err(invalid_config(
                        component,
                        "per-layer `transformer_layers_per_block` needs `reverse_transformer_layers_per_block`"
                            .to_string(),
                    ))
                }
            };
            found.ok_or_else(|| {
                invalid_config(
                    component,
                    format!("no transformer depth for up block {b}, attention {j}"),
                )
            })
        };

        let mut down = Vec::with_capacity(n);
        for (b, kind) in cfg.down_block_types.iter().enumerate() {
            let down_layers = layers.get(b).copied().unwrap_or_default();
            let down_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => Some(
                    (0..down_layers)
                        .map(|j| down_depth(b, j))
                        .collect::<Result<_>>()?,
                ),
                "DownBlock2D" => None,
                other => {
                    return Err(SingleFileError::UnsupportedConfig {
                        component: component.to_string(),
                        field: "down_block_types",
                        value: other.to_string(),
                    })
                }
            };
            down.push(UnetLevel {
                down_layers,
                down_attention,
            });
        }
        let mut up = Vec::with_capacity(n);
        for (b, kind) in cfg.up_block_types.iter().enumerate() {
            let up_layers = n
                .checked_sub(b + 1)
                .and_then(|i| layers.get(i))
                .map_or(0, |l| l.saturating_add(1));
            let attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => Some(
                    (0..up_layers)
                        .map(|j| up_depth(b, j))
                        .collect::<Result<_>>()?,
                ),
                "UpBlock2D" => None,
                other => {
                    return Err(SingleFileError::UnsupportedConfig {
                        component: component.to_string(),
                        field: "up_block_types",
                        value: other.to_string(),
                    })
                }
            };
            up.push((up_layers, attention));
        }

        let mid_attention = match cfg.mid_block_type.as_deref() {
            Some(MID_CROSS_ATTN) => Some(match &cfg.transformer_layers_per_block {
                TransformerLayers::One(d) => *d,
                TransformerLayers::Each(v) => v.last().copied().unwrap_or(1),
                TransformerLayers::EachLayer(v) => {
                    v.last().and_then(|l| l.first()).copied().unwrap_or(1)
                }
            }),
            None => None,
            Some(other) => {
                return Err(SingleFileError::UnsupportedConfig {
                    component: component.to_string(),
                    field: "mid_block_type",
                    value: other.to_string(),
                })
            }
        };

        // openaimodel.py numbers the input blocks conv_in, then per level its layers and (except the deepest)
        // a downsampler; the output blocks per level (deepest first) layers+1 entries, the last of which also
        // carries the upsampler (except at the shallowest level).
        let mut inputs = vec![InputSlot::ConvIn];
        for (block, level) in down.iter().enumerate() {
            inputs.extend((0..level.down_layers).map(|layer| InputSlot::Layer { block, layer }));
            if block + 1 < n {
                inputs.push(InputSlot::Downsample { block });
            }
        }
        let mut outputs = Vec::new();
        for (block, (up_layers, _)) in up.iter().enumerate() {
            outputs.extend((0..*up_layers).map(|layer| OutputSlot {
                block,
                layer,
                has_upsampler: layer + 1 == *up_layers && block + 1 < n,
            }));
        }

        let label_embedding = match (
            cfg.addition_embed_type.as_deref(),
            cfg.class_embed_type.as_deref(),
            cfg.num_class_embeds,
        ) {
            (Some("text_time"), _, _) => LabelEmbedding::AddEmbedding,
            (Some(other), _, _) => {
                return Err(SingleFileError::UnsupportedConfig {
                    component: component.to_string(),
                    field: "addition_embed_type",
                    value: other.to_string(),
                })
            }
            (None, Some("timestep" | "projection"), _) => LabelEmbedding::ClassProjection,
            (None, Some(other), _) => {
                return Err(SingleFileError::UnsupportedConfig {
                    component: component.to_string(),
                    field: "class_embed_type",
                    value: other.to_string(),
                })
            }
            (None, None, Some(_)) => LabelEmbedding::ClassTable,
            (None, None, None) => LabelEmbedding::None,
        };

        Ok(Self {
            block_out_channels: cfg.block_out_channels.clone(),
            down,
            up,
            mid_attention,
            inputs,
            outputs,
            linear_projection: cfg.use_linear_projection.unwrap_or(false),
            label_embedding,
        })
    }

    /// Every tensor diffusers' `UNet2DConditionModel` holds for this config (the embeddings and blocks an LDM
    /// checkpoint can provide).
    fn required_keys(&self) -> Vec<String> {
        let n = self.block_out_channels.len();
        let channels = |i: usize| self.block_out_channels.get(i).copied().unwrap_or_default();
        let mut keys = Vec::new();
        for module in [
            "conv_in",
            "time_embedding.linear_1",
            "time_embedding.linear_2",
            "conv_norm_out",
            "conv_out",
        ] {
            keys.extend(with_bias(module));
        }
        match self.label_embedding {
            LabelEmbedding::None => {}
            LabelEmbedding::AddEmbedding => {
                keys.extend(with_bias("add_embedding.linear_1"));
                keys.extend(with_bias("add_embedding.linear_2"));
            }
            LabelEmbedding::ClassProjection => {
                keys.extend(with_bias("class_embedding.linear_1"));
                keys.extend(with_bias("class_embedding.linear_2"));
            }
            LabelEmbedding::ClassTable => keys.push("class_embedding.weight".to_string()),
        }

        for (b, level) in self.down.iter().enumerate() {
            let out = channels(b);
            let mut inp = if b == 0 { channels(0) } else { channels(b - 1) };
            for j in 0..level.down_layers {
                unet_resnet_keys(&mut keys, &format!("down_blocks.{b}.resnets.{j}"), inp, out);
                inp = out;
            }
            if let Some(depths) = &level.down_attention {
                for (j, depth) in depths.iter().enumerate() {
                    unet_attention_keys(
                        &mut keys,
                        &format!("down_blocks.{b}.attentions.{j}"),
                        *depth,
                    );
                }
            }
            if b + 1 < n {
                keys.extend(with_bias(&format!("down_blocks.{b}.downsamplers.0.conv")));
            }
        }

        if let Some(depth) = self.mid_attention {
            let c = channels(n - 1);
            unet_resnet_keys(&mut keys, "mid_block.resnets.0", c, c);
            unet_resnet_keys(&mut keys, "mid_block.resnets.1", c, c);
            unet_attention_keys(&mut keys, "mid_block.attentions.0", depth);
        }

        // Up block b works at depth n-1-b; its resnets take the previous up block's output (or its own) plus a
        // skip connection, the last one the skip of the next shallower level.
        for (b, (up_layers, attention)) in self.up.iter().enumerate() {
            let depth = n - 1 - b;
            let out = channels(depth);
            let prev_out = if b == 0 { out } else { channels(depth + 1) };
            let skip_last = channels(depth.saturating_sub(1));
            for j in 0..*up_layers {
                let resnet_in = if j == 0 { prev_out } else { out };
                let skip = if j + 1 == *up_layers { skip_last } else { out };
                unet_resnet_keys(
                    &mut keys,
                    &format!("up_blocks.{b}.resnets.{j}"),
                    resnet_in.saturating_add(skip),
                    out,
                );
            }
            if let Some(depths) = attention {
                for (j, d) in depths.iter().enumerate() {
                    unet_attention_keys(&mut keys, &format!("up_blocks.{b}.attentions.{j}"), *d);
                }
            }
            if b + 1 < n {
                keys.extend(with_bias(&format!("up_blocks.{b}.upsamplers.0.conv")));
            }
        }
        keys
    }
}

fn unet_resnet_keys(keys: &mut Vec<String>, prefix: &str, in_channels: usize, out_channels: usize) {
    for module in ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"] {
        keys.extend(with_bias(&format!("{prefix}.{module}")));
    }
    if in_channels != out_channels {
        keys.extend(with_bias(&format!("{prefix}.conv_shortcut")));
    }
}

/// `Transformer2DModel` with `depth` `BasicTransformerBlock`s (self- and cross-attention, GEGLU feed-forward).
fn unet_attention_keys(keys: &mut Vec<String>, prefix: &str, depth: usize) {
    for module in ["norm", "proj_in", "proj_out"] {
        keys.extend(with_bias(&format!("{prefix}.{module}")));
    }
    for t in 0..depth {
        let block = format!("{prefix}.transformer_blocks.{t}");
        for module in ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] {
            keys.extend(with_bias(&format!("{block}.{module}")));
        }
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v"] {
                keys.push(format!("{block}.{attn}.{proj}.weight"));
            }
            keys.extend(with_bias(&format!("{block}.{attn}.to_out.0")));
        }
    }
}

/// A translated UNet key: the diffusers key, and whether it is a transformer `proj_in`/`proj_out` weight whose
/// layout (linear or 1x1 conv) follows `use_linear_projection`.
struct UnetTarget {
    key: String,
    projection: bool,
}

/// openaimodel.py `ResBlock` parameter paths -> diffusers `ResnetBlock2D`.
fn unet_resnet_rename(prefix: &str, path: &[&str]) -> Option<String> {
    let (module, rest) = match path {
        ["in_layers", "0", rest @ ..] => ("norm1", rest),
        ["in_layers", "2", rest @ ..] => ("conv1", rest),
        ["emb_layers", "1", rest @ ..] => ("time_emb_proj", rest),
        ["out_layers", "0", rest @ ..] => ("norm2", rest),
        ["out_layers", "3", rest @ ..] => ("conv2", rest),
        ["skip_connection", rest @ ..] => ("conv_shortcut", rest),
        _ => return None,
    };
    join(&format!("{prefix}.{module}"), rest)
}

fn unet_key(layout: &UnetLayout, key: &str, rest: &str) -> Result<UnetTarget> {
    let unmapped = || SingleFileError::UnmappedKey {
        component: COMPONENT_UNET.to_string(),
        key: key.to_string(),
    };
    let mismatch = |reason: String| SingleFileError::ConfigMismatch {
        component: COMPONENT_UNET.to_string(),
        key: key.to_string(),
        reason,
    };
    let plain = |k: Option<String>| {
        k.map(|key| UnetTarget {
            key,
            projection: false,
        })
        .ok_or_else(unmapped)
    };
    // Inside a transformer the names already agree; only the block position and depth need checking.
    let attention = |prefix: String, depth: usize, path: &[&str]| -> Result<UnetTarget> {
        if let ["transformer_blocks", t, ..] = path {
            match parse_index(t) {
                Some(t) if t < depth => {}
                _ => {
                    return Err(mismatch(format!(
                        "transformer block {t} of `{prefix}`, whose config depth is {depth}"
                    )))
                }
            }
        }
        let projection = matches!(path, ["proj_in" | "proj_out", "weight"]);
        join(&prefix, path)
            .map(|key| UnetTarget { key, projection })
            .ok_or_else(unmapped)
    };
    let index = |segment: &str| parse_index(segment).ok_or_else(unmapped);

    let path: Vec<&str> = rest.split('.').collect();
    match path.as_slice() {
        ["time_embed", "0", p @ ..] => plain(join("time_embedding.linear_1", p)),
        ["time_embed", "2", p @ ..] => plain(join("time_embedding.linear_2", p)),
        ["label_emb", "0", i @ ("0" | "2"), p @ ..] => {
            let linear = if *i == "0" { "linear_1" } else { "linear_2" };
            match layout.label_embedding {
                LabelEmbedding::AddEmbedding => plain(join(&format!("add_embedding.{linear}"), p)),
                LabelEmbedding::ClassProjection => plain(join(&format!("class_embedding.{linear}"), p)),
                _ => Err(mismatch(
                    "the config has no `addition_embed_type: text_time` nor projected class embedding".to_string(),
                )),
            }
        }
        ["label_emb", p @ ..] if layout.label_embedding == LabelEmbedding::ClassTable => {
            plain(join("class_embedding", p))
        }
        ["input_blocks", i, sub, p @ ..] => {
            let i = index(i)?;
            let slot = layout.inputs.get(i).copied().ok_or_else(|| {
                mismatch(format!(
                    "the config has {} input blocks",
                    layout.inputs.len()
                ))
            })?;
            match (slot, *sub) {
                (InputSlot::ConvIn, "0") => plain(join("conv_in", p)),
                (InputSlot::Layer { block, layer }, "0") => plain(unet_resnet_rename(
                    &format!("down_blocks.{block}.resnets.{layer}"),
                    p,
                )),
                (InputSlot::Layer { block, layer }, "1") => {
                    let depth = layout
                        .down
                        .get(block)
                        .and_then(|l| l.down_attention.as_ref())
                        .and_then(|d| d.get(layer))
                        .copied()
                        .ok_or_else(|| {
                            mismatch(format!("down block {block} has no attention in the config"))
                        })?;
                    attention(format!("down_blocks.{block}.attentions.{layer}"), depth, p)
                }
                (InputSlot::Downsample { block }, "0") => match p {
                    ["op", q @ ..] => {
                        plain(join(&format!("down_blocks.{block}.downsamplers.0.conv"), q))
                    }
                    _ => Err(unmapped()),
                },
                _ => Err(unmapped()),
            }
        }
        ["middle_block", i, p @ ..] => {
            let depth = layout
                .mid_attention
                .ok_or_else(|| mismatch("the config has no mid block".to_string()))?;
            match *i {
                "0" => plain(unet_resnet_rename("mid_block.resnets.0", p)),
                "1" => attention("mid_block.attentions.0".to_string(), depth, p),
                "2" => plain(unet_resnet_rename("mid_block.resnets.1", p)),
                _ => Err(unmapped()),
            }
        }
        ["output_blocks", i, sub, p @ ..] => {
            let i = index(i)?;
            let slot = layout.outputs.get(i).copied().ok_or_else(|| {
                mismatch(format!(
                    "the config has {} output blocks",
                    layout.outputs.len()
                ))
            })?;
            let OutputSlot {
                block,
                layer,
                has_upsampler,
            } = slot;
            let depths = layout.up.get(block).and_then(|(_, a)| a.as_ref());
            // The upsampler follows the resnet and, in attention blocks, the attention.
            let upsampler_index = if depths.is_some() { "2" } else { "1" };
            match (*sub, p) {
                ("0", _) => plain(unet_resnet_rename(&format!("up_blocks.{block}.resnets.{layer}"), p)),
                ("1", _) if depths.is_some() => {
                    let depth = depths.and_then(|d| d.get(layer)).copied().unwrap_or_default();
                    attention(format!("up_blocks.{block}.attentions.{layer}"), depth, p)
                }
                (s, ["conv", q @ ..]) if has_upsampler && s == upsampler_index => {
                    plain(join(&format!("up_blocks.{block}.upsamplers.0.conv"), q))
                }
                ("1" | "2", _) => Err(mismatch(format!(
                    "output block {i} is layer {layer} of up block {block}, which has {} in the config",
                    match (depths.is_some(), has_upsampler) {
                        (true, true) => "a resnet, an attention and an upsampler",
                        (true, false) => "a resnet and an attention",
                        (false, true) => "a resnet and an upsampler",
                        (false, false) => "only a resnet",
                    }
                ))),
                _ => Err(unmapped()),
            }
        }
        ["out", "0", p @ ..] => plain(join("conv_norm_out", p)),
        ["out", "2", p @ ..] => plain(join("conv_out", p)),
        _ => Err(unmapped()),
    }
}

fn unet_plan(
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let cfg: UnetConfig = parse_config(COMPONENT_UNET, config)?;
    let layout = UnetLayout::from_config(&cfg)?;
    let mut plan = PlanBuilder::new(COMPONENT_UNET, checkpoint_keys);
    for (key, shape) in checkpoint_keys {
        let Some(rest) = key.strip_prefix(UNET_PREFIX) else {
            continue;
        };
        let target = unet_key(&layout, key, rest)?;
        let source = if target.projection {
            projection_source(key, shape, layout.linear_projection)?
        } else {
            Source::Rename(key.clone())
        };
        plan.insert(target.key, source)?;
    }
    plan.finish(&layout.required_keys(), UNET_PREFIX)
}

// ---------------------------------------------------------------------------------------------------------------
// VAE: `first_stage_model.*` (ldm `AutoencoderKL`, model.py `Encoder`/`Decoder`) -> diffusers `AutoencoderKL`.

/// The fields of diffusers' `AutoencoderKL` config that shape the key layout (defaults as diffusers').
#[derive(Debug, Clone, Deserialize)]
struct VaeConfig {
    #[serde(default = "VaeConfig::default_block_out_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "VaeConfig::default_down_block_types")]
    down_block_types: Vec<String>,
    #[serde(default = "VaeConfig::default_up_block_types")]
    up_block_types: Vec<String>,
    #[serde(default = "VaeConfig::default_layers_per_block")]
    layers_per_block: usize,
    #[serde(default = "VaeConfig::default_true")]
    mid_block_add_attention: bool,
    #[serde(default = "VaeConfig::default_true")]
    use_quant_conv: bool,
    #[serde(default = "VaeConfig::default_true")]
    use_post_quant_conv: bool,
}

impl VaeConfig {
    fn default_block_out_channels() -> Vec<usize> {
        vec![64]
    }
    fn default_down_block_types() -> Vec<String> {
        vec!["DownEncoderBlock2D".to_string()]
    }
    fn default_up_block_types() -> Vec<String> {
        vec!["UpDecoderBlock2D".to_string()]
    }
    fn default_layers_per_block() -> usize {
        1
    }
    fn default_true() -> bool {
        true
    }

    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(invalid_config(
                COMPONENT_VAE,
                "`block_out_channels` is empty".to_string(),
            ));
        }
        for (field, types, expected) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(invalid_config(
                    COMPONENT_VAE,
                    format!(
                        "`{field}` has {} entries, `block_out_channels` has {n}",
                        types.len()
                    ),
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != expected) {
                return Err(SingleFileError::UnsupportedConfig {
                    component: COMPONENT_VAE.to_string(),
                    field,
                    value: other.clone(),
                });
            }
        }
        Ok(())
    }

    /// Every tensor diffusers' `AutoencoderKL` holds for this config.
    fn required_keys(&self) -> Vec<String> {
        let n = self.block_out_channels.len();
        let channels = |i: usize| self.block_out_channels.get(i).copied().unwrap_or_default();
        let deepest = channels(n.saturating_sub(1));
        let mut keys = Vec::new();
        let mid = |keys: &mut Vec<String>, side: &str| {
            vae_resnet_keys(
                keys,
                &format!("{side}.mid_block.resnets.0"),
                deepest,
                deepest,
            );
            vae_resnet_keys(
                keys,
                &format!("{side}.mid_block.resnets.1"),
                deepest,
                deepest,
            );
            if self.mid_block_add_attention {
                for module in ["group_norm", "to_q", "to_k", "to_v", "to_out.0"] {
                    keys.extend(with_bias(&format!(
                        "{side}.mid_block.attentions.0.{module}"
                    )));
                }
            }
            for module in ["conv_in", "conv_norm_out", "conv_out"] {
                keys.extend(with_bias(&format!("{side}.{module}")));
            }
        };

        mid(&mut keys, "encoder");
        let mut inp = channels(0);
        for b in 0..n {
            let out = channels(b);
            for j in 0..self.layers_per_block {
                vae_resnet_keys(
                    &mut keys,
                    &format!("encoder.down_blocks.{b}.resnets.{j}"),
                    inp,
                    out,
                );
                inp = out;
            }
            if b + 1 < n {
                keys.extend(with_bias(&format!(
                    "encoder.down_blocks.{b}.downsamplers.0.conv"
                )));
            }
        }

        mid(&mut keys, "decoder");
        let mut inp = deepest;
        for b in 0..n {
            let out = channels(n - 1 - b);
            for j in 0..=self.layers_per_block {
                vae_resnet_keys(
                    &mut keys,
                    &format!("decoder.up_blocks.{b}.resnets.{j}"),
                    inp,
                    out,
                );
                inp = out;
            }
            if b + 1 < n {
                keys.extend(with_bias(&format!(
                    "decoder.up_blocks.{b}.upsamplers.0.conv"
                )));
            }
        }

        if self.use_quant_conv {
            keys.extend(with_bias("quant_conv"));
        }
        if self.use_post_quant_conv {
            keys.extend(with_bias("post_quant_conv"));
        }
        keys
    }
}

fn vae_resnet_keys(keys: &mut Vec<String>, prefix: &str, in_channels: usize, out_channels: usize) {
    for module in ["norm1", "conv1", "norm2", "conv2"] {
        keys.extend(with_bias(&format!("{prefix}.{module}")));
    }
    if in_channels != out_channels {
        keys.extend(with_bias(&format!("{prefix}.conv_shortcut")));
    }
}

/// model.py `ResnetBlock` parameter paths -> diffusers `ResnetBlock2D` (no time embedding in the VAE).
fn vae_resnet_rename(prefix: &str, path: &[&str]) -> Option<String> {
    match path {
        [m @ ("norm1" | "conv1" | "norm2" | "conv2"), rest @ ..] => {
            join(&format!("{prefix}.{m}"), rest)
        }
        ["nin_shortcut", rest @ ..] => join(&format!("{prefix}.conv_shortcut"), rest),
        _ => None,
    }
}

/// A translated VAE key: the diffusers key, or `None` for tensors diffusers has no use for; and whether it is an
/// attention projection weight (1x1 conv in LDM, linear in diffusers).
type VaeTarget = Option<(String, bool)>;

fn vae_key(cfg: &VaeConfig, key: &str, rest: &str) -> Result<VaeTarget> {
    let unmapped = || SingleFileError::UnmappedKey {
        component: COMPONENT_VAE.to_string(),
        key: key.to_string(),
    };
    let mismatch = |reason: String| SingleFileError::ConfigMismatch {
        component: COMPONENT_VAE.to_string(),
        key: key.to_string(),
        reason,
    };
    let plain = |k: Option<String>| k.map(|k| Some((k, false))).ok_or_else(unmapped);
    let n = cfg.block_out_channels.len();
    let block = |segment: &str, limit: usize, what: &str| -> Result<usize> {
        let i = parse_index(segment).ok_or_else(unmapped)?;
        if i < limit {
            Ok(i)
        } else {
            Err(mismatch(format!("the config has {limit} {what}")))
        }
    };

    let path: Vec<&str> = rest.split('.').collect();
    match path.as_slice() {
        // Training-only discriminator / perceptual-loss weights that some LDM exports keep.
        ["loss", ..] => Ok(None),
        ["quant_conv", p @ ..] if cfg.use_quant_conv => plain(join("quant_conv", p)),
        ["post_quant_conv", p @ ..] if cfg.use_post_quant_conv => plain(join("post_quant_conv", p)),
        [side @ ("encoder" | "decoder"), inner @ ..] => match inner {
            ["conv_in", p @ ..] => plain(join(&format!("{side}.conv_in"), p)),
            ["conv_out", p @ ..] => plain(join(&format!("{side}.conv_out"), p)),
            ["norm_out", p @ ..] => plain(join(&format!("{side}.conv_norm_out"), p)),
            ["mid", "block_1", p @ ..] => {
                plain(vae_resnet_rename(&format!("{side}.mid_block.resnets.0"), p))
            }
            ["mid", "block_2", p @ ..] => {
                plain(vae_resnet_rename(&format!("{side}.mid_block.resnets.1"), p))
            }
            ["mid", "attn_1", module, p @ ..] => {
                if !cfg.mid_block_add_attention {
                    return Err(mismatch(
                        "the config has `mid_block_add_attention: false`".to_string(),
                    ));
                }
                let renamed = match *module {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return Err(unmapped()),
                };
                let projection = renamed != "group_norm" && p == ["weight"];
                join(&format!("{side}.mid_block.attentions.0.{renamed}"), p)
                    .map(|k| Some((k, projection)))
                    .ok_or_else(unmapped)
            }
            ["down", i, "block", j, p @ ..] if *side == "encoder" => {
                let i = block(i, n, "down blocks")?;
                let j = block(j, cfg.layers_per_block, "resnets per down block")?;
                plain(vae_resnet_rename(
                    &format!("encoder.down_blocks.{i}.resnets.{j}"),
                    p,
                ))
            }
            ["down", i, "downsample", "conv", p @ ..] if *side == "encoder" => {
                let i = block(i, n.saturating_sub(1), "downsamplers")?;
                plain(join(
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    p,
                ))
            }
            // model.py's `Decoder` numbers `up` from the shallowest level, diffusers' `up_blocks` from the deepest.
            ["up", i, "block", j, p @ ..] if *side == "decoder" => {
                let i = block(i, n, "up blocks")?;
                let j = block(
                    j,
                    cfg.layers_per_block.saturating_add(1),
                    "resnets per up block",
                )?;
                let b = n - 1 - i;
                plain(vae_resnet_rename(
                    &format!("decoder.up_blocks.{b}.resnets.{j}"),
                    p,
                ))
            }
            ["up", i, "upsample", "conv", p @ ..] if *side == "decoder" => {
                let i = block(i, n, "up blocks")?;
                if i == 0 {
                    return Err(mismatch(
                        "the shallowest up block has no upsampler".to_string(),
                    ));
                }
                let b = n - 1 - i;
                plain(join(&format!("decoder.up_blocks.{b}.upsamplers.0.conv"), p))
            }
            _ => Err(unmapped()),
        },
        _ => Err(unmapped()),
    }
}

fn vae_plan(
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let cfg: VaeConfig = parse_config(COMPONENT_VAE, config)?;
    cfg.validate()?;
    let mut plan = PlanBuilder::new(COMPONENT_VAE, checkpoint_keys);
    for (key, shape) in checkpoint_keys {
        let Some(rest) = key.strip_prefix(VAE_PREFIX) else {
            continue;
        };
        let Some((target, projection)) = vae_key(&cfg, key, rest)? else {
            continue;
        };
        let source = if projection {
            // diffusers' VAE attention uses linear layers where model.py's `AttnBlock` has 1x1 convolutions.
            projection_source(key, shape, true)?
        } else {
            Source::Rename(key.clone())
        };
        plan.insert(target, source)?;
    }
    plan.finish(&cfg.required_keys(), VAE_PREFIX)
}

// ---------------------------------------------------------------------------------------------------------------
// Text encoders: transformers-layout CLIP (SD1.x, SDXL's first encoder) and OpenCLIP (SD2, SDXL's second encoder)
// -> transformers `CLIPTextModel` / `CLIPTextModelWithProjection`.

#[derive(Debug, Clone, Copy)]
enum TextEncoder {
    /// A transformers `CLIPTextModel` under this prefix, with or without its `text_model.` segment.
    Clip(&'static str),
    /// An open_clip `CLIP` text tower under this prefix.
    OpenClip(&'static str),
}

/// The fields of transformers' `CLIPTextConfig` that shape the key layout (defaults as transformers').
#[derive(Debug, Clone, Deserialize)]
struct ClipConfig {
    #[serde(default = "ClipConfig::default_num_hidden_layers")]
    num_hidden_layers: usize,
    #[serde(default)]
    architectures: Option<Vec<String>>,
}

impl ClipConfig {
    fn default_num_hidden_layers() -> usize {
        12
    }

    /// Whether the diffusers model has a `text_projection`. transformers records the class in `architectures`;
    /// a config without it follows the SDXL convention that only `text_encoder_2` is projected.
    fn has_projection(&self, component: &str) -> bool {
        match &self.architectures {
            Some(archs) => archs.iter().any(|a| a == "CLIPTextModelWithProjection"),
            None => component == "text_encoder_2",
        }
    }

    fn required_keys(&self, component: &str) -> Vec<String> {
        let mut keys = vec![
            "text_model.embeddings.token_embedding.weight".to_string(),
            "text_model.embeddings.position_embedding.weight".to_string(),
        ];
        for i in 0..self.num_hidden_layers {
            let layer = format!("text_model.encoder.layers.{i}");
            for module in [
                "layer_norm1",
                "layer_norm2",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ] {
                keys.extend(with_bias(&format!("{layer}.{module}")));
            }
        }
        keys.extend(with_bias("text_model.final_layer_norm"));
        if self.has_projection(component) {
            keys.push("text_projection.weight".to_string());
        }
        keys
    }
}

/// Encoder layer index of a transformers-layout key (`text_model.encoder.layers.{i}.…`).
fn clip_layer_index(key: &str) -> Option<usize> {
    let rest = key.strip_prefix("text_model.encoder.layers.")?;
    parse_index(rest.split('.').next()?)
}

/// One checkpoint tensor's contribution to a text-encoder plan: diffusers keys with their sources.
type TextTargets = Vec<(String, Source)>;

fn clip_key(cfg: &ClipConfig, component: &str, key: &str, rest: &str) -> Result<TextTargets> {
    let renamed = if rest.starts_with("text_model.") || rest.starts_with("text_projection.") {
        rest.to_string()
    } else if ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| rest.starts_with(p))
    {
        // Some exports store `CLIPTextTransformer` directly, without the `text_model.` segment.
        format!("text_model.{rest}")
    } else {
        return Err(SingleFileError::UnmappedKey {
            component: component.to_string(),
            key: key.to_string(),
        });
    };
    let ignored = renamed.ends_with("position_ids")
        || (renamed.starts_with("text_projection.") && !cfg.has_projection(component))
        || clip_layer_index(&renamed).is_some_and(|i| i >= cfg.num_hidden_layers);
    if ignored {
        return Ok(Vec::new());
    }
    Ok(vec![(renamed, Source::Rename(key.to_string()))])
}

fn open_clip_key(cfg: &ClipConfig, component: &str, key: &str, rest: &str) -> Result<TextTargets> {
    let unmapped = || SingleFileError::UnmappedKey {
        component: component.to_string(),
        key: key.to_string(),
    };
    let rename = |target: Option<String>| {
        target
            .map(|t| vec![(t, Source::Rename(key.to_string()))])
            .ok_or_else(unmapped)
    };
    let path: Vec<&str> = rest.split('.').collect();
    match path.as_slice() {
        ["token_embedding", p @ ..] => rename(join("text_model.embeddings.token_embedding", p)),
        ["positional_embedding"] => rename(Some(
            "text_model.embeddings.position_embedding.weight".to_string(),
        )),
        ["ln_final", p @ ..] => rename(join("text_model.final_layer_norm", p)),
        ["text_projection"] if cfg.has_projection(component) => Ok(vec![(
            "text_projection.weight".to_string(),
            Source::Transpose(key.to_string()),
        )]),
        // Not part of the text model transformers builds: the unprojected SD2 encoder, CLIP's contrastive
        // temperature, and the causal mask buffer.
        ["text_projection"] | ["logit_scale"] | ["attn_mask"] => Ok(Vec::new()),
        ["transformer", "resblocks", i, inner @ ..] => {
            let i = parse_index(i).ok_or_else(unmapped)?;
            if i >= cfg.num_hidden_layers {
                // diffusers' SD2 text encoder stops at the penultimate layer the model conditions on.
                return Ok(Vec::new());
            }
            let layer = format!("text_model.encoder.layers.{i}");
            match inner {
                ["ln_1", p @ ..] => rename(join(&format!("{layer}.layer_norm1"), p)),
                ["ln_2", p @ ..] => rename(join(&format!("{layer}.layer_norm2"), p)),
                ["attn", "out_proj", p @ ..] => {
                    rename(join(&format!("{layer}.self_attn.out_proj"), p))
                }
                ["mlp", "c_fc", p @ ..] => rename(join(&format!("{layer}.mlp.fc1"), p)),
                ["mlp", "c_proj", p @ ..] => rename(join(&format!("{layer}.mlp.fc2"), p)),
                ["attn", fused @ ("in_proj_weight" | "in_proj_bias")] => {
                    let param = if *fused == "in_proj_weight" {
                        "weight"
                    } else {
                        "bias"
                    };
                    Ok(["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .enumerate()
                        .map(|(index, proj)| {
                            (
                                format!("{layer}.self_attn.{proj}.{param}"),
                                Source::Slice {
                                    key: key.to_string(),
                                    index,
                                    parts: 3,
                                },
                            )
                        })
                        .collect())
                }
                _ => Err(unmapped()),
            }
        }
        _ => Err(unmapped()),
    }
}

fn text_encoder_plan(
    component: &str,
    encoder: TextEncoder,
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let cfg: ClipConfig = parse_config(component, config)?;
    let prefix = match encoder {
        TextEncoder::Clip(p) | TextEncoder::OpenClip(p) => p,
    };
    let mut plan = PlanBuilder::new(component, checkpoint_keys);
    for (key, _) in checkpoint_keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let targets = match encoder {
            TextEncoder::Clip(_) => clip_key(&cfg, component, key, rest)?,
            TextEncoder::OpenClip(_) => open_clip_key(&cfg, component, key, rest)?,
        };
        for (target, source) in targets {
            plan.insert(target, source)?;
        }
    }
    plan.finish(&cfg.required_keys(component), prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(names: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        names
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect()
    }

    fn sd15_like_unet_config() -> serde_json::Value {
        json!({
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2,
            "transformer_layers_per_block": 1,
            "use_linear_projection": false,
        })
    }

    fn unet_layout(cfg: serde_json::Value) -> UnetLayout {
        let cfg: UnetConfig = serde_json::from_value(cfg).unwrap();
        UnetLayout::from_config(&cfg).unwrap()
    }

    fn unet_name(layout: &UnetLayout, rest: &str) -> Result<String> {
        unet_key(layout, &format!("{UNET_PREFIX}{rest}"), rest).map(|t| t.key)
    }

    #[test]
    fn unet_top_level_names() {
        let l = unet_layout(sd15_like_unet_config());
        for (ldm, diffusers) in [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ] {
            assert_eq!(unet_name(&l, ldm).unwrap(), diffusers, "{ldm}");
        }
    }

    #[test]
    fn unet_resnet_inner_names() {
        let l = unet_layout(sd15_like_unet_config());
        for (ldm, diffusers) in [
            ("in_layers.0.weight", "norm1.weight"),
            ("in_layers.2.weight", "conv1.weight"),
            ("emb_layers.1.bias", "time_emb_proj.bias"),
            ("out_layers.0.bias", "norm2.bias"),
            ("out_layers.3.weight", "conv2.weight"),
            ("skip_connection.weight", "conv_shortcut.weight"),
        ] {
            assert_eq!(
                unet_name(&l, &format!("input_blocks.4.0.{ldm}")).unwrap(),
                format!("down_blocks.1.resnets.0.{diffusers}")
            );
        }
        assert!(matches!(
            unet_name(&l, "input_blocks.1.0.in_layers.1.weight"),
            Err(SingleFileError::UnmappedKey { .. })
        ));
    }

    #[test]
    fn unet_input_block_numbering_follows_layers_per_block() {
        let l = unet_layout(sd15_like_unet_config());
        let cases = [
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.5.1.norm.bias",
                "down_blocks.1.attentions.1.norm.bias",
            ),
            (
                "input_blocks.6.0.op.bias",
                "down_blocks.1.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.8.0.out_layers.3.weight",
                "down_blocks.2.resnets.1.conv2.weight",
            ),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(&l, ldm).unwrap(), diffusers, "{ldm}");
        }
        // Three resnets per block shift every later index.
        let mut cfg = sd15_like_unet_config();
        cfg["layers_per_block"] = json!(3);
        let l3 = unet_layout(cfg);
        assert_eq!(
            unet_name(&l3, "input_blocks.4.0.op.weight").unwrap(),
            "down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            unet_name(&l3, "input_blocks.5.1.proj_out.weight").unwrap(),
            "down_blocks.1.attentions.0.proj_out.weight"
        );
        // The last down block has no attention and no downsampler; the table ends after it.
        assert!(matches!(
            unet_name(&l, "input_blocks.7.1.norm.weight"),
            Err(SingleFileError::ConfigMismatch { .. })
        ));
        assert!(matches!(
            unet_name(&l, "input_blocks.9.0.in_layers.0.weight"),
            Err(SingleFileError::ConfigMismatch { .. })
        ));
    }

    #[test]
    fn unet_output_blocks_and_upsampler_position() {
        let l = unet_layout(sd15_like_unet_config());
        let cases = [
            // Up block 0 has no attention: its upsampler is the second module.
            (
                "output_blocks.0.0.skip_connection.weight",
                "up_blocks.0.resnets.0.conv_shortcut.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            // Up block 1 has attention: the upsampler comes third.
            (
                "output_blocks.3.1.proj_in.bias",
                "up_blocks.1.attentions.0.proj_in.bias",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            // The shallowest block has no upsampler.
            (
                "output_blocks.8.0.emb_layers.1.weight",
                "up_blocks.2.resnets.2.time_emb_proj.weight",
            ),
            (
                "middle_block.0.in_layers.0.weight",
                "mid_block.resnets.0.norm1.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.out_layers.3.bias",
                "mid_block.resnets.1.conv2.bias",
            ),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(&l, ldm).unwrap(), diffusers, "{ldm}");
        }
        for wrong in [
            "output_blocks.8.2.conv.weight",
            "output_blocks.1.1.conv.weight",
            "output_blocks.0.1.norm.weight",
            "output_blocks.9.0.in_layers.0.weight",
        ] {
            assert!(
                matches!(
                    unet_name(&l, wrong),
                    Err(SingleFileError::ConfigMismatch { .. })
                ),
                "{wrong}"
            );
        }
    }

    #[test]
    fn unet_transformer_depth_is_checked() {
        let mut cfg = sd15_like_unet_config();
        cfg["transformer_layers_per_block"] = json!([1, 2, 2]);
        let l = unet_layout(cfg);
        assert_eq!(
            unet_name(&l, "input_blocks.4.1.transformer_blocks.1.ff.net.2.weight").unwrap(),
            "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2.weight"
        );
        assert!(matches!(
            unet_name(&l, "input_blocks.1.1.transformer_blocks.1.norm1.weight"),
            Err(SingleFileError::ConfigMismatch { .. })
        ));
        // Up path uses the reversed depths: up block 1 is down block 1's level (depth 2).
        assert!(unet_name(&l, "output_blocks.3.1.transformer_blocks.1.norm1.weight").is_ok());
        assert!(unet_name(&l, "output_blocks.6.1.transformer_blocks.1.norm1.weight").is_err());
        // The mid block takes the deepest depth.
        assert!(unet_name(&l, "middle_block.1.transformer_blocks.1.norm3.bias").is_ok());
    }

    #[test]
    fn unet_label_embedding_follows_config() {
        let mut cfg = sd15_like_unet_config();
        cfg["addition_embed_type"] = json!("text_time");
        let l = unet_layout(cfg);
        assert_eq!(
            unet_name(&l, "label_emb.0.0.weight").unwrap(),
            "add_embedding.linear_1.weight"
        );
        assert_eq!(
            unet_name(&l, "label_emb.0.2.bias").unwrap(),
            "add_embedding.linear_2.bias"
        );
        let plain = unet_layout(sd15_like_unet_config());
        assert!(matches!(
            unet_name(&plain, "label_emb.0.0.weight"),
            Err(SingleFileError::ConfigMismatch { .. })
        ));
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

    fn vae_config() -> VaeConfig {
        serde_json::from_value(json!({
            "block_out_channels": [32, 32, 64, 64],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 2,
        }))
        .unwrap()
    }

    fn vae_name(cfg: &VaeConfig, rest: &str) -> Result<VaeTarget> {
        vae_key(cfg, &format!("{VAE_PREFIX}{rest}"), rest)
    }

    #[test]
    fn vae_names() {
        let cfg = vae_config();
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            // `up` is numbered from the shallowest level: up.3 is the first diffusers up block.
            (
                "decoder.up.3.block.2.conv2.weight",
                "decoder.up_blocks.0.resnets.2.conv2.weight",
            ),
            (
                "decoder.up.0.block.0.norm1.bias",
                "decoder.up_blocks.3.resnets.0.norm1.bias",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.block_1.conv1.weight",
                "decoder.mid_block.resnets.0.conv1.weight",
            ),
            (
                "encoder.mid.block_2.norm2.bias",
                "encoder.mid_block.resnets.1.norm2.bias",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
            ),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            ("encoder.conv_in.bias", "encoder.conv_in.bias"),
            ("quant_conv.weight", "quant_conv.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                vae_name(&cfg, ldm).unwrap(),
                Some((diffusers.to_string(), false)),
                "{ldm}"
            );
        }
        for (ldm, diffusers) in [
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
            ),
            (
                "decoder.mid.attn_1.k.weight",
                "decoder.mid_block.attentions.0.to_k.weight",
            ),
            (
                "decoder.mid.attn_1.v.weight",
                "decoder.mid_block.attentions.0.to_v.weight",
            ),
            (
                "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
            ),
        ] {
            assert_eq!(
                vae_name(&cfg, ldm).unwrap(),
                Some((diffusers.to_string(), true)),
                "{ldm}"
            );
        }
        assert_eq!(
            vae_name(&cfg, "loss.discriminator.main.0.weight").unwrap(),
            None
        );
        for wrong in [
            "encoder.down.4.block.0.conv1.weight",
            "encoder.down.0.block.2.conv1.weight",
            "encoder.down.3.downsample.conv.weight",
            "decoder.up.0.upsample.conv.weight",
            "decoder.up.1.block.3.conv1.weight",
        ] {
            assert!(
                matches!(
                    vae_name(&cfg, wrong),
                    Err(SingleFileError::ConfigMismatch { .. })
                ),
                "{wrong}"
            );
        }
        assert!(matches!(
            vae_name(&cfg, "decoder.down.0.block.0.conv1.weight"),
            Err(SingleFileError::UnmappedKey { .. })
        ));
    }

    #[test]
    fn vae_attention_weights_are_reshaped_to_linear() {
        let mut ckpt = Vec::new();
        let cfg = json!({"block_out_channels": [4], "layers_per_block": 1});
        let vae: VaeConfig = serde_json::from_value(cfg.clone()).unwrap();
        for k in vae.required_keys() {
            let ldm = k
                .replace("mid_block.attentions.0.to_q", "mid.attn_1.q")
                .replace("mid_block.attentions.0.to_k", "mid.attn_1.k")
                .replace("mid_block.attentions.0.to_v", "mid.attn_1.v")
                .replace("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")
                .replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
                .replace("mid_block.resnets.0", "mid.block_1")
                .replace("mid_block.resnets.1", "mid.block_2")
                .replace("conv_norm_out", "norm_out")
                .replace("down_blocks.0.resnets", "down.0.block")
                .replace("up_blocks.0.resnets", "up.0.block");
            let shape =
                if ldm.contains("attn_1") && ldm.ends_with("weight") && !ldm.contains("norm") {
                    vec![4, 4, 1, 1]
                } else {
                    vec![4]
                };
            ckpt.push((format!("{VAE_PREFIX}{ldm}"), shape));
        }
        let plan = component_plan(CheckpointFamily::Sd15, "vae", &cfg, &ckpt).unwrap();
        assert_eq!(plan.len(), ckpt.len());
        let to_q = plan
            .iter()
            .find(|(k, _)| k == "decoder.mid_block.attentions.0.to_q.weight")
            .unwrap();
        assert_eq!(
            to_q.1,
            Source::Reshape {
                key: format!("{VAE_PREFIX}decoder.mid.attn_1.q.weight"),
                shape: vec![4, 4]
            }
        );
    }

    fn clip_config(layers: usize, arch: &str) -> serde_json::Value {
        json!({"num_hidden_layers": layers, "architectures": [arch]})
    }

    /// transformers-layout keys of a CLIP text model, under `prefix`.
    fn clip_checkpoint(prefix: &str, layers: usize) -> Vec<(String, Vec<usize>)> {
        let cfg: ClipConfig = serde_json::from_value(clip_config(layers, "CLIPTextModel")).unwrap();
        cfg.required_keys("text_encoder")
            .into_iter()
            .map(|k| (format!("{prefix}{k}"), vec![2]))
            .collect()
    }

    #[test]
    fn clip_prefix_with_and_without_text_model() {
        let cfg = clip_config(2, "CLIPTextModel");
        let mut with = clip_checkpoint(SD15_CLIP_PREFIX, 2);
        with.push((
            format!("{SD15_CLIP_PREFIX}text_model.embeddings.position_ids"),
            vec![1, 77],
        ));
        let plan = component_plan(CheckpointFamily::Sd15, "text_encoder", &cfg, &with).unwrap();
        assert_eq!(plan.len(), with.len() - 1);
        assert!(plan
            .iter()
            .all(|(k, s)| s == &Source::Rename(format!("{SD15_CLIP_PREFIX}{k}"))));

        let without: Vec<_> = with
            .iter()
            .map(|(k, s)| {
                (
                    k.replace("transformer.text_model.", "transformer."),
                    s.clone(),
                )
            })
            .collect();
        let plan2 = component_plan(CheckpointFamily::Sd15, "text_encoder", &cfg, &without).unwrap();
        let names: Vec<_> = plan.iter().map(|(k, _)| k).collect();
        let names2: Vec<_> = plan2.iter().map(|(k, _)| k).collect();
        assert_eq!(names, names2);
        assert_eq!(
            plan2
                .iter()
                .find(|(k, _)| k == "text_model.final_layer_norm.weight")
                .unwrap()
                .1,
            Source::Rename(format!("{SD15_CLIP_PREFIX}final_layer_norm.weight"))
        );
    }

    #[test]
    fn clip_missing_layer_is_named() {
        let cfg = clip_config(3, "CLIPTextModel");
        let ckpt = clip_checkpoint(SDXL_CLIP_PREFIX, 2);
        match component_plan(CheckpointFamily::SdxlBase, "text_encoder", &cfg, &ckpt) {
            Err(SingleFileError::MissingKey { diffusers_key, .. }) => {
                assert!(
                    diffusers_key.starts_with("text_model.encoder.layers.2."),
                    "{diffusers_key}"
                )
            }
            other => panic!("expected a missing key, got {other:?}"),
        }
        // Extra layers beyond the config are dropped, as diffusers does.
        let cfg1 = clip_config(1, "CLIPTextModel");
        let plan =
            component_plan(CheckpointFamily::SdxlBase, "text_encoder", &cfg1, &ckpt).unwrap();
        assert!(plan
            .iter()
            .all(|(k, _)| clip_layer_index(k).is_none_or(|i| i < 1)));
    }

    /// open_clip text tower keys (hidden 4, so fused in_proj is [12, 4]), under `prefix`.
    fn open_clip_checkpoint(prefix: &str, layers: usize) -> Vec<(String, Vec<usize>)> {
        let mut names: Vec<(String, Vec<usize>)> = vec![
            ("token_embedding.weight".into(), vec![10, 4]),
            ("positional_embedding".into(), vec![7, 4]),
            ("ln_final.weight".into(), vec![4]),
            ("ln_final.bias".into(), vec![4]),
            ("text_projection".into(), vec![4, 6]),
            ("logit_scale".into(), vec![]),
        ];
        for i in 0..layers {
            let b = format!("transformer.resblocks.{i}");
            names.push((format!("{b}.attn.in_proj_weight"), vec![12, 4]));
            names.push((format!("{b}.attn.in_proj_bias"), vec![12]));
            for (m, shape) in [
                ("attn.out_proj", vec![4, 4]),
                ("ln_1", vec![4]),
                ("ln_2", vec![4]),
                ("mlp.c_fc", vec![16, 4]),
                ("mlp.c_proj", vec![4, 16]),
            ] {
                names.push((format!("{b}.{m}.weight"), shape));
                names.push((format!("{b}.{m}.bias"), vec![4]));
            }
        }
        names
            .into_iter()
            .map(|(k, s)| (format!("{prefix}{k}"), s))
            .collect()
    }

    #[test]
    fn open_clip_names_slices_and_transpose() {
        let cfg = clip_config(2, "CLIPTextModelWithProjection");
        let ckpt = open_clip_checkpoint(SDXL_OPEN_CLIP_PREFIX, 2);
        let plan =
            component_plan(CheckpointFamily::SdxlBase, "text_encoder_2", &cfg, &ckpt).unwrap();
        let get = |k: &str| {
            plan.iter()
                .find(|(d, _)| d == k)
                .map(|(_, s)| s.clone())
                .unwrap()
        };
        let p = SDXL_OPEN_CLIP_PREFIX;
        assert_eq!(
            get("text_model.encoder.layers.1.self_attn.k_proj.weight"),
            Source::Slice {
                key: format!("{p}transformer.resblocks.1.attn.in_proj_weight"),
                index: 1,
                parts: 3
            }
        );
        assert_eq!(
            get("text_model.encoder.layers.0.self_attn.v_proj.bias"),
            Source::Slice {
                key: format!("{p}transformer.resblocks.0.attn.in_proj_bias"),
                index: 2,
                parts: 3
            }
        );
        assert_eq!(
            get("text_projection.weight"),
            Source::Transpose(format!("{p}text_projection"))
        );
        assert_eq!(
            get("text_model.embeddings.position_embedding.weight"),
            Source::Rename(format!("{p}positional_embedding"))
        );
        assert_eq!(
            get("text_model.encoder.layers.0.mlp.fc2.bias"),
            Source::Rename(format!("{p}transformer.resblocks.0.mlp.c_proj.bias"))
        );
        assert_eq!(
            get("text_model.final_layer_norm.weight"),
            Source::Rename(format!("{p}ln_final.weight"))
        );
        let required: ClipConfig = serde_json::from_value(cfg).unwrap();
        let mut expected = required.required_keys("text_encoder_2");
        expected.sort();
        let planned: Vec<_> = plan.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(planned, expected);
    }

    #[test]
    fn open_clip_without_projection_drops_last_layers_and_projection() {
        // SD2's diffusers encoder is an unprojected CLIPTextModel one layer shorter than the checkpoint.
        let cfg = clip_config(1, "CLIPTextModel");
        let ckpt = open_clip_checkpoint(SD2_OPEN_CLIP_PREFIX, 2);
        let plan = component_plan(CheckpointFamily::Sd2, "text_encoder", &cfg, &ckpt).unwrap();
        assert!(plan.iter().all(|(k, _)| k != "text_projection.weight"));
        assert!(plan.iter().all(|(_, s)| !s.key().contains("resblocks.1.")));
        assert_eq!(plan.len(), 2 + 2 + 16);
    }

    #[test]
    fn bad_fused_shape_is_reported() {
        let cfg = clip_config(1, "CLIPTextModelWithProjection");
        let mut ckpt = open_clip_checkpoint(REFINER_OPEN_CLIP_PREFIX, 1);
        for (k, s) in &mut ckpt {
            if k.ends_with("in_proj_weight") {
                *s = vec![10, 4];
            }
        }
        assert!(matches!(
            component_plan(CheckpointFamily::SdxlRefiner, "text_encoder_2", &cfg, &ckpt),
            Err(SingleFileError::BadShape { .. })
        ));
    }

    #[test]
    fn refiner_uses_first_embedder_as_open_clip() {
        let cfg = clip_config(2, "CLIPTextModelWithProjection");
        let ckpt = open_clip_checkpoint(REFINER_OPEN_CLIP_PREFIX, 2);
        assert_eq!(detect_family(&ckpt).unwrap(), CheckpointFamily::SdxlRefiner);
        let plan =
            component_plan(CheckpointFamily::SdxlRefiner, "text_encoder_2", &cfg, &ckpt).unwrap();
        assert!(plan
            .iter()
            .all(|(_, s)| s.key().starts_with(REFINER_OPEN_CLIP_PREFIX)));
        assert!(matches!(
            component_plan(CheckpointFamily::SdxlRefiner, "text_encoder", &cfg, &ckpt),
            Err(SingleFileError::UnknownComponent { .. })
        ));
        assert!(matches!(
            component_plan(CheckpointFamily::Sd15, "text_encoder_2", &cfg, &ckpt),
            Err(SingleFileError::UnknownComponent { .. })
        ));
        assert!(matches!(
            component_plan(CheckpointFamily::Sd15, "tokenizer", &cfg, &ckpt),
            Err(SingleFileError::UnknownComponent { .. })
        ));
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

    #[test]
    fn invalid_unet_configs_are_errors_not_panics() {
        let cases = [
            json!({"block_out_channels": []}),
            json!({"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "UpBlock2D"]}),
            json!({"block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                   "up_block_types": ["UpBlock2D"], "layers_per_block": [1, 2]}),
            json!({"block_out_channels": [32], "down_block_types": ["CrossAttnDownBlock2D"],
                   "up_block_types": ["UpBlock2D"], "transformer_layers_per_block": [[1]]}),
            json!({"block_out_channels": [32], "down_block_types": ["AttnDownBlock2D"],
                   "up_block_types": ["UpBlock2D"]}),
            json!({"block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                   "up_block_types": ["UpBlock2D"], "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}),
            json!({"block_out_channels": "wide"}),
        ];
        for cfg in cases {
            assert!(
                component_plan(CheckpointFamily::Sd15, "unet", &cfg, &[]).is_err(),
                "{cfg}"
            );
        }
    }

    #[test]
    fn unrelated_and_ema_keys_are_ignored() {
        let cfg = clip_config(1, "CLIPTextModel");
        let mut ckpt = clip_checkpoint(SD15_CLIP_PREFIX, 1);
        ckpt.push(("model_ema.decay".into(), vec![]));
        ckpt.push((
            "model_ema.diffusion_modelinput_blocks00weight".into(),
            vec![4],
        ));
        ckpt.push(("alphas_cumprod".into(), vec![1000]));
        let plan = component_plan(CheckpointFamily::Sd15, "text_encoder", &cfg, &ckpt).unwrap();
        assert_eq!(plan.len(), ckpt.len() - 3);
    }
}
