//! `Transformer2DModel` of diffusers' `models/transformers/transformer_2d.py`, continuous-input
//! form: group norm, `proj_in`, a stack of `BasicTransformerBlock`s over the pixels as tokens,
//! `proj_out`, plus the input.

use candle_core::Tensor;
use candle_nn::Module;
use sdrs_blocks::Conv2d;
use sdrs_kernels::nn::{GroupNorm, Linear};
use sdrs_kernels::VarBuilder;

use crate::attention::BasicTransformerBlock;
use crate::error::Result;

/// The options of a [`Transformer2DModel`].
#[derive(Debug, Clone)]
pub struct Transformer2DModelConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    /// Number of `transformer_blocks`.
    pub num_layers: usize,
    pub cross_attention_dim: Option<usize>,
    pub norm_num_groups: usize,
    /// `proj_in` / `proj_out` are linear layers on the tokens rather than 1x1 convs.
    pub use_linear_projection: bool,
}

/// `proj_in` / `proj_out`: a 1x1 conv (SD1.x) or a linear layer (SD2.x, SDXL).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, linear: bool, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(if linear {
            Self::Linear(sdrs_kernels::nn::linear(in_dim, out_dim, vb)?)
        } else {
            Self::Conv(Conv2d::new(vb, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DModelConfig) -> Result<Self> {
        let inner_dim = cfg.num_attention_heads * cfg.attention_head_dim;
        // diffusers quirk: this GroupNorm's eps is fixed at 1e-6 in `Transformer2DModel`,
        // whatever the UNet's `norm_eps`.
        let norm = sdrs_kernels::nn::group_norm(
            cfg.norm_num_groups,
            cfg.in_channels,
            1e-6,
            vb.pp("norm"),
        )?;
        let linear = cfg.use_linear_projection;
        let proj_in = Projection::new(vb.pp("proj_in"), linear, cfg.in_channels, inner_dim)?;
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    blocks.pp(i.to_string()),
                    inner_dim,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = Projection::new(vb.pp("proj_out"), linear, inner_dim, cfg.in_channels)?;
        Ok(Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }

    /// `xs` `[B, C, H, W]`, `encoder_hidden_states` `[B, M, cross_attention_dim]`.
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        // `[B, C, H, W]` -> tokens `[B, H*W, C]`, projecting before or after the reshape.
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let _span = tracing::trace_span!("unet.transformer_block", index = i).entered();
            tokens = block.forward(&tokens, encoder_hidden_states)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(linear) => to_map(&linear.forward(&tokens)?)?,
        };
        Ok((out + xs)?)
    }
}
