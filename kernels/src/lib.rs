//! Hand-written CPU kernels for sdrs: matrix multiplication and convolution in f32, bf16 and f16
//! with f32 accumulation, and flash/sliced attention, each chosen at run time for the CPU's SIMD
//! instructions, and the candle layers that use them. Other devices go through candle's own
//! operations; CUDA and Metal kernels can join here through the same layer types.

pub mod attention;
pub mod conv;
pub mod cpu;
pub mod gemm;
pub mod memory;
pub mod nn;
