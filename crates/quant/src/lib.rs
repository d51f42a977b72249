//! Compressed weights for sdrs, each a [`sdrs_kernels::QuantizedMatrix`] that the CPU GEMM
//! decodes while it packs its panels, so a quantized layer never exists as a dense copy:
//! - [`kmeans`] and [`palette`]: k-means palettization (a lookup table per tensor or per group
//!   of output channels, each weight a 1-8 bit index), as coremltools' palettizer makes it;
//! - [`linear`]: linear int8 per output channel (symmetric or with a zero point) and int4 per
//!   block;
//! - [`gguf`]: GGUF files and their block formats, as ggml and gguf-py read and write them;
//! - [`format`]: how quantized tensors are stored in a model folder's `.safetensors` files;
//! - [`spec`]: the quantization a user asks for (`kmeans6`, `int8`, `q8_0`, ...), [`Quantized`]
//!   the matrix it makes.

pub mod error;
pub mod format;
pub mod gguf;
pub mod kmeans;
pub mod linear;
pub mod palette;
pub mod quantized;
pub mod spec;

pub use error::{Error, Result};
pub use quantized::Quantized;
pub use spec::QuantSpec;
