//! DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models"), following diffusers'
//! `schedulers/scheduling_ddim.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{parse_config, BetaSchedule, PredictionType, TimestepSpacing, BETA_CHOICES};
use crate::ops::{self, div, f32, mul};
use crate::schedule::{self, beta_params};
use crate::{check_steps, Error, NoiseSource, Result, Scheduler};

const CLASS: &str = "DDIMScheduler";

/// `DDIMScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// Reads the config from a diffusers JSON object (unknown keys ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        parse_config(
            CLASS,
            value,
            &[
                BETA_CHOICES[0],
                BETA_CHOICES[1],
                ("prediction_type", &["epsilon", "sample", "v_prediction"]),
            ],
        )
    }
}

/// Converts a model output to `(x0, epsilon)` predictions for the alpha-based (DDPM-family)
/// schedulers; `a` is `alphas_cumprod[t]`.
pub(crate) fn predict_x0_eps(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    a: f32,
) -> Result<(Tensor, Tensor)> {
    let b = 1.0 - a;
    Ok(match prediction_type {
        PredictionType::Epsilon => {
            let x0 = div(&(sample - mul(model_output, b.sqrt())?)?, a.sqrt())?;
            (x0, model_output.clone())
        }
        PredictionType::Sample => {
            let eps = div(&(sample - mul(model_output, a.sqrt())?)?, b.sqrt())?;
            (model_output.clone(), eps)
        }
        PredictionType::VPrediction => {
            let x0 = (mul(sample, a.sqrt())? - mul(model_output, b.sqrt())?)?;
            let eps = (mul(model_output, a.sqrt())? + mul(sample, b.sqrt())?)?;
            (x0, eps)
        }
    })
}

/// `sqrt(a) * original + sqrt(1 - a) * noise`: the alpha-based schedulers' `add_noise`.
pub(crate) fn add_noise_alpha(original: &Tensor, noise: &Tensor, a: f32) -> Result<Tensor> {
    let noisy = (mul(&f32(original)?, a.sqrt())? + mul(&f32(noise)?, (1.0 - a).sqrt())?)?;
    Ok(noisy.to_dtype(original.dtype())?)
}

/// An integer training timestep as an index into `alphas_cumprod`.
pub(crate) fn train_index(class: &str, t: f64, len: usize) -> Result<usize> {
    if t.fract() != 0.0 || t < 0.0 || t >= len as f64 {
        return Err(Error::UnknownTimestep {
            class: class.to_string(),
            timestep: t,
        });
    }
    Ok(t as usize)
}

/// DDIM, deterministic (`eta = 0`) unless [`DdimScheduler::set_eta`] says otherwise.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    eta: f64,
}

impl DdimScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: DdimConfig, num_inference_steps: usize) -> Result<Self> {
        let alphas_cumprod = beta_params!(config).alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod.first().copied().unwrap_or(1.0)
        };
        let mut scheduler = Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            eta: 0.0,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    /// diffusers' `set_timesteps`.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(CLASS, n, train)?;
        let timesteps: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => schedule::leading(train, n, self.config.steps_offset),
            TimestepSpacing::Trailing => schedule::trailing(train as f64, train, n),
        };
        self.num_inference_steps = n;
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        Ok(())
    }

    /// The `eta` of DDIM's `step` (0 = deterministic DDIM, 1 = DDPM-like); diffusers' pipelines
    /// default to 0.
    pub fn set_eta(&mut self, eta: f64) {
        self.eta = eta;
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let t = train_index(CLASS, timestep, self.alphas_cumprod.len())?;
        let prev_t = t as i64 - (cfg.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (model_output, x) = (f32(model_output)?, f32(sample)?);
        let (mut x0, eps) = predict_x0_eps(cfg.prediction_type, &model_output, &x, a_t)?;
        if cfg.thresholding {
            x0 = ops::threshold_sample(&x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)?;
        } else if cfg.clip_sample {
            let r = cfg.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = mul(&eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (mul(&x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = ops::draw_noise(CLASS, noise, &model_output)?;
            prev = (prev + mul(&z, std_dev)?)?;
        }
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let t = train_index(CLASS, timestep, self.alphas_cumprod.len())?;
        add_noise_alpha(original, noise, self.alphas_cumprod[t])
    }

    fn set_begin_index(&mut self, _begin_index: usize) {}

    fn order(&self) -> usize {
        1
    }
}
