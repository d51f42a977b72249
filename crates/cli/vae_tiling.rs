//! `--vae-tiling`, `--vae-tile-size`, `--vae-tile-overlap`: the flags of a tiled VAE decode and
//! encode, shared by `generate`, `bench` and `roundtrip`.

use std::sync::Arc;

use clap::Args;
use sdrs_pipeline::vae_tiling::{AutoTiling, TilingMode, VaeTilingOptions};
use sdrs_vae::{AutoencoderKLConfig, VaeTiling};

#[derive(Debug, Clone, Args)]
pub struct VaeTilingArgs {
    /// Decode (and, for image-to-image, encode) with the VAE in overlapping tiles, blended into
    /// each other as diffusers' `enable_tiling()` does: lower peak memory, small seams. Without
    /// it, tiling is chosen (with a message) only when the untiled pass would not fit in the
    /// memory available.
    #[arg(long = "vae-tiling")]
    pub vae_tiling: bool,

    /// The side of a VAE tile in pixels, a multiple of the VAE's scale factor (8); the latent
    /// tile is this over 8 (default: the VAE config's `sample_size`, 512 for SD1.5, 1024 for SDXL).
    #[arg(long = "vae-tile-size", value_name = "N")]
    pub vae_tile_size: Option<usize>,

    /// The fraction of a VAE tile that overlaps its neighbour, in [0, 1).
    #[arg(
        long = "vae-tile-overlap",
        value_name = "F",
        default_value_t = 0.25,
        value_parser = parse_overlap,
        allow_negative_numbers = true
    )]
    pub vae_tile_overlap: f64,
}

/// clap's parser for `--vae-tile-overlap`: a fraction in [0, 1).
pub fn parse_overlap(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "expected a fraction in [0, 1) such as 0.25, got {text:?}"
        )),
    }
}

impl VaeTilingArgs {
    /// The pipeline's tiling options: always with `--vae-tiling`, else automatic, with a line on
    /// stderr when the automatic choice tiles.
    pub fn options(&self) -> VaeTilingOptions {
        VaeTilingOptions {
            mode: if self.vae_tiling {
                TilingMode::On
            } else {
                TilingMode::Auto
            },
            tile_size: self.vae_tile_size,
            overlap: self.vae_tile_overlap,
            notice: Some(Arc::new(|chosen: &AutoTiling| {
                eprintln!("{}", notice_text(chosen))
            })),
        }
    }

    /// The tiles for a VAE of `config` when `--vae-tiling` is given (`roundtrip`, which has no
    /// automatic choice).
    pub fn tiles(&self, config: &AutoencoderKLConfig) -> anyhow::Result<Option<VaeTiling>> {
        if !self.vae_tiling {
            // Checked anyway, so that a bad value is never silently ignored.
            VaeTiling::for_tile_size(config, self.vae_tile_size, self.vae_tile_overlap)
                .map_err(with_flags)?;
            return Ok(None);
        }
        Ok(Some(
            VaeTiling::for_tile_size(config, self.vae_tile_size, self.vae_tile_overlap)
                .map_err(with_flags)?,
        ))
    }
}

fn with_flags(error: sdrs_vae::Error) -> anyhow::Error {
    anyhow::anyhow!("--vae-tile-size / --vae-tile-overlap: {error}")
}

fn gigabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// The one line printed when the automatic choice tiles a VAE pass.
pub fn notice_text(chosen: &AutoTiling) -> String {
    format!(
        "tiled VAE {}: the untiled pass needs about {:.2} GB, more than the {:.2} GB available; \
         using {}-pixel tiles with overlap {}",
        chosen.pass.name(),
        gigabytes(chosen.estimate_bytes),
        gigabytes(chosen.available_bytes),
        chosen.tiling.sample_size(),
        chosen.tiling.overlap()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use sdrs_pipeline::vae_tiling::VaePass;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tiling: VaeTilingArgs,
    }

    #[test]
    fn the_flags_resolve_to_tiling_options() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let options = cli.tiling.options();
        assert_eq!(options.mode, TilingMode::Auto);
        assert_eq!((options.tile_size, options.overlap), (None, 0.25));
        let cli = Cli::try_parse_from([
            "x",
            "--vae-tiling",
            "--vae-tile-size",
            "256",
            "--vae-tile-overlap",
            "0.5",
        ])
        .unwrap();
        let options = cli.tiling.options();
        assert_eq!(options.mode, TilingMode::On);
        assert_eq!((options.tile_size, options.overlap), (Some(256), 0.5));
    }

    #[test]
    fn an_overlap_outside_the_range_is_refused() {
        for bad in ["1", "-0.1", "half"] {
            let error = Cli::try_parse_from(["x", "--vae-tile-overlap", bad]).unwrap_err();
            assert!(error.to_string().contains("[0, 1)"), "{error}");
        }
    }

    #[test]
    fn roundtrip_tiles_only_with_the_flag_and_checks_the_size_anyway() {
        let config = AutoencoderKLConfig {
            block_out_channels: vec![32, 32, 64, 64],
            sample_size: 128,
            ..Default::default()
        };
        let cli = Cli::try_parse_from(["x", "--vae-tile-size", "64"]).unwrap();
        assert_eq!(cli.tiling.tiles(&config).unwrap(), None);
        let cli = Cli::try_parse_from(["x", "--vae-tile-size", "60"]).unwrap();
        let message = cli.tiling.tiles(&config).unwrap_err().to_string();
        assert!(
            message.contains("--vae-tile-size") && message.contains("60"),
            "{message}"
        );
        let cli = Cli::try_parse_from(["x", "--vae-tiling"]).unwrap();
        let tiles = cli.tiling.tiles(&config).unwrap().unwrap();
        assert_eq!((tiles.sample_size(), tiles.latent_size()), (128, 16));
    }

    #[test]
    fn the_notice_names_the_estimate_and_the_memory_available() {
        let text = notice_text(&AutoTiling {
            pass: VaePass::Decode,
            estimate_bytes: 4_300_000_000,
            available_bytes: 2_000_000_000,
            tiling: VaeTiling::new(1024, 128, 0.25).unwrap(),
        });
        assert!(
            text.contains("4.30 GB") && text.contains("2.00 GB"),
            "{text}"
        );
        assert!(
            text.contains("decode") && text.contains("1024-pixel"),
            "{text}"
        );
    }
}
