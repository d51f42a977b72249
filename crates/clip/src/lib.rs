//! CLIP for sdrs: the CLIP BPE tokenizer and the CLIP text encoder (transformers'
//! `CLIPTokenizer` and `CLIPTextModel` / `CLIPTextModelWithProjection`).

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
