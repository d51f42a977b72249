//! The VAE's stages of diffusers' `models/unets/unet_2d_blocks.py`: `DownEncoderBlock2D`,
//! `UpDecoderBlock2D` and `UNetMidBlock2D`, plus the [`BlockConfig`] every block of that file
//! (the UNet's too) is sized by.

use candle_core::Tensor;
use sdrs_kernels::VarBuilder;

use crate::activations::Activation;
use crate::attention::{Attention, AttentionConfig};
use crate::error::Result;
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// What every block shares: its resnets' sizes and options.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Number of resnets (and transformers, for cross-attention blocks).
    pub num_layers: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Size of the time embedding; `None` for the VAE.
    pub temb_channels: Option<usize>,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub act: Activation,
    /// The resnets' (and the VAE mid-block attention's) output scale.
    pub output_scale_factor: f64,
}

impl BlockConfig {
    /// One of the block's resnets, from `in_channels` to `out_channels`.
    pub fn resnet(
        &self,
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<ResnetBlock2D> {
        let cfg = ResnetBlock2DConfig {
            out_channels: Some(out_channels),
            temb_channels: self.temb_channels,
            groups: self.resnet_groups,
            groups_out: None,
            eps: self.resnet_eps,
            output_scale_factor: self.output_scale_factor,
            use_in_shortcut: None,
            conv_shortcut: false,
            act: self.act,
        };
        ResnetBlock2D::new(vb, in_channels, &cfg)
    }

    /// `num_layers` resnets (keys `resnets.{j}`), the first from `in_channels`, all to
    /// `out_channels`.
    pub fn resnets(&self, vb: &VarBuilder) -> Result<Vec<ResnetBlock2D>> {
        (0..self.num_layers)
            .map(|j| {
                let in_channels = if j == 0 {
                    self.in_channels
                } else {
                    self.out_channels
                };
                self.resnet(vb.pp("resnets").pp(j), in_channels, self.out_channels)
            })
            .collect()
    }
}

/// The VAE encoder's stage: resnets without time embedding, then a downsampler.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// `downsample_padding`: `Some(padding)` adds the downsampler; the VAE uses padding 0
    /// (which pads right and bottom, see [`Downsample2D`]).
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let resnets = cfg.resnets(&vb)?;
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
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

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.downsampler {
            Some(down) => down.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// The VAE decoder's stage: resnets without skip connections, then an upsampler.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(vb: VarBuilder, cfg: &BlockConfig, add_upsample: bool) -> Result<Self> {
        let resnets = cfg.resnets(&vb)?;
        let upsampler = if add_upsample {
            let out = cfg.out_channels;
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out, out)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, temb)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

/// The VAE's bottleneck: a resnet, then (optional self-attention, resnet) pairs. The attention
/// is diffusers' `Attention` with a `group_norm`, q/k/v biases and a residual connection.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    first: ResnetBlock2D,
    layers: Vec<(Option<Attention>, ResnetBlock2D)>,
}

impl UNetMidBlock2D {
    /// `attention_head_dim`: channels per head (the VAE passes its channel count: one head).
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        attention_head_dim: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let channels = cfg.in_channels;
        let first = cfg.resnet(vb.pp("resnets").pp(0), channels, channels)?;
        let heads = channels.checked_div(attention_head_dim).unwrap_or(0);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let attn = if add_attention {
                    let attn_cfg = AttentionConfig {
                        query_dim: channels,
                        cross_attention_dim: None,
                        heads,
                        dim_head: attention_head_dim,
                        bias: true,
                        out_bias: true,
                        norm_num_groups: Some(cfg.resnet_groups),
                        eps: cfg.resnet_eps,
                        residual_connection: true,
                        rescale_output_factor: cfg.output_scale_factor,
                    };
                    Some(Attention::new(vb.pp("attentions").pp(i), &attn_cfg)?)
                } else {
                    None
                };
                let resnet = cfg.resnet(vb.pp("resnets").pp(i + 1), channels, channels)?;
                Ok((attn, resnet))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, temb)?;
        for (attn, resnet) in &self.layers {
            if let Some(attn) = attn {
                xs = attn.forward(&xs, None)?;
            }
            xs = resnet.forward(&xs, temb)?;
        }
        Ok(xs)
    }
}
