//! Latent Consistency Model multistep sampling (Luo et al. 2023): each step predicts the clean
//! sample through the consistency boundary condition and re-noises it to the next timestep,
//! following diffusers' `schedulers/scheduling_lcm.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{parse_config, BetaSchedule, PredictionType, TimestepSpacing, BETA_CHOICES};
use crate::ddim::{add_noise_alpha, predict_x0_eps, train_index};
use crate::ops::{self, f32, mul, StepIndex};
use crate::schedule::beta_params;
use crate::{check_steps, Error, NoiseSource, Result, Scheduler};

const CLASS: &str = "LCMScheduler";
/// `sigma_data` of the consistency-model boundary condition.
const SIGMA_DATA: f32 = 0.5;

/// `LCMScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LcmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    /// Not used by LCM's `set_timesteps` (diffusers keeps it for config compatibility).
    pub timestep_spacing: TimestepSpacing,
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl LcmConfig {
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

/// LCM: draws fresh noise after every step but the last.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl LcmScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: LcmConfig, num_inference_steps: usize) -> Result<Self> {
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
            index: StepIndex::default(),
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    /// diffusers' `set_timesteps(num_inference_steps)` (full strength, the config's
    /// `original_inference_steps`).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.set_timesteps_with(n, None, 1.0)
    }

    /// diffusers' `set_timesteps(num_inference_steps, original_inference_steps=..., strength=...)`:
    /// `n` timesteps picked evenly from the distillation schedule
    /// `[k - 1, 2k - 1, ..., original_steps * k - 1]`, `k = train // original_steps`, truncated to
    /// `strength` for image-to-image.
    pub fn set_timesteps_with(
        &mut self,
        n: usize,
        original_inference_steps: Option<usize>,
        strength: f64,
    ) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(CLASS, n, train)?;
        let original = original_inference_steps.unwrap_or(self.config.original_inference_steps);
        let invalid = |reason: String| Error::InvalidSteps {
            class: CLASS.to_string(),
            steps: n,
            reason,
        };
        if original == 0 || original > train {
            return Err(invalid(format!(
                "original_inference_steps {original} must be between 1 and the {train} training timesteps"
            )));
        }
        let k = (train / original) as i64;
        let count = (original as f64 * strength) as usize;
        // Descending `lcm_origin_timesteps`.
        let origin: Vec<i64> = (1..=count as i64).rev().map(|i| i * k - 1).collect();
        if origin.len() / n < 1 {
            return Err(invalid(format!(
                "original_inference_steps x strength = {original} x {strength} leaves only {} timesteps",
                origin.len()
            )));
        }
        if n > original {
            return Err(invalid(format!(
                "cannot be larger than original_inference_steps = {original}"
            )));
        }
        // np.floor(np.linspace(0, len, n, endpoint=False)).
        let step = origin.len() as f64 / n as f64;
        self.timesteps = (0..n)
            .map(|i| origin[((i as f64 * step).floor() as usize).min(origin.len() - 1)] as f64)
            .collect();
        self.num_inference_steps = n;
        self.index = StepIndex::default();
        Ok(())
    }

    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    fn alpha(&self, t: f64) -> Result<f32> {
        if t < 0.0 {
            return Ok(self.final_alpha_cumprod);
        }
        Ok(self.alphas_cumprod[train_index(CLASS, t, self.alphas_cumprod.len())?])
    }
}

impl Scheduler for LcmScheduler {
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
        let i = self
            .index
            .for_step(CLASS, &self.timesteps, timestep, false)?;
        let cfg = &self.config;
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(timestep);
        let a_t = self.alpha(timestep)?;
        let a_prev = self.alpha(prev_t)?;
        // Consistency-model boundary condition, in float32 as diffusers' tensors.
        let scaled = timestep as f32 * cfg.timestep_scaling as f32;
        let sd2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = sd2 / (scaled * scaled + sd2);
        let c_out = scaled / (scaled * scaled + sd2).sqrt();
        let (m, x) = (f32(model_output)?, f32(sample)?);
        let (mut x0, _) = predict_x0_eps(cfg.prediction_type, &m, &x, a_t)?;
        if cfg.thresholding {
            x0 = ops::threshold_sample(&x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)?;
        } else if cfg.clip_sample {
            let r = cfg.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = (mul(&x0, c_out)? + mul(&x, c_skip)?)?;
        let prev = if i + 1 != self.num_inference_steps {
            let z = ops::draw_noise(CLASS, noise, &denoised)?;
            (mul(&denoised, a_prev.sqrt())? + mul(&z, (1.0 - a_prev).sqrt())?)?
        } else {
            denoised
        };
        self.index.advance();
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_alpha(original, noise, self.alpha(timestep)?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn order(&self) -> usize {
        1
    }
}
