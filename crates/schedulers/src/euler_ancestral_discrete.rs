//! Euler ancestral sampler (k-diffusion's `sample_euler_ancestral`): an Euler step down to
//! `sigma_down`, then fresh noise of size `sigma_up`, following diffusers'
//! `schedulers/scheduling_euler_ancestral_discrete.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{parse_config, BetaSchedule, PredictionType, TimestepSpacing, BETA_CHOICES};
use crate::ops::{self, div, f32, mul, StepIndex};
use crate::schedule::{self, beta_params};
use crate::sigmas;
use crate::{check_steps, NoiseSource, Result, Scheduler};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// `EulerAncestralDiscreteScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EulerAncestralDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl EulerAncestralDiscreteConfig {
    /// Reads the config from a diffusers JSON object (unknown keys ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        parse_config(
            CLASS,
            value,
            &[
                BETA_CHOICES[0],
                BETA_CHOICES[1],
                ("prediction_type", PredictionType::ACCEPTED),
            ],
        )
    }
}

/// Euler ancestral ("Euler a"): stochastic, draws one noise tensor per step.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteConfig,
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: EulerAncestralDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
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
        let mut sigmas: Vec<f32> = sigmas::interpolate_sigmas(&spaced, &train_sigmas)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = spaced.iter().map(|&t| t as f64).collect();
        self.index = StepIndex::default();
        Ok(())
    }

    pub fn config(&self) -> &EulerAncestralDiscreteConfig {
        &self.config
    }

    /// The float32 sigmas, one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self
            .index
            .for_step(CLASS, &self.timesteps, timestep, false)?;
        let (m, x) = (f32(model_output)?, f32(sample)?);
        let sigma = self.sigmas[i];
        let x0 = sigmas::sigma_x0(self.config.prediction_type, &m, &x, sigma)?;
        let (sigma_from, sigma_to) = (sigma, self.sigmas[i + 1]);
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&x - x0)?, sigma)?;
        let prev = (x + mul(&derivative, sigma_down - sigma)?)?;
        let z = ops::draw_noise(CLASS, noise, &m)?;
        let prev = (prev + mul(&z, sigma_up)?)?;
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
