//! `ClipTextConfig`: the `config.json` of transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection` (follows `models/clip/configuration_clip.py`, `CLIPTextConfig`).

use std::path::Path;

use serde::Deserialize;

use crate::activations::Activation;
use crate::error::{Error, Result};

/// The text encoder's configuration. Field names and defaults are `CLIPTextConfig`'s; keys we do
/// not use (`architectures`, `dtype`, `initializer_range`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Output size of `text_projection` (only `CLIPTextModelWithProjection` has one).
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The longest `input_ids` the position embedding covers.
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP), `gelu` (exact, OpenCLIP ViT-bigG), ...: see [`Activation`].
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// Chooses how the pooled token is found; see [`crate::pooled_positions`].
    pub eos_token_id: Option<u32>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

impl ClipTextConfig {
    /// Reads a `text_encoder/config.json` (or `text_encoder_2/config.json`) and checks it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The parsed `hidden_act`.
    pub fn activation(&self) -> Result<Activation> {
        self.hidden_act.parse()
    }

    /// Rejects configs that cannot describe a working model, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        self.activation()?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    name,
                    value: value.to_string(),
                    expected: "must be positive".to_string(),
                });
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::InvalidConfig {
                name: "hidden_size",
                value: self.hidden_size.to_string(),
                expected: format!(
                    "must be divisible by num_attention_heads ({})",
                    self.num_attention_heads
                ),
            });
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(Error::InvalidConfig {
                name: "layer_norm_eps",
                value: self.layer_norm_eps.to_string(),
                expected: "must be a finite, non-negative number".to_string(),
            });
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_transformers_defaults_and_unknown_keys_are_ignored() {
        let config: ClipTextConfig =
            serde_json::from_str(r#"{"hidden_size": 768, "architectures": ["CLIPTextModel"]}"#)
                .unwrap();
        assert_eq!(config.hidden_size, 768);
        assert_eq!(config.num_hidden_layers, 12);
        assert_eq!(config.hidden_act, "quick_gelu");
        assert_eq!(config.eos_token_id, Some(49407));
        assert_eq!(config.pad_token_id, Some(1));
    }

    #[test]
    fn unknown_activation_is_named() {
        let config = ClipTextConfig {
            hidden_act: "mish".into(),
            ..Default::default()
        };
        let err = config.validate().unwrap_err();
        match &err {
            Error::UnsupportedActivation { found, accepted } => {
                assert_eq!(found, "mish");
                assert!(accepted.contains("quick_gelu"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn heads_must_divide_hidden_size() {
        let config = ClipTextConfig {
            hidden_size: 30,
            num_attention_heads: 4,
            ..Default::default()
        };
        assert!(matches!(
            config.validate(),
            Err(Error::InvalidConfig {
                name: "hidden_size",
                ..
            })
        ));
        let config = ClipTextConfig {
            num_attention_heads: 0,
            ..Default::default()
        };
        assert!(config.validate().is_err());
    }
}
