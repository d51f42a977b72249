//! Euler sampler of Karras et al. (2022, "Elucidating the Design Space of Diffusion-Based Generative
//! Models", algorithm 2 without churn), following diffusers' `schedulers/scheduling_euler_discrete.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{
    check_sigma_options, config_enum, parse_config, BetaSchedule, FinalSigmasType, PredictionType,
    TimestepSpacing, BETA_CHOICES,
};
use crate::ops::{div, f32, mul, StepIndex};
use crate::schedule::{self, beta_params};
use crate::sigmas::{self, SigmaOptions};
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
        let alphas_cumprod = beta_params!(config).pinned_alphas_cumprod();
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
        let sigmas: Vec<f64> = match cfg.interpolation_type {
            InterpolationType::Linear => sigmas::interpolate_sigmas(&spaced, &train_sigmas),
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
        let opts = SigmaOptions {
            karras: cfg.use_karras_sigmas,
            exponential: cfg.use_exponential_sigmas,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
        };
        let (mut sigmas, timesteps) =
            sigmas::apply_sigma_options(opts, sigmas, &spaced, &log_sigmas, n);
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

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::euler_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let (steps, table) = (&self.timesteps, &self.sigmas);
        sigmas::scale_model_input(CLASS, &mut self.index, steps, table, sample, timestep)
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
        let x0 = sigmas::sigma_x0(self.config.prediction_type, &m, &x, sigma)?;
        let derivative = div(&(&x - x0)?, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        let prev = (x + mul(&derivative, dt)?)?;
        self.index.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let (index, steps, table) = (&self.index, &self.timesteps, &self.sigmas);
        sigmas::add_noise(CLASS, index, steps, table, original, noise, timestep)
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
