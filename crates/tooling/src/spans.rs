//! A tracing subscriber for tests: it records every span opened up to a level (name, level and
//! the `index` / `cross` fields the model crates put on their spans), so a test can check which
//! spans a forward pass opens without installing a real subscriber.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// A subscriber that records every span opened at `max_level` or below: its name, level and
/// `index` / `cross` fields, in the order opened.
pub struct Recorder {
    max_level: Level,
    spans: Mutex<Vec<SpanSeen>>,
    next_id: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpanSeen {
    pub name: &'static str,
    pub level: Level,
    pub index: Option<u64>,
    pub cross: Option<bool>,
}

impl Recorder {
    pub fn new(max_level: Level) -> Arc<Self> {
        Arc::new(Self {
            max_level,
            spans: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// The spans opened so far, in order.
    pub fn spans(&self) -> Vec<SpanSeen> {
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
