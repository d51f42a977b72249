//! Choosing the compute device and dtype from the names users type (`auto`, `cpu`, `cuda:1`, `metal`; `f32`, `bf16`).

use candle_core::{DType, Device};

use sdrs_kernels::KernelOptions;

use crate::error::{Error, Result};

/// A device as users name it (`auto`, `cpu`, `cuda`, `cuda:N`, `metal`), before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA, then Metal, then the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    /// `auto|cpu|cuda[:N]|metal`, case-insensitive.
    fn from_str(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let unknown = |reason: &str| Error::Device {
            value: name.to_string(),
            reason: reason.to_string(),
        };
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            _ => match lower.strip_prefix("cuda") {
                Some("") => Ok(Self::Cuda(0)),
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .map(Self::Cuda)
                    .ok_or_else(|| unknown("expected cuda or cuda:N with N a GPU index")),
                None => Err(unknown("expected one of auto, cpu, cuda, cuda:N, metal")),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device: an error names it when this build or this machine lacks it.
    pub fn open(&self) -> Result<Device> {
        let unavailable = |reason: String| Error::Device {
            value: self.to_string(),
            reason,
        };
        match *self {
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(device) = Device::new_cuda(0) {
                        return Ok(device);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(device) = Device::new_metal(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cpu => Ok(Device::Cpu),
            Self::Metal => {
                Device::new_metal(0).map_err(|e| unavailable(gpu_error_text(e, "metal")))
            }
            Self::Cuda(ordinal) => {
                Device::new_cuda(ordinal).map_err(|e| unavailable(gpu_error_text(e, "cuda")))
            }
        }
    }
}

/// Resolves `auto|cpu|cuda[:N]|metal`. `auto` takes CUDA, then Metal, then the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    name.parse::<DeviceChoice>()?.open()
}

fn gpu_error_text(error: candle_core::Error, feature: &str) -> String {
    match error {
        candle_core::Error::NotCompiledWithCudaSupport
        | candle_core::Error::NotCompiledWithMetalSupport => {
            format!("this sdrs was built without {feature} support (rebuild with `--features {feature}`)")
        }
        other => other.to_string(),
    }
}

/// Resolves `f32|f16|bf16` (also `float32`, `fp16`, `float16`, `bfloat16`).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::InvalidParameter {
            name: "dtype",
            value: name.to_string(),
            expected: "one of f32, f16, bf16".to_string(),
        }),
    }
}

/// A compute dtype as users name it: `auto` or one of [`parse_dtype`]'s names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// The fast dtype of the device (see [`DtypeChoice::resolve`]).
    Auto,
    Fixed(DType),
}

impl std::str::FromStr for DtypeChoice {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        if name.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        parse_dtype(name)
            .map(Self::Fixed)
            .map_err(|_| Error::InvalidParameter {
                name: "dtype",
                value: name.to_string(),
                expected: "one of auto, f32, f16, bf16".to_string(),
            })
    }
}

impl std::fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(dtype) => f.write_str(dtype_name(*dtype)),
        }
    }
}

impl DtypeChoice {
    /// The dtype; `auto` picks the fast dtype of `device` for kernels computing with `kernels`
    /// (see [`KernelOptions::default_dtype`]: bf16 on CPUs with native bf16 dot products, f32 on
    /// other CPUs, f16 on CUDA and Metal).
    pub fn resolve(&self, device: &Device, kernels: &KernelOptions) -> DType {
        match self {
            Self::Auto => kernels.default_dtype(device),
            Self::Fixed(dtype) => *dtype,
        }
    }
}

/// Resolves a dtype flag where `auto` picks the fast dtype of the device for kernels computing
/// with `kernels` (see [`DtypeChoice::resolve`]).
pub fn resolve_dtype(name: &str, device: &Device, kernels: &KernelOptions) -> Result<DType> {
    Ok(name.parse::<DtypeChoice>()?.resolve(device, kernels))
}

/// The short name used in messages and metadata (`f32`, `f16`, `bf16`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_resolve_without_a_gpu() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").is_ok());
        assert!(parse_device("auto").is_ok());
    }

    #[test]
    fn unknown_device_names_the_value_and_the_choices() {
        let message = parse_device("tpu").unwrap_err().to_string();
        assert!(
            message.contains("tpu") && message.contains("cuda:N"),
            "{message}"
        );
        let message = parse_device("cuda:x").unwrap_err().to_string();
        assert!(message.contains("cuda:x"), "{message}");
    }

    #[test]
    fn device_names_parse_without_opening_the_device() {
        assert_eq!("Auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:2".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(2)
        );
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        assert_eq!(
            "metal".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Metal
        );
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn dtype_choices_parse_and_auto_waits_for_the_device() {
        assert_eq!("auto".parse::<DtypeChoice>().unwrap(), DtypeChoice::Auto);
        assert_eq!(
            "fp16".parse::<DtypeChoice>().unwrap(),
            DtypeChoice::Fixed(DType::F16)
        );
        assert_eq!(DtypeChoice::Fixed(DType::BF16).to_string(), "bf16");
        let kernels = KernelOptions::default();
        assert_eq!(
            DtypeChoice::Auto.resolve(&Device::Cpu, &kernels),
            kernels.default_dtype(&Device::Cpu)
        );
        let message = "int4".parse::<DtypeChoice>().unwrap_err().to_string();
        assert!(
            message.contains("int4") && message.contains("auto, f32"),
            "{message}"
        );
    }

    #[test]
    fn dtypes_parse_and_unknown_ones_are_rejected() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        let message = parse_dtype("int8").unwrap_err().to_string();
        assert!(
            message.contains("int8") && message.contains("bf16"),
            "{message}"
        );
    }

    #[test]
    fn auto_dtype_is_bf16_only_with_native_bf16_on_the_cpu() {
        let kernels = KernelOptions::default();
        let expected = if kernels.cpu_level().has_bf16_dots() {
            DType::BF16
        } else {
            DType::F32
        };
        assert_eq!(
            resolve_dtype("auto", &Device::Cpu, &kernels).unwrap(),
            expected
        );
        assert_eq!(
            resolve_dtype("f16", &Device::Cpu, &kernels).unwrap(),
            DType::F16
        );
        let message = resolve_dtype("f8", &Device::Cpu, &kernels)
            .unwrap_err()
            .to_string();
        assert!(message.contains("auto, f32"), "{message}");
    }
}
