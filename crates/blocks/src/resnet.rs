//! Residual blocks and resamplers of diffusers' `models/resnet.py`, `models/downsampling.py` and
//! `models/upsampling.py`: `ResnetBlock2D`, `Downsample2D`, `Upsample2D`. Shared by the UNet and
//! the VAE (whose resnets have no time embedding).

use candle_core::{Tensor, D};
use candle_nn::{Conv2dConfig, Module};
use sdrs_kernels::nn::{GroupNorm, Linear};
use sdrs_kernels::VarBuilder;

use crate::activations::Activation;
use crate::error::Result;

/// The options of a `ResnetBlock2D` besides its input channels.
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Defaults to the input channels.
    pub out_channels: Option<usize>,
    /// Size of the time embedding; `None` builds no `time_emb_proj` (VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    /// Groups of `norm2`; defaults to `groups`.
    pub groups_out: Option<usize>,
    pub eps: f64,
    /// The block's output is `(shortcut + residual) / output_scale_factor`.
    pub output_scale_factor: f64,
    /// Whether the input goes through `conv_shortcut`; defaults to `in != out` channels.
    pub use_in_shortcut: Option<bool>,
    /// `conv_shortcut` is a 3x3 conv instead of a 1x1 one.
    pub conv_shortcut: bool,
    pub act: Activation,
}

impl Default for ResnetBlock2DConfig {
    fn default() -> Self {
        Self {
            out_channels: None,
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            output_scale_factor: 1.0,
            use_in_shortcut: None,
            conv_shortcut: false,
            act: Activation::Silu,
        }
    }
}

/// A 2D convolution (torch's `nn.Conv2d`, keys `weight` and `bias`), on sdrs' kernels on the CPU
/// (f32, bf16 and f16) and on candle's elsewhere.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: sdrs_kernels::nn::Conv2d,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let inner = sdrs_kernels::nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
        Ok(Self { inner })
    }

    pub fn weight(&self) -> &sdrs_kernels::Weight {
        self.inner.weight()
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(xs)?)
    }

    /// `forward(xs) + residual`, fused on the CPU kernels.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward_add(xs, residual)?)
    }
}

/// A conv with "same" padding for an odd kernel, as diffusers builds `conv_in` / `conv_out`.
pub fn conv2d_same(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
) -> Result<Conv2d> {
    Conv2d::new(
        vb,
        in_channels,
        out_channels,
        kernel,
        1,
        (kernel.max(1) - 1) / 2,
    )
}

/// `act(norm(xs))`, fused into one pass when the activation is SiLU (as in every SD model).
pub fn norm_act(norm: &GroupNorm, act: Activation, xs: &Tensor) -> Result<Tensor> {
    if act == Activation::Silu {
        Ok(norm.forward_silu(xs)?)
    } else {
        Ok(act.forward(&norm.forward(xs)?)?)
    }
}

/// `norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2`, plus the
/// (optionally projected) input.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_channels: usize, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let out_channels = cfg.out_channels.unwrap_or(in_channels);
        let norm1 = sdrs_kernels::nn::group_norm(cfg.groups, in_channels, cfg.eps, vb.pp("norm1"))?;
        let conv1 = Conv2d::new(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?;
        let time_emb_proj = match cfg.temb_channels {
            Some(temb) => Some(sdrs_kernels::nn::linear(
                temb,
                out_channels,
                vb.pp("time_emb_proj"),
            )?),
            None => None,
        };
        let groups_out = cfg.groups_out.unwrap_or(cfg.groups);
        let norm2 =
            sdrs_kernels::nn::group_norm(groups_out, out_channels, cfg.eps, vb.pp("norm2"))?;
        let conv2 = Conv2d::new(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?;
        let use_in_shortcut = cfg.use_in_shortcut.unwrap_or(in_channels != out_channels);
        let conv_shortcut = if use_in_shortcut {
            let (kernel, padding) = if cfg.conv_shortcut { (3, 1) } else { (1, 0) };
            let vb = vb.pp("conv_shortcut");
            Some(Conv2d::new(
                vb,
                in_channels,
                out_channels,
                kernel,
                1,
                padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            act: cfg.act,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `xs` `[B, C, H, W]`; `temb` `[B, temb_channels]`, ignored by a block built without one.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // Each intermediate is dropped as soon as the next exists (a shadowed binding would
        // live to the end of the function): at 512x512 a VAE activation is 134-268 MB.
        let h = {
            let mut h = self.conv1.forward(&norm_act(&self.norm1, self.act, xs)?)?;
            if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
                let temb = proj.forward(&self.act.forward(temb)?)?;
                h = h.broadcast_add(&temb.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
            }
            norm_act(&self.norm2, self.act, &h)?
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        // conv2(h) + shortcut, summed as conv2 writes its output.
        let out = self.conv2.forward_add(&h, &shortcut)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// Halves the resolution with a stride-2 3x3 conv (`use_conv=True`, the only form SD uses).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// With `padding = 0` diffusers pads right and bottom by one instead (the VAE encoder).
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 2, padding)?;
        Ok(Self {
            conv,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Doubles the resolution (nearest neighbour), or resizes to the skip connection's size when the
/// latent size is not a multiple of the UNet's total downsampling, then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 1, 1)?;
        Ok(Self { conv })
    }

    /// `output_size`: `(height, width)` to resize to instead of doubling (torch's
    /// `F.interpolate(size=..., mode="nearest")`).
    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (out_h, out_w) = output_size.unwrap_or((2 * h, 2 * w));
        let xs = xs.upsample_nearest2d(out_h, out_w)?;
        self.conv.forward(&xs)
    }
}
