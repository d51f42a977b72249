//! VAE parity against diffusers: `reference/vae_sd15.safetensors` and
//! `reference/vae_sdxl.safetensors` (`latents` -> `decoded`, `image` -> `encoded_mean`,
//! `encoded_logvar`; f32 on CPU), plus half-precision smoke runs, with the VAE bounds of the
//! tolerance table (`sdrs_tooling::tolerances`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;
use sdrs_tooling::tolerances::{tolerance, CaseKind};
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig, Error};

/// The table's max |diff| for the VAE computed in `dtype` with activations in `dtype` too (1e-3
/// in f32, 5e-2 in f16, 1.5e-1 in bf16, whose decodes come out about 8x further off than in f16:
/// 9e-2 measured vs 1.1e-2).
fn bound(dtype: DType) -> f32 {
    tolerance(CaseKind::VaeHalfActivations, dtype).unwrap() as f32
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
        .join("vae/diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while the test maps them.
    VarBuilder::from(
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }
            .unwrap(),
    )
}

fn config(folder: &str) -> AutoencoderKLConfig {
    AutoencoderKLConfig::from_file(&fixtures().join(folder).join("vae/config.json")).unwrap()
}

fn model(folder: &str, dtype: DType) -> AutoencoderKL {
    AutoencoderKL::new(var_builder(folder, dtype), &config(folder)).unwrap()
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

/// Max |diff| of decode, encode mean and encode logvar against a reference file.
fn diffs(folder: &str, file: &str, dtype: DType) -> [f32; 3] {
    let r = reference(file);
    let vae = model(folder, dtype);
    let input = |key: &str| r[key].to_dtype(dtype).unwrap();
    let decoded = vae.decode(&input("latents")).unwrap();
    assert_eq!(decoded.dtype(), dtype);
    let dist = vae.encode(&input("image")).unwrap();
    [
        max_abs_diff(&decoded, &r["decoded"]),
        max_abs_diff(&dist.mean, &r["encoded_mean"]),
        max_abs_diff(&dist.logvar, &r["encoded_logvar"]),
    ]
}

fn check(what: &str, diffs: [f32; 3], tolerance: f32) {
    let [decoded, mean, logvar] = diffs;
    eprintln!("{what}: max |diff| decoded {decoded:e}, mean {mean:e}, logvar {logvar:e}");
    for (name, diff) in [
        ("decoded", decoded),
        ("encoded_mean", mean),
        ("encoded_logvar", logvar),
    ] {
        assert!(
            diff < tolerance,
            "{what} {name}: max |diff| {diff} >= {tolerance}"
        );
    }
}

#[test]
fn sd15_vae_matches_diffusers() {
    // Tolerance: the table's f32 VAE bound, 1e-3 max |diff| (the fixtures README's).
    check(
        "sd15 vae",
        diffs("tiny-sd15", "vae_sd15.safetensors", DType::F32),
        bound(DType::F32),
    );
}

#[test]
fn sdxl_vae_matches_diffusers() {
    // Tolerance: the table's f32 VAE bound, 1e-3 max |diff|.
    check(
        "sdxl vae",
        diffs("tiny-sdxl", "vae_sdxl.safetensors", DType::F32),
        bound(DType::F32),
    );
}

#[test]
fn sd15_vae_in_bf16_stays_close() {
    // Tolerance: the table's bf16 VAE bound, 1.5e-1 max |diff| (bf16 weights and activations).
    check(
        "sd15 vae bf16",
        diffs("tiny-sd15", "vae_sd15.safetensors", DType::BF16),
        bound(DType::BF16),
    );
}

#[test]
fn sdxl_vae_in_f16_stays_close() {
    // Tolerance: the table's f16 VAE bound, 5e-2 max |diff| (f16 weights and activations).
    check(
        "sdxl vae f16",
        diffs("tiny-sdxl", "vae_sdxl.safetensors", DType::F16),
        bound(DType::F16),
    );
}

#[test]
fn sampling_uses_the_given_noise() {
    let r = reference("vae_sd15.safetensors");
    let vae = model("tiny-sd15", DType::F32);
    let dist = vae.encode(&r["image"]).unwrap();
    let zeros = dist.mean.zeros_like().unwrap();
    // Tolerance: exact, zero noise gives the mean.
    assert_eq!(
        max_abs_diff(&dist.sample_with(&zeros).unwrap(), &dist.mean),
        0.0
    );
    let ones = dist.mean.ones_like().unwrap();
    let expected = (&dist.mean + dist.std().unwrap()).unwrap();
    assert_eq!(
        max_abs_diff(&dist.sample_with(&ones).unwrap(), &expected),
        0.0
    );
}

#[test]
fn odd_image_sizes_shrink_like_diffusers() {
    let vae = model("tiny-sd15", DType::F32);
    let image = Tensor::zeros((1, 3, 20, 13), DType::F32, &Device::Cpu).unwrap();
    // Three stride-2 convs after padding right and bottom by one: n -> (n - 2) / 2 + 1, so
    // 20 -> 10 -> 5 -> 2 and 13 -> 6 -> 3 -> 1.
    assert_eq!(vae.encode(&image).unwrap().mean.dims(), &[1, 4, 2, 1]);
}

#[test]
fn wrong_input_shapes_are_reported() {
    let vae = model("tiny-sd15", DType::F32);
    let latents = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&latents).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InputShape {
                input: "latents",
                ..
            }
        ),
        "{err}"
    );
    let image = Tensor::zeros((3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let err = vae.encode(&image).unwrap_err();
    assert!(
        matches!(err, Error::InputShape { input: "image", .. }),
        "{err}"
    );
}

#[test]
fn weights_that_do_not_fit_the_config_name_the_tensor() {
    let mut cfg = config("tiny-sd15");
    cfg.latent_channels = 8;
    let err = AutoencoderKL::new(var_builder("tiny-sd15", DType::F32), &cfg).unwrap_err();
    let message = err.to_string();
    eprintln!("weights/config mismatch: {message}");
    assert!(message.contains("encoder.conv_out.weight"), "{message}");
}

#[test]
fn unsupported_config_values_are_refused() {
    let mut cfg = config("tiny-sdxl");
    cfg.act_fn = "tanh".to_string();
    let err = AutoencoderKL::new(var_builder("tiny-sdxl", DType::F32), &cfg).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { key, .. } if key == "act_fn"),
        "{err}"
    );
}
