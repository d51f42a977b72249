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
        Ok(self.select()?.device)
    }

    /// Opens the device and says which it is and, when `auto` ends on the CPU, why no GPU was
    /// taken. A named GPU that cannot be used is an error naming the cause.
    pub fn select(&self) -> Result<DeviceSelection> {
        let unavailable = |reason: String| Error::Device {
            value: self.to_string(),
            reason,
        };
        match *self {
            Self::Cpu => Ok(DeviceSelection::cpu(None)),
            Self::Cuda(ordinal) => open_cuda(ordinal).map_err(unavailable),
            Self::Metal => open_metal().map_err(unavailable),
            Self::Auto => {
                let cuda = match open_cuda(0) {
                    Ok(selection) => return Ok(selection),
                    Err(reason) => reason,
                };
                let metal = match open_metal() {
                    Ok(selection) => return Ok(selection),
                    Err(reason) => reason,
                };
                Ok(DeviceSelection::cpu(Some(fallback_reason(&cuda, &metal))))
            }
        }
    }
}

/// The device a command runs on, as opened by [`DeviceChoice::select`].
#[derive(Debug, Clone)]
pub struct DeviceSelection {
    pub device: Device,
    /// What it is, for messages: `cpu`, `cuda:0 (NVIDIA H200, compute 9.0, 139.8 GiB, ...)`.
    pub description: String,
    /// Why `auto` fell back to the CPU; `None` when it took a GPU or a device was named.
    pub fallback: Option<String>,
}

impl DeviceSelection {
    fn cpu(fallback: Option<String>) -> Self {
        Self {
            device: Device::Cpu,
            description: "cpu".to_string(),
            fallback,
        }
    }

    /// One line for the user: the device, and the reason for a fallback.
    pub fn message(&self) -> String {
        match &self.fallback {
            Some(reason) => format!("device: {} (no GPU used: {reason})", self.description),
            None => format!("device: {}", self.description),
        }
    }
}

/// The lowest compute capability this build's CUDA kernels run on (Ampere, sm_80): candle's and
/// ours are compiled for it and later architectures (see `crates/kernels/cuda/README.md`).
pub const MIN_CUDA_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// `auto`'s reason for the CPU, from why CUDA and Metal could not be used.
fn fallback_reason(cuda: &str, metal: &str) -> String {
    match (cfg!(feature = "cuda"), cfg!(feature = "metal")) {
        (false, false) => "this sdrs was built without GPU support (build with `--features cuda` \
                           or `--features metal`)"
            .to_string(),
        (true, false) => format!("CUDA: {cuda}"),
        (false, true) => format!("Metal: {metal}"),
        (true, true) => format!("CUDA: {cuda}; Metal: {metal}"),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> std::result::Result<DeviceSelection, String> {
    use candle_core::cuda_backend::cudarc::driver::sys;

    let mut driver = 0;
    // SAFETY: cuDriverGetVersion only writes the int it is given; it needs no cuInit.
    let status = unsafe { sys::cuDriverGetVersion(&mut driver) };
    if status == sys::cudaError_enum::CUDA_SUCCESS {
        if let Some(reason) = driver_too_old(driver, sys::CUDA_VERSION as i32) {
            return Err(reason);
        }
    }
    let device = std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| "the CUDA libraries could not be initialised".to_string())?
        .map_err(|error| describe_cuda_error(&error.to_string()))?;
    let description = match &device {
        Device::Cuda(cuda) => {
            let context = cuda.cuda_stream().context().clone();
            let name = context.name().unwrap_or_else(|_| "unknown GPU".to_string());
            let (major, minor) = context
                .compute_capability()
                .map_err(|error| describe_cuda_error(&error.to_string()))?;
            if (major, minor) < MIN_CUDA_COMPUTE_CAPABILITY {
                return Err(format!(
                    "{name} has compute capability {major}.{minor}; this build runs on {}.{} \
                     (Ampere) and newer",
                    MIN_CUDA_COMPUTE_CAPABILITY.0, MIN_CUDA_COMPUTE_CAPABILITY.1
                ));
            }
            let memory = context
                .total_mem()
                .map(|bytes| format!(", {:.1} GiB", bytes as f64 / (1u64 << 30) as f64))
                .unwrap_or_default();
            format!(
                "cuda:{ordinal} ({name}, compute {major}.{minor}{memory}, driver CUDA {})",
                cuda_version_name(driver)
            )
        }
        _ => format!("cuda:{ordinal}"),
    };
    Ok(DeviceSelection {
        device,
        description,
        fallback: None,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> std::result::Result<DeviceSelection, String> {
    Err("this sdrs was built without CUDA support (rebuild with `--features cuda`)".to_string())
}

#[cfg(feature = "metal")]
fn open_metal() -> std::result::Result<DeviceSelection, String> {
    let device =
        Device::new_metal(0).map_err(|error| first_line(&error.to_string()).to_string())?;
    Ok(DeviceSelection {
        device,
        description: "metal".to_string(),
        fallback: None,
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal() -> std::result::Result<DeviceSelection, String> {
    Err("this sdrs was built without Metal support (rebuild with `--features metal`)".to_string())
}

/// `13000` -> `13.0`: how CUDA writes its versions as integers.
pub fn cuda_version_name(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// Why a driver that supports CUDA `driver` cannot run a build made with CUDA `build` (both as
/// CUDA writes them, `13000` for 13.0), if it cannot: a driver runs builds of its own major
/// version and older ones.
pub fn driver_too_old(driver: i32, build: i32) -> Option<String> {
    (driver / 1000 < build / 1000).then(|| {
        format!(
            "the NVIDIA driver supports CUDA {}, this sdrs was built with CUDA {}: update the \
             driver (CUDA 13 needs driver 580 or newer)",
            cuda_version_name(driver),
            cuda_version_name(build)
        )
    })
}

/// The message of a candle error, without the backtrace candle appends on the lines after it.
fn first_line(error: &str) -> &str {
    error.lines().next().unwrap_or_default().trim()
}

/// A CUDA error as candle and cudarc print it, in words a user can act on (the code is kept).
pub fn describe_cuda_error(error: &str) -> String {
    let error = first_line(error);
    const KNOWN: [(&str, &str); 10] = [
        ("CUDA_ERROR_NO_DEVICE", "no NVIDIA GPU found"),
        (
            "CUDA_ERROR_STUB_LIBRARY",
            "the CUDA driver library found is a stub, not an NVIDIA driver",
        ),
        (
            "CUDA_ERROR_INVALID_DEVICE",
            "there is no GPU with that index",
        ),
        (
            "CUDA_ERROR_INSUFFICIENT_DRIVER",
            "the NVIDIA driver is too old for this build (CUDA 13 needs driver 580 or newer)",
        ),
        (
            "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
            "the NVIDIA kernel driver and its user-space library are of different versions \
             (reboot, or reinstall the driver)",
        ),
        ("CUDA_ERROR_OUT_OF_MEMORY", "out of GPU memory"),
        (
            "CUDA_ERROR_NO_BINARY_FOR_GPU",
            "this build has no kernels for this GPU's architecture",
        ),
        (
            "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
            "the NVIDIA driver is too old for this build's kernels (CUDA 13 needs driver 580 \
             or newer)",
        ),
        (
            "CUDA_ERROR_NOT_INITIALIZED",
            "the CUDA driver could not be initialised",
        ),
        (
            "CUDA_ERROR_UNKNOWN",
            "the CUDA driver failed (is the NVIDIA kernel module loaded?)",
        ),
    ];
    match KNOWN.iter().find(|(code, _)| error.contains(code)) {
        Some((code, words)) => format!("{words} ({code})"),
        None => error.to_string(),
    }
}

/// GPU memory in use on `device`'s GPU in bytes (all processes: the driver's `total - free`);
/// `None` on the CPU and on Metal, which has no such reading here.
pub fn gpu_memory_in_use(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

/// The peak of [`gpu_memory_in_use`] while some work runs, sampled every millisecond by a
/// background thread (CUDA's allocator keeps freed blocks in its pool, so the reading includes
/// them, as `nvidia-smi` does).
pub struct GpuMemoryPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl GpuMemoryPeak {
    /// Starts sampling; `None` where [`gpu_memory_in_use`] has no reading.
    pub fn start(device: &Device) -> Option<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let first = gpu_memory_in_use(device)?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (device, flag) = (device.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            let mut peak = first;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(gpu_memory_in_use(&device).unwrap_or(0));
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak.max(gpu_memory_in_use(&device).unwrap_or(0))
        });
        Some(Self { stop, sampler })
    }

    /// Stops sampling and returns the peak in bytes.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().unwrap_or(0)
    }
}

/// Resolves `auto|cpu|cuda[:N]|metal`. `auto` takes CUDA, then Metal, then the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    name.parse::<DeviceChoice>()?.open()
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
    /// (see [`KernelOptions::default_dtype`]: bf16 on CPUs whose bf16 dot products measure faster
    /// than their f32 kernels, f32 on other CPUs, f16 on CUDA and Metal).
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
    fn auto_without_a_usable_gpu_takes_the_cpu_and_says_why() {
        let selection = DeviceChoice::Auto.select().unwrap();
        if selection.device.is_cpu() {
            let reason = selection.fallback.as_deref().unwrap();
            if !cfg!(any(feature = "cuda", feature = "metal")) {
                assert!(reason.contains("without GPU support"), "{reason}");
            }
            assert!(
                selection.message().contains("no GPU used"),
                "{}",
                selection.message()
            );
        } else {
            assert!(selection.fallback.is_none());
        }
        let named = DeviceChoice::Cpu.select().unwrap();
        assert_eq!(
            (named.message().as_str(), named.fallback),
            ("device: cpu", None)
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_build_without_it_is_an_error_naming_the_feature() {
        let message = DeviceChoice::Cuda(1).select().unwrap_err().to_string();
        assert!(
            message.contains("cuda:1") && message.contains("--features cuda"),
            "{message}"
        );
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_in_a_build_without_it_is_an_error_naming_the_feature() {
        let message = DeviceChoice::Metal.select().unwrap_err().to_string();
        assert!(message.contains("--features metal"), "{message}");
    }

    #[test]
    fn an_old_driver_is_named_with_both_versions() {
        let reason = driver_too_old(12040, 13000).unwrap();
        assert!(
            reason.contains("12.4") && reason.contains("13.0"),
            "{reason}"
        );
        assert_eq!(driver_too_old(13010, 13000), None);
        assert_eq!(driver_too_old(13000, 13000), None);
        assert_eq!(cuda_version_name(12080), "12.8");
    }

    #[test]
    fn cuda_errors_are_told_in_words_and_keep_their_code() {
        let text = "DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")";
        assert_eq!(
            describe_cuda_error(text),
            "no NVIDIA GPU found (CUDA_ERROR_NO_DEVICE)"
        );
        let memory =
            describe_cuda_error("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(memory.starts_with("out of GPU memory"), "{memory}");
        assert_eq!(
            describe_cuda_error("something else\n   0: <unknown>"),
            "something else"
        );
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
        let expected = if sdrs_kernels::gemm::bf16_dots_pay(kernels.cpu_level()) {
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
