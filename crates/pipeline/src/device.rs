//! Choosing the compute device and dtype from the names users type (`auto`, `cpu`, `cuda:1`, `metal`; `f32`, `bf16`).

use candle_core::{DType, Device};

use sdrs_kernels::KernelOptions;

use crate::error::{Error, Result};

/// Resolves `auto|cpu|cuda[:N]|metal`. `auto` takes CUDA, then Metal, then the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let lower = name.trim().to_ascii_lowercase();
    let unavailable = |reason: String| Error::Device {
        value: name.to_string(),
        reason,
    };
    match lower.as_str() {
        "auto" => {
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
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| unavailable(gpu_error_text(e, "metal"))),
        _ => {
            let ordinal = match lower.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        unavailable("expected cuda or cuda:N with N a GPU index".to_string())
                    })?,
                None => {
                    return Err(unavailable(
                        "expected one of auto, cpu, cuda, cuda:N, metal".to_string(),
                    ))
                }
            };
            Device::new_cuda(ordinal).map_err(|e| unavailable(gpu_error_text(e, "cuda")))
        }
    }
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

/// Resolves a dtype flag where `auto` picks the fast dtype of the device for kernels computing
/// with `kernels` (see [`KernelOptions::default_dtype`]: bf16 on CPUs with native bf16 dot
/// products, f32 on other CPUs, f16 on CUDA and Metal).
pub fn resolve_dtype(name: &str, device: &Device, kernels: &KernelOptions) -> Result<DType> {
    if name.trim().eq_ignore_ascii_case("auto") {
        return Ok(kernels.default_dtype(device));
    }
    parse_dtype(name).map_err(|_| Error::InvalidParameter {
        name: "dtype",
        value: name.to_string(),
        expected: "one of auto, f32, f16, bf16".to_string(),
    })
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
