//! How a model is loaded: device, dtype, weight variant, and the per-pipeline kernel options and
//! CPU thread pool its layers compute with.

use std::sync::Arc;

use candle_core::{DType, Device};
use sdrs_kernels::KernelOptions;

use crate::error::{Error, Result};

/// How a model is loaded: where it computes, in which dtype, which weight variant to prefer, and
/// how its layers compute (kernel options and CPU threads, kept by this pipeline alone).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// A weight-file variant such as `fp16` (`model.fp16.safetensors`), tried before the plain files.
    pub variant: Option<String>,
    /// Attention mode and CPU kernel level of every layer.
    pub kernels: KernelOptions,
    /// Worker threads of the pipeline's own thread pool; `None`: the physical cores.
    pub threads: Option<usize>,
    /// Quantize the UNet's and text encoders' layer weights as they load.
    pub quantize: Option<sdrs_quant::QuantSpec>,
    /// Per-layer bit widths for [`Self::quantize`] (a mixed-bit recipe).
    pub recipe: Option<Arc<crate::loading::quantize::Recipe>>,
    /// When the VAE decodes and encodes in tiles (default: only when the untiled pass would not
    /// fit in memory).
    pub vae_tiling: crate::pipeline::vae_tiling::VaeTilingOptions,
    /// LoRA / LyCORIS files merged into the UNet and text encoders as they load, in order.
    pub loras: Vec<crate::loading::lora::LoraFile>,
    /// Merge what matches and ignore a LoRA's modules that match no layer (else an error).
    pub lora_ignore_unmatched: bool,
    /// Refuse a request whose estimated peak memory exceeds the memory available, before it
    /// starts (default: on; see `StableDiffusion::check_memory`).
    pub memory_check: bool,
    /// The most memory a request may take, in bytes, when less than what the system reports
    /// available (a machine shared with other work).
    pub memory_limit: Option<u64>,
}

impl LoadOptions {
    /// Options for computing in `dtype` on `device`, reading weight `variant` when given, else
    /// the `fp16` files for half-precision compute (the plain files fill any gap): the rule
    /// downloads and loads share, so a cache holding both kinds loads what a run fetched.
    pub fn new(device: Device, dtype: DType, variant: Option<String>) -> Self {
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let variant = variant.or_else(|| half.then(|| "fp16".to_string()));
        Self {
            device,
            dtype,
            variant,
            kernels: KernelOptions::default(),
            threads: None,
            quantize: None,
            recipe: None,
            vae_tiling: Default::default(),
            loras: Vec::new(),
            lora_ignore_unmatched: false,
            memory_check: true,
            memory_limit: None,
        }
    }

    /// The same options with the memory check on or off, and at most `limit` bytes per request.
    pub fn with_memory_check(mut self, on: bool, limit: Option<u64>) -> Self {
        self.memory_check = on;
        self.memory_limit = limit;
        self
    }

    /// The same options with this VAE tiling.
    pub fn with_vae_tiling(
        mut self,
        tiling: crate::pipeline::vae_tiling::VaeTilingOptions,
    ) -> Self {
        self.vae_tiling = tiling;
        self
    }

    /// The same options with these kernel options.
    pub fn with_kernels(mut self, kernels: KernelOptions) -> Self {
        self.kernels = kernels;
        self
    }

    /// The same options with `threads` CPU worker threads (`None`: the physical cores).
    pub fn with_threads(mut self, threads: Option<usize>) -> Self {
        self.threads = threads;
        self
    }

    /// The same options quantizing at load with `spec` (and `recipe`'s per-layer bits).
    pub fn with_quantize(
        mut self,
        spec: Option<sdrs_quant::QuantSpec>,
        recipe: Option<Arc<crate::loading::quantize::Recipe>>,
    ) -> Self {
        self.quantize = spec;
        self.recipe = recipe;
        self
    }

    /// The same options merging `loras` (see [`Self::loras`]); `ignore_unmatched` merges what
    /// matches instead of refusing modules that match no layer.
    pub fn with_loras(
        mut self,
        loras: Vec<crate::loading::lora::LoraFile>,
        ignore_unmatched: bool,
    ) -> Self {
        self.loras = loras;
        self.lora_ignore_unmatched = ignore_unmatched;
        self
    }

    /// The pipeline's thread pool: `threads` workers (at most [`max_threads`]), or one per
    /// physical core.
    pub fn thread_pool(&self) -> Result<Arc<rayon::ThreadPool>> {
        let threads = match self.threads {
            Some(0) => {
                return Err(Error::InvalidParameter {
                    name: "threads",
                    value: "0".to_string(),
                    expected: "at least 1 (or none for the physical cores)".to_string(),
                })
            }
            Some(n) if n > max_threads() => {
                return Err(Error::InvalidParameter {
                    name: "threads",
                    value: n.to_string(),
                    expected: format!(
                        "at most {} (4 per logical CPU, {} here, and never above {MAX_THREADS}): \
                         more workers than that only slow the run down",
                        max_threads(),
                        num_cpus::get()
                    ),
                })
            }
            Some(n) => n,
            None => num_cpus::get_physical().max(1),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sdrs-worker-{i}"))
            .build()
            .map_err(|e| Error::InvalidParameter {
                name: "threads",
                value: threads.to_string(),
                expected: format!("a count the system can start threads for ({e})"),
            })?;
        Ok(Arc::new(pool))
    }
}

/// The hard ceiling on `threads` whatever the machine: starting a million threads takes minutes.
pub const MAX_THREADS: usize = 1024;

/// The most worker threads a pool may have here: 4 per logical CPU, at most [`MAX_THREADS`].
pub fn max_threads() -> usize {
    num_cpus::get().max(1).saturating_mul(4).min(MAX_THREADS)
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::new(Device::Cpu, DType::F32, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_one_million_is_refused_instead_of_hanging() {
        let options = LoadOptions::default().with_threads(Some(1_000_000));
        let message = options.thread_pool().err().unwrap().to_string();
        assert!(
            message.contains("1000000") && message.contains(&max_threads().to_string()),
            "{message}"
        );
        let fits = LoadOptions::default().with_threads(Some(max_threads()));
        assert_eq!(
            fits.thread_pool().unwrap().current_num_threads(),
            max_threads()
        );
    }
}
