//! Timestep embeddings of diffusers' `models/embeddings.py`: `get_timestep_embedding` /
//! `Timesteps` (the sinusoidal features of "Attention Is All You Need", as DDPM uses them) and
//! `TimestepEmbedding` (the MLP on top).

use candle_core::{DType, Tensor, D};
use candle_nn::Module;
use sdrs_blocks::Activation;
use sdrs_kernels::nn::Linear;
use sdrs_kernels::VarBuilder;

use crate::error::Result;

/// Sinusoidal features of scalar values (timesteps, or SDXL's size/crop ids).
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
        }
    }

    /// `[N]` values of any dtype -> `[N, num_channels]` features in f32 (diffusers computes them
    /// in float32 whatever the model's dtype; callers cast the result).
    pub fn forward(&self, values: &Tensor) -> Result<Tensor> {
        let half = self.num_channels / 2;
        // torch evaluates the frequencies in float32: -ln(10000) * arange(half) / (half - shift).
        let log_period = -(10000f64.ln()) as f32;
        let denominator = (half as f64 - self.downscale_freq_shift) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (log_period * i as f32 / denominator).exp())
            .collect();
        let device = values.device();
        let freqs = Tensor::from_vec(freqs, (1, half), device)?;
        let args = values
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)?
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)?
        };
        if self.num_channels % 2 == 1 {
            Ok(emb.pad_with_zeros(D::Minus1, 0, 1)?)
        } else {
            Ok(emb)
        }
    }
}

/// `linear_1 -> act -> linear_2 (-> post_act)`: turns the sinusoidal features into the embedding
/// every resnet receives.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
    ) -> Result<Self> {
        let linear_1 = sdrs_kernels::nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?;
        let linear_2 = sdrs_kernels::nn::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?;
        Ok(Self {
            linear_1,
            act,
            linear_2,
            post_act,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.act.forward(&self.linear_1.forward(xs)?)?;
        let xs = self.linear_2.forward(&xs)?;
        match &self.post_act {
            Some(act) => Ok(act.forward(&xs)?),
            None => Ok(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sinusoids_match_get_timestep_embedding() {
        let t = Tensor::new(&[0f32, 1.0, 500.5], &Device::Cpu).unwrap();
        let emb = Timesteps::new(6, true, 1.0).forward(&t).unwrap();
        let emb: Vec<Vec<f32>> = emb.to_vec2().unwrap();
        // half = 3, shift 1: frequencies exp(-ln(1e4) * i / 2) = 1, 1e-2, 1e-4; cos first.
        for (row, &t) in emb.iter().zip(&[0f64, 1.0, 500.5]) {
            let freqs = [1.0, 1e-2, 1e-4];
            for (i, f) in freqs.iter().enumerate() {
                // Tolerance: f32 evaluation of sin/cos at arguments up to ~500.
                assert!((row[i] as f64 - (t * f).cos()).abs() < 1e-4, "{row:?}");
                assert!((row[i + 3] as f64 - (t * f).sin()).abs() < 1e-4, "{row:?}");
            }
        }
    }

    #[test]
    fn odd_sizes_are_zero_padded() {
        let t = Tensor::new(&[3f32], &Device::Cpu).unwrap();
        let emb = Timesteps::new(5, false, 0.0).forward(&t).unwrap();
        assert_eq!(emb.dims(), &[1, 5]);
        let last: f32 = emb.get(0).unwrap().get(4).unwrap().to_scalar().unwrap();
        assert_eq!(last, 0.0);
    }
}
