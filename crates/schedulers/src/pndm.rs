//! PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): Runge-Kutta
//! warm-up steps (PRK) then linear multistep (PLMS), following diffusers' `schedulers/scheduling_pndm.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{parse_config, BetaSchedule, PredictionType, TimestepSpacing, BETA_CHOICES};
use crate::ddim::{add_noise_alpha, train_index};
use crate::ops::{div, f32, mul};
use crate::schedule::{self, beta_params};
use crate::{check_steps, Error, NoiseSource, Result, Scheduler};

const CLASS: &str = "PNDMScheduler";
/// PNDM is a fourth-order method.
const PNDM_ORDER: usize = 4;

/// `PNDMScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PndmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl Default for PndmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

impl PndmConfig {
    /// Reads the config from a diffusers JSON object (unknown keys ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        parse_config(
            CLASS,
            value,
            &[
                BETA_CHOICES[0],
                BETA_CHOICES[1],
                ("prediction_type", &["epsilon", "v_prediction"]),
            ],
        )
    }
}

/// PNDM / PLMS: the `step` calls alternate between Runge-Kutta and multistep updates by an
/// internal counter, exactly as diffusers' `step_prk` / `step_plms`.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    config: PndmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: PndmConfig, num_inference_steps: usize) -> Result<Self> {
        let alphas_cumprod = beta_params!(config, false).alphas_cumprod();
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
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    /// diffusers' `set_timesteps`: PRK timesteps (unless skipped) then PLMS timesteps.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(CLASS, n, train)?;
        // Ascending, as diffusers' `_timesteps`.
        let base: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let mut v = schedule::leading(train, n, self.config.steps_offset);
                v.reverse();
                v
            }
            TimestepSpacing::Trailing => {
                let mut v = schedule::trailing(train as f64, train, n);
                v.reverse();
                v
            }
        };
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.config.skip_prk_steps {
            // PLMS repeats the second-to-last entry: its first two calls form one Heun-like step.
            let mut plms: Vec<i64> = base[..base.len() - 1].to_vec();
            if base.len() >= 2 {
                plms.push(base[base.len() - 2]);
            }
            plms.push(base[base.len() - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if base.len() < PNDM_ORDER {
                return Err(Error::InvalidSteps {
                    class: CLASS.to_string(),
                    steps: n,
                    reason: format!(
                        "PNDM with Runge-Kutta warm-up (skip_prk_steps = false) needs at least {PNDM_ORDER} steps"
                    ),
                });
            }
            let half = (train / n / 2) as i64;
            let tail = &base[base.len() - PNDM_ORDER..];
            // prk = tail.repeat(2) + tile([0, half]); then prk[:-1].repeat(2)[1:-1], reversed.
            let prk: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = prk[..prk.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..base.len().saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.num_inference_steps = n;
        self.timesteps = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    pub fn config(&self) -> &PndmConfig {
        &self.config
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        let index = train_index(CLASS, t as f64, self.alphas_cumprod.len())?;
        Ok(self.alphas_cumprod[index])
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn prev_sample(
        &self,
        x: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.alpha(t)?;
        let a_prev = self.alpha(prev_t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let model_output = match self.config.prediction_type {
            PredictionType::VPrediction => (mul(model_output, a_t.sqrt())? + mul(x, b_t.sqrt())?)?,
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let correction = div(&mul(&model_output, a_prev - a_t)?, denom)?;
        Ok((mul(x, sample_coeff)? - correction)?)
    }

    fn step_prk(&mut self, model_output: Tensor, timestep: i64, x: Tensor) -> Result<Tensor> {
        let half = (self.config.num_train_timesteps / self.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let accumulate = |acc: &Option<Tensor>, term: Tensor| -> Result<Tensor> {
            Ok(match acc {
                Some(acc) => (acc + term)?,
                None => term,
            })
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(accumulate(
                    &self.cur_model_output,
                    mul(&model_output, sixth)?,
                )?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(x.clone());
                model_output
            }
            1 | 2 => {
                self.cur_model_output = Some(accumulate(
                    &self.cur_model_output,
                    mul(&model_output, third)?,
                )?);
                model_output
            }
            _ => {
                let out = accumulate(&self.cur_model_output, mul(&model_output, sixth)?)?;
                self.cur_model_output = None;
                out
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(x);
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: Tensor, timestep: i64, x: Tensor) -> Result<Tensor> {
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::TooManySteps {
                class: CLASS.to_string(),
                calls: self.counter + 1,
                available: self.timesteps.len(),
            });
        }
        let ratio = (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let (model_output, x) = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(x.clone());
            (model_output, x)
        } else if n == 1 && self.counter == 1 {
            let averaged = div(&(&model_output + &e[0])?, 2.0)?;
            let x = self.cur_sample.take().unwrap_or(x);
            (averaged, x)
        } else if n == 2 {
            (div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?, x)
        } else if n == 3 {
            let sum = ((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?;
            (div(&sum, 12.0)?, x)
        } else {
            let sum = (((mul(&e[n - 1], 55.0)? - mul(&e[n - 2], 59.0)?)?
                + mul(&e[n - 3], 37.0)?)?
                - mul(&e[n - 4], 9.0)?)?;
            (mul(&sum, (1.0f64 / 24.0) as f32)?, x)
        };
        let prev = self.prev_sample(&x, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PndmScheduler {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.counter >= self.timesteps.len() {
            return Err(Error::TooManySteps {
                class: CLASS.to_string(),
                calls: self.counter + 1,
                available: self.timesteps.len(),
            });
        }
        if timestep.fract() != 0.0 {
            return Err(Error::UnknownTimestep {
                class: CLASS.to_string(),
                timestep,
            });
        }
        let (m, x) = (f32(model_output)?, f32(sample)?);
        let t = timestep as i64;
        let prev = if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(m, t, x)?
        } else {
            self.step_plms(m, t, x)?
        };
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
