//! The `Attention` layer of diffusers' `models/attention_processor.py` (run by `AttnProcessor2_0`),
//! the self-attention of the VAE's mid block and the self-/cross-attention of the UNet's
//! transformers, plus the single [`scaled_dot_product_attention`] that every attention of those
//! models goes through.

use candle_core::Tensor;
use candle_nn::Module;
use sdrs_kernels::nn::{GroupNorm, Linear};
use sdrs_kernels::{KernelOptions, VarBuilder};

use crate::error::{Error, Result};

/// `softmax(q k^T * scale) v` for `q` `[B, H, Nq, D]`, `k` and `v` `[B, H, Nk, D]`.
///
/// Every attention of the UNet and the VAE calls this one function; it runs the mode of the
/// pipeline's kernel options (`--attention`): flash attention on the CPU by default, which never
/// holds the `Nq x Nk` scores, and candle's matmul and softmax elsewhere. Scores and softmax are computed in f32 for every dtype, as torch's fused kernels
/// effectively do: f16 scores of SD2.x overflow otherwise (what diffusers' `upcast_attention` /
/// `upcast_softmax` guard against), so those options need no further handling.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    options: &KernelOptions,
) -> Result<Tensor> {
    Ok(sdrs_kernels::attention::attention(q, k, v, scale, options)?)
}

/// [`scaled_dot_product_attention`] in a layer whose projections compute as `weights`: bf16
/// weights let the CPU's tile kernels (AMX) take bf16 inputs for the two products, as PyTorch's
/// bf16 attention does.
pub fn scaled_dot_product_attention_for_weights(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    options: &KernelOptions,
    weights: candle_core::DType,
) -> Result<Tensor> {
    Ok(sdrs_kernels::attention::attention_for_weights(
        q, k, v, scale, options, weights,
    )?)
}

/// The options of an [`Attention`] layer (diffusers' `Attention.__init__` arguments we use).
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Size of the key/value input for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Whether `to_q`, `to_k`, `to_v` have biases.
    pub bias: bool,
    /// Whether `to_out.0` has a bias.
    pub out_bias: bool,
    /// A `group_norm` over the channels of the input, before the projections (VAE mid block).
    pub norm_num_groups: Option<usize>,
    /// Epsilon of `group_norm`.
    pub eps: f64,
    /// Adds the input to the output (VAE mid block).
    pub residual_connection: bool,
    /// The output is divided by this.
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    /// The transformer blocks' attention: no q/k/v bias, an output bias, no norm, no residual.
    pub fn transformer(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Self {
        Self {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            bias: false,
            out_bias: true,
            norm_num_groups: None,
            eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }
}

/// Multi-head (self- or cross-) attention with keys `to_q`, `to_k`, `to_v`, `to_out.0` and an
/// optional `group_norm`. Takes `[B, N, C]` tokens or a `[B, C, H, W]` feature map.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
    scale: f64,
    residual_connection: bool,
    rescale_output_factor: f64,
    options: KernelOptions,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        let inner_dim = cfg.heads * cfg.dim_head;
        if inner_dim == 0 {
            return Err(Error::InvalidConfig {
                key: "attention heads x head size".to_string(),
                value: format!("{} x {}", cfg.heads, cfg.dim_head),
                expected: "at least one head of at least one channel".to_string(),
            });
        }
        let context_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.norm_num_groups {
            Some(groups) => Some(sdrs_kernels::nn::group_norm(
                groups,
                cfg.query_dim,
                cfg.eps,
                vb.pp("group_norm"),
            )?),
            None => None,
        };
        let to_q = sdrs_kernels::nn::linear_b(cfg.query_dim, inner_dim, cfg.bias, vb.pp("to_q"))?;
        let to_k = sdrs_kernels::nn::linear_b(context_dim, inner_dim, cfg.bias, vb.pp("to_k"))?;
        let to_v = sdrs_kernels::nn::linear_b(context_dim, inner_dim, cfg.bias, vb.pp("to_v"))?;
        let to_out = sdrs_kernels::nn::linear_b(
            inner_dim,
            cfg.query_dim,
            cfg.out_bias,
            vb.pp("to_out").pp("0"),
        )?;
        Ok(Self {
            group_norm,
            to_q,
            to_k,
            to_v,
            to_out,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
            options: vb.options(),
        })
    }

    /// `[B, N, C]` -> `[B, heads, N, dim_head]`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        // A strided view, not a copy: the CPU flash kernels read it where it lies, and the
        // other attention paths copy what they need.
        Ok(xs
            .reshape((b, n, self.heads, self.dim_head))?
            .transpose(1, 2)?)
    }

    /// `xs`: `[B, N, query_dim]` or `[B, query_dim, H, W]`; `encoder_hidden_states`:
    /// `[B, M, cross_attention_dim]` for cross-attention, `None` to attend to `xs` itself.
    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let _span =
            tracing::trace_span!("attention", cross = encoder_hidden_states.is_some()).entered();
        let spatial = match xs.rank() {
            4 => Some(xs.dims4()?),
            _ => None,
        };
        // Tokens with the channels last; a feature map's `[B, C, H*W]` view is what the group
        // norm wants.
        let tokens = match (spatial, &self.group_norm) {
            (Some((b, c, h, w)), norm) => {
                let flat = xs.reshape((b, c, h * w))?;
                let flat = match norm {
                    Some(norm) => norm.forward(&flat)?,
                    None => flat,
                };
                flat.transpose(1, 2)?.contiguous()?
            }
            (None, Some(norm)) => norm
                .forward(&xs.transpose(1, 2)?.contiguous()?)?
                .transpose(1, 2)?
                .contiguous()?,
            (None, None) => xs.clone(),
        };
        let (b, n, _) = tokens.dims3()?;
        let context = encoder_hidden_states.unwrap_or(&tokens);
        let q = self.split_heads(&self.to_q.forward(&tokens)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = scaled_dot_product_attention_for_weights(
            &q,
            &k,
            &v,
            self.scale,
            &self.options,
            self.to_q.weight().dtype(),
        )?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.dim_head))?;
        let mut out = self.to_out.forward(&out)?;
        if let Some((b, c, h, w)) = spatial {
            out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        }
        if self.residual_connection {
            out = (out + xs)?;
        }
        if self.rescale_output_factor != 1.0 {
            out = (out / self.rescale_output_factor)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A direct, loop-based attention to check the tensor version against.
    fn naive(q: &[Vec<f32>], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<Vec<f32>> {
        q.iter()
            .map(|qi| {
                let scores: Vec<f32> = k
                    .iter()
                    .map(|kj| qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                (0..v[0].len())
                    .map(|d| exps.iter().zip(v).map(|(e, vj)| e / sum * vj[d]).sum())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn sdpa_matches_a_direct_computation() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 1, 3, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 1, 5, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 1, 5, 2), &dev).unwrap();
        let got: Vec<Vec<f32>> =
            scaled_dot_product_attention(&q, &k, &v, 0.5, &KernelOptions::default())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2()
                .unwrap();
        let rows = |t: &Tensor| -> Vec<Vec<f32>> {
            t.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
        };
        let expected = naive(&rows(&q), &rows(&k), &rows(&v), 0.5);
        for (g, e) in got.iter().flatten().zip(expected.iter().flatten()) {
            // Tolerance: f32 rounding of a 4-term dot product and a 5-term softmax.
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn sdpa_chunks_long_queries_without_changing_the_result() {
        let dev = Device::Cpu;
        // 1 x 1 x 8200 x 8200 scores exceed MAX_SCORE_ELEMENTS, so this runs in two chunks.
        let n = 8200;
        let q = Tensor::randn(0f32, 1.0, (1, 1, n, 2), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 1, n, 2), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 1, n, 3), &dev).unwrap();
        let chunked =
            scaled_dot_product_attention(&q, &k, &v, 0.7, &KernelOptions::default()).unwrap();
        let tail = 100;
        let q_tail = q.narrow(2, n - tail, tail).unwrap();
        let direct =
            scaled_dot_product_attention(&q_tail, &k, &v, 0.7, &KernelOptions::default()).unwrap();
        let diff = (chunked.narrow(2, n - tail, tail).unwrap() - direct)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Tolerance: the same per-query computation; only the matmul blocking may differ.
        assert!(diff < 1e-6, "max |diff| {diff}");
        assert_eq!(chunked.dims(), &[1, 1, n, 3]);
    }

    #[test]
    fn sdpa_keeps_half_dtypes() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 2, 3, 4), &dev).unwrap();
        let f32_out =
            scaled_dot_product_attention(&q, &q, &q, 0.5, &KernelOptions::default()).unwrap();
        let half = q.to_dtype(DType::BF16).unwrap();
        let bf16_out =
            scaled_dot_product_attention(&half, &half, &half, 0.5, &KernelOptions::default())
                .unwrap();
        assert_eq!(bf16_out.dtype(), DType::BF16);
        let diff = (bf16_out.to_dtype(DType::F32).unwrap() - f32_out)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Tolerance: bf16 keeps 8 bits of mantissa (inputs and output rounded).
        assert!(diff < 5e-2, "max |diff| {diff}");
    }
}
