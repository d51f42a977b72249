//! `EncoderTiny` and `DecoderTiny` (diffusers `models/autoencoders/vae.py`): the two halves of
//! `AutoencoderTiny`, each an `nn.Sequential` stored under `layers.<index>`.

use candle_core::{DType, Module, Result as CandleResult, Tensor};
use candle_nn::Conv2dConfig;
use sdrs_blocks::Activation;
use sdrs_kernels::nn::{conv2d, conv2d_no_bias, Conv2d};
use sdrs_kernels::VarBuilder;

use crate::config::AutoencoderTinyConfig;
use crate::error::{Error, Result};
use crate::unet_2d_blocks::AutoencoderTinyBlock;

/// An `upsample_fn` value: the mode of the `nn.Upsample` between `DecoderTiny`'s stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsampleMode {
    Nearest,
    /// `nn.Upsample(mode="bilinear")`, whose `align_corners` defaults to false.
    Bilinear,
}

impl UpsampleMode {
    /// The `upsample_fn` names accepted, for error messages.
    pub const ACCEPTED: &'static str = "nearest, bilinear";

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nearest" => Ok(Self::Nearest),
            "bilinear" => Ok(Self::Bilinear),
            _ => Err(Error::UnsupportedUpsample {
                upsample_fn: name.to_string(),
                accepted: Self::ACCEPTED,
            }),
        }
    }

    /// `nn.Upsample(scale_factor=factor, mode=self)` on an NCHW tensor.
    pub fn forward(&self, xs: &Tensor, factor: usize) -> CandleResult<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match self {
            Self::Nearest => xs.upsample_nearest2d(h * factor, w * factor),
            Self::Bilinear => {
                xs.upsample_bilinear2d_with_scale(factor as f64, factor as f64, false)
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Block(Box<AutoencoderTinyBlock>),
    Act(Activation),
    Upsample(UpsampleMode, usize),
}

impl Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Layer::Conv(conv) => conv.forward(xs)?,
            Layer::Block(block) => block.forward(xs)?,
            Layer::Act(act) => act.forward(xs)?,
            Layer::Upsample(mode, factor) => mode.forward(xs, *factor)?,
        })
    }
}

fn run(layers: &[Layer], xs: &Tensor) -> Result<Tensor> {
    let mut xs = xs.clone();
    for layer in layers {
        xs = layer.forward(&xs)?;
    }
    Ok(xs)
}

fn count_pooled(layers: &[Layer]) -> usize {
    layers
        .iter()
        .filter(|l| matches!(l, Layer::Block(b) if b.has_pooled_branch()))
        .count()
}

fn conv3x3(stride: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    }
}

/// Image -> latents: per stage a 3x3 conv (stride 2 and no bias after the first stage), then
/// that stage's blocks; a final 3x3 conv to `latent_channels`.
#[derive(Debug, Clone)]
pub struct EncoderTiny {
    layers: Vec<Layer>,
    dtype: DType,
}

impl EncoderTiny {
    /// `vb` points at the `encoder` module (keys `layers.<i>...` below it).
    pub fn new(vb: VarBuilder, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        cfg.validate()?;
        let act = cfg.activation()?;
        let vb = vb.pp("layers");
        let mut layers = Vec::new();
        let mut channels = cfg.in_channels;
        let stages = cfg
            .num_encoder_blocks
            .iter()
            .zip(cfg.encoder_block_out_channels.iter());
        for (stage, (&num_blocks, &width)) in stages.enumerate() {
            // diffusers passes `block_out_channels[i]` as the downsampling conv's input width;
            // that only runs when neighbouring widths agree, and then equals the previous width
            // used here.
            let conv = if stage == 0 {
                conv2d(channels, width, 3, conv3x3(1), vb.pp(layers.len()))?
            } else {
                conv2d_no_bias(channels, width, 3, conv3x3(2), vb.pp(layers.len()))?
            };
            layers.push(Layer::Conv(conv));
            for _ in 0..num_blocks {
                let block = AutoencoderTinyBlock::new(vb.pp(layers.len()), width, width, act)?;
                layers.push(Layer::Block(Box::new(block)));
            }
            channels = width;
        }
        let conv_out = conv2d(
            channels,
            cfg.latent_channels,
            3,
            conv3x3(1),
            vb.pp(layers.len()),
        )?;
        layers.push(Layer::Conv(conv_out));
        Ok(Self {
            layers,
            dtype: vb.dtype(),
        })
    }

    /// diffusers' convention: `xs` in [-1, 1], mapped to TAESD's [0, 1] before the layers.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = ((xs.to_dtype(self.dtype)? + 1.0)? / 2.0)?;
        run(&self.layers, &xs)
    }

    /// The original TAESD convention: `xs` in [0, 1], raw layers only.
    pub fn forward_unit(&self, xs: &Tensor) -> Result<Tensor> {
        run(&self.layers, &xs.to_dtype(self.dtype)?)
    }

    /// Number of blocks that carry TAEF2's pooled group-norm branch.
    pub fn pooled_blocks(&self) -> usize {
        count_pooled(&self.layers)
    }
}

/// Latents -> image: clamp, 3x3 conv + activation, then per stage its blocks, an upsample and a
/// bias-free 3x3 conv, except the last stage whose conv (with bias) gives `out_channels`.
#[derive(Debug, Clone)]
pub struct DecoderTiny {
    layers: Vec<Layer>,
    dtype: DType,
}

impl DecoderTiny {
    /// `vb` points at the `decoder` module (keys `layers.<i>...` below it).
    pub fn new(vb: VarBuilder, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        cfg.validate()?;
        let act = cfg.activation()?;
        let upsample = cfg.upsample_mode()?;
        let vb = vb.pp("layers");
        let widths = &cfg.decoder_block_out_channels;
        let mut layers = Vec::new();
        let conv_in = conv2d(cfg.latent_channels, widths[0], 3, conv3x3(1), vb.pp(0))?;
        layers.push(Layer::Conv(conv_in));
        layers.push(Layer::Act(act));
        let last = cfg.num_decoder_blocks.len() - 1;
        for (stage, (&num_blocks, &width)) in cfg.num_decoder_blocks.iter().zip(widths).enumerate()
        {
            for _ in 0..num_blocks {
                let block = AutoencoderTinyBlock::new(vb.pp(layers.len()), width, width, act)?;
                layers.push(Layer::Block(Box::new(block)));
            }
            if stage == last {
                let conv = conv2d(width, cfg.out_channels, 3, conv3x3(1), vb.pp(layers.len()))?;
                layers.push(Layer::Conv(conv));
            } else {
                layers.push(Layer::Upsample(upsample, cfg.upsampling_scaling_factor));
                // diffusers keeps the width here (`num_channels -> num_channels`); going to the
                // next stage's width is the same wherever diffusers itself can run.
                let next = widths[stage + 1];
                let conv = conv2d_no_bias(width, next, 3, conv3x3(1), vb.pp(layers.len()))?;
                layers.push(Layer::Conv(conv));
            }
        }
        Ok(Self {
            layers,
            dtype: vb.dtype(),
        })
    }

    /// TAESD's input clamp, `tanh(x / 3) * 3`: latents are soft-limited to (-3, 3).
    fn clamp(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(((xs.to_dtype(self.dtype)? / 3.0)?.tanh()? * 3.0)?)
    }

    /// diffusers' convention: output image in [-1, 1] (not clamped).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let image = run(&self.layers, &self.clamp(xs)?)?;
        Ok(((image * 2.0)? - 1.0)?)
    }

    /// The original TAESD convention: output image in [0, 1] (not clamped).
    pub fn forward_unit(&self, xs: &Tensor) -> Result<Tensor> {
        run(&self.layers, &self.clamp(xs)?)
    }

    /// Number of blocks that carry TAEF2's pooled group-norm branch.
    pub fn pooled_blocks(&self) -> usize {
        count_pooled(&self.layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn upsample_names_are_torch_modes() {
        assert_eq!(
            UpsampleMode::from_name("bilinear").unwrap(),
            UpsampleMode::Bilinear
        );
        assert!(UpsampleMode::from_name("bicubic").is_err());
    }

    #[test]
    fn nearest_upsample_repeats_pixels() {
        let xs = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let ys = UpsampleMode::Nearest.forward(&xs, 2).unwrap();
        let rows = ys
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(rows[0], vec![1., 1., 2., 2.]);
        assert_eq!(rows[3], vec![3., 3., 4., 4.]);
    }
}
