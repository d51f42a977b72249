//! The UNet's tracing spans: with a subscriber installed, one forward pass of the tiny SD1.5
//! UNet opens `unet`, `unet.time_embedding`, one `unet.down_block` / `unet.up_block` per block
//! (with its index) and `unet.mid_block` at info level, and one `unet.transformer_block` per
//! transformer block and one `attention` per attention call at trace level.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;
use sdrs_tooling::spans::{Recorder, SpanSeen};
use sdrs_unet::{UNet2DConditionConfig, UNet2DConditionModel};
use tracing::Level;

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

/// Runs the tiny SD1.5 UNet once under `recorder`.
fn forward_under(recorder: Arc<Recorder>) {
    let folder = fixtures().join("tiny-sd15/unet");
    let cfg = UNet2DConditionConfig::from_file(&folder.join("config.json")).unwrap();
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while the test maps them.
    let vb = VarBuilder::from(
        unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)
        }
        .unwrap(),
    );
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let sample = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let timestep = Tensor::new(&[10f32], &Device::Cpu).unwrap();
    let context = Tensor::zeros((1, 7, 32), DType::F32, &Device::Cpu).unwrap();
    tracing::subscriber::with_default(recorder, || {
        unet.forward(&sample, &timestep, &context, None).unwrap();
    });
}

fn info(name: &'static str, index: Option<u64>) -> SpanSeen {
    SpanSeen {
        name,
        level: Level::INFO,
        index,
        cross: None,
    }
}

#[test]
fn forward_opens_one_span_per_stage_and_per_attention() {
    let recorder = Recorder::new(Level::TRACE);
    forward_under(recorder.clone());
    let spans = recorder.spans();
    let stages: Vec<SpanSeen> = spans
        .iter()
        .filter(|s| s.level == Level::INFO)
        .cloned()
        .collect();
    assert_eq!(
        stages,
        vec![
            info("unet", None),
            info("unet.time_embedding", None),
            info("unet.down_block", Some(0)),
            info("unet.down_block", Some(1)),
            info("unet.down_block", Some(2)),
            info("unet.mid_block", None),
            info("unet.up_block", Some(0)),
            info("unet.up_block", Some(1)),
            info("unet.up_block", Some(2)),
        ]
    );
    // tiny-sd15: 2 + 2 cross-attention down resnets, 1 in the mid block, 3 + 3 up: eleven
    // transformers of depth 1, each with a self- and a cross-attention.
    let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
    assert_eq!(count("unet.transformer_block"), 11);
    assert_eq!(count("attention"), 22);
    let cross = spans.iter().filter(|s| s.cross == Some(true)).count();
    assert_eq!(cross, 11);
    assert!(spans
        .iter()
        .filter(|s| s.level != Level::INFO)
        .all(|s| s.level == Level::TRACE));
}

#[test]
fn per_layer_spans_are_trace_level_only() {
    let recorder = Recorder::new(Level::INFO);
    forward_under(recorder.clone());
    let spans = recorder.spans();
    assert_eq!(spans.len(), 9, "{spans:?}");
    assert!(spans.iter().all(|s| s.name != "attention"), "{spans:?}");
}
