//! Seeded random weights for any model constructor: a candle `SimpleBackend` that draws each tensor
//! on demand from its name and a seed, so that real-size models can be built in the process without
//! a download (`StableDiffusion::random`, `sdrs bench`, the `random_model` example).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Weights drawn on demand, the same for the same seed and tensor name: uniform with the variance
/// of PyTorch's default initialisation (`1 / fan_in`), so activations stay in a realistic range
/// through hundreds of layers; 1-D `weight`s (norm scales) are near 1, biases near 0.
pub struct RandomWeights {
    seed: u64,
    /// Name fragments of optional tensors this model does not have (a model asks
    /// `contains_tensor` before building an optional branch).
    absent: Vec<String>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            absent: Vec::new(),
        }
    }

    /// The weights of one diffusers component: as [`Self::new`], leaving out what the published
    /// model lacks (the first SDXL/SD1.5 text encoder, `CLIPTextModel`, has no projection).
    pub fn for_component(seed: u64, component: &str) -> Self {
        let weights = Self::new(seed);
        match component {
            "text_encoder" => weights.without(&["text_projection"]),
            _ => weights,
        }
    }

    /// Leaves out the optional tensors whose names contain one of `fragments`.
    pub fn without(mut self, fragments: &[&str]) -> Self {
        self.absent
            .extend(fragments.iter().map(|fragment| fragment.to_string()));
        self
    }

    /// A `VarBuilder` over these weights, for any model constructor.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, name: &str, shape: &Shape) -> Vec<f32> {
        let dims = shape.dims();
        let (scale, offset) = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            // A uniform on [-a, a] has variance a^2 / 3.
            ((3.0 / fan_in.max(1) as f32).sqrt(), 0.0)
        } else if name.ends_with("weight") {
            (0.1, 1.0)
        } else {
            (0.02, 0.0)
        };
        let seed = self.seed ^ fnv1a(name.as_bytes());
        let mut values = vec![0f32; shape.elem_count()];
        // Chunks with their own streams, so that large tensors fill in parallel and the values
        // do not depend on the thread count.
        values
            .par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(chunk, out)| {
                let mut state = seed ^ (chunk as u64).wrapping_mul(0xd6e8_feb8_6659_fd93);
                for value in out {
                    *value = offset + scale * uniform(&mut state);
                }
            });
        values
    }
}

/// splitmix64 mapped to a uniform in [-1, 1): fast, well mixed, and needs no dependency.
fn uniform(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // 24 random bits.
    ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

/// FNV-1a, to turn a tensor name into a seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = self.values(name, &shape);
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !self.absent.iter().any(|fragment| name.contains(fragment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_seeded_and_scaled() {
        let weights = RandomWeights::new(7);
        let shape = Shape::from_dims(&[64, 300]);
        let a = weights.values("a.weight", &shape);
        assert_eq!(a, weights.values("a.weight", &shape));
        assert_ne!(a, weights.values("b.weight", &shape));
        let variance = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!((variance * 300.0 - 1.0).abs() < 0.1, "{variance}");
        let norm = weights.values("norm.weight", &Shape::from_dims(&[8]));
        assert!(norm.iter().all(|x| (0.9..=1.1).contains(x)));
        let weights = weights.without(&["pool"]);
        assert!(weights.contains_tensor("layers.1.conv.weight"));
        assert!(!weights.contains_tensor("layers.1.pool.0.weight"));
    }
}
