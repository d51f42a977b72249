//! The VAE's tracing spans: with a subscriber installed, decoding opens `vae.decoder`, then
//! `vae.mid_block` and one `vae.up_block` per block (with its index), and encoding
//! `vae.encoder`, one `vae.down_block` per block and `vae.mid_block`, all at info level; the
//! mid block's attention opens a trace-level `attention` span.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// A subscriber that records every span opened at `max_level` or below: its name, level and
/// `index` / `cross` fields, in the order opened.
struct Recorder {
    max_level: Level,
    spans: Mutex<Vec<SpanSeen>>,
    next_id: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
struct SpanSeen {
    name: &'static str,
    level: Level,
    index: Option<u64>,
    cross: Option<bool>,
}

impl Recorder {
    fn new(max_level: Level) -> Arc<Self> {
        Arc::new(Self {
            max_level,
            spans: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn spans(&self) -> Vec<SpanSeen> {
        self.spans.lock().unwrap().clone()
    }
}

impl Visit for SpanSeen {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "index" {
            self.index = Some(value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "cross" {
            self.cross = Some(value);
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max_level
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut seen = SpanSeen {
            name: span.metadata().name(),
            level: *span.metadata().level(),
            index: None,
            cross: None,
        };
        span.record(&mut seen);
        self.spans.lock().unwrap().push(seen);
        Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

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
