//! The pieces shared by the sigma-based (Euler-family) schedulers of diffusers
//! (`scheduling_euler_discrete.py`, `scheduling_euler_ancestral_discrete.py`,
//! `scheduling_heun_discrete.py`, `scheduling_lms_discrete.py`): the interpolated sigma table, the
//! Karras / exponential replacement, input scaling, the denoised estimate and `add_noise`.

use candle_core::Tensor;

use crate::config::{PredictionType, TimestepSpacing};
use crate::ops::{div, f32, mul, StepIndex};
use crate::schedule;
use crate::Result;

/// `np.interp(timesteps, arange(len(sigmas)), sigmas)`: the training sigmas at the spaced
/// (fractional) timesteps, in float64.
pub(crate) fn interpolate_sigmas(spaced: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    spaced
        .iter()
        .map(|&t| schedule::np_interp_index(t as f64, train_sigmas))
        .collect()
}

/// The sigma-schedule switches shared by the Euler-family schedulers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SigmaOptions {
    pub karras: bool,
    pub exponential: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

/// Replaces interpolated sigmas by a Karras or exponential schedule (diffusers' `_convert_to_*`),
/// with the timesteps found by `_sigma_to_t`; `None` when neither option is on.
pub(crate) fn convert_sigmas(
    opts: SigmaOptions,
    sigmas: &[f64],
    log_sigmas: &[f32],
    n: usize,
) -> Option<(Vec<f64>, Vec<f64>)> {
    if !opts.karras && !opts.exponential {
        return None;
    }
    let sigma_min = opts
        .sigma_min
        .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
    let sigma_max = opts
        .sigma_max
        .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
    let converted = if opts.karras {
        schedule::karras_sigmas(sigma_min, sigma_max, n)
    } else {
        schedule::exponential_sigmas(sigma_min, sigma_max, n)
    };
    let timesteps = converted
        .iter()
        .map(|&s| schedule::sigma_to_t(s, log_sigmas))
        .collect();
    Some((converted, timesteps))
}

/// `sample / sqrt(sigma^2 + 1)`, in float32 as diffusers.
fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let scaled = div(&f32(sample)?, (sigma * sigma + 1.0).sqrt())?;
    Ok(scaled.to_dtype(sample.dtype())?)
}

/// The denoised estimate `x0` of the sigma-based schedulers for a model output.
pub(crate) fn sigma_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// `original + noise * sigma`: the sigma-based schedulers' `add_noise`.
fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let noisy = (f32(original)? + mul(&f32(noise)?, sigma)?)?;
    Ok(noisy.to_dtype(original.dtype())?)
}

/// diffusers' `init_noise_sigma` for the Euler family: the largest sigma, or `sqrt(max^2 + 1)`
/// for "leading" spacing.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// The spaced timesteps as float64, or the Karras / exponential sigmas and their timesteps in
/// place of `sigmas` when one of those options is on.
pub(crate) fn apply_sigma_options(
    opts: SigmaOptions,
    sigmas: Vec<f64>,
    spaced: &[f32],
    log_sigmas: &[f32],
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    match convert_sigmas(opts, &sigmas, log_sigmas, n) {
        Some(converted) => converted,
        None => (sigmas, spaced.iter().map(|&t| t as f64).collect()),
    }
}

/// diffusers' `scale_model_input` of the sigma-based schedulers: finds (and fixes) the step index
/// on first use, then divides by `sqrt(sigma^2 + 1)`.
pub(crate) fn scale_model_input(
    class: &str,
    index: &mut StepIndex,
    timesteps: &[f64],
    sigmas: &[f32],
    sample: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let i = index.for_step(class, timesteps, timestep, false)?;
    scale_by_sigma(sample, sigmas[i])
}

/// diffusers' `add_noise` of the sigma-based schedulers: `original + noise * sigma` at the
/// timestep's (or begin index's) sigma.
pub(crate) fn add_noise(
    class: &str,
    index: &StepIndex,
    timesteps: &[f64],
    sigmas: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let i = index.for_add_noise(class, timesteps, timestep, false)?;
    add_noise_sigma(original, noise, sigmas[i])
}
