//! The UNet's stages of diffusers' `models/unets/unet_2d_blocks.py`: `DownBlock2D`,
//! `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`. The
//! VAE's stages of that file, and the [`BlockConfig`] all of them are sized by, are in
//! [`sdrs_blocks::unet_2d_blocks`].

use candle_core::{Tensor, D};
use sdrs_blocks::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use sdrs_kernels::VarBuilder;

pub use sdrs_blocks::unet_2d_blocks::BlockConfig;

use crate::error::{Error, Result};
use crate::transformer_2d::{Transformer2DModel, Transformer2DModelConfig};

/// The transformers of a cross-attention block.
#[derive(Debug, Clone)]
pub struct CrossAttnConfig {
    pub num_attention_heads: usize,
    /// Depth of the transformer after each resnet (one entry per layer).
    pub transformer_layers_per_block: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

impl CrossAttnConfig {
    /// The transformer after resnet `layer`; its head size is the channels over the head count.
    fn transformer(
        &self,
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        layer: usize,
    ) -> Result<Transformer2DModel> {
        let heads = self.num_attention_heads;
        let head_dim = channels.checked_div(heads).unwrap_or(0);
        if head_dim == 0 {
            return Err(Error::InvalidConfig {
                key: "attention_head_dim (number of heads)".to_string(),
                value: heads.to_string(),
                expected: format!("between 1 and the block's {channels} channels"),
            });
        }
        let num_layers = self
            .transformer_layers_per_block
            .get(layer)
            .copied()
            .ok_or_else(|| Error::InvalidConfig {
                key: "transformer_layers_per_block".to_string(),
                value: format!("{:?}", self.transformer_layers_per_block),
                expected: format!("a depth for layer {layer}"),
            })?;
        let cfg = Transformer2DModelConfig {
            num_attention_heads: heads,
            attention_head_dim: head_dim,
            in_channels: channels,
            num_layers,
            cross_attention_dim: Some(self.cross_attention_dim),
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
        };
        Transformer2DModel::new(vb, &cfg)
    }
}

/// `vb.pp(name).pp(i)`: the `i`-th module of a `ModuleList`.
fn item<'a>(vb: &VarBuilder<'a>, name: &str, i: usize) -> VarBuilder<'a> {
    vb.pp(name).pp(i.to_string())
}

/// Pops the newest skip connection and concatenates it to `xs` along the channels.
fn concat_skip(xs: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
    let skip = skips.pop().ok_or_else(|| Error::InvalidConfig {
        key: "up block skip connections".to_string(),
        value: "none left".to_string(),
        expected: "one per up-block resnet (down and up blocks do not match)".to_string(),
    })?;
    Ok(Tensor::cat(&[xs, &skip], 1)?)
}

/// Resnets, then a downsampler; returns the output and every intermediate state (the skip
/// connections of the up path).
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// `downsample_padding`: `Some(padding)` adds the downsampler (every block but the last).
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let resnets = cfg.resnets(&vb)?;
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample2D::new(
                item(&vb, "downsamplers", 0),
                cfg.out_channels,
                cfg.out_channels,
                padding,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, temb)?;
            states.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// A [`DownBlock2D`] with a transformer after each resnet.
#[derive(Debug, Clone)]
pub struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        attn: &CrossAttnConfig,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let plain = DownBlock2D::new(vb.clone(), cfg, downsample_padding)?;
        let attentions = (0..cfg.num_layers)
            .map(|j| {
                attn.transformer(
                    item(&vb, "attentions", j),
                    cfg.out_channels,
                    cfg.resnet_groups,
                    j,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets: plain.resnets,
            attentions,
            downsampler: plain.downsampler,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            xs = resnet.forward(&xs, temb)?;
            xs = attn.forward(&xs, Some(encoder_hidden_states))?;
            states.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// The UNet's bottleneck: a resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    first: ResnetBlock2D,
    layers: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

impl UNetMidBlock2DCrossAttn {
    /// `cfg.in_channels` is used for both input and output channels.
    pub fn new(vb: VarBuilder, cfg: &BlockConfig, attn: &CrossAttnConfig) -> Result<Self> {
        let channels = cfg.in_channels;
        let first = cfg.resnet(item(&vb, "resnets", 0), channels, channels)?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let transformer =
                    attn.transformer(item(&vb, "attentions", i), channels, cfg.resnet_groups, i)?;
                let resnet = cfg.resnet(item(&vb, "resnets", i + 1), channels, channels)?;
                Ok((transformer, resnet))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, temb)?;
        for (attn, resnet) in &self.layers {
            xs = attn.forward(&xs, Some(encoder_hidden_states))?;
            xs = resnet.forward(&xs, temb)?;
        }
        Ok(xs)
    }
}

/// Resnets that each take the previous output concatenated with a skip connection, then an
/// upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// `cfg.in_channels` is the channels of the LAST skip connection (the down block's input),
    /// `prev_output_channel` those of the previous up block's output, as in diffusers.
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        prev_output_channel: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let out = cfg.out_channels;
        let resnets = (0..cfg.num_layers)
            .map(|j| {
                let skip = if j + 1 == cfg.num_layers {
                    cfg.in_channels
                } else {
                    out
                };
                let resnet_in = if j == 0 { prev_output_channel } else { out };
                Ok(cfg.resnet(item(&vb, "resnets", j), resnet_in + skip, out)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(item(&vb, "upsamplers", 0), out, out)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: the skip connections, newest last; one is consumed per resnet.
    /// `upsample_size`: the size to upsample to when it is not twice the input's.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&concat_skip(&xs, skips)?, temb)?;
        }
        match &self.upsampler {
            Some(up) => Ok(up.forward(&xs, upsample_size)?),
            None => Ok(xs),
        }
    }
}

/// An [`UpBlock2D`] with a transformer after each resnet.
#[derive(Debug, Clone)]
pub struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        attn: &CrossAttnConfig,
        prev_output_channel: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let plain = UpBlock2D::new(vb.clone(), cfg, prev_output_channel, add_upsample)?;
        let attentions = (0..cfg.num_layers)
            .map(|j| {
                attn.transformer(
                    item(&vb, "attentions", j),
                    cfg.out_channels,
                    cfg.resnet_groups,
                    j,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets: plain.resnets,
            attentions,
            upsampler: plain.upsampler,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: Option<&Tensor>,
        encoder_hidden_states: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            xs = resnet.forward(&concat_skip(&xs, skips)?, temb)?;
            xs = attn.forward(&xs, Some(encoder_hidden_states))?;
        }
        match &self.upsampler {
            Some(up) => Ok(up.forward(&xs, upsample_size)?),
            None => Ok(xs),
        }
    }
}

/// The spatial size `[H, W]` of a `[B, C, H, W]` tensor.
pub(crate) fn spatial_size(xs: &Tensor) -> Result<(usize, usize)> {
    Ok((xs.dim(D::Minus2)?, xs.dim(D::Minus1)?))
}
