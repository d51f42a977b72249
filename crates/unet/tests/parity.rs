//! UNet parity against diffusers: `reference/unet_sd15.safetensors` and
//! `reference/unet_sdxl.safetensors` (f32 on CPU, and bf16 and f16 smoke runs, with the UNet bounds
//! of the tolerance table `sdrs_tooling::tolerances`), the SDXL refiner's shapes, and the errors for
//! bad configs and mismatched weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;
use sdrs_tooling::tolerances::{tolerance, CaseKind};
use sdrs_unet::{AddedConditions, Error, UNet2DConditionConfig, UNet2DConditionModel};

/// The table's max |diff| for the UNet computed in `dtype` (1e-3 in f32, 5e-2 in f16 and bf16).
fn bound(dtype: DType) -> f32 {
    tolerance(CaseKind::Unet, dtype).unwrap() as f32
}

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference").join(name), &Device::Cpu).unwrap()
}

fn var_builder(folder: &str, dtype: DType) -> VarBuilder<'static> {
    let weights = fixtures()
        .join(folder)
        .join("unet/diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while the test maps them.
    VarBuilder::from(
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }
            .unwrap(),
    )
}

fn config(folder: &str) -> UNet2DConditionConfig {
    UNet2DConditionConfig::from_file(&fixtures().join(folder).join("unet/config.json")).unwrap()
}

fn model(folder: &str, dtype: DType) -> UNet2DConditionModel {
    UNet2DConditionModel::new(var_builder(folder, dtype), &config(folder)).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Runs the model on a reference file's inputs in `dtype` and returns (output, expected).
fn run(folder: &str, file: &str, dtype: DType) -> (Tensor, Tensor) {
    let r = reference(file);
    let unet = model(folder, dtype);
    let input = |key: &str| r[key].to_dtype(dtype).unwrap();
    let added = r.contains_key("text_embeds").then(|| AddedConditions {
        text_embeds: input("text_embeds"),
        time_ids: input("time_ids"),
    });
    let out = unet
        .forward(
            &input("sample"),
            &r["timestep"],
            &input("encoder_hidden_states"),
            added.as_ref(),
        )
        .unwrap();
    assert_eq!(out.dtype(), dtype);
    (out, r["out"].clone())
}

#[test]
fn sd15_matches_diffusers() {
    let (out, expected) = run("tiny-sd15", "unet_sd15.safetensors", DType::F32);
    let diff = max_abs_diff(&out, &expected);
    eprintln!("sd15 unet: max |diff| {diff:e}");
    // Tolerance: the table's f32 UNet bound, 1e-3 max |diff| (the fixtures README's).
    let tol = bound(DType::F32);
    assert!(diff < tol, "sd15 unet: max |diff| {diff} >= {tol}");
}

#[test]
fn sdxl_matches_diffusers() {
    let (out, expected) = run("tiny-sdxl", "unet_sdxl.safetensors", DType::F32);
    let diff = max_abs_diff(&out, &expected);
    eprintln!("sdxl unet: max |diff| {diff:e}");
    // Tolerance: the table's f32 UNet bound, 1e-3 max |diff|.
    let tol = bound(DType::F32);
    assert!(diff < tol, "sdxl unet: max |diff| {diff} >= {tol}");
}

#[test]
fn sd15_in_bf16_stays_close() {
    let (out, expected) = run("tiny-sd15", "unet_sd15.safetensors", DType::BF16);
    let diff = max_abs_diff(&out, &expected);
    eprintln!("sd15 unet in bf16: max |diff| {diff:e}");
    // Tolerance: the table's bf16 UNet bound, 5e-2 max |diff| (bf16 weights and activations).
    let tol = bound(DType::BF16);
    assert!(diff < tol, "sd15 unet in bf16: max |diff| {diff} >= {tol}");
}

#[test]
fn sdxl_in_f16_stays_close() {
    let (out, expected) = run("tiny-sdxl", "unet_sdxl.safetensors", DType::F16);
    let diff = max_abs_diff(&out, &expected);
    eprintln!("sdxl unet in f16: max |diff| {diff:e}");
    // Tolerance: the table's f16 UNet bound, 5e-2 max |diff| (f16 weights and activations).
    let tol = bound(DType::F16);
    assert!(diff < tol, "sdxl unet in f16: max |diff| {diff} >= {tol}");
}

#[test]
fn sdxl_needs_its_added_conditions() {
    let r = reference("unet_sdxl.safetensors");
    let unet = model("tiny-sdxl", DType::F32);
    let err = unet
        .forward(
            &r["sample"],
            &r["timestep"],
            &r["encoder_hidden_states"],
            None,
        )
        .unwrap_err();
    assert!(matches!(err, Error::MissingAddedCondition { .. }), "{err}");
}

#[test]
fn refiner_builds_and_runs() {
    let cfg = config("tiny-sdxl-refiner");
    let unet =
        UNet2DConditionModel::new(var_builder("tiny-sdxl-refiner", DType::F32), &cfg).unwrap();
    let dev = Device::Cpu;
    let cross = 32; // the refiner fixture's cross_attention_dim, checked next
    assert_eq!(cfg.cross_attention_dim, sdrs_unet::OneOrMany::One(cross));
    let sample = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, 12, 20), &dev).unwrap();
    let timesteps = Tensor::new(&[999f32, 0.5], &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, cross), &dev).unwrap();
    // Refiner time ids: original size, crop offset, aesthetic score (5 values).
    let time_ids =
        Tensor::new(&[[96f32, 160., 0., 0., 6.], [96., 160., 0., 0., 2.5]], &dev).unwrap();
    let add_dim = cfg.addition_time_embed_dim.unwrap();
    let text_dim = cfg.projection_class_embeddings_input_dim.unwrap() - 5 * add_dim;
    let text_embeds = Tensor::randn(0f32, 1.0, (2, text_dim), &dev).unwrap();
    let added = AddedConditions {
        text_embeds,
        time_ids,
    };
    let out = unet
        .forward(&sample, &timesteps, &context, Some(&added))
        .unwrap();
    assert_eq!(out.dims(), &[2, cfg.out_channels, 12, 20]);
}

#[test]
fn odd_latent_sizes_follow_the_skip_connections() {
    let unet = model("tiny-sd15", DType::F32);
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1.0, (1, 4, 13, 7), &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (1, 77, 32), &dev).unwrap();
    // One timestep for the whole batch is broadcast.
    let t = Tensor::new(10.5f32, &dev).unwrap();
    let out = unet.forward(&sample, &t, &context, None).unwrap();
    assert_eq!(out.dims(), &[1, 4, 13, 7]);
}

#[test]
fn one_timestep_per_batch_item() {
    let r = reference("unet_sd15.safetensors");
    let unet = model("tiny-sd15", DType::F32);
    let both = unet
        .forward(
            &r["sample"],
            &r["timestep"],
            &r["encoder_hidden_states"],
            None,
        )
        .unwrap();
    let first = |t: &Tensor| t.narrow(0, 0, 1).unwrap();
    let alone = unet
        .forward(
            &first(&r["sample"]),
            &first(&r["timestep"]),
            &first(&r["encoder_hidden_states"]),
            None,
        )
        .unwrap();
    let diff = max_abs_diff(&alone, &first(&both));
    // Tolerance: the same computation batched or not, up to f32 reassociation.
    assert!(
        diff < 1e-5,
        "batch item 0 alone vs batched: max |diff| {diff}"
    );
}

#[test]
fn wrong_input_shapes_are_reported() {
    let r = reference("unet_sd15.safetensors");
    let unet = model("tiny-sd15", DType::F32);
    let bad_context = r["encoder_hidden_states"].narrow(2, 0, 16).unwrap();
    let err = unet
        .forward(&r["sample"], &r["timestep"], &bad_context, None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InputShape {
                input: "encoder_hidden_states",
                ..
            }
        ),
        "{err}"
    );
    let three_timesteps = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let err = unet
        .forward(
            &r["sample"],
            &three_timesteps,
            &r["encoder_hidden_states"],
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InputShape {
                input: "timesteps",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unsupported_config_values_are_refused() {
    let mut cfg = config("tiny-sd15");
    cfg.resnet_time_scale_shift = "scale_shift".to_string();
    let err = UNet2DConditionModel::new(var_builder("tiny-sd15", DType::F32), &cfg).unwrap_err();
    match &err {
        Error::Unsupported {
            key,
            value,
            accepted,
        } => {
            assert_eq!(key, "resnet_time_scale_shift");
            assert!(value.contains("scale_shift"), "{err}");
            assert!(accepted.contains("default"), "{err}");
        }
        other => panic!("expected Unsupported, got {other}"),
    }
    let text = std::fs::read_to_string(fixtures().join("tiny-sd15/unet/config.json")).unwrap();
    let text = text.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"");
    let cfg: UNet2DConditionConfig = serde_json::from_str(&text).unwrap();
    let err = UNet2DConditionModel::new(var_builder("tiny-sd15", DType::F32), &cfg).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { key, .. } if key == "down_block_types"),
        "{err}"
    );
}

#[test]
fn weights_that_do_not_fit_the_config_name_the_tensor() {
    let mut cfg = config("tiny-sd15");
    cfg.cross_attention_dim = sdrs_unet::OneOrMany::One(48);
    let err = UNet2DConditionModel::new(var_builder("tiny-sd15", DType::F32), &cfg).unwrap_err();
    let message = err.to_string();
    eprintln!("weights/config mismatch: {message}");
    assert!(message.contains("attn2.to_k.weight"), "{message}");
}

#[test]
fn config_file_errors_name_the_file() {
    let missing = fixtures().join("tiny-sd15/unet/no-such-config.json");
    let err = UNet2DConditionConfig::from_file(&missing).unwrap_err();
    assert!(err.to_string().contains("no-such-config.json"), "{err}");
}
