//! The one place that decides which implementation runs an operation: our CPU kernels at a given
//! SIMD level (with or without bf16 dot products), our CUDA kernels (built with the `cuda`
//! feature and asked for with `SDRS_GPU_KERNELS=ours`), candle-nn's fused attention on a Metal
//! device, or candle's own operation (every other device and dtype). Every layer of `nn.rs` and
//! the attention ask [`KernelOptions`] once per call; no other code in sdrs asks a tensor or a
//! device what kind it is.
//!
//! The options are per pipeline (passed in at load inside [`crate::VarBuilder`]), never process
//! state, so two pipelines in one process can differ.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use crate::cpu::{self, Level};

/// How a pipeline's layers compute: the attention algorithm, the fastest CPU kernel level
/// allowed and whose kernels run on GPUs. `Default` is `auto` attention, the CPU's best level and
/// candle's GPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOptions {
    /// How attention is computed (`--attention`).
    pub attention: AttentionMode,
    /// The fastest CPU kernel level allowed (`SDRS_CPU_FEATURES`); `None`: the CPU's best.
    pub cpu_cap: Option<Level>,
    /// Whose kernels run on CUDA devices (`SDRS_GPU_KERNELS`).
    pub gpu_kernels: GpuKernels,
}

/// The environment variable that caps the CPU kernel level.
pub const CPU_FEATURES_VAR: &str = "SDRS_CPU_FEATURES";

/// The environment variable that chooses whose kernels run on CUDA devices ([`GpuKernels`]).
pub const GPU_KERNELS_VAR: &str = "SDRS_GPU_KERNELS";

impl KernelOptions {
    /// Options with `attention`, the CPU level capped by `SDRS_CPU_FEATURES` and the GPU kernels
    /// chosen by `SDRS_GPU_KERNELS` when they are set.
    pub fn from_env(attention: AttentionMode) -> Result<Self, String> {
        let cpu_cap = match std::env::var(CPU_FEATURES_VAR) {
            Ok(value) if !value.trim().is_empty() => Some(parse_cpu_cap(&value)?),
            _ => None,
        };
        let gpu_kernels = match std::env::var(GPU_KERNELS_VAR) {
            Ok(value) if !value.trim().is_empty() => value.parse()?,
            _ => GpuKernels::default(),
        };
        Ok(Self {
            attention,
            cpu_cap,
            gpu_kernels,
        })
    }

    /// The CPU kernel level these options run at: the CPU's best, capped.
    pub fn cpu_level(&self) -> Level {
        let best = cpu::detected();
        self.cpu_cap.map_or(best, |cap| cap.min(best))
    }

    /// Where an operation on `input` alone runs (norms, GEGLU, the attention's inputs).
    pub fn route(&self, input: &Tensor) -> Route {
        let device = input.device();
        if !is_kernel_dtype(input.dtype()) {
            Route::Candle
        } else if on_cpu(device) {
            Route::Cpu {
                level: self.cpu_level(),
                bf16_dots: false,
            }
        } else if on_cuda(device) && self.gpu_kernels == GpuKernels::Ours {
            Route::Cuda
        } else if on_metal(device) {
            Route::Metal
        } else {
            Route::Candle
        }
    }

    /// Where a product of `input` with a weight that computes as `weight` runs (linear layers,
    /// convolutions): bf16 weights take the bf16 dot products where the level has them and they
    /// measure faster than the f32 kernels on this CPU ([`crate::gemm::bf16_dots_pay`]; the
    /// activations are then rounded to bf16 as they are packed, as PyTorch's bf16 autocast does).
    pub fn route_product(&self, input: &Tensor, weight: DType) -> Route {
        match self.route(input) {
            Route::Cpu { level, .. } if is_kernel_dtype(weight) => Route::Cpu {
                level,
                bf16_dots: weight == DType::BF16 && crate::gemm::bf16_dots_pay(level),
            },
            Route::Cuda if is_kernel_dtype(weight) => Route::Cuda,
            _ => Route::Candle,
        }
    }

    /// [`Self::route_product`] for a convolution of `groups` groups (our CPU and CUDA kernels do
    /// `groups == 1`).
    pub fn route_conv(&self, input: &Tensor, weight: DType, groups: usize) -> Route {
        if groups == 1 {
            self.route_product(input, weight)
        } else {
            Route::Candle
        }
    }

    /// The attention algorithm for queries `q` (`[B, H, Lq, D]`): `auto` is flash attention where
    /// a fused kernel runs (ours on the CPU and on [`Route::Cuda`], candle-nn's SDPA on a Metal
    /// device for the head dims [`metal_sdpa_head_dim`] takes) and candle's matmul + softmax
    /// elsewhere; `flash` falls back the same way.
    pub fn attention_for(&self, q: &Tensor) -> AttentionMode {
        let ours = match self.route(q) {
            Route::Cpu { .. } | Route::Cuda => true,
            Route::Metal => match q.dims() {
                [_, _, lq, d] => metal_sdpa_head_dim(*d, *lq, q.dtype()).is_some(),
                _ => false,
            },
            Route::Candle => false,
        };
        match self.attention {
            AttentionMode::Auto | AttentionMode::Flash if ours => AttentionMode::Flash,
            AttentionMode::Auto | AttentionMode::Flash => AttentionMode::Naive,
            other => other,
        }
    }

    /// The default weight dtype on `device`: bf16 on CPUs whose allowed level has bf16 dot
    /// products (AMX, AVX512-BF16, aarch64 BF16) that measure faster than its f32 kernels, f32 on
    /// other CPUs, f16 on GPUs.
    pub fn default_dtype(&self, device: &Device) -> DType {
        if !on_cpu(device) {
            DType::F16
        } else if crate::gemm::bf16_dots_pay(self.cpu_level()) {
            DType::BF16
        } else {
            DType::F32
        }
    }
}

/// How attention is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// The fastest that fits: flash on the CPU, naive elsewhere.
    #[default]
    Auto,
    Naive,
    /// `Some(n)`: `n` (batch x head) slices at a time; `None`: one.
    Sliced(Option<usize>),
    Flash,
}

impl AttentionMode {
    pub const ACCEPTED: &'static str = "auto, naive, sliced, sliced:N (N >= 1), flash";
}

impl FromStr for AttentionMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "unknown attention {s:?}: expected one of {}",
                Self::ACCEPTED
            )
        };
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "naive" => Ok(Self::Naive),
            "flash" => Ok(Self::Flash),
            "sliced" => Ok(Self::Sliced(None)),
            other => match other.strip_prefix("sliced:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Ok(Self::Sliced(Some(n))),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Naive => write!(f, "naive"),
            Self::Sliced(None) => write!(f, "sliced"),
            Self::Sliced(Some(n)) => write!(f, "sliced:{n}"),
            Self::Flash => write!(f, "flash"),
        }
    }
}

/// Whose kernels run on CUDA devices: candle's own (the default) or ours (`cuda/*.cu`: flash
/// attention, fused GroupNorm + SiLU, GEGLU and an implicit-GEMM conv2d; linear layers stay on
/// cuBLAS either way). `ours` needs a build with the `cuda` feature; without it, or on other
/// devices, it changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuKernels {
    #[default]
    Candle,
    Ours,
}

impl GpuKernels {
    pub const ACCEPTED: &'static str = "candle, ours";
}

impl FromStr for GpuKernels {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "candle" => Ok(Self::Candle),
            "ours" => Ok(Self::Ours),
            _ => Err(format!(
                "unknown {GPU_KERNELS_VAR} value {s:?}: expected one of {}",
                Self::ACCEPTED
            )),
        }
    }
}

impl fmt::Display for GpuKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Candle => write!(f, "candle"),
            Self::Ours => write!(f, "ours"),
        }
    }
}

/// Head dims candle-nn 0.11.1's fused Metal SDPA has kernels for, with more than one query
/// (`steel_attention_*`, `candle-metal-kernels/src/kernels/sdpa.rs`: 512 exists for f16/bf16
/// only and is left out) and with one query (`sdpa_vector_*`: no 72 or 80, although candle-nn's
/// own check lets them through).
const METAL_SDPA_FULL_HEAD_DIMS: [usize; 7] = [32, 64, 72, 80, 96, 128, 256];
const METAL_SDPA_VECTOR_HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// The head dim candle-nn's Metal SDPA computes a head of `head_dim` (`max(D, Dv)`) with, for
/// `lq` queries of `dtype`: the smallest supported one that is at least as large, the inputs
/// zero-padded up to it (`None`: too large, or not an f32/f16/bf16 dtype; the naive path runs).
///
/// Padding rather than the naive path for SD1.5's head dims 40 (padded to 64) and 160 (to 256):
/// the zeros change no score (`q·k` gains exact zero products, the scale is passed explicitly)
/// and the extra output columns are cut off, so the result is the same attention; the fused
/// kernel then does 1.6x the head's arithmetic but never writes the Lq x Lk scores, which the
/// naive path writes and reads back in f32 (64 MiB per head for SD1.5's 4096-token
/// self-attention of head dim 40, against 1.5 MiB for that head's padded q, k and v in f16).
pub fn metal_sdpa_head_dim(head_dim: usize, lq: usize, dtype: DType) -> Option<usize> {
    if !is_kernel_dtype(dtype) || head_dim == 0 {
        return None;
    }
    let supported: &[usize] = if lq == 1 {
        &METAL_SDPA_VECTOR_HEAD_DIMS
    } else {
        &METAL_SDPA_FULL_HEAD_DIMS
    };
    supported.iter().copied().find(|&d| d >= head_dim)
}

/// `SDRS_CPU_FEATURES`' value as a level cap.
pub fn parse_cpu_cap(value: &str) -> Result<Level, String> {
    Level::parse(value).ok_or_else(|| {
        format!(
            "unknown {CPU_FEATURES_VAR} value {value:?}: expected one of {}",
            Level::ACCEPTED
        )
    })
}

/// Which implementation runs one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Our CPU kernels at `level`; `bf16_dots`: products with bf16 dot-product instructions.
    Cpu { level: Level, bf16_dots: bool },
    /// Our CUDA kernels (`cuda/*.cu`) on the tensor's CUDA device: returned only in builds with
    /// the `cuda` feature, for f32/bf16/f16 tensors, when [`GpuKernels::Ours`] is asked for.
    Cuda,
    /// A Metal device (returned only in builds with the `metal` feature): candle's operations,
    /// and candle-nn's fused SDPA for the attention where [`metal_sdpa_head_dim`] allows.
    Metal,
    /// candle's own operation, on whatever device the tensors are.
    Candle,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu { level, bf16_dots } => {
                write!(f, "cpu:{}", level.name())?;
                if *bf16_dots {
                    write!(f, " (bf16 dots)")?;
                }
                Ok(())
            }
            Self::Cuda => write!(f, "cuda"),
            Self::Metal => write!(f, "metal"),
            Self::Candle => write!(f, "candle"),
        }
    }
}

/// The dtype activations flow in around weights stored in `weights`: f32 where our CPU kernels
/// run, which take half-precision weights with f32 activations (only the products' inputs are
/// rounded, as in PyTorch's bf16 autocast, so norms and residual sums keep their precision); the
/// weights' dtype on other devices.
pub fn activation_dtype(weights: DType, device: &Device) -> DType {
    if on_cpu(device) {
        DType::F32
    } else {
        weights
    }
}

/// The dtype to load a small convolutional model (a tiny autoencoder: 64-channel convolutions,
/// 10 MB of weights) in when the pipeline computes in `dtype`: f32 instead of bf16 on the CPU,
/// where such narrow products are too small for the bf16 dot products to pay (0.64 s in f32
/// against 0.69 s in bf16 for a 512x512 TAESD decode on an AVX512-BF16 machine) and the result is
/// then exact instead of rounded. Other dtypes and devices are kept.
pub fn small_model_dtype(dtype: DType, device: &Device) -> DType {
    if on_cpu(device) && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// Whether `device` is the CPU: the only device-kind question in sdrs, asked here.
fn on_cpu(device: &Device) -> bool {
    matches!(device, Device::Cpu)
}

/// Whether `device` is a CUDA device our kernels can run on (the build has them).
fn on_cuda(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// Whether `device` is a Metal device (the build has the backend).
fn on_metal(device: &Device) -> bool {
    cfg!(feature = "metal") && device.is_metal()
}

/// The dtypes our CPU and CUDA kernels read.
fn is_kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for text in ["auto", "naive", "sliced", "sliced:4", "flash"] {
            let mode: AttentionMode = text.parse().unwrap();
            assert_eq!(mode.to_string(), text);
        }
        for bad in ["fast", "sliced:0", "sliced:x", ""] {
            let error = bad.parse::<AttentionMode>().unwrap_err();
            assert!(error.contains("sliced:N"), "{error}");
        }
    }

    #[test]
    fn cpu_tensors_of_kernel_dtypes_take_our_kernels_and_others_candle() {
        let options = KernelOptions::default();
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(options.route(&x), Route::Cpu { .. }));
        let ints = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(options.route(&ints), Route::Candle);
        assert_eq!(options.route_product(&x, DType::U8), Route::Candle);
        assert_eq!(options.route_conv(&x, DType::F32, 2), Route::Candle);
    }

    #[test]
    fn bf16_dots_need_bf16_weights_and_a_level_that_has_them() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let capped = KernelOptions {
            cpu_cap: Some(Level::Portable),
            ..Default::default()
        };
        assert_eq!(
            capped.route_product(&x, DType::BF16),
            Route::Cpu {
                level: Level::Portable,
                bf16_dots: false
            }
        );
        let best = KernelOptions::default();
        let Route::Cpu { bf16_dots, level } = best.route_product(&x, DType::BF16) else {
            panic!("the CPU takes our kernels");
        };
        assert_eq!(bf16_dots, crate::gemm::bf16_dots_pay(level));
        let Route::Cpu { bf16_dots, .. } = best.route_product(&x, DType::F16) else {
            panic!("the CPU takes our kernels");
        };
        assert!(!bf16_dots);
    }

    #[test]
    fn a_cap_never_raises_the_level_and_bad_caps_name_the_accepted_ones() {
        let options = KernelOptions {
            cpu_cap: Some(*Level::available().last().unwrap()),
            ..Default::default()
        };
        assert_eq!(options.cpu_level(), cpu::detected());
        assert_eq!(parse_cpu_cap("portable"), Ok(Level::Portable));
        let error = parse_cpu_cap("sse9").unwrap_err();
        assert!(
            error.contains("sse9") && error.contains("portable"),
            "{error}"
        );
    }

    #[test]
    fn auto_attention_is_flash_on_our_kernels_and_naive_elsewhere() {
        let q = Tensor::zeros((1, 1, 4, 8), DType::F32, &Device::Cpu).unwrap();
        let ints = Tensor::zeros((1, 1, 4, 8), DType::U32, &Device::Cpu).unwrap();
        let auto = KernelOptions::default();
        assert_eq!(auto.attention_for(&q), AttentionMode::Flash);
        assert_eq!(auto.attention_for(&ints), AttentionMode::Naive);
        let sliced = KernelOptions {
            attention: AttentionMode::Sliced(Some(2)),
            ..Default::default()
        };
        assert_eq!(sliced.attention_for(&q), AttentionMode::Sliced(Some(2)));
    }

    #[test]
    fn gpu_kernels_parse_print_and_default_to_candle() {
        for text in ["candle", "ours"] {
            let kernels: GpuKernels = text.parse().unwrap();
            assert_eq!(kernels.to_string(), text);
        }
        assert_eq!(KernelOptions::default().gpu_kernels, GpuKernels::Candle);
        for bad in ["", "cuda", "Ours"] {
            let error = bad.parse::<GpuKernels>().unwrap_err();
            assert!(
                error.contains(GPU_KERNELS_VAR) && error.contains(GpuKernels::ACCEPTED),
                "{error}"
            );
        }
    }

    #[test]
    fn asking_for_our_gpu_kernels_changes_nothing_on_the_cpu() {
        let ours = KernelOptions {
            gpu_kernels: GpuKernels::Ours,
            ..Default::default()
        };
        let x = Tensor::zeros((1, 1, 4, 8), DType::F32, &Device::Cpu).unwrap();
        let default = KernelOptions::default();
        assert_eq!(ours.route(&x), default.route(&x));
        assert_eq!(
            ours.route_product(&x, DType::BF16),
            default.route_product(&x, DType::BF16)
        );
        assert_eq!(ours.attention_for(&x), AttentionMode::Flash);
    }

    #[test]
    fn metal_sdpa_pads_sd_head_dims_to_supported_ones() {
        // SD1.5's 40, 80 and 160, SDXL's 64.
        assert_eq!(metal_sdpa_head_dim(40, 4096, DType::F16), Some(64));
        assert_eq!(metal_sdpa_head_dim(80, 4096, DType::F16), Some(80));
        assert_eq!(metal_sdpa_head_dim(160, 77, DType::BF16), Some(256));
        assert_eq!(metal_sdpa_head_dim(64, 1024, DType::F32), Some(64));
        // One query takes the vector kernels, which have no 72 or 80.
        assert_eq!(metal_sdpa_head_dim(80, 1, DType::F16), Some(96));
        assert_eq!(metal_sdpa_head_dim(257, 4096, DType::F16), None);
        assert_eq!(metal_sdpa_head_dim(0, 4096, DType::F16), None);
        assert_eq!(metal_sdpa_head_dim(64, 4096, DType::U32), None);
    }

    #[test]
    fn activations_stay_f32_on_the_cpu() {
        assert_eq!(activation_dtype(DType::BF16, &Device::Cpu), DType::F32);
        assert_eq!(small_model_dtype(DType::BF16, &Device::Cpu), DType::F32);
        assert_eq!(small_model_dtype(DType::F16, &Device::Cpu), DType::F16);
    }
}
