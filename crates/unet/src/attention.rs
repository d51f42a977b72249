//! The transformer parts of diffusers' `models/attention.py` that only the UNet uses:
//! `FeedForward` with its `GEGLU` projection (`models/activations.py`) and
//! `BasicTransformerBlock`. The `Attention` layer itself is shared with the VAE and lives in
//! [`sdrs_blocks::attention`]; it is re-exported here.

use candle_core::Tensor;
use candle_nn::Module;
use sdrs_kernels::nn::{LayerNorm, Linear};
use sdrs_kernels::VarBuilder;

pub use sdrs_blocks::attention::{scaled_dot_product_attention, Attention, AttentionConfig};

use crate::error::Result;

/// GEGLU (Shazeer 2020, "GLU Variants Improve Transformer"): one projection to twice the inner
/// size, split into a value half and a gate half, `value * gelu(gate)`.
#[derive(Debug, Clone)]
pub struct Geglu {
    proj: Linear,
}

impl Geglu {
    pub fn new(vb: VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        let proj = sdrs_kernels::nn::linear(dim_in, dim_out * 2, vb.pp("proj"))?;
        Ok(Self { proj })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(sdrs_kernels::nn::geglu(
            &self.proj.forward(xs)?,
            &self.proj.options(),
        )?)
    }
}

/// The transformer MLP with GEGLU: `net.0` (GEGLU projection), `net.2` (output linear).
#[derive(Debug, Clone)]
pub struct FeedForward {
    geglu: Geglu,
    out: Linear,
}

impl FeedForward {
    /// `inner_dim` is `4 * dim` in every Stable Diffusion UNet (diffusers' `mult=4`).
    pub fn new(vb: VarBuilder, dim: usize, inner_dim: usize) -> Result<Self> {
        let net = vb.pp("net");
        let geglu = Geglu::new(net.pp("0"), dim, inner_dim)?;
        let out = sdrs_kernels::nn::linear(inner_dim, dim, net.pp("2"))?;
        Ok(Self { geglu, out })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.out.forward(&self.geglu.forward(xs)?)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed by a LayerNorm and added
/// back to its input.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    cross: Option<(LayerNorm, Attention)>,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`, `attention_bias=False`,
    /// `activation_fn="geglu"`, LayerNorm eps 1e-5 (what `Transformer2DModel` builds for SD).
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: Option<usize>,
    ) -> Result<Self> {
        let eps = 1e-5;
        let norm1 = sdrs_kernels::nn::layer_norm(dim, eps, vb.pp("norm1"))?;
        let attn1 = Attention::new(
            vb.pp("attn1"),
            &AttentionConfig::transformer(dim, None, heads, dim_head),
        )?;
        let cross = match cross_attention_dim {
            Some(context_dim) => {
                let norm2 = sdrs_kernels::nn::layer_norm(dim, eps, vb.pp("norm2"))?;
                let cfg = AttentionConfig::transformer(dim, Some(context_dim), heads, dim_head);
                Some((norm2, Attention::new(vb.pp("attn2"), &cfg)?))
            }
            None => None,
        };
        let norm3 = sdrs_kernels::nn::layer_norm(dim, eps, vb.pp("norm3"))?;
        let ff = FeedForward::new(vb.pp("ff"), dim, 4 * dim)?;
        Ok(Self {
            norm1,
            attn1,
            cross,
            norm3,
            ff,
        })
    }

    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = match &self.cross {
            Some((norm2, attn2)) => {
                (attn2.forward(&norm2.forward(&xs)?, encoder_hidden_states)? + &xs)?
            }
            None => xs,
        };
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + &xs)?)
    }
}
