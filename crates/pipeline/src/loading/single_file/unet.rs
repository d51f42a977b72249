//! UNet: `model.diffusion_model.*` (openaimodel.py `UNetModel`) -> diffusers `UNet2DConditionModel`.

use serde::Deserialize;

use super::{
    invalid_config, join, parse_config, parse_index, projection_source, with_bias, PlanBuilder,
    Result, SingleFileError, Source, UNET_PREFIX,
};

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

pub(super) fn unet_plan(
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::loading::single_file::{component_plan, CheckpointFamily};

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
}
