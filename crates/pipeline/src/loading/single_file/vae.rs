//! VAE: `first_stage_model.*` (ldm `AutoencoderKL`, model.py `Encoder`/`Decoder`) -> diffusers `AutoencoderKL`.
//!
//! The layout comes from [`AutoencoderKLConfig`], the config `sdrs_vae` builds the model from; a config it
//! refuses is refused here with its error.

use sdrs_vae::AutoencoderKLConfig;

use super::{
    join, parse_config, parse_index, projection_source, with_bias, PlanBuilder, Result,
    SingleFileError, Source, VAE_PREFIX,
};

const COMPONENT_VAE: &str = "vae";

/// Every tensor diffusers' `AutoencoderKL` holds for this config.
fn required_keys(cfg: &AutoencoderKLConfig) -> Vec<String> {
    let n = cfg.block_out_channels.len();
    let channels = |i: usize| cfg.block_out_channels.get(i).copied().unwrap_or_default();
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
        if cfg.mid_block_add_attention {
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
        for j in 0..cfg.layers_per_block {
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
        for j in 0..=cfg.layers_per_block {
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

    if cfg.use_quant_conv {
        keys.extend(with_bias("quant_conv"));
    }
    if cfg.use_post_quant_conv {
        keys.extend(with_bias("post_quant_conv"));
    }
    keys
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

fn vae_key(cfg: &AutoencoderKLConfig, key: &str, rest: &str) -> Result<VaeTarget> {
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

pub(super) fn vae_plan(
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let cfg: AutoencoderKLConfig = parse_config(COMPONENT_VAE, config)?;
    cfg.check_supported()
        .map_err(|source| SingleFileError::VaeConfig {
            source: Box::new(source),
        })?;
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
    plan.finish(&required_keys(&cfg), VAE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::loading::single_file::{component_plan, CheckpointFamily};

    fn vae_config() -> AutoencoderKLConfig {
        serde_json::from_value(json!({
            "block_out_channels": [32, 32, 64, 64],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 2,
        }))
        .unwrap()
    }

    fn vae_name(cfg: &AutoencoderKLConfig, rest: &str) -> Result<VaeTarget> {
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
    fn vae_configs_the_vae_refuses_are_refused() {
        for refused in [
            json!({"block_out_channels": []}),
            json!({"block_out_channels": [4, 8], "layers_per_block": 1}),
            json!({"down_block_types": ["DownEncoderBlock2DWithAttn"]}),
            json!({"act_fn": "tanh"}),
        ] {
            let vae: AutoencoderKLConfig = serde_json::from_value(refused.clone()).unwrap();
            let expected = vae.check_supported().unwrap_err().to_string();
            match component_plan(CheckpointFamily::Sd15, "vae", &refused, &[]) {
                Err(SingleFileError::VaeConfig { source }) => {
                    assert_eq!(source.to_string(), expected, "{refused}")
                }
                other => panic!("{refused}: expected the VAE's error, got {other:?}"),
            }
        }
        assert!(matches!(
            component_plan(
                CheckpointFamily::Sd15,
                "vae",
                &json!({"layers_per_block": -1}),
                &[]
            ),
            Err(SingleFileError::Config { .. })
        ));
    }

    #[test]
    fn vae_attention_weights_are_reshaped_to_linear() {
        let mut ckpt = Vec::new();
        let cfg = json!({"block_out_channels": [4], "layers_per_block": 1});
        let vae: AutoencoderKLConfig = serde_json::from_value(cfg.clone()).unwrap();
        for k in required_keys(&vae) {
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
}
