//! Parity of the tiny autoencoders with the diffusers / taesd.py reference outputs in
//! `tests/fixtures` (f32 on CPU, and an f16 run), with the tiny-autoencoder bounds of the tolerance
//! table (`sdrs_tooling::tolerances`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_taesd::{compare_images, AutoencoderTiny, Error, Half, Layout, TinyVariant};
use sdrs_tooling::tolerances::{tolerance, CaseKind};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

/// The table's max |diff| for a tiny autoencoder computed in `dtype` (1e-3 in f32, 5e-2 in f16).
fn bound(dtype: DType) -> f32 {
    tolerance(CaseKind::TinyAutoencoder, dtype).unwrap() as f32
}

fn reference(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(what: &str, ours: &Tensor, expected: &Tensor, tol: f32) {
    let diff = max_abs_diff(ours, expected);
    assert!(diff <= tol, "{what}: max |diff| = {diff:e} > {tol:e}");
    eprintln!("{what}: max |diff| = {diff:e}");
}

/// `latents -> decoded` and `image -> encoded`, AutoencoderTiny convention ([-1, 1] images).
fn check_autoencoder_tiny(name: &str, model: &AutoencoderTiny, refs: &HashMap<String, Tensor>) {
    let decoded = model.decode(&refs["latents"]).unwrap();
    // Tolerance: the table's f32 tiny-autoencoder bound, 1e-3 max |diff| (outputs are O(1)).
    let tol = bound(DType::F32);
    assert_close(&format!("{name} decode"), &decoded, &refs["decoded"], tol);
    let encoded = model.encode(&refs["image"]).unwrap();
    // Tolerance: the same, 1e-3.
    assert_close(&format!("{name} encode"), &encoded, &refs["encoded"], tol);
}

#[test]
fn taesd_diffusers_layout() {
    let dev = Device::Cpu;
    let dir = fixture("taesd");
    assert!(matches!(
        sdrs_taesd::detect_layout(&dir).unwrap(),
        Layout::Diffusers { .. }
    ));
    let model = AutoencoderTiny::from_dir(&dir, DType::F32, &dev, Default::default()).unwrap();
    assert_eq!(model.variant(), TinyVariant::Taesd);
    check_autoencoder_tiny(
        "taesd (diffusers)",
        &model,
        &reference("reference/taesd.safetensors"),
    );
}

#[test]
fn taesd_bare_files() {
    let dev = Device::Cpu;
    let model = AutoencoderTiny::from_files(
        Some(&fixture("taesd/taesd_encoder.safetensors")),
        Some(&fixture("taesd/taesd_decoder.safetensors")),
        DType::F32,
        &dev,
        Default::default(),
    )
    .unwrap();
    assert_eq!(model.variant(), TinyVariant::Taesd);
    assert_eq!(model.config().latent_channels, 4);
    check_autoencoder_tiny(
        "taesd (bare)",
        &model,
        &reference("reference/taesd.safetensors"),
    );
}

#[test]
fn taef1_diffusers_layout() {
    let dev = Device::Cpu;
    let model =
        AutoencoderTiny::from_dir(fixture("taef1"), DType::F32, &dev, Default::default()).unwrap();
    assert_eq!(model.variant(), TinyVariant::Taef1);
    check_autoencoder_tiny(
        "taef1 (diffusers)",
        &model,
        &reference("reference/taef1.safetensors"),
    );
}

#[test]
fn taef1_bare_files() {
    let dev = Device::Cpu;
    let model = AutoencoderTiny::from_files(
        Some(&fixture("taef1/taef1_encoder.safetensors")),
        Some(&fixture("taef1/taef1_decoder.safetensors")),
        DType::F32,
        &dev,
        Default::default(),
    )
    .unwrap();
    assert_eq!(model.variant(), TinyVariant::Taef1);
    check_autoencoder_tiny(
        "taef1 (bare)",
        &model,
        &reference("reference/taef1.safetensors"),
    );
}

#[test]
fn decoder_only_decodes_and_refuses_to_encode() {
    let dev = Device::Cpu;
    let model = AutoencoderTiny::from_files(
        None,
        Some(&fixture("taesd/taesd_decoder.safetensors")),
        DType::F32,
        &dev,
        Default::default(),
    )
    .unwrap();
    assert!(!model.has_encoder() && model.has_decoder());
    let refs = reference("reference/taesd.safetensors");
    let decoded = model.decode(&refs["latents"]).unwrap();
    // Tolerance: the table's f32 tiny-autoencoder bound, 1e-3 max |diff|.
    let tol = bound(DType::F32);
    assert_close("taesd decoder only", &decoded, &refs["decoded"], tol);
    match model.encode(&refs["image"]) {
        Err(Error::MissingHalf {
            half: Half::Encoder,
            ..
        }) => {}
        other => panic!("expected a missing-encoder error, got {other:?}"),
    }
    // Latents with the wrong channel count are refused with the shapes involved.
    let wrong = Tensor::zeros((1, 16, 4, 4), DType::F32, &dev).unwrap();
    assert!(matches!(
        model.decode(&wrong),
        Err(Error::InputShape { found, .. }) if found == vec![1, 16, 4, 4]
    ));
}

#[test]
fn half_precision_runs_close_to_f32() {
    let dev = Device::Cpu;
    let refs = reference("reference/taesd.safetensors");
    // candle's CPU backend has no bf16 matmul, so only f16 is checked here; bf16 needs a GPU.
    let model =
        AutoencoderTiny::from_dir(fixture("taesd"), DType::F16, &dev, Default::default()).unwrap();
    let decoded = model.decode(&refs["latents"]).unwrap();
    assert_eq!(decoded.dtype(), DType::F16);
    // Tolerance: the table's f16 tiny-autoencoder bound, 5e-2 max |diff| (f16 compute).
    let tol = bound(DType::F16);
    assert_close("taesd decode F16", &decoded, &refs["decoded"], tol);
    let encoded = model.encode(&refs["image"]).unwrap();
    // Tolerance: the same, 5e-2.
    assert_close("taesd encode F16", &encoded, &refs["encoded"], tol);
}

#[test]
fn real_taef2_matches_reference_and_psnr() {
    let dev = Device::Cpu;
    let dir = fixture("real-taef2");
    let model = AutoencoderTiny::from_dir(&dir, DType::F32, &dev, Default::default()).unwrap();
    assert_eq!(model.variant(), TinyVariant::Taef2);
    assert_eq!(model.config().latent_channels, 32);
    assert_eq!(model.pooled_blocks(), 6);

    let refs = reference("real-taef2/reference.safetensors");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let images = json["images"].as_object().unwrap();
    assert!(!images.is_empty());
    let tol = bound(DType::F32);
    let psnr_tol_db = tolerance(CaseKind::RoundTripPsnr, DType::F32).unwrap();
    for (name, info) in images {
        // TAEF2 convention: images in [0, 1], latents = encoder(image), decoded before clamping.
        let image = &refs[&format!("{name}_image")];
        let latents = model.encode_unit(image).unwrap();
        // Tolerance: the table's f32 tiny-autoencoder bound, 1e-3 max |diff|.
        assert_close(
            &format!("taef2 {name} encode"),
            &latents,
            &refs[&format!("{name}_latents")],
            tol,
        );
        let decoded = model
            .decode_unit(&refs[&format!("{name}_latents")])
            .unwrap();
        // Tolerance: the same, 1e-3.
        assert_close(
            &format!("taef2 {name} decode"),
            &decoded,
            &refs[&format!("{name}_decoded")],
            tol,
        );

        let round_trip = model
            .decode_unit(&latents)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let metrics = compare_images(&round_trip, image).unwrap();
        let expected = info["psnr_db_roundtrip"].as_f64().unwrap();
        eprintln!(
            "taef2 {name}: PSNR {:.4} dB (reference {expected}), {metrics:?}",
            metrics.psnr_db
        );
        // Tolerance: the table's round-trip bound, 0.05 dB on the PSNR.
        assert!(
            (metrics.psnr_db - expected).abs() <= psnr_tol_db,
            "taef2 {name}: PSNR {} dB vs reference {expected} dB",
            metrics.psnr_db
        );
    }
}
