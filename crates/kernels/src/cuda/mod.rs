//! Our CUDA kernels (`cuda/*.cu`) as candle custom ops, launched on the stream of the tensors'
//! device: flash attention, GroupNorm (+ SiLU), GEGLU and an implicit-GEMM conv2d, each in f32,
//! f16 and bf16 with f32 arithmetic. build.rs compiles them into one fatbin (SASS for each of
//! [`ARCHITECTURES`], PTX for compute_80 and compute_120), embedded here and loaded once per CUDA
//! context. The layers reach them through [`crate::dispatch::Route::Cuda`]; [`self_check`]
//! compares each with our CPU kernels on a device.
//!
//! Every op checks dtypes, shapes and contiguity and returns candle errors; none panics on its
//! inputs. Their `cpu_fwd` is an error: the CPU has its own kernels (`nn.rs`, `attention`).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaView, DeviceRepr};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Error, Layout, Result};

mod attention;
mod conv;
mod norm;
mod self_check;

pub use attention::flash_attention;
pub use conv::{conv2d, conv2d_with, ConvKernel};
pub use norm::{geglu, group_norm};
pub use self_check::{self_check, CheckResult};

/// The fatbin build.rs compiled from `cuda/kernels.cu`.
static FATBIN: &[u8] = include_bytes!(env!("SDRS_CUDA_FATBIN"));

/// The architectures the embedded fatbin has SASS for (`sm_80,sm_86,...`: build.rs's
/// `ARCHITECTURES`, where each is documented); PTX for compute_80 and compute_120 rides along.
pub const ARCHITECTURES: &str = env!("SDRS_CUDA_ARCHITECTURES");

/// The path of our kernels' PTX for compute_90 (H100 class), written by build.rs into OUT_DIR.
pub const PTX_COMPUTE_90: &str = env!("SDRS_CUDA_PTX_90");

/// The path of our kernels' PTX for compute_120 (RTX 50 class), written by build.rs into OUT_DIR.
pub const PTX_COMPUTE_120: &str = env!("SDRS_CUDA_PTX_120");

/// Our module in one CUDA context, and the kernels looked up so far.
struct Loaded {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

/// Our module per CUDA context, keyed by the context's handle: the module holds its context,
/// so no handle is reused while its entry is here.
static MODULES: OnceLock<Mutex<HashMap<usize, Loaded>>> = OnceLock::new();

/// Kernel `name` of our module in `device`'s context, loading the module the first time.
pub(crate) fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let stream = device.cuda_stream();
    let context = stream.context();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Msg("sdrs CUDA kernels: the module cache is poisoned".into()))?;
    let loaded = match modules.entry(context.cu_ctx() as usize) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => {
            // The driver picks the SASS for this GPU, or JIT-compiles the newest PTX it can.
            let module = context
                .load_module(Ptx::from_binary(FATBIN.to_vec()))
                .map_err(|e| {
                    let capability = context
                        .compute_capability()
                        .map_or_else(|_| "unknown".into(), |(a, b)| format!("{a}.{b}"));
                    Error::Msg(format!(
                        "sdrs CUDA kernels: loading the module (SASS for {ARCHITECTURES}, PTX for \
                         compute_80 and compute_120) failed on a GPU of compute capability \
                         {capability}: {e}"
                    ))
                })?;
            entry.insert(Loaded {
                module,
                functions: HashMap::new(),
            })
        }
    };
    if let Some(function) = loaded.functions.get(name) {
        return Ok(function.clone());
    }
    let function = loaded
        .module
        .load_function(name)
        .map_err(|e| Error::Msg(format!("sdrs CUDA kernels: no kernel {name}: {e}")))?;
    loaded.functions.insert(name.to_owned(), function.clone());
    Ok(function)
}

/// The kernels' name for `dtype`.
pub(crate) fn dtype_name(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{op}: unsupported dtype {other:?} (f32, f16 or bf16)"),
    }
}

/// Runs `$body` with the type alias `$t` set to the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {other:?} (f32, f16 or bf16)", $op),
        }
    };
}
pub(crate) use with_dtype;

/// The elements of a contiguous operand.
pub(crate) fn contiguous_view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous, got {layout:?}");
    };
    storage
        .as_cuda_slice::<T>()?
        .try_slice(start..end)
        .ok_or_else(|| {
            Error::Msg(format!(
                "{op}: {what}'s layout {layout:?} exceeds its storage"
            ))
        })
}

/// The elements of a strided operand from its first one on (the kernel applies the strides).
pub(crate) fn strided_view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    storage
        .as_cuda_slice::<T>()?
        .try_slice(layout.start_offset()..)
        .ok_or_else(|| {
            Error::Msg(format!(
                "{op}: {what}'s layout {layout:?} exceeds its storage"
            ))
        })
}

/// `value` as a kernel's 32-bit size argument.
pub(crate) fn int(value: usize, what: &str, op: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        Error::Msg(format!(
            "{op}: {what} {value} does not fit the kernel's 32-bit sizes"
        ))
    })
}

/// `value` as a kernel's 64-bit size or stride argument.
pub(crate) fn long(value: usize, what: &str, op: &str) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::Msg(format!("{op}: {what} {value} does not fit 64 bits")))
}

/// A grid dimension: x up to 2^31 - 1 blocks, y and z up to 65535.
pub(crate) fn grid(blocks: usize, limit: u32, what: &str, op: &str) -> Result<u32> {
    match u32::try_from(blocks) {
        Ok(blocks) if blocks <= limit => Ok(blocks.max(1)),
        _ => candle_core::bail!("{op}: {what} needs {blocks} blocks, more than a grid holds"),
    }
}

/// The largest grid x dimension.
pub(crate) const GRID_X: u32 = i32::MAX as u32;
/// The largest grid y or z dimension.
pub(crate) const GRID_YZ: u32 = 65535;

#[cfg(test)]
mod tests {
    use super::*;

    /// `(kind, architecture)` of each entry of the fatbin images in `data` (kind 1: PTX, 2:
    /// SASS), from the fatbin headers: magic 0xBA55ED50, header size at +6, size at +8; each
    /// entry's kind at +0, header size at +4, padded size at +8, architecture at +28.
    fn entries(data: &[u8]) -> Vec<(u16, u32)> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let u64_at = |at: usize| {
            data.get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        };
        let mut found = Vec::new();
        let mut pos = 0;
        while let Some(offset) = data[pos..]
            .windows(4)
            .position(|w| w == 0xBA55_ED50u32.to_le_bytes())
        {
            let start = pos + offset;
            let (Some(header), Some(size)) = (u16_at(start + 6), u64_at(start + 8)) else {
                break;
            };
            let end = start + header as usize + size as usize;
            let mut entry = start + header as usize;
            while entry < end {
                let (Some(kind), Some(entry_header), Some(padded), Some(arch)) = (
                    u16_at(entry),
                    u32_at(entry + 4),
                    u32_at(entry + 8),
                    u32_at(entry + 28),
                ) else {
                    break;
                };
                found.push((kind, arch));
                entry += entry_header as usize + padded as usize;
            }
            pos = end.min(data.len());
        }
        found
    }

    #[test]
    fn the_fatbin_has_sass_for_every_architecture_and_ptx_for_the_oldest_and_newest() {
        let found = entries(FATBIN);
        let sass: Vec<u32> = found.iter().filter(|e| e.0 == 2).map(|e| e.1).collect();
        let ptx: Vec<u32> = found.iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
        let listed: Vec<u32> = ARCHITECTURES
            .split(',')
            .map(|a| a.trim_start_matches("sm_").parse().unwrap())
            .collect();
        assert_eq!(sass, listed, "{found:?}");
        assert_eq!(ptx, [listed[0], listed[listed.len() - 1]], "{found:?}");
    }
}
