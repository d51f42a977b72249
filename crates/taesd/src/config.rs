//! `AutoencoderTinyConfig`: the `config.json` of diffusers' `AutoencoderTiny`
//! (`diffusers/models/autoencoders/autoencoder_tiny.py`), same key names and defaults.

use std::path::Path;

use sdrs_blocks::Activation;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::vae::UpsampleMode;

/// Configuration of a tiny autoencoder. Unknown JSON keys (such as `_class_name` or the
/// `block_out_channels` alias diffusers writes) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub act_fn: String,
    pub upsample_fn: String,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_magnitude: f64,
    pub latent_shift: f64,
    pub force_upcast: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64, 64, 64, 64],
            decoder_block_out_channels: vec![64, 64, 64, 64],
            act_fn: "relu".to_string(),
            upsample_fn: "nearest".to_string(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            force_upcast: false,
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }
}

impl AutoencoderTinyConfig {
    /// Reads and validates a diffusers `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = cfg.with_diffusers_overrides();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Diffusers quirk: `AutoencoderTiny.__init__` ends with `register_to_config(force_upcast=False)`,
    /// so whatever the file says, a loaded model reports `force_upcast = false`.
    pub fn with_diffusers_overrides(mut self) -> Self {
        self.force_upcast = false;
        self
    }

    /// Checks what diffusers checks at construction time, and what we need to build the model.
    pub fn validate(&self) -> Result<()> {
        if self.encoder_block_out_channels.len() != self.num_encoder_blocks.len() {
            return Err(Error::InvalidConfig {
                field: "encoder_block_out_channels",
                value: format!("{:?}", self.encoder_block_out_channels),
                reason: format!(
                    "must have the same length as num_encoder_blocks {:?}",
                    self.num_encoder_blocks
                ),
            });
        }
        if self.decoder_block_out_channels.len() != self.num_decoder_blocks.len() {
            return Err(Error::InvalidConfig {
                field: "decoder_block_out_channels",
                value: format!("{:?}", self.decoder_block_out_channels),
                reason: format!(
                    "must have the same length as num_decoder_blocks {:?}",
                    self.num_decoder_blocks
                ),
            });
        }
        let lists = [
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
            ),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
            ),
        ];
        for (field, list) in lists {
            if list.is_empty() || list.contains(&0) {
                return Err(Error::InvalidConfig {
                    field,
                    value: format!("{list:?}"),
                    reason: "must be a non-empty list of positive channel counts".to_string(),
                });
            }
        }
        let counts = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("upsampling_scaling_factor", self.upsampling_scaling_factor),
        ];
        for (field, value) in counts {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    value: value.to_string(),
                    reason: "must be positive".to_string(),
                });
            }
        }
        if self.latent_magnitude == 0.0 || !self.latent_magnitude.is_finite() {
            return Err(Error::InvalidConfig {
                field: "latent_magnitude",
                value: self.latent_magnitude.to_string(),
                reason: "must be finite and non-zero".to_string(),
            });
        }
        self.activation()?;
        self.upsample_mode()?;
        Ok(())
    }

    /// The parsed `act_fn` (any case, as diffusers' `get_activation` lower-cases it).
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_config("act_fn", &self.act_fn).map_err(|_| Error::UnsupportedActivation {
            act_fn: self.act_fn.clone(),
            accepted: Activation::ACCEPTED,
        })
    }

    pub fn upsample_mode(&self) -> Result<UpsampleMode> {
        UpsampleMode::from_name(&self.upsample_fn)
    }

    /// How many times the encoder halves the resolution (one stride-2 conv per stage after the first).
    pub fn encoder_downsampling_factor(&self) -> usize {
        1usize << self.num_encoder_blocks.len().saturating_sub(1)
    }

    /// How many times the decoder enlarges the resolution (one upsample per stage but the last).
    pub fn decoder_upsampling_factor(&self) -> usize {
        self.upsampling_scaling_factor
            .saturating_pow(self.num_decoder_blocks.len().saturating_sub(1) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_diffusers() {
        let cfg: AutoencoderTinyConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, AutoencoderTinyConfig::default());
        assert_eq!(cfg.num_encoder_blocks, vec![1, 3, 3, 3]);
        assert_eq!(cfg.num_decoder_blocks, vec![3, 3, 3, 1]);
        assert_eq!(cfg.latent_magnitude, 3.0);
        assert_eq!(cfg.latent_shift, 0.5);
        assert_eq!(cfg.encoder_downsampling_factor(), 8);
        assert_eq!(cfg.decoder_upsampling_factor(), 8);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_ignored_and_force_upcast_is_overridden() {
        let json = r#"{"_class_name": "AutoencoderTiny", "block_out_channels": [64, 64],
            "latent_channels": 16, "force_upcast": true, "something_new": {"a": 1}}"#;
        let cfg: AutoencoderTinyConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.latent_channels, 16);
        assert!(cfg.force_upcast);
        assert!(!cfg.with_diffusers_overrides().force_upcast);
    }

    #[test]
    fn length_mismatch_is_rejected() {
        let cfg = AutoencoderTinyConfig {
            num_encoder_blocks: vec![1, 3],
            ..Default::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(Error::InvalidConfig {
                field: "encoder_block_out_channels",
                ..
            })
        ));
        let cfg = AutoencoderTinyConfig {
            act_fn: "tanh".to_string(),
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(matches!(err, Error::UnsupportedActivation { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("\"tanh\"") && message.contains("relu"),
            "{message}"
        );
        let cfg = AutoencoderTinyConfig {
            upsample_fn: "bicubic".to_string(),
            ..Default::default()
        };
        let message = cfg.validate().unwrap_err().to_string();
        assert!(
            message.contains("bicubic") && message.contains("nearest"),
            "{message}"
        );
    }

    #[test]
    fn act_fn_is_read_in_any_case_like_get_activation() {
        let cfg = AutoencoderTinyConfig {
            act_fn: "ReLU".to_string(),
            ..Default::default()
        };
        assert_eq!(cfg.activation().unwrap(), Activation::Relu);
    }
}
