//! `AutoencoderTiny` (diffusers `models/autoencoders/autoencoder_tiny.py`): TAESD-family
//! encoder and decoder with diffusers' conventions (images in [-1, 1] at the API).

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;

use crate::config::AutoencoderTinyConfig;
use crate::error::{Error, Half, Result};
use crate::vae::{DecoderTiny, EncoderTiny};

/// Which published tiny autoencoder the weights look like, judged from latent channels and
/// the presence of TAEF2's pooled blocks (never from file names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVariant {
    /// 4 latent channels: TAESD (SD 1.x/2.x) or TAESDXL, which share one architecture.
    Taesd,
    /// 16 latent channels: TAEF1 (FLUX.1) or TAESD3, which share one architecture.
    Taef1,
    /// 32 latent channels with pooled group-norm blocks: TAEF2 (FLUX.2).
    Taef2,
    Other {
        latent_channels: usize,
        pooled_blocks: usize,
    },
}

impl std::fmt::Display for TinyVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Taesd => f.write_str("TAESD/TAESDXL (4 latent channels)"),
            Self::Taef1 => f.write_str("TAEF1/TAESD3 (16 latent channels)"),
            Self::Taef2 => f.write_str("TAEF2 (32 latent channels, pooled group-norm blocks)"),
            Self::Other {
                latent_channels,
                pooled_blocks,
            } => write!(
                f,
                "tiny autoencoder with {latent_channels} latent channels and {pooled_blocks} pooled blocks"
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    encoder: Option<EncoderTiny>,
    decoder: Option<DecoderTiny>,
    config: AutoencoderTinyConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderTiny {
    /// Both halves, from the diffusers keys `encoder.layers.*` and `decoder.layers.*`.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        Self::with_halves(vb, cfg, true, true)
    }

    /// Like [`AutoencoderTiny::new`], building only the halves asked for (at least one), so
    /// that a decoder alone can serve previews.
    pub fn with_halves(
        vb: VarBuilder,
        cfg: &AutoencoderTinyConfig,
        encoder: bool,
        decoder: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        if !encoder && !decoder {
            return Err(Error::NoHalves);
        }
        let encoder = if encoder {
            Some(EncoderTiny::new(vb.pp("encoder"), cfg)?)
        } else {
            None
        };
        let decoder = if decoder {
            Some(DecoderTiny::new(vb.pp("decoder"), cfg)?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderTinyConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    pub fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }

    /// Blocks with TAEF2's pooled group-norm branch, over the halves that are loaded.
    pub fn pooled_blocks(&self) -> usize {
        self.encoder.as_ref().map_or(0, |e| e.pooled_blocks())
            + self.decoder.as_ref().map_or(0, |d| d.pooled_blocks())
    }

    pub fn variant(&self) -> TinyVariant {
        match (self.config.latent_channels, self.pooled_blocks()) {
            (4, 0) => TinyVariant::Taesd,
            (16, 0) => TinyVariant::Taef1,
            (32, p) if p > 0 => TinyVariant::Taef2,
            (latent_channels, pooled_blocks) => TinyVariant::Other {
                latent_channels,
                pooled_blocks,
            },
        }
    }

    fn encoder(&self) -> Result<&EncoderTiny> {
        self.encoder.as_ref().ok_or(Error::MissingHalf {
            half: Half::Encoder,
            action: "encode images",
        })
    }

    fn decoder(&self) -> Result<&DecoderTiny> {
        self.decoder.as_ref().ok_or(Error::MissingHalf {
            half: Half::Decoder,
            action: "decode latents",
        })
    }

    fn check_input(&self, xs: &Tensor, what: &'static str, channels: usize) -> Result<()> {
        match xs.dims() {
            &[_, c, h, w] if c == channels && h > 0 && w > 0 => Ok(()),
            dims => Err(Error::InputShape {
                what,
                expected: format!("[batch, {channels}, height, width]"),
                found: dims.to_vec(),
            }),
        }
    }

    /// Image in [-1, 1] (NCHW) -> raw latents, as diffusers' `AutoencoderTiny.encode(x).latents`.
    /// The input is cast to the model's dtype.
    #[tracing::instrument(level = "info", name = "taesd.encode", skip_all)]
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        self.check_input(image, "image to encode", self.config.in_channels)?;
        self.encoder()?.forward(image)
    }

    /// Raw latents -> image in [-1, 1] (not clamped), as diffusers' `AutoencoderTiny.decode(z).sample`.
    #[tracing::instrument(level = "info", name = "taesd.decode", skip_all)]
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents, "latents to decode", self.config.latent_channels)?;
        self.decoder()?.forward(latents)
    }

    /// The original TAESD convention: image in [0, 1] -> latents.
    #[tracing::instrument(level = "info", name = "taesd.encode", skip_all)]
    pub fn encode_unit(&self, image: &Tensor) -> Result<Tensor> {
        self.check_input(image, "image to encode", self.config.in_channels)?;
        self.encoder()?.forward_unit(image)
    }

    /// The original TAESD convention: latents -> image in [0, 1] (not clamped).
    #[tracing::instrument(level = "info", name = "taesd.decode", skip_all)]
    pub fn decode_unit(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents, "latents to decode", self.config.latent_channels)?;
        self.decoder()?.forward_unit(latents)
    }

    /// Raw latents -> [0, 1] (for storing latents as 8-bit images), as diffusers' `scale_latents`.
    pub fn scale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled =
            ((latents / (2.0 * self.config.latent_magnitude))? + self.config.latent_shift)?;
        Ok(scaled.clamp(0.0, 1.0)?)
    }

    /// [0, 1] -> raw latents, as diffusers' `unscale_latents`.
    pub fn unscale_latents(&self, scaled: &Tensor) -> Result<Tensor> {
        Ok(((scaled - self.config.latent_shift)? * (2.0 * self.config.latent_magnitude))?)
    }
}
