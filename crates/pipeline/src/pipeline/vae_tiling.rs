//! When the pipeline's VAE decodes and encodes in tiles (`sdrs_vae::VaeTiling`, diffusers'
//! `enable_tiling()`): never, always, or only when the untiled pass would not fit in the memory
//! available, judged from an estimate of its peak activations.

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device};
use sdrs_vae::{AutoencoderKLConfig, VaeTiling};

use crate::error::{Error, Result};

/// Which way the VAE runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaePass {
    /// Latents to pixels.
    Decode,
    /// Pixels to latents (image-to-image).
    Encode,
}

impl VaePass {
    pub fn name(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Encode => "encode",
        }
    }
}

/// What an automatic choice of tiling saw: the untiled pass's estimated peak, more than the
/// memory available.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoTiling {
    pub pass: VaePass,
    /// The estimated peak of the untiled pass's activations, in bytes.
    pub estimate_bytes: u64,
    /// The memory available when it was about to run, in bytes.
    pub available_bytes: u64,
    /// The tiles used instead.
    pub tiling: VaeTiling,
}

/// Told when the pipeline tiles a pass on its own.
pub type TilingNotice = Arc<dyn Fn(&AutoTiling) + Send + Sync>;

/// Whether tiling is used: [`TilingMode::Auto`] by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TilingMode {
    /// Never tile (the whole image in one pass, whatever the memory).
    Off,
    /// Tile every input larger than a tile.
    On,
    /// Tile only when the untiled pass's estimated peak exceeds the memory available (where this
    /// platform reports it; elsewhere never).
    #[default]
    Auto,
}

/// How the VAE is tiled, as a user asks for it: the mode, the tile side in pixels and the
/// overlap; resolved against the VAE's config at load ([`Self::resolve`]).
#[derive(Clone)]
pub struct VaeTilingOptions {
    pub mode: TilingMode,
    /// The tile side in pixels, a multiple of the VAE's scale factor (latent tiles are this over
    /// the factor); `None`: the config's `sample_size`, as diffusers.
    pub tile_size: Option<usize>,
    /// The fraction of a tile that overlaps its neighbour, in `[0, 1)`; diffusers' 0.25.
    pub overlap: f64,
    /// Called when [`TilingMode::Auto`] tiles a pass.
    pub notice: Option<TilingNotice>,
}

impl Default for VaeTilingOptions {
    fn default() -> Self {
        Self {
            mode: TilingMode::Auto,
            tile_size: None,
            overlap: 0.25,
            notice: None,
        }
    }
}

impl fmt::Debug for VaeTilingOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaeTilingOptions")
            .field("mode", &self.mode)
            .field("tile_size", &self.tile_size)
            .field("overlap", &self.overlap)
            .field("notice", &self.notice.is_some())
            .finish()
    }
}

impl VaeTilingOptions {
    /// The policy for the VAE of `config`; a tile size or overlap out of range is an error even
    /// with tiling off, so that a bad value is never silently ignored.
    pub fn resolve(&self, config: &AutoencoderKLConfig) -> Result<VaeTilingPolicy> {
        let tiling = match VaeTiling::for_tile_size(config, self.tile_size, self.overlap) {
            Ok(tiling) => tiling,
            // A config whose own `sample_size` cannot be a tile, and nothing asked for: no
            // automatic tiling rather than a model that does not load.
            Err(sdrs_vae::Error::InvalidParameter {
                name: "tile size", ..
            }) if self.tile_size.is_none() && self.mode == TilingMode::Auto => {
                return Ok(VaeTilingPolicy::Off)
            }
            Err(sdrs_vae::Error::InvalidParameter {
                name,
                value,
                expected,
            }) => {
                return Err(Error::InvalidParameter {
                    name: match name {
                        "tile overlap" => "VAE tile overlap",
                        _ => "VAE tile size",
                    },
                    value,
                    expected,
                })
            }
            Err(other) => return Err(other.into()),
        };
        Ok(match self.mode {
            TilingMode::Off => VaeTilingPolicy::Off,
            TilingMode::On => VaeTilingPolicy::Always(tiling),
            TilingMode::Auto => VaeTilingPolicy::WhenNeeded {
                tiling,
                notice: self.notice.clone(),
            },
        })
    }
}

/// The tiling a VAE runs with, resolved.
#[derive(Clone, Default)]
pub enum VaeTilingPolicy {
    /// Never tile.
    #[default]
    Off,
    /// Tile every input larger than a tile (diffusers' `enable_tiling()`).
    Always(VaeTiling),
    /// Tile when [`auto_tiling`] says the untiled pass would not fit; `notice` is told.
    WhenNeeded {
        tiling: VaeTiling,
        notice: Option<TilingNotice>,
    },
}

impl fmt::Debug for VaeTilingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => write!(f, "Off"),
            Self::Always(tiling) => f.debug_tuple("Always").field(tiling).finish(),
            Self::WhenNeeded { tiling, notice } => f
                .debug_struct("WhenNeeded")
                .field("tiling", tiling)
                .field("notice", &notice.is_some())
                .finish(),
        }
    }
}

impl VaeTilingPolicy {
    /// The tiles for a `pass` over `batch` images of `height` x `width` pixels computed in
    /// `activations` on `device`, or `None` for one untiled pass. An automatic choice is told to
    /// the notice (and traced).
    pub(crate) fn tiles_for(
        &self,
        config: &AutoencoderKLConfig,
        pass: VaePass,
        (batch, height, width): (usize, usize, usize),
        activations: DType,
        device: &Device,
    ) -> Option<VaeTiling> {
        match self {
            Self::Off => None,
            Self::Always(tiling) => Some(*tiling),
            Self::WhenNeeded { tiling, notice } => {
                let estimate = untiled_peak_bytes(config, pass, batch, height, width, activations);
                let chosen = auto_tiling(pass, estimate, memory_available(device), *tiling)?;
                tracing::info!(
                    pass = pass.name(),
                    estimate_bytes = chosen.estimate_bytes,
                    available_bytes = chosen.available_bytes,
                    "tiled VAE: the untiled pass would not fit"
                );
                if let Some(notice) = notice {
                    notice(&chosen);
                }
                Some(chosen.tiling)
            }
        }
    }
}

impl VaeTilingPolicy {
    /// The estimated peak of a `pass` over `batch` images of `height` x `width` pixels as this
    /// policy will run it with `available_bytes` free, and whether it is tiled: the untiled
    /// pass's [`untiled_peak_bytes`], or one tile's plus the whole image it is blended into (the
    /// output of a decode, the input of an encode, three f32 channels) when tiled.
    pub fn peak_bytes(
        &self,
        config: &AutoencoderKLConfig,
        pass: VaePass,
        (batch, height, width): (usize, usize, usize),
        activations: DType,
        available_bytes: Option<u64>,
    ) -> (u64, bool) {
        let untiled = untiled_peak_bytes(config, pass, batch, height, width, activations);
        let tiled = |tiling: &VaeTiling| {
            let side = tiling.sample_size();
            let image = 3u64
                .saturating_mul(batch as u64)
                .saturating_mul(height as u64)
                .saturating_mul(width as u64)
                .saturating_mul(4);
            untiled_peak_bytes(config, pass, batch, side, side, activations)
                .min(untiled)
                .saturating_add(image)
        };
        match self {
            Self::Off => (untiled, false),
            Self::Always(tiling) => (tiled(tiling), true),
            Self::WhenNeeded { tiling, .. } => {
                match auto_tiling(pass, untiled, available_bytes, *tiling) {
                    Some(_) => (tiled(tiling), true),
                    None => (untiled, false),
                }
            }
        }
    }
}

/// How many full-resolution activations of the widest stage are alive at once at the peak of an
/// untiled pass: a resnet's input, its normalised input and its convolution's output, and the
/// block's upsampled input. Measured: SDXL's decode at 1024x1024 in f32 grows the RSS by 4.3 GB,
/// four buffers of 256 channels x 1024 x 1024 x 4 bytes (the README's memory section).
const PEAK_BUFFERS: u64 = 4;

/// The estimated peak of the untiled `pass`'s activations for `batch` images of `height` x
/// `width` pixels in `dtype`: [`PEAK_BUFFERS`] buffers of the widest stage at full resolution. A
/// decode's widest full-resolution stage is the upsampler into it, which keeps the second
/// block's channels (256 for SD and SDXL: `block_out_channels[1]`); an encode's is its first block
/// (`block_out_channels[0]`).
pub fn untiled_peak_bytes(
    config: &AutoencoderKLConfig,
    pass: VaePass,
    batch: usize,
    height: usize,
    width: usize,
    dtype: DType,
) -> u64 {
    let channels = &config.block_out_channels;
    let first = channels.first().copied().unwrap_or(0);
    let widest = match pass {
        VaePass::Decode => first.max(channels.get(1).copied().unwrap_or(first)),
        VaePass::Encode => first,
    };
    PEAK_BUFFERS
        .saturating_mul(batch as u64)
        .saturating_mul(widest as u64)
        .saturating_mul(height as u64)
        .saturating_mul(width as u64)
        .saturating_mul(dtype.size_in_bytes() as u64)
}

/// The rule of [`TilingMode::Auto`]: tile when the estimate exceeds the memory available; no
/// reading of the memory, no automatic tiling.
pub fn auto_tiling(
    pass: VaePass,
    estimate_bytes: u64,
    available_bytes: Option<u64>,
    tiling: VaeTiling,
) -> Option<AutoTiling> {
    let available_bytes = available_bytes?;
    (estimate_bytes > available_bytes).then_some(AutoTiling {
        pass,
        estimate_bytes,
        available_bytes,
        tiling,
    })
}

/// The memory a pass on `device` can still take, in bytes: the GPU's free memory on CUDA, Linux's
/// `MemAvailable` on the CPU; `None` where neither is known (Metal, other systems).
pub fn memory_available(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_available(&text)),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        _ => None,
    }
}

/// `MemAvailable:  123456 kB` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let mut fields = line.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_config() -> AutoencoderKLConfig {
        AutoencoderKLConfig {
            block_out_channels: vec![128, 256, 512, 512],
            sample_size: 512,
            ..Default::default()
        }
    }

    #[test]
    fn the_estimate_is_four_buffers_of_the_widest_full_resolution_stage() {
        let config = sd_config();
        let decode = untiled_peak_bytes(&config, VaePass::Decode, 1, 1024, 1024, DType::F32);
        assert_eq!(decode, 4 * 256 * 1024 * 1024 * 4);
        let encode = untiled_peak_bytes(&config, VaePass::Encode, 2, 512, 512, DType::BF16);
        assert_eq!(encode, 4 * 2 * 128 * 512 * 512 * 2);
        let single = AutoencoderKLConfig::default();
        assert_eq!(
            untiled_peak_bytes(&single, VaePass::Decode, 1, 8, 8, DType::F32),
            4 * 64 * 8 * 8 * 4
        );
    }

    #[test]
    fn auto_tiles_only_when_the_estimate_exceeds_what_is_available() {
        let tiling = VaeTiling::new(512, 64, 0.25).unwrap();
        let chosen = auto_tiling(VaePass::Decode, 5_000, Some(4_000), tiling).unwrap();
        assert_eq!(
            (chosen.estimate_bytes, chosen.available_bytes),
            (5_000, 4_000)
        );
        assert_eq!(chosen.tiling, tiling);
        assert!(auto_tiling(VaePass::Decode, 4_000, Some(4_000), tiling).is_none());
        assert!(auto_tiling(VaePass::Decode, 5_000, None, tiling).is_none());
    }

    #[test]
    fn the_policy_tiles_as_its_mode_says() {
        let config = sd_config();
        let resolve = |mode| {
            VaeTilingOptions {
                mode,
                ..Default::default()
            }
            .resolve(&config)
            .unwrap()
        };
        let shape = (1, 1024, 1024);
        let device = Device::Cpu;
        let tiles = |policy: &VaeTilingPolicy| {
            policy.tiles_for(&config, VaePass::Decode, shape, DType::F32, &device)
        };
        assert_eq!(tiles(&resolve(TilingMode::Off)), None);
        let always = tiles(&resolve(TilingMode::On)).unwrap();
        assert_eq!((always.sample_size(), always.latent_size()), (512, 64));
        // An estimate no machine has room for is tiled and told, where the memory is known.
        let told = Arc::new(std::sync::Mutex::new(None));
        let seen = told.clone();
        let policy = VaeTilingOptions {
            notice: Some(Arc::new(move |chosen: &AutoTiling| {
                *seen.lock().unwrap() = Some(*chosen)
            })),
            ..Default::default()
        }
        .resolve(&config)
        .unwrap();
        let huge = (1 << 20, 1 << 12, 1 << 12);
        let tiled = policy.tiles_for(&config, VaePass::Decode, huge, DType::F32, &device);
        let told = *told.lock().unwrap();
        assert_eq!(tiled.is_some(), memory_available(&device).is_some());
        assert_eq!(told.map(|t| t.pass), tiled.map(|_| VaePass::Decode));
        // A small image is never tiled automatically.
        let small = (1, 64, 64);
        assert!(policy
            .tiles_for(&config, VaePass::Decode, small, DType::F32, &device)
            .is_none());
    }

    #[test]
    fn bad_tile_settings_are_refused_even_with_tiling_off() {
        let config = sd_config();
        let options = VaeTilingOptions {
            mode: TilingMode::Off,
            tile_size: Some(100),
            ..Default::default()
        };
        let message = options.resolve(&config).unwrap_err().to_string();
        assert!(
            message.contains("VAE tile size 100") && message.contains("multiple of 8"),
            "{message}"
        );
        let options = VaeTilingOptions {
            overlap: 1.5,
            ..Default::default()
        };
        let message = options.resolve(&config).unwrap_err().to_string();
        assert!(message.contains("VAE tile overlap 1.5"), "{message}");
    }

    #[test]
    fn a_config_without_a_usable_default_tile_is_not_tiled_automatically() {
        let config = AutoencoderKLConfig {
            block_out_channels: vec![128, 256, 512, 512],
            sample_size: 100,
            ..Default::default()
        };
        let auto = VaeTilingOptions::default().resolve(&config).unwrap();
        assert!(matches!(auto, VaeTilingPolicy::Off), "{auto:?}");
        let on = VaeTilingOptions {
            mode: TilingMode::On,
            ..Default::default()
        };
        let message = on.resolve(&config).unwrap_err().to_string();
        assert!(message.contains("VAE tile size 100"), "{message}");
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots\n"), None);
    }
}
