//! GGUF files and ggml's block formats, as ggml writes them and gguf-py 0.19.0 reads them:
//! - [`file`]: the reader ([`GgufFile`]: header, metadata, tensor infos, data on demand);
//! - [`blocks`]: the tensor types ([`GgmlType`]) and their bit-exact decoding ([`decode`]);
//! - [`quantize`](mod@quantize): f32 values into blocks, as ggml's reference quantizers;
//! - [`write`](mod@write): the writer ([`write_gguf`]);
//! - [`matrix`]: a tensor as the CPU GEMM's [`sdrs_kernels::QuantizedMatrix`] ([`GgufMatrix`]).

pub mod blocks;
pub mod file;
mod kquants;
pub mod matrix;
pub mod quantize;
pub mod value;
pub mod write;

pub use blocks::{decode, GgmlType, QK_K};
pub use file::{GgufFile, TensorInfo};
pub use matrix::GgufMatrix;
pub use quantize::quantize;
pub use value::{Value, ValueType};
pub use write::{write_gguf, WriteTensor};

#[cfg(test)]
mod tests;
