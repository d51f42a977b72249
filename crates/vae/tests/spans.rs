//! The VAE's tracing spans: with a subscriber installed, decoding opens `vae.decoder`, then
//! `vae.mid_block` and one `vae.up_block` per block (with its index), and encoding
//! `vae.encoder`, one `vae.down_block` per block and `vae.mid_block`, all at info level; the
//! mid block's attention opens a trace-level `attention` span.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;
use sdrs_tooling::spans::{Recorder, SpanSeen};
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig};
use tracing::Level;

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn model() -> AutoencoderKL {
    let folder = fixtures().join("tiny-sd15/vae");
    let cfg = AutoencoderKLConfig::from_file(&folder.join("config.json")).unwrap();
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while the test maps them.
    let vb = VarBuilder::from(
        unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)
        }
        .unwrap(),
    );
    AutoencoderKL::new(vb, &cfg).unwrap()
}

fn names(spans: &[SpanSeen], level: Level) -> Vec<(&'static str, Option<u64>)> {
    spans
        .iter()
        .filter(|s| s.level == level)
        .map(|s| (s.name, s.index))
        .collect()
}

#[test]
fn decode_and_encode_open_one_span_per_block() {
    let vae = model();
    let recorder = Recorder::new(Level::TRACE);
    let latents = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let image = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    tracing::subscriber::with_default(recorder.clone(), || {
        vae.decode(&latents).unwrap();
        vae.encode(&image).unwrap();
    });
    let spans = recorder.spans();
    assert_eq!(
        names(&spans, Level::INFO),
        vec![
            ("vae.decoder", None),
            ("vae.mid_block", None),
            ("vae.up_block", Some(0)),
            ("vae.up_block", Some(1)),
            ("vae.up_block", Some(2)),
            ("vae.up_block", Some(3)),
            ("vae.encoder", None),
            ("vae.down_block", Some(0)),
            ("vae.down_block", Some(1)),
            ("vae.down_block", Some(2)),
            ("vae.down_block", Some(3)),
            ("vae.mid_block", None),
        ]
    );
    // One self-attention in each mid block.
    assert_eq!(
        names(&spans, Level::TRACE),
        vec![("attention", None), ("attention", None)]
    );
    assert!(spans
        .iter()
        .filter(|s| s.name == "attention")
        .all(|s| s.cross == Some(false)));
}
