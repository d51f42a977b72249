//! Loading a model's files: where its configs and tokenizers come from (a diffusers folder or the
//! built-in configs of a published model), reading `.safetensors` weights tensor by tensor, and
//! single original-layout checkpoints (`.safetensors` or GGUF) translated into the diffusers key space.
//!
//! - [`model_files`]: the configs, tokenizers and scheduler settings of a model, from a folder or
//!   from [`builtin`].
//! - [`weights`] and [`tensor_files`]: a component's weight files opened as a `VarBuilder`.
//! - [`single_file`] and [`checkpoint`]: the key plan of a single-file checkpoint and its
//!   execution on the file's tensors.
//! - [`embeddings`]: textual-inversion embedding files (A1111, diffusers, SDXL layouts).
//! - [`options`]: [`LoadOptions`], how a pipeline is loaded and computes.
//! - [`lora`]: LoRA / LyCORIS adapters merged into the weights as they load.
//! - [`quantize`]: weights quantized as they load (`--quantize`); [`export`]: a model's files
//!   and tensors for rewriting (`sdrs quantize`).

pub mod builtin;
pub mod checkpoint;
pub mod embeddings;
pub mod export;
pub mod lora;
pub mod model_files;
pub mod options;
pub mod quantize;
pub mod single_file;
pub mod tensor_files;
pub mod weights;

pub use lora::{addnet_hash, LoraFile};
pub use options::LoadOptions;
