//! CLIP for sdrs: the CLIP BPE tokenizer and the CLIP text encoder (transformers'
//! `CLIPTokenizer` and `CLIPTextModel` / `CLIPTextModelWithProjection`).
//!
//! Tracing spans (no subscriber is installed here): `clip.text_encoder` (field `layers`, the
//! number run) at info level, one `clip.layer` (field `index`) per encoder layer at trace level.

pub mod activations;
pub mod configuration_clip;
pub mod error;
pub mod modeling_clip;
pub mod tokenizer;

pub use activations::Activation;
pub use configuration_clip::ClipTextConfig;
pub use error::{Error, Result};
pub use modeling_clip::{pooled_positions, ClipTextModel, ClipTextOutput};
pub use tokenizer::ClipTokenizer;
