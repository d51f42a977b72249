//! The VAE's `Encoder` and `Decoder` of diffusers' `models/autoencoders/vae.py` (the KL
//! autoencoder of "High-Resolution Image Synthesis with Latent Diffusion Models").

use candle_core::Tensor;
use sdrs_blocks::unet_2d_blocks::{
    BlockConfig, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D,
};
use sdrs_blocks::{Activation, Conv2d};
use sdrs_kernels::nn::GroupNorm;
use sdrs_kernels::VarBuilder;

use crate::config::AutoencoderKLConfig;
use crate::error::Result;

/// diffusers builds every VAE resnet and norm with this epsilon, whatever the config says.
const VAE_EPS: f64 = 1e-6;

/// The mid block's options: one resnet-attention-resnet stage whose single attention head spans
/// every channel (`attention_head_dim` = the channel count).
fn mid_block(vb: VarBuilder, cfg: &AutoencoderKLConfig, act: Activation) -> Result<UNetMidBlock2D> {
    let channels = cfg.block_out_channels[cfg.block_out_channels.len() - 1];
    let block = BlockConfig {
        num_layers: 1,
        in_channels: channels,
        out_channels: channels,
        temb_channels: None,
        resnet_eps: VAE_EPS,
        resnet_groups: cfg.norm_num_groups,
        act,
        output_scale_factor: 1.0,
    };
    Ok(UNetMidBlock2D::new(
        vb,
        &block,
        channels,
        cfg.mid_block_add_attention,
    )?)
}

fn conv3x3(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Conv2d> {
    Ok(Conv2d::new(vb, in_channels, out_channels, 3, 1, 1)?)
}

/// Image `[B, in_channels, H, W]` -> the latent distribution's parameters
/// `[B, 2 * latent_channels, H / f, W / f]` (mean and log-variance, before `quant_conv`).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.check_supported()?;
        let act = cfg.activation()?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let conv_in = conv3x3(vb.pp("conv_in"), cfg.in_channels, channels[0])?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = channels[0];
        for (i, &channel) in channels.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channel;
            let block = BlockConfig {
                num_layers: cfg.layers_per_block,
                in_channels: input_channel,
                out_channels: output_channel,
                temb_channels: None,
                resnet_eps: VAE_EPS,
                resnet_groups: cfg.norm_num_groups,
                act,
                output_scale_factor: 1.0,
            };
            // The encoder downsamples with padding 0, i.e. pads only right and bottom.
            let padding = (i + 1 != n).then_some(0);
            let vb = vb.pp("down_blocks").pp(i.to_string());
            down_blocks.push(DownEncoderBlock2D::new(vb, &block, padding)?);
        }
        let mid_block = mid_block(vb.pp("mid_block"), cfg, act)?;
        let last = channels[n - 1];
        let conv_norm_out = sdrs_kernels::nn::group_norm(
            cfg.norm_num_groups,
            last,
            VAE_EPS,
            vb.pp("conv_norm_out"),
        )?;
        // `double_z`: mean and log-variance.
        let conv_out = conv3x3(vb.pp("conv_out"), last, 2 * cfg.latent_channels)?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
        })
    }

    #[tracing::instrument(level = "info", name = "vae.encoder", skip_all)]
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for (i, block) in self.down_blocks.iter().enumerate() {
            let _span = tracing::info_span!("vae.down_block", index = i).entered();
            xs = block.forward(&xs)?;
        }
        let xs = {
            let _span = tracing::info_span!("vae.mid_block").entered();
            self.mid_block.forward(&xs, None)?
        };
        // diffusers quirk: the final activation is `nn.SiLU()` whatever `act_fn` says.
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}

/// Latents `[B, latent_channels, h, w]` (after `post_quant_conv`) -> image
/// `[B, out_channels, h * f, w * f]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.check_supported()?;
        let act = cfg.activation()?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let conv_in = conv3x3(vb.pp("conv_in"), cfg.latent_channels, channels[n - 1])?;
        let mid_block = mid_block(vb.pp("mid_block"), cfg, act)?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = channels[n - 1];
        for (i, &channel) in channels.iter().rev().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = channel;
            let block = BlockConfig {
                num_layers: cfg.layers_per_block + 1,
                in_channels: prev_output_channel,
                out_channels: output_channel,
                temb_channels: None,
                resnet_eps: VAE_EPS,
                resnet_groups: cfg.norm_num_groups,
                act,
                output_scale_factor: 1.0,
            };
            let vb = vb.pp("up_blocks").pp(i.to_string());
            up_blocks.push(UpDecoderBlock2D::new(vb, &block, i + 1 != n)?);
        }
        let conv_norm_out = sdrs_kernels::nn::group_norm(
            cfg.norm_num_groups,
            channels[0],
            VAE_EPS,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = conv3x3(vb.pp("conv_out"), channels[0], cfg.out_channels)?;
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    #[tracing::instrument(level = "info", name = "vae.decoder", skip_all)]
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = {
            let _span = tracing::info_span!("vae.mid_block").entered();
            self.mid_block.forward(&xs, None)?
        };
        for (i, block) in self.up_blocks.iter().enumerate() {
            let _span = tracing::info_span!("vae.up_block", index = i).entered();
            xs = block.forward(&xs, None)?;
        }
        // diffusers quirk: the final activation is `nn.SiLU()` whatever `act_fn` says.
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}
