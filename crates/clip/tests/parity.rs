//! Text-encoder parity against transformers: `reference/text_encoder_sd15.safetensors` and
//! `reference/text_encoders_sdxl.safetensors` (f32 on CPU, and half-precision weights), with the
//! text-encoder bounds of the tolerance table (`sdrs_tooling::tolerances`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_clip::{ClipTextConfig, ClipTextModel};
use sdrs_kernels::VarBuilder;
use sdrs_tooling::tolerances::{tolerance, CaseKind};

/// The table's max |diff| for the text encoders computed in `dtype` (1e-4 in f32, 5e-2 in f16,
/// 1e-1 in bf16).
fn bound(dtype: DType) -> f32 {
    tolerance(CaseKind::TextEncoder, dtype).unwrap() as f32
}

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference").join(name), &Device::Cpu).unwrap()
}

fn model(folder: &str, dtype: DType) -> ClipTextModel {
    let dir = fixtures().join(folder);
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = dir.join("model.safetensors");
    // SAFETY: the fixture files are not modified while the test maps them.
    let vb = VarBuilder::from(
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }
            .unwrap(),
    );
    ClipTextModel::new(vb, &cfg).unwrap()
}

/// The reference stores `input_ids` as float.
fn ids(reference: &HashMap<String, Tensor>, key: &str) -> Tensor {
    reference[key].to_dtype(DType::U32).unwrap()
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
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(what: &str, got: &Tensor, expected: &Tensor, tol: f32) {
    let diff = max_abs_diff(got, expected);
    assert!(diff <= tol, "{what}: max |diff| {diff:e} > {tol:e}");
    eprintln!("{what}: max |diff| {diff:e} (tolerance {tol:e})");
}

/// `penultimate_hidden_state` is transformers' `hidden_states[-2]` as is, without
/// `final_layer_norm` (what SDXL conditions on). diffusers' SD1.5 `clip_skip` applies
/// `final_layer_norm` on top of it, which `forward_clip_skip` reproduces.
#[test]
fn sd15_text_encoder_matches_transformers() {
    let r = reference("text_encoder_sd15.safetensors");
    let model = model("tiny-sd15/text_encoder", DType::F32);
    let input_ids = ids(&r, "input_ids");
    let out = model.forward(&input_ids).unwrap();
    assert!(out.text_embeds.is_none());
    assert_eq!(out.hidden_states.len(), model.num_hidden_layers() + 1);
    let penultimate = model
        .hidden_state(&input_ids, model.num_hidden_layers() - 1)
        .unwrap();
    let n = out.hidden_states.len();

    // Tolerance: the table's f32 text-encoder bound, 1e-4 max |diff| (the fixtures README's).
    let tol_f32 = bound(DType::F32);
    assert_close(
        "sd15 last_hidden_state",
        &out.last_hidden_state,
        &r["last_hidden_state"],
        tol_f32,
    );
    assert_close("sd15 pooled", &out.pooled, &r["pooled"], tol_f32);
    assert_close(
        "sd15 penultimate (early exit)",
        &penultimate,
        &r["penultimate_hidden_state"],
        tol_f32,
    );
    assert_close(
        "sd15 penultimate (hidden_states[-2])",
        &out.hidden_states[n - 2],
        &r["penultimate_hidden_state"],
        tol_f32,
    );
    let clip_skip_2 = model.forward_clip_skip(&input_ids, 2).unwrap();
    let expected = model
        .final_layer_norm(&r["penultimate_hidden_state"])
        .unwrap();
    assert_close("sd15 clip skip 2", &clip_skip_2, &expected, tol_f32);
}

#[test]
fn sdxl_text_encoders_match_transformers() {
    let r = reference("text_encoders_sdxl.safetensors");
    // Tolerance: the table's f32 text-encoder bound, 1e-4 max |diff|.
    let tol_f32 = bound(DType::F32);

    let te1 = model("tiny-sdxl/text_encoder", DType::F32);
    let input_ids = ids(&r, "input_ids");
    let out1 = te1.forward(&input_ids).unwrap();
    let te1_penultimate = te1
        .hidden_state(&input_ids, te1.num_hidden_layers() - 1)
        .unwrap();
    assert_close(
        "sdxl te1_last",
        &out1.last_hidden_state,
        &r["te1_last"],
        tol_f32,
    );
    assert_close(
        "sdxl te1_penultimate",
        &te1_penultimate,
        &r["te1_penultimate"],
        tol_f32,
    );

    let te2 = model("tiny-sdxl/text_encoder_2", DType::F32);
    assert!(te2.has_projection());
    let out2 = te2.forward(&ids(&r, "input_ids_2")).unwrap();
    let n = out2.hidden_states.len();
    assert_close(
        "sdxl te2_penultimate",
        &out2.hidden_states[n - 2],
        &r["te2_penultimate"],
        tol_f32,
    );
    let text_embeds = out2.text_embeds.as_ref().unwrap();
    assert_close(
        "sdxl te2_text_embeds",
        text_embeds,
        &r["te2_text_embeds"],
        tol_f32,
    );
}

/// Half-precision weights on the CPU (activations, layer norms and softmax in f32) against the f32
/// reference. The outputs are O(1) (up to ~4); f16 weights keep 11 significant bits and bf16 8.
#[test]
fn half_precision_stays_close() {
    let r15 = reference("text_encoder_sd15.safetensors");
    let rxl = reference("text_encoders_sdxl.safetensors");
    for dtype in [DType::F16, DType::BF16] {
        // Tolerance: the table's text-encoder bound for `dtype`, 5e-2 (f16) and 1e-1 (bf16) max
        // |diff|, which also cover half-precision activations on a GPU.
        let tol = bound(dtype);
        let te = model("tiny-sd15/text_encoder", dtype);
        let out = te.forward(&ids(&r15, "input_ids")).unwrap();
        // On the CPU half-precision weights run with f32 activations.
        assert_eq!(out.last_hidden_state.dtype(), DType::F32);
        let what = format!("{dtype:?} sd15 last_hidden_state");
        assert_close(
            &what,
            &out.last_hidden_state,
            &r15["last_hidden_state"],
            tol,
        );
        assert_close(
            &format!("{dtype:?} sd15 pooled"),
            &out.pooled,
            &r15["pooled"],
            tol,
        );

        let te2 = model("tiny-sdxl/text_encoder_2", dtype);
        let out2 = te2.forward(&ids(&rxl, "input_ids_2")).unwrap();
        let n = out2.hidden_states.len();
        let what = format!("{dtype:?} sdxl te2_penultimate");
        assert_close(
            &what,
            &out2.hidden_states[n - 2],
            &rxl["te2_penultimate"],
            tol,
        );
        let what = format!("{dtype:?} sdxl te2_text_embeds");
        assert_close(
            &what,
            out2.text_embeds.as_ref().unwrap(),
            &rxl["te2_text_embeds"],
            tol,
        );
    }
}
