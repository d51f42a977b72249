//! Checks the single-file key plans against the fixtures: the original-layout files must yield exactly the
//! diffusers folders' tensors, byte for byte, after the planned slices, transposes and reshapes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sdrs_pipeline::single_file::{component_plan, detect_family, CheckpointFamily, Source};

/// The project's fixtures folder.
fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// One tensor of a safetensors file, kept as raw little-endian bytes.
#[derive(Debug, Clone)]
struct RawTensor {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawTensor {
    fn element_size(&self) -> usize {
        match self.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" => 1,
            other => panic!("unexpected dtype {other}"),
        }
    }
}

/// A minimal safetensors reader: 8-byte little-endian header length, JSON header, raw data.
fn read_safetensors(path: &Path) -> BTreeMap<String, RawTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut tensors = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap().to_string();
        let shape = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let offsets = info["data_offsets"].as_array().unwrap();
        let (start, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        tensors.insert(
            name,
            RawTensor {
                dtype,
                shape,
                data: data[start..end].to_vec(),
            },
        );
    }
    tensors
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn keys_and_shapes(tensors: &BTreeMap<String, RawTensor>) -> Vec<(String, Vec<usize>)> {
    tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect()
}

/// Carries out one planned source on raw bytes.
fn materialize(source: &Source, ckpt: &BTreeMap<String, RawTensor>) -> RawTensor {
    let src = ckpt
        .get(source.key())
        .unwrap_or_else(|| panic!("planned source `{}` is not in the checkpoint", source.key()));
    let shape = source.target_shape(&src.shape).unwrap();
    let es = src.element_size();
    let data = match source {
        Source::Rename(_) | Source::Reshape { .. } => src.data.clone(),
        Source::Slice { index, parts, .. } => {
            let part = src.data.len() / parts;
            src.data[index * part..(index + 1) * part].to_vec()
        }
        Source::Transpose(_) => {
            let (rows, cols) = (src.shape[0], src.shape[1]);
            let mut out = vec![0u8; src.data.len()];
            for r in 0..rows {
                for c in 0..cols {
                    let from = (r * cols + c) * es;
                    let to = (c * rows + r) * es;
                    out[to..to + es].copy_from_slice(&src.data[from..from + es]);
                }
            }
            out
        }
    };
    RawTensor {
        dtype: src.dtype.clone(),
        shape,
        data,
    }
}

/// The plan for `component` must name exactly the diffusers file's tensors and reproduce each one exactly.
fn check_component(
    family: CheckpointFamily,
    component: &str,
    config: &serde_json::Value,
    ckpt: &BTreeMap<String, RawTensor>,
    expected: &BTreeMap<String, RawTensor>,
) {
    let plan = component_plan(family, component, config, &keys_and_shapes(ckpt))
        .unwrap_or_else(|e| panic!("{component}: {e}"));
    let planned: BTreeSet<&str> = plan.iter().map(|(k, _)| k.as_str()).collect();
    let wanted: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    let extra: Vec<_> = planned.difference(&wanted).collect();
    let missing: Vec<_> = wanted.difference(&planned).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{component}: planned but not in diffusers: {extra:?}; in diffusers but not planned: {missing:?}"
    );
    assert_eq!(
        plan.len(),
        expected.len(),
        "{component}: duplicate plan entries"
    );

    let mut differing = Vec::new();
    for (key, source) in &plan {
        let got = materialize(source, ckpt);
        let want = &expected[key];
        assert_eq!(
            got.dtype, want.dtype,
            "{component}: dtype of {key} from {source:?}"
        );
        assert_eq!(
            got.shape, want.shape,
            "{component}: shape of {key} from {source:?}"
        );
        if got.data != want.data {
            differing.push(format!("{key} <- {source:?}"));
        }
    }
    // Exact byte equality: the tolerance is zero, the files hold the same f16 values.
    assert!(
        differing.is_empty(),
        "{component}: {} of {} tensors differ (tolerance 0): {differing:?}",
        differing.len(),
        plan.len()
    );
}

#[test]
fn sd15_single_file_matches_diffusers_folder() {
    let root = fixtures();
    let ckpt = read_safetensors(&root.join("tiny-sd15-single-file.safetensors"));
    let family = detect_family(&keys_and_shapes(&ckpt)).unwrap();
    assert_eq!(family, CheckpointFamily::Sd15);
    let folder = root.join("tiny-sd15");
    for (component, weights) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let config = read_json(&folder.join(component).join("config.json"));
        let expected = read_safetensors(&folder.join(component).join(weights));
        check_component(family, component, &config, &ckpt, &expected);
    }
}

#[test]
fn sdxl_single_file_matches_diffusers_folder() {
    let root = fixtures();
    let ckpt = read_safetensors(&root.join("tiny-sdxl-single-file.safetensors"));
    let family = detect_family(&keys_and_shapes(&ckpt)).unwrap();
    assert_eq!(family, CheckpointFamily::SdxlBase);
    let folder = root.join("tiny-sdxl");
    for (component, weights) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("text_encoder_2", "model.safetensors"),
    ] {
        let config = read_json(&folder.join(component).join("config.json"));
        let expected = read_safetensors(&folder.join(component).join(weights));
        check_component(family, component, &config, &ckpt, &expected);
    }
}

#[test]
fn sd15_unet_only_file_is_recognized_from_shapes() {
    let ckpt = read_safetensors(&fixtures().join("tiny-sd15-single-file.safetensors"));
    let unet_only: Vec<_> = keys_and_shapes(&ckpt)
        .into_iter()
        .filter(|(k, _)| k.starts_with("model.diffusion_model."))
        .collect();
    assert_eq!(detect_family(&unet_only).unwrap(), CheckpointFamily::Sd15);
}

// ---------------------------------------------------------------------------------------------------------------
// No refiner single file exists among the fixtures: build one from the `tiny-sdxl-refiner` folder with an
// independent diffusers -> LDM translation (closed-form indices rather than the library's tables), then check
// that the plan recovers the folder exactly.

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";

fn ldm_resnet(name: &str) -> String {
    name.replace("norm1", "in_layers.0")
        .replace("conv1", "in_layers.2")
        .replace("time_emb_proj", "emb_layers.1")
        .replace("norm2", "out_layers.0")
        .replace("conv2", "out_layers.3")
        .replace("conv_shortcut", "skip_connection")
}

/// diffusers UNet key -> LDM key, for a config with an integer `layers_per_block`.
fn ldm_unet_key(key: &str, cfg: &serde_json::Value) -> String {
    let l = cfg["layers_per_block"].as_u64().unwrap() as usize;
    let up_types = cfg["up_block_types"].as_array().unwrap();
    let parts: Vec<&str> = key.split('.').collect();
    let tail = |from: usize| parts[from..].join(".");
    let ldm = match parts[0] {
        "conv_in" => format!("input_blocks.0.0.{}", tail(1)),
        "conv_norm_out" => format!("out.0.{}", tail(1)),
        "conv_out" => format!("out.2.{}", tail(1)),
        "time_embedding" => format!(
            "time_embed.{}.{}",
            if parts[1] == "linear_1" { 0 } else { 2 },
            tail(2)
        ),
        "add_embedding" => format!(
            "label_emb.0.{}.{}",
            if parts[1] == "linear_1" { 0 } else { 2 },
            tail(2)
        ),
        "down_blocks" => {
            let b: usize = parts[1].parse().unwrap();
            match parts[2] {
                "resnets" => {
                    let j: usize = parts[3].parse().unwrap();
                    format!(
                        "input_blocks.{}.0.{}",
                        1 + b * (l + 1) + j,
                        ldm_resnet(&tail(4))
                    )
                }
                "attentions" => {
                    let j: usize = parts[3].parse().unwrap();
                    format!("input_blocks.{}.1.{}", 1 + b * (l + 1) + j, tail(4))
                }
                "downsamplers" => format!("input_blocks.{}.0.op.{}", (b + 1) * (l + 1), tail(5)),
                other => panic!("{other}"),
            }
        }
        "mid_block" => match (parts[1], parts[2]) {
            ("resnets", "0") => format!("middle_block.0.{}", ldm_resnet(&tail(3))),
            ("attentions", "0") => format!("middle_block.1.{}", tail(3)),
            ("resnets", "1") => format!("middle_block.2.{}", ldm_resnet(&tail(3))),
            other => panic!("{other:?}"),
        },
        "up_blocks" => {
            let b: usize = parts[1].parse().unwrap();
            let has_attention = up_types[b].as_str().unwrap().contains("CrossAttn");
            match parts[2] {
                "resnets" => {
                    let j: usize = parts[3].parse().unwrap();
                    format!(
                        "output_blocks.{}.0.{}",
                        b * (l + 1) + j,
                        ldm_resnet(&tail(4))
                    )
                }
                "attentions" => {
                    let j: usize = parts[3].parse().unwrap();
                    format!("output_blocks.{}.1.{}", b * (l + 1) + j, tail(4))
                }
                "upsamplers" => format!(
                    "output_blocks.{}.{}.conv.{}",
                    b * (l + 1) + l,
                    if has_attention { 2 } else { 1 },
                    tail(5)
                ),
                other => panic!("{other}"),
            }
        }
        other => panic!("unexpected UNet key {other}"),
    };
    format!("{UNET}{ldm}")
}

/// diffusers VAE key -> LDM key, and whether the LDM tensor is a 1x1 convolution.
fn ldm_vae_key(key: &str, n_blocks: usize) -> (String, bool) {
    let parts: Vec<&str> = key.split('.').collect();
    let tail = |from: usize| parts[from..].join(".");
    let vae_resnet = |s: String| s.replace("conv_shortcut", "nin_shortcut");
    let (ldm, conv) = match parts[0] {
        "quant_conv" | "post_quant_conv" => (key.to_string(), false),
        side => {
            let inner = match parts[1] {
                "conv_in" | "conv_out" => (tail(1), false),
                "conv_norm_out" => (format!("norm_out.{}", tail(2)), false),
                "down_blocks" => match parts[3] {
                    "resnets" => (
                        format!(
                            "down.{}.block.{}.{}",
                            parts[2],
                            parts[4],
                            vae_resnet(tail(5))
                        ),
                        false,
                    ),
                    _ => (
                        format!("down.{}.downsample.conv.{}", parts[2], tail(6)),
                        false,
                    ),
                },
                "up_blocks" => {
                    let i = n_blocks - 1 - parts[2].parse::<usize>().unwrap();
                    match parts[3] {
                        "resnets" => (
                            format!("up.{i}.block.{}.{}", parts[4], vae_resnet(tail(5))),
                            false,
                        ),
                        _ => (format!("up.{i}.upsample.conv.{}", tail(6)), false),
                    }
                }
                "mid_block" => match parts[2] {
                    "resnets" => (
                        format!(
                            "mid.block_{}.{}",
                            parts[3].parse::<usize>().unwrap() + 1,
                            vae_resnet(tail(4))
                        ),
                        false,
                    ),
                    _ => {
                        let rest = tail(4)
                            .replace("group_norm", "norm")
                            .replace("to_q", "q")
                            .replace("to_k", "k")
                            .replace("to_v", "v")
                            .replace("to_out.0", "proj_out");
                        let conv = rest.ends_with(".weight") && !rest.starts_with("norm");
                        (format!("mid.attn_1.{rest}"), conv)
                    }
                },
                other => panic!("unexpected VAE key part {other}"),
            };
            (format!("{side}.{}", inner.0), inner.1)
        }
    };
    (format!("{VAE}{ldm}"), conv)
}

/// Builds the OpenCLIP text tower from a transformers `CLIPTextModelWithProjection` state dict.
fn open_clip_tensors(
    te: &BTreeMap<String, RawTensor>,
    prefix: &str,
) -> BTreeMap<String, RawTensor> {
    let mut out = BTreeMap::new();
    for (key, t) in te {
        let ldm = if let Some(rest) = key.strip_prefix("text_model.encoder.layers.") {
            let (i, inner) = rest.split_once('.').unwrap();
            if inner.contains("q_proj") || inner.contains("k_proj") || inner.contains("v_proj") {
                if inner.contains("q_proj") {
                    let param = inner.rsplit('.').next().unwrap();
                    let get = |p: &str| {
                        &te[&format!("text_model.encoder.layers.{i}.self_attn.{p}.{param}")]
                    };
                    let (q, k, v) = (get("q_proj"), get("k_proj"), get("v_proj"));
                    let mut shape = q.shape.clone();
                    shape[0] *= 3;
                    let data = [q.data.as_slice(), &k.data, &v.data].concat();
                    out.insert(
                        format!("{prefix}transformer.resblocks.{i}.attn.in_proj_{param}"),
                        RawTensor {
                            dtype: q.dtype.clone(),
                            shape,
                            data,
                        },
                    );
                }
                continue;
            }
            let inner = inner
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("self_attn.out_proj", "attn.out_proj")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj");
            format!("transformer.resblocks.{i}.{inner}")
        } else {
            match key.as_str() {
                "text_model.embeddings.token_embedding.weight" => {
                    "token_embedding.weight".to_string()
                }
                "text_model.embeddings.position_embedding.weight" => {
                    "positional_embedding".to_string()
                }
                "text_model.final_layer_norm.weight" => "ln_final.weight".to_string(),
                "text_model.final_layer_norm.bias" => "ln_final.bias".to_string(),
                "text_projection.weight" => {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let es = t.element_size();
                    let mut data = vec![0u8; t.data.len()];
                    for r in 0..rows {
                        for c in 0..cols {
                            let from = (r * cols + c) * es;
                            let to = (c * rows + r) * es;
                            data[to..to + es].copy_from_slice(&t.data[from..from + es]);
                        }
                    }
                    out.insert(
                        format!("{prefix}text_projection"),
                        RawTensor {
                            dtype: t.dtype.clone(),
                            shape: vec![cols, rows],
                            data,
                        },
                    );
                    continue;
                }
                other => panic!("unexpected text encoder key {other}"),
            }
        };
        out.insert(format!("{prefix}{ldm}"), t.clone());
    }
    out
}

#[test]
fn synthetic_refiner_single_file_matches_diffusers_folder() {
    let folder = fixtures().join("tiny-sdxl-refiner");
    let unet_cfg = read_json(&folder.join("unet/config.json"));
    let vae_cfg = read_json(&folder.join("vae/config.json"));
    let te2_cfg = read_json(&folder.join("text_encoder_2/config.json"));
    let unet = read_safetensors(&folder.join("unet/diffusion_pytorch_model.safetensors"));
    let vae = read_safetensors(&folder.join("vae/diffusion_pytorch_model.safetensors"));
    let te2 = read_safetensors(&folder.join("text_encoder_2/model.safetensors"));

    let mut ckpt = BTreeMap::new();
    for (key, t) in &unet {
        ckpt.insert(ldm_unet_key(key, &unet_cfg), t.clone());
    }
    let n_blocks = vae_cfg["block_out_channels"].as_array().unwrap().len();
    for (key, t) in &vae {
        let (ldm, conv) = ldm_vae_key(key, n_blocks);
        let mut t = t.clone();
        if conv {
            t.shape.extend([1, 1]);
        }
        ckpt.insert(ldm, t);
    }
    ckpt.extend(open_clip_tensors(&te2, REFINER_OPEN_CLIP));
    // Each layer's six q/k/v tensors became two fused ones.
    let layers = te2_cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    assert_eq!(ckpt.len(), unet.len() + vae.len() + te2.len() - 4 * layers);
    // Things a real refiner file also carries, which the plan must ignore.
    let scalar = RawTensor {
        dtype: "F32".into(),
        shape: vec![],
        data: vec![0; 4],
    };
    ckpt.insert(format!("{REFINER_OPEN_CLIP}logit_scale"), scalar.clone());
    ckpt.insert("model_ema.num_updates".into(), scalar.clone());
    ckpt.insert(
        format!(
            "model_ema.{}",
            &ldm_unet_key("conv_in.weight", &unet_cfg)[6..]
        ),
        scalar,
    );

    let family = detect_family(&keys_and_shapes(&ckpt)).unwrap();
    assert_eq!(family, CheckpointFamily::SdxlRefiner);
    check_component(family, "unet", &unet_cfg, &ckpt, &unet);
    check_component(family, "vae", &vae_cfg, &ckpt, &vae);
    check_component(family, "text_encoder_2", &te2_cfg, &ckpt, &te2);

    // The refiner's UNet layout differs from the base's (transformer depths [1, 1, 2]): the base config must not
    // silently accept it.
    let base_cfg = read_json(&fixtures().join("tiny-sdxl/unet/config.json"));
    let err = component_plan(family, "unet", &base_cfg, &keys_and_shapes(&ckpt)).unwrap_err();
    assert!(err.to_string().contains("diffusers key"), "{err}");
}

#[test]
fn wrong_config_is_reported_with_the_offending_key() {
    let root = fixtures();
    let ckpt = read_safetensors(&root.join("tiny-sdxl-single-file.safetensors"));
    let keys = keys_and_shapes(&ckpt);
    // SD1.5's UNet has attention in the first down block, SDXL's does not.
    let sd15_unet = read_json(&root.join("tiny-sd15/unet/config.json"));
    let err = component_plan(CheckpointFamily::SdxlBase, "unet", &sd15_unet, &keys).unwrap_err();
    assert!(err.to_string().contains("model.diffusion_model."), "{err}");
    // SD1.5's text encoder has 3 layers, SDXL's first one 2.
    let sd15_te = read_json(&root.join("tiny-sd15/text_encoder/config.json"));
    let err =
        component_plan(CheckpointFamily::SdxlBase, "text_encoder", &sd15_te, &keys).unwrap_err();
    assert!(
        err.to_string().contains("text_model.encoder.layers.2."),
        "{err}"
    );
}

#[test]
fn every_tensor_the_fixtures_hold_is_required() {
    // The config-derived list of needed tensors is complete for these configs: dropping any one checkpoint
    // tensor of a component must be reported, never yield a silently shorter plan.
    let root = fixtures();
    let cases = [
        (
            "tiny-sdxl",
            CheckpointFamily::SdxlBase,
            &["unet", "vae", "text_encoder", "text_encoder_2"][..],
        ),
        // SD1.5 puts attention in other blocks and shortcuts in other resnets.
        ("tiny-sd15", CheckpointFamily::Sd15, &["unet"][..]),
    ];
    for (folder, family, components) in cases {
        let ckpt = read_safetensors(&root.join(format!("{folder}-single-file.safetensors")));
        let all = keys_and_shapes(&ckpt);
        for component in components {
            let config = read_json(&root.join(folder).join(component).join("config.json"));
            let plan = component_plan(family, component, &config, &all).unwrap();
            let sources: BTreeSet<&str> = plan.iter().map(|(_, s)| s.key()).collect();
            for dropped in &sources {
                let fewer: Vec<_> = all.iter().filter(|(k, _)| k != dropped).cloned().collect();
                assert!(
                    component_plan(family, component, &config, &fewer).is_err(),
                    "{folder} {component}: dropping `{dropped}` went unnoticed"
                );
            }
        }
    }
}
