//! Heun's second-order sampler (Karras et al. 2022, algorithm 1 without churn), following diffusers'
//! `schedulers/scheduling_heun_discrete.py`: every step but the last takes two model evaluations,
//! so the timestep list repeats each inner timestep and `step` alternates between the Euler
//! predictor and the trapezoidal corrector.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{
    check_sigma_options, parse_config, BetaSchedule, PredictionType, TimestepSpacing, BETA_CHOICES,
};
use crate::ops::{div, f32, mul, StepIndex};
use crate::schedule::{self, beta_params};
use crate::sigmas::{self, SigmaOptions};
use crate::{check_steps, NoiseSource, Result, Scheduler};

const CLASS: &str = "HeunDiscreteScheduler";

/// `HeunDiscreteScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HeunDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// Not a constructor argument: diffusers reads `sigma_min` / `sigma_max` for the Karras and
    /// exponential schedules through `hasattr(self.config, ...)`, which also sees keys carried over
    /// from another scheduler's config (diffusers keeps unknown keys as hidden config entries).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl Default for HeunDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

impl HeunDiscreteConfig {
    /// Reads the config from a diffusers JSON object (unknown keys ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        parse_config(
            CLASS,
            value,
            &[
                ("beta_schedule", BetaSchedule::ACCEPTED),
                BETA_CHOICES[1],
                ("prediction_type", PredictionType::ACCEPTED),
            ],
        )
    }
}

/// The predictor's derivative, step size and starting sample, kept for the corrector call.
#[derive(Debug, Clone)]
struct FirstOrder {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// Heun: predictor and corrector are separate `step` calls with their own model evaluations.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    config: HeunDiscreteConfig,
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
    pending: Option<FirstOrder>,
}

impl HeunDiscreteScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: HeunDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
        check_sigma_options(
            CLASS,
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        let alphas_cumprod = beta_params!(config, false).alphas_cumprod();
        let mut scheduler = Self {
            config,
            alphas_cumprod,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            index: StepIndex::default(),
            pending: None,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    /// diffusers' `set_timesteps(num_inference_steps)`: `2n - 1` model evaluations.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let cfg = &self.config;
        let train = cfg.num_train_timesteps;
        check_steps(CLASS, n, train)?;
        let spaced =
            schedule::euler_family_timesteps(cfg.timestep_spacing, train, n, cfg.steps_offset);
        let train_sigmas = schedule::train_sigmas(&self.alphas_cumprod);
        let log_sigmas = schedule::log_sigmas(&train_sigmas);
        let sigmas = sigmas::interpolate_sigmas(&spaced, &train_sigmas);
        let opts = SigmaOptions {
            karras: cfg.use_karras_sigmas,
            exponential: cfg.use_exponential_sigmas,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
        };
        let (mut sigmas, timesteps) =
            sigmas::apply_sigma_options(opts, sigmas, &spaced, &log_sigmas, n);
        sigmas.push(0.0);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        // [s0, s1, s1, s2, s2, ..., s_last, s_last, 0] and [t0, t1, t1, ..., t_last, t_last].
        let last = sigmas.len() - 1;
        self.sigmas = std::iter::once(sigmas[0])
            .chain(sigmas[1..last].iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(sigmas[last]))
            .collect();
        let timesteps: Vec<f64> = timesteps.iter().map(|&t| t as f32 as f64).collect();
        self.timesteps = std::iter::once(timesteps[0])
            .chain(timesteps[1..].iter().flat_map(|&t| [t, t]))
            .collect();
        self.index = StepIndex::default();
        self.pending = None;
        Ok(())
    }

    pub fn config(&self) -> &HeunDiscreteConfig {
        &self.config
    }

    /// The float32 sigmas as diffusers stores them (inner ones repeated).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for HeunDiscreteScheduler {
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
        let cfg = &self.config;
        let (m, x) = (f32(model_output)?, f32(sample)?);
        let first_order = self.pending.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[i], self.sigmas[i + 1])
        } else {
            (self.sigmas[i - 1], self.sigmas[i])
        };
        // No churn: sigma_hat = sigma.
        let sigma_input = if first_order { sigma } else { sigma_next };
        let mut x0 = sigmas::sigma_x0(cfg.prediction_type, &m, &x, sigma_input)?;
        if cfg.clip_sample {
            let r = cfg.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let prev = match self.pending.take() {
            None => {
                let derivative = div(&(&x - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&x + mul(&derivative, dt)?)?;
                self.pending = Some(FirstOrder {
                    derivative,
                    dt,
                    sample: x,
                });
                prev
            }
            Some(first) => {
                let derivative = div(&(&x - x0)?, sigma_next)?;
                let derivative = div(&(first.derivative + derivative)?, 2.0)?;
                (first.sample + mul(&derivative, first.dt)?)?
            }
        };
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
        2
    }
}
