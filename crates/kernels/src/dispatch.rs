//! The one place that decides which implementation runs an operation: our CPU kernels at a given
//! SIMD level (with or without bf16 dot products), or candle's own operation (every other device
//! and dtype). Every layer of `nn.rs` and the attention ask [`KernelOptions`] once per call; no
//! other code in sdrs asks a tensor or a device what kind it is. A CUDA or Metal kernel joins as a
//! new [`Route`] variant chosen here.
//!
//! The options are per pipeline (passed in at load inside [`crate::VarBuilder`]), never process
//! state, so two pipelines in one process can differ.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use crate::cpu::{self, Level};

/// How a pipeline's layers compute: the attention algorithm and the fastest CPU kernel level
/// allowed. `Default` is `auto` attention and the CPU's best level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOptions {
    /// How attention is computed (`--attention`).
    pub attention: AttentionMode,
    /// The fastest CPU kernel level allowed (`SDRS_CPU_FEATURES`); `None`: the CPU's best.
    pub cpu_cap: Option<Level>,
}

/// The environment variable that caps the CPU kernel level.
pub const CPU_FEATURES_VAR: &str = "SDRS_CPU_FEATURES";

impl KernelOptions {
    /// Options with `attention`, the CPU level capped by `SDRS_CPU_FEATURES` when it is set.
    pub fn from_env(attention: AttentionMode) -> Result<Self, String> {
        let cpu_cap = match std::env::var(CPU_FEATURES_VAR) {
            Ok(value) if !value.trim().is_empty() => Some(parse_cpu_cap(&value)?),
            _ => None,
        };
        Ok(Self { attention, cpu_cap })
    }

    /// The CPU kernel level these options run at: the CPU's best, capped.
    pub fn cpu_level(&self) -> Level {
        let best = cpu::detected();
        self.cpu_cap.map_or(best, |cap| cap.min(best))
    }

    /// Where an operation on `input` alone runs (norms, GEGLU, the attention's inputs).
    pub fn route(&self, input: &Tensor) -> Route {
        if on_cpu(input.device()) && is_kernel_dtype(input.dtype()) {
            Route::Cpu {
                level: self.cpu_level(),
                bf16_dots: false,
            }
        } else {
            Route::Candle
        }
    }

    /// Where a product of `input` with a weight that computes as `weight` runs (linear layers,
    /// convolutions): bf16 weights take the bf16 dot products where the level has them (the
    /// activations are then rounded to bf16 as they are packed, as PyTorch's bf16 autocast does).
    pub fn route_product(&self, input: &Tensor, weight: DType) -> Route {
        match self.route(input) {
            Route::Cpu { level, .. } if is_kernel_dtype(weight) => Route::Cpu {
                level,
                bf16_dots: weight == DType::BF16 && level.has_bf16_dots(),
            },
            _ => Route::Candle,
        }
    }

    /// [`Self::route_product`] for a convolution of `groups` groups (our kernels do `groups == 1`).
    pub fn route_conv(&self, input: &Tensor, weight: DType, groups: usize) -> Route {
        if groups == 1 {
            self.route_product(input, weight)
        } else {
            Route::Candle
        }
    }

    /// The attention algorithm for queries `q`: `auto` is flash attention where our kernels run
    /// and candle's matmul + softmax elsewhere; `flash` falls back the same way.
    pub fn attention_for(&self, q: &Tensor) -> AttentionMode {
        let ours = matches!(self.route(q), Route::Cpu { .. });
        match self.attention {
            AttentionMode::Auto | AttentionMode::Flash if ours => AttentionMode::Flash,
            AttentionMode::Auto | AttentionMode::Flash => AttentionMode::Naive,
            other => other,
        }
    }

    /// The default weight dtype on `device`: bf16 on CPUs whose allowed level has bf16 dot
    /// products (AVX512-BF16, aarch64 BF16), f32 on other CPUs, f16 on GPUs.
    pub fn default_dtype(&self, device: &Device) -> DType {
        if !on_cpu(device) {
            DType::F16
        } else if self.cpu_level().has_bf16_dots() {
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

/// The dtypes our CPU kernels read.
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
        assert_eq!(bf16_dots, level.has_bf16_dots());
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
    fn activations_stay_f32_on_the_cpu() {
        assert_eq!(activation_dtype(DType::BF16, &Device::Cpu), DType::F32);
        assert_eq!(small_model_dtype(DType::BF16, &Device::Cpu), DType::F32);
        assert_eq!(small_model_dtype(DType::F16, &Device::Cpu), DType::F16);
    }
}
