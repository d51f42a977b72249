//! The autoencoder's boundary as Apple's `Decoder.swift` / `Encoder.swift` cross it: the scaling
//! factor is not inside the models, so `z` = latents / scaling_factor goes into `VAEDecoder`,
//! whose `image` is in [-1, 1]; `VAEEncoder` takes `x` in [-1, 1] and returns the 2C moments
//! (mean, log-variance) that are sampled (diffusers' `DiagonalGaussianDistribution`, log-variance
//! clamped to [-30, 20]) and multiplied by the scaling factor outside. The pipeline's side is
//! [0, 1] pixels, as its latent decoder and encoder traits want them.

use std::collections::HashMap;
use std::sync::Arc;

use super::features::{FeatureInfo, MultiArray};
use super::{take_output, CoreMlModel};
use crate::error::model as model_error;
use crate::Result;

/// A VAE decoder, optionally its encoder, and the scaling factor the latents are kept in.
pub struct VaeGlue {
    decoder: Arc<dyn CoreMlModel>,
    encoder: Option<Arc<dyn CoreMlModel>>,
    scaling_factor: f64,
}

fn single(model: &dyn CoreMlModel, features: &[FeatureInfo], what: &str) -> Result<FeatureInfo> {
    match features {
        [only] => Ok(only.clone()),
        _ => Err(model_error(
            model.name(),
            format!("expected one {what}, it declares {}", features.len()),
        )),
    }
}

/// Runs `model` (one input, one output) on `input`, in slices of the batch it was compiled for.
fn run_batched(model: &dyn CoreMlModel, input: &MultiArray) -> Result<MultiArray> {
    let feature = single(model, model.inputs(), "input")?;
    let output = single(model, model.outputs(), "output")?;
    if input.shape.get(1..) != feature.shape.get(1..) {
        return Err(model_error(
            model.name(),
            format!(
                "input {} of shape {:?}: the model was compiled for {:?} (Core ML models have a \
                 fixed size)",
                feature.name, input.shape, feature.shape
            ),
        ));
    }
    let model_batch = feature.shape.first().copied().unwrap_or(1).max(1);
    let batch = input.shape.first().copied().unwrap_or(0);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < batch {
        let take = model_batch.min(batch - start);
        let mut rows = input.rows(start, take)?;
        if take < model_batch {
            let last = rows.rows(take - 1, 1)?;
            let mut filled = vec![rows];
            filled.extend(std::iter::repeat_n(last, model_batch - take));
            rows = MultiArray::concat_rows(&filled)?;
        }
        let mut out = model.predict(&HashMap::from([(
            feature.name.clone(),
            rows.to_dtype(feature.dtype),
        )]))?;
        parts.push(take_output(model.name(), &mut out, &output.name)?.rows(0, take)?);
        start += take;
    }
    let out = MultiArray::concat_rows(&parts)?;
    MultiArray::from_f32(&out.shape, out.to_f32())
}

impl VaeGlue {
    pub fn new(
        decoder: Arc<dyn CoreMlModel>,
        encoder: Option<Arc<dyn CoreMlModel>>,
        scaling_factor: f64,
    ) -> Result<Self> {
        single(decoder.as_ref(), decoder.inputs(), "input")?;
        if let Some(encoder) = &encoder {
            single(encoder.as_ref(), encoder.inputs(), "input")?;
        }
        if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
            return Err(crate::Error::InvalidParameter {
                name: "VAE scaling factor",
                value: scaling_factor.to_string(),
                expected: "a positive number".to_string(),
            });
        }
        Ok(Self {
            decoder,
            encoder,
            scaling_factor,
        })
    }

    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The decoder's declared latent shape `[B, C, h, w]`.
    pub fn latent_shape(&self) -> &[usize] {
        self.decoder
            .inputs()
            .first()
            .map_or(&[], |f| f.shape.as_slice())
    }

    /// The decoder's declared image shape `[B, 3, H, W]`.
    pub fn image_shape(&self) -> &[usize] {
        self.decoder
            .outputs()
            .first()
            .map_or(&[], |f| f.shape.as_slice())
    }

    /// Latents as the scheduler keeps them `[B, C, h, w]` to pixels `[B, 3, H, W]` in [0, 1].
    pub fn decode(&self, latents: &MultiArray) -> Result<MultiArray> {
        let scale = self.scaling_factor as f32;
        let z: Vec<f32> = latents.to_f32().iter().map(|v| v / scale).collect();
        let image = run_batched(
            self.decoder.as_ref(),
            &MultiArray::from_f32(&latents.shape, z)?,
        )?;
        let pixels = image
            .to_f32()
            .iter()
            .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect();
        MultiArray::from_f32(&image.shape, pixels)
    }

    /// Pixels `[B, 3, H, W]` in [0, 1] to the encoder's moments `[B, 2C, h, w]` (mean, then
    /// log-variance), unscaled.
    pub fn encode_moments(&self, image: &MultiArray) -> Result<MultiArray> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            model_error(
                "VAEEncoder",
                "this resources folder has no VAEEncoder: image-to-image needs one (Apple's \
                 SDXL bundles ship none)",
            )
        })?;
        let x: Vec<f32> = image.to_f32().iter().map(|v| v * 2.0 - 1.0).collect();
        run_batched(encoder.as_ref(), &MultiArray::from_f32(&image.shape, x)?)
    }

    /// A latent drawn from `moments` with standard normal `noise` (the mean's shape `[B, C, h,
    /// w]`): (mean + exp(logvar / 2) * noise) * scaling factor.
    pub fn sample(&self, moments: &MultiArray, noise: &MultiArray) -> Result<MultiArray> {
        let (b, c2, h, w) = match moments.shape.as_slice() {
            &[b, c2, h, w] if c2 % 2 == 0 => (b, c2, h, w),
            other => {
                return Err(model_error(
                    "VAEEncoder",
                    format!("moments of shape {other:?}; expected [B, 2C, h, w]"),
                ))
            }
        };
        let c = c2 / 2;
        if noise.shape != [b, c, h, w] {
            return Err(crate::Error::InvalidParameter {
                name: "VAE noise",
                value: format!("{:?}", noise.shape),
                expected: format!("{:?}", [b, c, h, w]),
            });
        }
        let (m, n) = (moments.to_f32(), noise.to_f32());
        let plane = c * h * w;
        let scale = self.scaling_factor as f32;
        let mut out = Vec::with_capacity(b * plane);
        for bi in 0..b {
            let (mean, logvar) = (
                &m[bi * 2 * plane..bi * 2 * plane + plane],
                &m[bi * 2 * plane + plane..(bi + 1) * 2 * plane],
            );
            for i in 0..plane {
                let std = (0.5 * logvar[i].clamp(-30.0, 20.0)).exp();
                out.push((mean[i] + std * n[bi * plane + i]) * scale);
            }
        }
        MultiArray::from_f32(&[b, c, h, w], out)
    }
}
