//! UNet: `model.diffusion_model.*` (openaimodel.py `UNetModel`) -> diffusers `UNet2DConditionModel`.
//!
//! Every count (blocks, resnets, transformer depths, which blocks have attention) comes from
//! [`UNet2DConditionConfig`] and its methods, the same ones `sdrs_unet` builds the model from, so a
//! plan exists exactly for the configs the UNet accepts and holds the tensors it reads.
//!
//! This file turns the config into a [`UnetLayout`] and lists the tensors the UNet holds; `keys.rs`
//! translates each checkpoint key at the position the layout gives it.

use sdrs_unet::UNet2DConditionConfig;

use super::{
    parse_config, projection_source, with_bias, PlanBuilder, Result, SingleFileError, Source,
    UNET_PREFIX,
};

mod keys;

use keys::unet_key;

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
    /// SDXL `addition_embed_type: "text_time"`: `label_emb.0.{0,2}` -> `add_embedding.linear_{1,2}`.
    add_embedding: bool,
}

const COMPONENT_UNET: &str = "unet";

impl UnetLayout {
    /// The layout of the UNet `sdrs_unet` builds from `cfg`; a config it refuses is refused here
    /// with the UNet's own error.
    fn from_config(cfg: &UNet2DConditionConfig) -> Result<Self> {
        let unet_error = |source| SingleFileError::UnetConfig {
            source: Box::new(source),
        };
        cfg.check_supported().map_err(unet_error)?;
        let n = cfg.num_blocks();

        let down_layers = cfg
            .layers_per_block
            .expand("layers_per_block", n)
            .map_err(unet_error)?;
        let down_depths = cfg.down_transformer_layers().map_err(unet_error)?;
        let down: Vec<UnetLevel> = down_layers
            .into_iter()
            .zip(down_depths)
            .zip(cfg.down_blocks_have_cross_attention())
            .map(|((down_layers, depths), attention)| UnetLevel {
                down_layers,
                down_attention: attention.then_some(depths),
            })
            .collect();

        let up_layers = cfg.up_layers_per_block().map_err(unet_error)?;
        let up_depths = cfg.up_transformer_layers().map_err(unet_error)?;
        let up: Vec<(usize, Option<Vec<usize>>)> = up_layers
            .into_iter()
            .zip(up_depths)
            .zip(cfg.up_blocks_have_cross_attention())
            .map(|((layers, depths), attention)| (layers, attention.then_some(depths)))
            .collect();

        // `check_supported` leaves `UNetMidBlock2DCrossAttn` as the only mid block there can be.
        let mid_attention = match cfg.mid_block_type {
            Some(_) => Some(cfg.mid_transformer_layers().map_err(unet_error)?),
            None => None,
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

        Ok(Self {
            block_out_channels: cfg.block_out_channels.clone(),
            down,
            up,
            mid_attention,
            inputs,
            outputs,
            linear_projection: cfg.use_linear_projection,
            // `check_supported` accepts no other addition embedding and no class embedding.
            add_embedding: cfg.addition_embed_type.as_deref() == Some("text_time"),
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
        if self.add_embedding {
            keys.extend(with_bias("add_embedding.linear_1"));
            keys.extend(with_bias("add_embedding.linear_2"));
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

pub(super) fn unet_plan(
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let cfg: UNet2DConditionConfig = parse_config(COMPONENT_UNET, config)?;
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

    pub(super) fn sd15_like_unet_config() -> serde_json::Value {
        json!({
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2,
            "transformer_layers_per_block": 1,
            "use_linear_projection": false,
        })
    }

    pub(super) fn unet_layout(cfg: serde_json::Value) -> UnetLayout {
        let cfg: UNet2DConditionConfig = serde_json::from_value(cfg).unwrap();
        UnetLayout::from_config(&cfg).unwrap()
    }

    pub(super) fn unet_name(layout: &UnetLayout, rest: &str) -> Result<String> {
        unet_key(layout, &format!("{UNET_PREFIX}{rest}"), rest).map(|t| t.key)
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

    /// The former private copy of the UNet config took a mid-block depth of 1 where
    /// `transformer_layers_per_block` has no entry for the deepest block; the UNet refuses such a
    /// config (`UNet2DConditionConfig::mid_transformer_layers`), and so must the plan.
    #[test]
    fn single_file_mid_block_depth_follows_the_unet_config() {
        let one_block = |depths: serde_json::Value| {
            json!({
                "block_out_channels": [32],
                "down_block_types": ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"],
                "transformer_layers_per_block": depths,
            })
        };
        let lacking = one_block(json!([]));
        let unet: UNet2DConditionConfig = serde_json::from_value(lacking.clone()).unwrap();
        assert!(unet.mid_transformer_layers().is_err());
        let err = UnetLayout::from_config(&unet).unwrap_err();
        assert!(matches!(&err, SingleFileError::UnetConfig { .. }), "{err}");
        assert!(component_plan(CheckpointFamily::Sd15, "unet", &lacking, &[]).is_err());

        // Given, the depth is the config's, in every form the key takes.
        let mut nested = sd15_like_unet_config();
        nested["transformer_layers_per_block"] = json!([[1, 1], [2, 2], [4, 4]]);
        nested["reverse_transformer_layers_per_block"] = json!([[4, 4, 4], [2, 2, 2], [1, 1, 1]]);
        let mut no_mid = sd15_like_unet_config();
        no_mid["mid_block_type"] = serde_json::Value::Null;
        for (cfg, expected) in [
            (one_block(json!([3])), Some(3)),
            (one_block(json!(2)), Some(2)),
            (nested, Some(4)),
            (sd15_like_unet_config(), Some(1)),
            (no_mid, None),
        ] {
            let unet: UNet2DConditionConfig = serde_json::from_value(cfg.clone()).unwrap();
            let canonical = unet
                .mid_block_type
                .as_ref()
                .map(|_| unet.mid_transformer_layers().unwrap());
            assert_eq!(canonical, expected, "{cfg}");
            assert_eq!(unet_layout(cfg.clone()).mid_attention, expected, "{cfg}");
        }
        // The plan reads the mid transformer blocks the depth asks for, and no more.
        let l = unet_layout(one_block(json!([3])));
        assert!(unet_name(&l, "middle_block.1.transformer_blocks.2.norm1.weight").is_ok());
        assert!(matches!(
            unet_name(&l, "middle_block.1.transformer_blocks.3.norm1.weight"),
            Err(SingleFileError::ConfigMismatch { .. })
        ));
    }

    #[test]
    fn unet_block_types_are_read_as_the_unet_reads_them() {
        // diffusers (and sdrs_unet) accept the `UNetRes` prefix on block names.
        let mut cfg = sd15_like_unet_config();
        cfg["down_block_types"] = json!([
            "UNetResCrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D"
        ]);
        cfg["up_block_types"] = json!([
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "UNetResCrossAttnUpBlock2D"
        ]);
        let l = unet_layout(cfg);
        assert_eq!(
            unet_name(&l, "input_blocks.1.1.proj_in.weight").unwrap(),
            "down_blocks.0.attentions.0.proj_in.weight"
        );
        assert_eq!(
            unet_name(&l, "output_blocks.8.1.proj_out.bias").unwrap(),
            "up_blocks.2.attentions.2.proj_out.bias"
        );
    }

    #[test]
    fn unet_configs_the_unet_refuses_are_refused() {
        // Class embeddings are not built by sdrs_unet, so a plan for them would load nothing.
        for extra in [
            json!({"class_embed_type": "timestep"}),
            json!({"num_class_embeds": 10}),
            json!({"addition_embed_type": "text_time"}),
            json!({"act_fn": "tanh"}),
        ] {
            let mut cfg = sd15_like_unet_config();
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            let unet: UNet2DConditionConfig = serde_json::from_value(cfg.clone()).unwrap();
            let expected = unet.check_supported().unwrap_err().to_string();
            match component_plan(CheckpointFamily::Sd15, "unet", &cfg, &[]) {
                Err(SingleFileError::UnetConfig { source }) => {
                    assert_eq!(source.to_string(), expected, "{cfg}")
                }
                other => panic!("{cfg}: expected the UNet's error, got {other:?}"),
            }
        }
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
