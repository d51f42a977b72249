//! Euler sampler of Karras et al. (2022, "Elucidating the Design Space of Diffusion-Based Generative
//! Models", algorithm 2 without churn), following diffusers' `schedulers/scheduling_euler_discrete.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{
    check_sigma_options, config_enum, parse_config, BetaSchedule, FinalSigmasType, PredictionType,
    TimestepSpacing, BETA_CHOICES,
};
use crate::ops::{div, f32, mul, StepIndex};
use crate::schedule::{self, BetaParams};
use crate::{check_steps, NoiseSource, Result, Scheduler};

const CLASS: &str = "EulerDiscreteScheduler";

config_enum! {
    /// `interpolation_type`: how sigmas between training steps are found.
    InterpolationType {
        Linear = "linear",
        LogLinear = "log_linear",
    }
}

config_enum! {
    /// `timestep_type`: whether the UNet is fed training timesteps or `0.25 * log(sigma)`.
    TimestepType {
        Discrete = "discrete",
        Continuous = "continuous",
    }
}

/// `EulerDiscreteScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub interpolation_type: InterpolationType,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_type: TimestepType,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl EulerDiscreteConfig {
    /// Reads the config from a diffusers JSON object (unknown keys ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        parse_config(
            CLASS,
            value,
            &[
                BETA_CHOICES[0],
                BETA_CHOICES[1],
                ("prediction_type", PredictionType::ACCEPTED),
                ("interpolation_type", InterpolationType::ACCEPTED),
                ("timestep_type", TimestepType::ACCEPTED),
                ("final_sigmas_type", FinalSigmasType::ACCEPTED),
            ],
        )
    }
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

/// Euler: `x + (x - x0) / sigma * (sigma_next - sigma)`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl EulerDiscreteScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: EulerDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
        check_sigma_options(
            CLASS,
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        let betas = schedule::betas(&BetaParams {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        });
        let mut alphas_cumprod = schedule::alphas_cumprod(&betas);
        schedule::pin_terminal_alpha_cumprod(&mut alphas_cumprod, config.rescale_betas_zero_snr);
        let mut scheduler = Self {
            config,
            alphas_cumprod,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            index: StepIndex::default(),
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    /// diffusers' `set_timesteps(num_inference_steps)`.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let cfg = &self.config;
        let train = cfg.num_train_timesteps;
        check_steps(CLASS, n, train)?;
        let spaced =
            schedule::euler_family_timesteps(cfg.timestep_spacing, train, n, cfg.steps_offset);
        let train_sigmas = schedule::train_sigmas(&self.alphas_cumprod);
        let log_sigmas = schedule::log_sigmas(&train_sigmas);
        let mut sigmas: Vec<f64> = match cfg.interpolation_type {
            InterpolationType::Linear => spaced
                .iter()
                .map(|&t| schedule::np_interp_index(t as f64, &train_sigmas))
                .collect(),
            // diffusers quirk: `log_linear` spaces n + 1 sigmas from the smallest to the largest
            // (ascending), in float32 via torch.linspace, and still appends the final sigma.
            InterpolationType::LogLinear => {
                let first = schedule::np_interp_index(spaced[0] as f64, &train_sigmas);
                let last = schedule::np_interp_index(spaced[n - 1] as f64, &train_sigmas);
                schedule::torch_linspace_f32(last.ln(), first.ln(), n + 1)
                    .into_iter()
                    .map(|l| l.exp() as f64)
                    .collect()
            }
        };
        let mut timesteps: Vec<f64> = spaced.iter().map(|&t| t as f64).collect();
        let opts = SigmaOptions {
            karras: cfg.use_karras_sigmas,
            exponential: cfg.use_exponential_sigmas,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
        };
        if let Some((s, t)) = convert_sigmas(opts, &sigmas, &log_sigmas, n) {
            sigmas = s;
            timesteps = t;
        }
        let sigma_last = match cfg.final_sigmas_type {
            FinalSigmasType::SigmaMin => train_sigmas.first().copied().unwrap_or(0.0) as f64,
            FinalSigmasType::Zero => 0.0,
        };
        sigmas.push(sigma_last);
        self.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        self.timesteps = if cfg.timestep_type == TimestepType::Continuous
            && cfg.prediction_type == PredictionType::VPrediction
        {
            self.sigmas[..self.sigmas.len() - 1]
                .iter()
                .map(|s| (0.25 * s.ln()) as f64)
                .collect()
        } else {
            timesteps.iter().map(|&t| t as f32 as f64).collect()
        };
        self.index = StepIndex::default();
        Ok(())
    }

    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    /// The float32 sigmas, one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// `sample / sqrt(sigma^2 + 1)`, in float32 as diffusers.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
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
pub(crate) fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
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

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .index
            .for_step(CLASS, &self.timesteps, timestep, false)?;
        scale_by_sigma(sample, self.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self
            .index
            .for_step(CLASS, &self.timesteps, timestep, false)?;
        let (m, x) = (f32(model_output)?, f32(sample)?);
        // No churn (s_churn = 0): sigma_hat = sigma.
        let sigma = self.sigmas[i];
        let x0 = sigma_x0(self.config.prediction_type, &m, &x, sigma)?;
        let derivative = div(&(&x - x0)?, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        let prev = (x + mul(&derivative, dt)?)?;
        self.index.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .index
            .for_add_noise(CLASS, &self.timesteps, timestep, false)?;
        add_noise_sigma(original, noise, self.sigmas[i])
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn order(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_and_exponential_are_exclusive() {
        let cfg = EulerDiscreteConfig {
            use_karras_sigmas: true,
            use_exponential_sigmas: true,
            ..Default::default()
        };
        assert!(EulerDiscreteScheduler::new(cfg, 10).is_err());
    }

    #[test]
    fn linspace_init_noise_sigma_is_the_largest_sigma() {
        let s = EulerDiscreteScheduler::new(EulerDiscreteConfig::default(), 10).unwrap();
        let max = s.sigmas()[0] as f64;
        assert!((s.init_noise_sigma() - max).abs() < 1e-6);
    }

    #[test]
    fn step_past_the_end_errors() {
        let mut s = EulerDiscreteScheduler::new(EulerDiscreteConfig::default(), 2).unwrap();
        let x = Tensor::zeros(
            (1, 1, 2, 2),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let ts = s.timesteps().to_vec();
        let mut x = x;
        for t in &ts {
            x = s.step(&x.clone(), *t, &x, &mut crate::NoNoise).unwrap();
        }
        assert!(s.step(&x.clone(), ts[1], &x, &mut crate::NoNoise).is_err());
    }
}
