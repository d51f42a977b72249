//! Cheap previews: a linear map from latent channels to RGB, per pixel, at latent resolution
//! (the "approximate" preview of AUTOMATIC1111 and ComfyUI, after Keturn's fit of SD latents).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The latent space a VAE encodes into; each has its own fitted preview factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentSpace {
    /// The SD1.x/2.x VAE.
    Sd,
    /// The SDXL VAE (base and refiner).
    Sdxl,
}

/// `[C][3]` weights and a `[3]` bias mapping each latent pixel to RGB in about `[-1, 1]`.
pub struct LatentRgbFactors {
    pub weights: Vec<[f32; 3]>,
    pub bias: [f32; 3],
}

/// The published least-squares fits for the SD1.x/2.x and SDXL VAEs (4 latent channels).
pub fn latent_rgb_factors(space: LatentSpace, channels: usize) -> Result<LatentRgbFactors> {
    if channels != 4 {
        return Err(Error::InvalidParameter {
            name: "preview",
            value: format!("latents with {channels} channels"),
            expected:
                "4-channel latents for the linear preview; give a tiny autoencoder for others"
                    .to_string(),
        });
    }
    Ok(match space {
        LatentSpace::Sd => LatentRgbFactors {
            weights: vec![
                [0.3512, 0.2297, 0.3227],
                [0.3250, 0.4974, 0.2350],
                [-0.2829, 0.1762, 0.2721],
                [-0.2120, -0.2616, -0.7177],
            ],
            bias: [0.0, 0.0, 0.0],
        },
        LatentSpace::Sdxl => LatentRgbFactors {
            weights: vec![
                [0.3651, 0.4232, 0.4341],
                [-0.2533, -0.0042, 0.1068],
                [0.1076, 0.1111, -0.0362],
                [-0.3165, -0.2492, -0.2188],
            ],
            bias: [0.1084, -0.0175, -0.0011],
        },
    })
}

/// `[1, C, h, w]` latents -> `[1, 3, h, w]` in `[0, 1]`.
pub fn linear_preview(latents: &Tensor, factors: &LatentRgbFactors) -> Result<Tensor> {
    let device = latents.device();
    let channels = factors.weights.len();
    let weights: Vec<f32> = factors.weights.iter().flatten().copied().collect();
    // [3, C] x [C, h*w]
    let weights = Tensor::from_vec(weights, (channels, 3), device)?.t()?;
    let bias = Tensor::from_vec(factors.bias.to_vec(), (3, 1), device)?;
    let (_, c, h, w) = latents.dims4()?;
    let flat = latents.get(0)?.to_dtype(DType::F32)?.reshape((c, h * w))?;
    let rgb = weights.matmul(&flat)?.broadcast_add(&bias)?;
    let rgb = ((rgb + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
    Ok(rgb.reshape((1, 3, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn projection_is_per_pixel_and_in_unit_range() {
        let factors = latent_rgb_factors(LatentSpace::Sd, 4).unwrap();
        // One pixel with latent (1, 0, 0, 0) maps to the first row of the weights.
        let latents =
            Tensor::from_vec(vec![1f32, 0.0, 0.0, 0.0], (1, 4, 1, 1), &Device::Cpu).unwrap();
        let rgb = linear_preview(&latents, &factors).unwrap();
        assert_eq!(rgb.dims(), &[1, 3, 1, 1]);
        let values = rgb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (v, w) in values.iter().zip(factors.weights[0]) {
            assert!((v - (w + 1.0) / 2.0).abs() < 1e-6);
        }
        let huge = (Tensor::ones((1, 4, 2, 3), DType::F32, &Device::Cpu).unwrap() * 100.0).unwrap();
        let rgb = linear_preview(&huge, &factors).unwrap();
        assert_eq!(rgb.dims(), &[1, 3, 2, 3]);
        assert!(rgb
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn other_channel_counts_need_a_tiny_autoencoder() {
        let message = latent_rgb_factors(LatentSpace::Sd, 16)
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("16") && message.contains("tiny autoencoder"),
            "{message}"
        );
    }
}
