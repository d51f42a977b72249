//! Hand-written CPU kernels for sdrs and the layers built on them: matrix multiplication and
//! convolution in f32, bf16 and f16 with f32 accumulation, flash/sliced attention, fused norms,
//! each chosen at run time for the CPU's SIMD instructions.
//!
//! The seams the backends and weight formats plug into:
//! - [`dispatch`]: the one place that decides where each call runs (our CPU kernels at a level,
//!   our CUDA kernels, or candle's operation on any other device), from per-pipeline
//!   [`KernelOptions`];
//! - `cuda` (feature `cuda`): our CUDA kernels as candle custom ops, and a self-check of each
//!   against the CPU kernels;
//! - [`weight`]: a layer's weight is dense or a [`weight::QuantizedMatrix`] decoded while the GEMM
//!   packs it;
//! - [`VarBuilder`]: what models are built from, carrying both to every layer.

pub mod attention;
pub mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dispatch;
pub mod gemm;
pub mod math;
pub mod memory;
pub mod nn;
pub mod var_builder;
pub mod weight;

pub use dispatch::{KernelOptions, Route};
pub use var_builder::VarBuilder;
pub use weight::{QuantizedMatrix, Weight};
