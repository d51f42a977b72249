//! `AutoencoderKL` of diffusers' `models/autoencoders/autoencoder_kl.py` and the
//! `DiagonalGaussianDistribution` of `models/autoencoders/vae.py`.

use candle_core::Tensor;
use sdrs_blocks::Conv2d;
use sdrs_kernels::VarBuilder;

use crate::config::AutoencoderKLConfig;
use crate::error::{Error, Result};
use crate::tiling::{run_tiled, VaeTiling};
use crate::vae::{Decoder, Encoder};

/// The latent distribution the encoder predicts: a diagonal Gaussian per latent pixel.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `[B, latent_channels, h, w]`.
    pub mean: Tensor,
    /// Log-variance, already clamped to `[-30, 20]` as diffusers stores it.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the `[B, 2 * C, h, w]` moments into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let channels = match *moments.dims() {
            [_, c, _, _] if c >= 2 && c % 2 == 0 => c / 2,
            _ => {
                return Err(Error::InputShape {
                    input: "moments",
                    found: moments.dims().to_vec(),
                    expected: "[batch, 2 * latent_channels, height, width]".to_string(),
                })
            }
        };
        let mean = moments.narrow(1, 0, channels)?.contiguous()?;
        let logvar = moments.narrow(1, channels, channels)?.contiguous()?;
        // diffusers clamps the log-variance so that `exp` neither overflows nor underflows.
        let logvar = logvar.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// `mean + std * noise`; the caller draws `noise` (shape of `mean`) with the torch-compatible
    /// generator so that seeds reproduce diffusers.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::InputShape {
                input: "noise",
                found: noise.dims().to_vec(),
                expected: format!("the latent mean's shape {:?}", self.mean.dims()),
            });
        }
        let noise = noise
            .to_device(self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }

    /// The distribution's mode (its mean), what `latent_dist.mode()` gives.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// The KL-regularised autoencoder of Stable Diffusion: images to latents and back.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Builds the model; `vb` is at the root of `vae/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.check_supported()?;
        let encoder = Encoder::new(vb.pp("encoder"), cfg)?;
        let decoder = Decoder::new(vb.pp("decoder"), cfg)?;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), moments, moments, 1, 1, 0)?)
        } else {
            None
        };
        let latent = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(
                vb.pp("post_quant_conv"),
                latent,
                latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// `[B, C, H, W]` with `C` = `channels` and `H`, `W` positive, or an input-shape error.
    fn check_input(
        &self,
        input: &'static str,
        xs: &Tensor,
        channels: usize,
        what: &str,
    ) -> Result<()> {
        match *xs.dims() {
            [_, c, h, w] if c == channels && h > 0 && w > 0 => Ok(()),
            _ => Err(Error::InputShape {
                input,
                found: xs.dims().to_vec(),
                expected: format!("[batch, {channels}, height, width] ({what})"),
            }),
        }
    }

    /// Image `[B, in_channels, H, W]` in `[-1, 1]` -> the latent distribution (no scaling or
    /// shift applied). Sizes that are not a multiple of the downsampling factor shrink as in
    /// diffusers: each downsampler maps `n` to `(n - 2) / 2 + 1`.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        self.check_input(
            "image",
            image,
            self.config.in_channels,
            "an image in [-1, 1]",
        )?;
        DiagonalGaussian::from_moments(&self.moments(image)?)
    }

    /// The encoder and `quant_conv`: image -> `[B, 2 * latent_channels, h, w]` moments.
    fn moments(&self, image: &Tensor) -> Result<Tensor> {
        let h = self.encoder.forward(image)?;
        Ok(match &self.quant_conv {
            Some(conv) => conv.forward(&h)?,
            None => h,
        })
    }

    /// [`Self::encode`] as diffusers' `encode` after `enable_tiling()`: an image wider or taller
    /// than `tiling.sample_size()` is encoded in overlapping tiles whose moments are blended
    /// (see [`crate::tiling`]); a smaller one exactly as [`Self::encode`].
    pub fn encode_tiled(&self, image: &Tensor, tiling: &VaeTiling) -> Result<DiagonalGaussian> {
        self.check_input(
            "image",
            image,
            self.config.in_channels,
            "an image in [-1, 1]",
        )?;
        let (_, _, height, width) = image.dims4()?;
        if !tiling.tiles_encode(height, width) {
            return self.encode(image);
        }
        let plan = tiling.encode_plan(height, width);
        let moments = run_tiled(image, &plan, |tile| self.moments(tile))?;
        DiagonalGaussian::from_moments(&moments)
    }

    /// Latents `[B, latent_channels, h, w]` (unscaled) -> image `[B, out_channels, h * f, w * f]`
    /// in about `[-1, 1]` (not clamped).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let channels = self.config.latent_channels;
        self.check_input("latents", latents, channels, "unscaled latents")?;
        self.decode_unchecked(latents)
    }

    /// `post_quant_conv` and the decoder.
    fn decode_unchecked(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }

    /// [`Self::decode`] as diffusers' `decode` after `enable_tiling()`: latents wider or taller
    /// than `tiling.latent_size()` are decoded in overlapping tiles blended into each other (see
    /// [`crate::tiling`]); smaller ones exactly as [`Self::decode`].
    pub fn decode_tiled(&self, latents: &Tensor, tiling: &VaeTiling) -> Result<Tensor> {
        let channels = self.config.latent_channels;
        self.check_input("latents", latents, channels, "unscaled latents")?;
        let (_, _, height, width) = latents.dims4()?;
        if !tiling.tiles_decode(height, width) {
            return self.decode_unchecked(latents);
        }
        let plan = tiling.decode_plan(height, width);
        run_tiled(latents, &plan, |tile| self.decode_unchecked(tile))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn moments_split_into_mean_and_clamped_logvar() {
        let moments = Tensor::new(&[1f32, -2.0, 50.0, -100.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 1, 1))
            .unwrap();
        let dist = DiagonalGaussian::from_moments(&moments).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&dist.mean), vec![1.0, -2.0]);
        assert_eq!(flat(&dist.logvar), vec![20.0, -30.0]);
        let noise = Tensor::new(&[1f32, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 1))
            .unwrap();
        let sample = flat(&dist.sample_with(&noise).unwrap());
        // Tolerance: f32 exp.
        assert!((sample[0] - (1.0 + 10f32.exp())).abs() / 10f32.exp() < 1e-6);
        assert!((sample[1] - (-2.0 + (-15f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn noise_must_have_the_mean_shape() {
        let moments = Tensor::zeros((1, 8, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let dist = DiagonalGaussian::from_moments(&moments).unwrap();
        let noise = Tensor::zeros((1, 4, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            dist.sample_with(&noise),
            Err(Error::InputShape { input: "noise", .. })
        ));
    }
}
