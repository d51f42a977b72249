//! One LDM UNet key (openaimodel.py `UNetModel`'s `input_blocks`, `middle_block`, `output_blocks`, ...)
//! translated into the diffusers key at the position the [`UnetLayout`] gives it.

use super::{InputSlot, OutputSlot, UnetLayout, COMPONENT_UNET};
use crate::loading::single_file::{join, parse_index, Result, SingleFileError};

/// A translated UNet key: the diffusers key, and whether it is a transformer `proj_in`/`proj_out` weight whose
/// layout (linear or 1x1 conv) follows `use_linear_projection`.
pub(super) struct UnetTarget {
    pub(super) key: String,
    pub(super) projection: bool,
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

pub(super) fn unet_key(layout: &UnetLayout, key: &str, rest: &str) -> Result<UnetTarget> {
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
            if !layout.add_embedding {
                return Err(mismatch(
                    "the config has no `addition_embed_type: text_time`".to_string(),
                ));
            }
            let linear = if *i == "0" { "linear_1" } else { "linear_2" };
            plain(join(&format!("add_embedding.{linear}"), p))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::loading::single_file::unet::tests::{sd15_like_unet_config, unet_layout, unet_name};

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
    fn unet_label_embedding_follows_config() {
        let mut cfg = sd15_like_unet_config();
        cfg["addition_embed_type"] = json!("text_time");
        // The sizes the UNet needs for `text_time` (checked by `check_supported`).
        cfg["addition_time_embed_dim"] = json!(8);
        cfg["projection_class_embeddings_input_dim"] = json!(56);
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
}
