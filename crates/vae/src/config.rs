//! `AutoencoderKLConfig`: the `vae/config.json` of diffusers' `AutoencoderKL` (follows
//! `models/autoencoders/autoencoder_kl.py`, `AutoencoderKL.__init__`).

use std::fmt::Debug;
use std::path::Path;

use sdrs_blocks::Activation;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The VAE's configuration. Field names and defaults are `AutoencoderKL.__init__`'s; keys we do
/// not use (`_class_name`, `_diffusers_version`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Image size the VAE was trained at.
    pub sample_size: usize,
    /// Latents given to the UNet are `(z - shift_factor) * scaling_factor` (applied by the
    /// pipeline, not by [`crate::AutoencoderKL`]).
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    /// Per-channel statistics some VAEs normalise latents with instead of `shift_factor`.
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// The VAE overflows in float16: diffusers runs it in float32 when the model is float16.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string()],
            up_block_types: vec!["UpDecoderBlock2D".to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

fn unsupported(key: &str, value: impl Debug, accepted: &str) -> Error {
    Error::Unsupported {
        key: key.to_string(),
        value: format!("{value:?}"),
        accepted: accepted.to_string(),
    }
}

impl AutoencoderKLConfig {
    /// Reads a `vae/config.json`. The values are checked by [`Self::check_supported`], which
    /// `AutoencoderKL::new` also calls.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // serde reads a struct from a JSON array too (field by field), which would turn a
        // mangled config into a confusing shape mismatch later.
        if !text.trim_start().starts_with('{') {
            return Err(Error::Json {
                path: path.to_path_buf(),
                source: serde::de::Error::custom("the config is not a JSON object ({...})"),
            });
        }
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Rejects options this implementation does not reproduce and lists whose lengths do not
    /// match.
    pub fn check_supported(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::InvalidConfig {
                key: "block_out_channels".to_string(),
                value: "[]".to_string(),
                expected: "at least one block".to_string(),
            });
        }
        for (key, types, accepted) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(Error::InvalidConfig {
                    key: key.to_string(),
                    value: format!("{types:?}"),
                    expected: format!(
                        "as many blocks as block_out_channels {:?}",
                        self.block_out_channels
                    ),
                });
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != accepted) {
                return Err(unsupported(key, other, accepted));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            // Latents are divided by it before decoding: 0 gives infinities, a blank image.
            return Err(Error::InvalidConfig {
                key: "scaling_factor".to_string(),
                value: self.scaling_factor.to_string(),
                expected: "a positive finite number (0.18215 for SD1.x, 0.13025 for SDXL)"
                    .to_string(),
            });
        }
        self.activation()?;
        for (key, stats) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(stats) = stats {
                if stats.len() != self.latent_channels {
                    return Err(Error::InvalidConfig {
                        key: key.to_string(),
                        value: format!("{stats:?}"),
                        expected: format!(
                            "one value per latent channel ({})",
                            self.latent_channels
                        ),
                    });
                }
            }
        }
        if self.latents_mean.is_some() != self.latents_std.is_some() {
            return Err(Error::InvalidConfig {
                key: "latents_mean / latents_std".to_string(),
                value: format!("{:?} / {:?}", self.latents_mean, self.latents_std),
                expected: "both or neither".to_string(),
            });
        }
        Ok(())
    }

    /// The parsed `act_fn`.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_config("act_fn", &self.act_fn).map_err(|err| match err {
            sdrs_blocks::Error::Unsupported {
                key,
                value,
                accepted,
            } => Error::Unsupported {
                key,
                value,
                accepted,
            },
            other => other.into(),
        })
    }

    /// How many times smaller the latents are than the images: `2^(blocks - 1)` (saturating).
    pub fn downsample_factor(&self) -> usize {
        let downsamplers = self.block_out_channels.len().saturating_sub(1);
        u32::try_from(downsamplers)
            .ok()
            .and_then(|n| 1usize.checked_shl(n))
            .unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults() {
        let cfg: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, AutoencoderKLConfig::default());
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert!(cfg.force_upcast);
        cfg.check_supported().unwrap();
        assert_eq!(cfg.downsample_factor(), 1);
    }

    #[test]
    fn sd_vae_config_reads() {
        let cfg: AutoencoderKLConfig = serde_json::from_str(
            r#"{"block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                     "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                                   "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "layers_per_block": 2, "scaling_factor": 0.13025, "some_new_key": 1}"#,
        )
        .unwrap();
        cfg.check_supported().unwrap();
        assert_eq!(cfg.downsample_factor(), 8);
        assert_eq!(cfg.scaling_factor, 0.13025);
    }

    #[test]
    fn unsupported_values_name_the_key() {
        let cfg: AutoencoderKLConfig =
            serde_json::from_str(r#"{"down_block_types": ["DownEncoderBlock2DWithAttn"]}"#)
                .unwrap();
        match cfg.check_supported() {
            Err(Error::Unsupported { key, .. }) => assert_eq!(key, "down_block_types"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let cfg: AutoencoderKLConfig =
            serde_json::from_str(r#"{"latents_mean": [0.0, 0.1, 0.2, 0.3]}"#).unwrap();
        assert!(matches!(
            cfg.check_supported(),
            Err(Error::InvalidConfig { .. })
        ));
    }

    #[test]
    fn scaling_factor_zero_is_refused_not_decoded_to_a_blank_image() {
        for value in ["0", "-0.18215"] {
            let cfg: AutoencoderKLConfig =
                serde_json::from_str(&format!(r#"{{"scaling_factor": {value}}}"#)).unwrap();
            match cfg.check_supported() {
                Err(Error::InvalidConfig { key, .. }) => assert_eq!(key, "scaling_factor"),
                other => panic!("expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
