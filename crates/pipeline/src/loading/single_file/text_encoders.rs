//! Text encoders: transformers-layout CLIP (SD1.x, SDXL's first encoder) and OpenCLIP (SD2, SDXL's second
//! encoder) -> transformers `CLIPTextModel` / `CLIPTextModelWithProjection`.
//!
//! The layer count comes from [`ClipTextConfig`], the config `sdrs_clip` builds the model from; a config it
//! refuses is refused here with its error.

use sdrs_clip::ClipTextConfig;
use serde::Deserialize;

use super::{
    join, parse_config, parse_index, with_bias, PlanBuilder, Result, SingleFileError, Source,
};

#[derive(Debug, Clone, Copy)]
pub(super) enum TextEncoder {
    /// A transformers `CLIPTextModel` under this prefix, with or without its `text_model.` segment.
    Clip(&'static str),
    /// An open_clip `CLIP` text tower under this prefix.
    OpenClip(&'static str),
}

/// Whether the diffusers model has a `text_projection` (`CLIPTextModelWithProjection`).
///
/// transformers records the model class in the config's `architectures`, a key of every
/// `PretrainedConfig` rather than of `CLIPTextConfig` (so [`ClipTextConfig`] does not read it, and the
/// CLIP model itself goes by whether `text_projection.weight` is there). A config without it follows
/// the SDXL convention that only `text_encoder_2` is projected.
fn has_projection(component: &str, config: &serde_json::Value) -> Result<bool> {
    let architectures = match config.get("architectures") {
        Some(value) => {
            Option::<Vec<String>>::deserialize(value).map_err(|source| SingleFileError::Config {
                component: component.to_string(),
                source,
            })?
        }
        None => None,
    };
    Ok(match architectures {
        Some(archs) => archs.iter().any(|a| a == "CLIPTextModelWithProjection"),
        None => component == "text_encoder_2",
    })
}

/// Every tensor transformers' `CLIPTextModel` (with `text_projection` when `projection`) holds for
/// this config.
fn required_keys(cfg: &ClipTextConfig, projection: bool) -> Vec<String> {
    let mut keys = vec![
        "text_model.embeddings.token_embedding.weight".to_string(),
        "text_model.embeddings.position_embedding.weight".to_string(),
    ];
    for i in 0..cfg.num_hidden_layers {
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
    if projection {
        keys.push("text_projection.weight".to_string());
    }
    keys
}

/// Encoder layer index of a transformers-layout key (`text_model.encoder.layers.{i}.…`).
fn clip_layer_index(key: &str) -> Option<usize> {
    let rest = key.strip_prefix("text_model.encoder.layers.")?;
    parse_index(rest.split('.').next()?)
}

/// One checkpoint tensor's contribution to a text-encoder plan: diffusers keys with their sources.
type TextTargets = Vec<(String, Source)>;

fn clip_key(
    cfg: &ClipTextConfig,
    projection: bool,
    component: &str,
    key: &str,
    rest: &str,
) -> Result<TextTargets> {
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
        || (renamed.starts_with("text_projection.") && !projection)
        || clip_layer_index(&renamed).is_some_and(|i| i >= cfg.num_hidden_layers);
    if ignored {
        return Ok(Vec::new());
    }
    Ok(vec![(renamed, Source::Rename(key.to_string()))])
}

fn open_clip_key(
    cfg: &ClipTextConfig,
    projection: bool,
    component: &str,
    key: &str,
    rest: &str,
) -> Result<TextTargets> {
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
        ["text_projection"] if projection => Ok(vec![(
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

pub(super) fn text_encoder_plan(
    component: &str,
    encoder: TextEncoder,
    config: &serde_json::Value,
    checkpoint_keys: &[(String, Vec<usize>)],
) -> Result<Vec<(String, Source)>> {
    let cfg: ClipTextConfig = parse_config(component, config)?;
    cfg.validate()
        .map_err(|source| SingleFileError::TextEncoderConfig {
            component: component.to_string(),
            source: Box::new(source),
        })?;
    let projection = has_projection(component, config)?;
    let prefix = match encoder {
        TextEncoder::Clip(p) | TextEncoder::OpenClip(p) => p,
    };
    let mut plan = PlanBuilder::new(component, checkpoint_keys);
    for (key, _) in checkpoint_keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let targets = match encoder {
            TextEncoder::Clip(_) => clip_key(&cfg, projection, component, key, rest)?,
            TextEncoder::OpenClip(_) => open_clip_key(&cfg, projection, component, key, rest)?,
        };
        for (target, source) in targets {
            plan.insert(target, source)?;
        }
    }
    plan.finish(&required_keys(&cfg, projection), prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::loading::single_file::{
        component_plan, detect_family, CheckpointFamily, REFINER_OPEN_CLIP_PREFIX,
        SD15_CLIP_PREFIX, SD2_OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX,
    };

    fn clip_config(layers: usize, arch: &str) -> serde_json::Value {
        json!({"num_hidden_layers": layers, "architectures": [arch]})
    }

    /// transformers-layout keys of a CLIP text model, under `prefix`.
    fn clip_checkpoint(prefix: &str, layers: usize) -> Vec<(String, Vec<usize>)> {
        let cfg: ClipTextConfig =
            serde_json::from_value(clip_config(layers, "CLIPTextModel")).unwrap();
        required_keys(&cfg, false)
            .into_iter()
            .map(|k| (format!("{prefix}{k}"), vec![2]))
            .collect()
    }

    #[test]
    fn projection_follows_architectures_else_the_component() {
        let with = clip_config(1, "CLIPTextModelWithProjection");
        let without = clip_config(1, "CLIPTextModel");
        let unnamed = json!({"num_hidden_layers": 1});
        for component in ["text_encoder", "text_encoder_2"] {
            assert!(has_projection(component, &with).unwrap());
            assert!(!has_projection(component, &without).unwrap());
        }
        assert!(!has_projection("text_encoder", &unnamed).unwrap());
        assert!(has_projection("text_encoder_2", &unnamed).unwrap());
        assert!(matches!(
            has_projection("text_encoder", &json!({"architectures": "CLIPTextModel"})),
            Err(SingleFileError::Config { .. })
        ));
    }

    #[test]
    fn text_encoder_configs_clip_refuses_are_refused() {
        let ckpt = clip_checkpoint(SD15_CLIP_PREFIX, 1);
        for refused in [
            json!({"num_hidden_layers": 1, "hidden_act": "mish"}),
            json!({"num_hidden_layers": 1, "hidden_size": 30, "num_attention_heads": 4}),
        ] {
            let clip: ClipTextConfig = serde_json::from_value(refused.clone()).unwrap();
            let expected = clip.validate().unwrap_err().to_string();
            match component_plan(CheckpointFamily::Sd15, "text_encoder", &refused, &ckpt) {
                Err(SingleFileError::TextEncoderConfig { component, source }) => {
                    assert_eq!(component, "text_encoder");
                    assert_eq!(source.to_string(), expected, "{refused}");
                }
                other => panic!("{refused}: expected the CLIP error, got {other:?}"),
            }
        }
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
        let required: ClipTextConfig = serde_json::from_value(cfg).unwrap();
        let mut expected = required_keys(&required, true);
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
