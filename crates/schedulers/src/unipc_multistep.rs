//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models"): a multistep predictor (UniP) and a corrector (UniC) that reuses the next
//! model evaluation, B(h) variants bh1/bh2, following diffusers'
//! `schedulers/scheduling_unipc_multistep.py`. Coefficients are float32 scalars, as diffusers
//! computes them with 0-dim float32 tensors.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{
    bad_value, check_sigma_options, config_enum, parse_config, BetaSchedule, FinalSigmasType,
    PredictionType, TimestepSpacing, BETA_CHOICES,
};
use crate::dpmsolver_multistep::{alpha_sigma, lambda};
use crate::ops::{self, div, f32, mul, StepIndex};
use crate::schedule::{self, beta_params};
use crate::sigmas::{convert_sigmas, SigmaOptions};
use crate::{Error, NoiseSource, Result, Scheduler};

const CLASS: &str = "UniPCMultistepScheduler";

config_enum! {
    /// `solver_type`: the `B(h)` of the UniPC update.
    UniPcSolverType {
        /// `B(h) = h`.
        Bh1 = "bh1",
        /// `B(h) = e^h - 1`. diffusers quirk: the DPM-Solver types `midpoint`, `heun`, `logrho`
        /// (a DPM-Solver config loaded into this class) become `bh2`.
        Bh2 = "bh2" | "midpoint" | "heun" | "logrho",
    }
}

/// `UniPCMultistepScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UniPcMultistepConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub predict_x0: bool,
    pub solver_type: UniPcSolverType,
    pub lower_order_final: bool,
    pub disable_corrector: Vec<usize>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub final_sigmas_type: FinalSigmasType,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl Default for UniPcMultistepConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            predict_x0: true,
            solver_type: UniPcSolverType::Bh2,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

impl UniPcMultistepConfig {
    /// Reads the config from a diffusers JSON object (unknown keys ignored).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let cfg: Self = parse_config(
            CLASS,
            value,
            &[
                BETA_CHOICES[0],
                BETA_CHOICES[1],
                ("prediction_type", &["epsilon", "sample", "v_prediction"]),
                ("solver_type", UniPcSolverType::ACCEPTED),
                ("final_sigmas_type", FinalSigmasType::ACCEPTED),
            ],
        )?;
        // `solver_p` (another scheduler as predictor) cannot be expressed in JSON by diffusers either.
        if value.get("solver_p").is_some_and(|v| !v.is_null()) {
            return Err(bad_value(CLASS, "solver_p", &value["solver_p"], &["null"]));
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        check_sigma_options(
            CLASS,
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
        if self.solver_order == 0 {
            return Err(bad_value(CLASS, "solver_order", 0, &["1 or more"]));
        }
        if self.use_flow_sigmas {
            return Err(bad_value(
                CLASS,
                "use_flow_sigmas",
                true,
                &["false (flow-matching sigmas are not implemented)"],
            ));
        }
        if self.use_dynamic_shifting {
            return Err(bad_value(CLASS, "use_dynamic_shifting", true, &["false"]));
        }
        Ok(())
    }
}

/// Solves the small dense system `a x = b` (row-major `n x n`) in float32 by Gaussian elimination
/// with partial pivoting, as LAPACK's `sgesv` behind `torch.linalg.solve` does (with fused
/// multiply-adds, as its x86-64 kernels use).
fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Option<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col] == 0.0 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let inv = 1.0 / a[col][col];
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let l = a[row][col] * inv;
            for (dst, &src) in a[row][col + 1..].iter_mut().zip(&pivot_row[col + 1..]) {
                *dst = (-l).mul_add(src, *dst);
            }
            b[row] = (-l).mul_add(b[col], b[row]);
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let mut s = b[row];
        for (&coef, &xk) in a[row][row + 1..].iter().zip(&x[row + 1..]) {
            s = (-coef).mul_add(xk, s);
        }
        x[row] = s / a[row][row];
    }
    Some(x)
}

/// UniPC multistep (predictor + corrector).
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    config: UniPcMultistepConfig,
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    index: StepIndex,
}

impl UniPcMultistepScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: UniPcMultistepConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate()?;
        let alphas_cumprod = beta_params!(config).pinned_alphas_cumprod();
        let mut scheduler = Self {
            config,
            alphas_cumprod,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            index: StepIndex::default(),
        };
        scheduler.set_timesteps(num_inference_steps)?;
        Ok(scheduler)
    }

    /// diffusers' `set_timesteps(num_inference_steps)`.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let cfg = &self.config;
        let train = cfg.num_train_timesteps;
        crate::check_steps(CLASS, n, train)?;
        let spaced: Vec<f64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v = schedule::np_linspace(0.0, (train - 1) as f64, n + 1);
                v.reverse();
                v.pop();
                v.into_iter().map(f64::round_ties_even).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = train / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + cfg.steps_offset as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => schedule::trailing(train as f64, train, n)
                .into_iter()
                .map(|t| t as f64)
                .collect(),
        };
        let train_sigmas = schedule::train_sigmas(&self.alphas_cumprod);
        let log_sigmas = schedule::log_sigmas(&train_sigmas);
        let descending: Vec<f64> = train_sigmas.iter().rev().map(|&s| s as f64).collect();
        let opts = SigmaOptions {
            karras: cfg.use_karras_sigmas,
            exponential: cfg.use_exponential_sigmas,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
        };
        let (mut sigmas, timesteps, converted) =
            match convert_sigmas(opts, &descending, &log_sigmas, n) {
                Some((sigmas, ts)) => {
                    let ts = if cfg.use_karras_sigmas {
                        ts.into_iter().map(f64::round_ties_even).collect()
                    } else {
                        ts
                    };
                    (sigmas, ts, true)
                }
                None => {
                    let sigmas = spaced
                        .iter()
                        .map(|&t| schedule::np_interp_index(t, &train_sigmas))
                        .collect();
                    (sigmas, spaced, false)
                }
            };
        let sigma_last = match cfg.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            // Converted schedules end on their own last sigma; interpolated ones on sigma(t = 0).
            FinalSigmasType::SigmaMin if converted => sigmas.last().copied().unwrap_or(0.0),
            FinalSigmasType::SigmaMin => train_sigmas.first().copied().unwrap_or(0.0) as f64,
        };
        sigmas.push(sigma_last);
        self.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        // `torch.from_numpy(timesteps).to(torch.int64)` truncates.
        self.timesteps = timesteps.iter().map(|t| t.trunc()).collect();
        self.model_outputs = vec![None; cfg.solver_order];
        self.lower_order_nums = 0;
        self.this_order = 0;
        self.last_sample = None;
        self.index = StepIndex::default();
        Ok(())
    }

    pub fn config(&self) -> &UniPcMultistepConfig {
        &self.config
    }

    /// The float32 sigmas, one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn convert_model_output(&self, m: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        if cfg.predict_x0 {
            let x0 = match cfg.prediction_type {
                PredictionType::Epsilon => div(&(x - mul(m, sigma_t)?)?, alpha_t)?,
                PredictionType::Sample => m.clone(),
                PredictionType::VPrediction => (mul(x, alpha_t)? - mul(m, sigma_t)?)?,
            };
            if cfg.thresholding {
                ops::threshold_sample(&x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            } else {
                Ok(x0)
            }
        } else {
            Ok(match cfg.prediction_type {
                PredictionType::Epsilon => m.clone(),
                PredictionType::Sample => div(&(x - mul(m, alpha_t)?)?, sigma_t)?,
                PredictionType::VPrediction => (mul(m, alpha_t)? + mul(x, sigma_t)?)?,
            })
        }
    }

    /// The `k`-th newest stored model output (0 = newest).
    fn output(&self, k: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        n.checked_sub(k + 1)
            .and_then(|j| self.model_outputs[j].as_ref())
            .ok_or_else(|| Error::TooManySteps {
                class: CLASS.to_string(),
                calls: k + 1,
                available: n,
            })
    }

    /// The shared part of UniP and UniC: `rks`, `D1s`, `h_phi_1`, `B(h)` and the right-hand side
    /// `b`, for the step from sigma index `s0` to `t`. `m0` is the newest stored output and the
    /// k-th older one belongs to sigma index `s0 - k`.
    fn coefficients(&self, t: usize, s0: usize, order: usize) -> Result<Coefficients> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let m0 = self.output(0)?.clone();
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let si = s0.checked_sub(k).ok_or_else(|| Error::TooManySteps {
                class: CLASS.to_string(),
                calls: k,
                available: s0,
            })?;
            let mi = self.output(k)?;
            let (alpha_si, sigma_si) = alpha_sigma(self.sigmas[si]);
            let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div(&(mi - &m0)?, rk)?);
        }
        rks.push(1.0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let b_h = match self.config.solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => hh.exp_m1(),
        };
        let mut rows = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for k in 1..=order {
            rows.push(
                rks.iter()
                    .map(|r| r.powi(k as i32 - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= k as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Ok(Coefficients {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h_phi_1,
            b_h,
            m0,
            d1s,
            rows,
            b,
        })
    }

    /// `x_t_ = (sigma_t / sigma_s0) x - alpha_t h_phi_1 m0` (data prediction) or the noise form.
    fn base_update(&self, c: &Coefficients, x: &Tensor) -> Result<Tensor> {
        Ok(if self.config.predict_x0 {
            (mul(x, c.sigma_t / c.sigma_s0)? - mul(&c.m0, c.alpha_t * c.h_phi_1)?)?
        } else {
            (mul(x, c.alpha_t / c.alpha_s0)? - mul(&c.m0, c.sigma_t * c.h_phi_1)?)?
        })
    }

    /// `alpha_t * B(h)` (data prediction) or `sigma_t * B(h)`.
    fn residual_scale(&self, c: &Coefficients) -> f32 {
        if self.config.predict_x0 {
            c.alpha_t * c.b_h
        } else {
            c.sigma_t * c.b_h
        }
    }

    /// diffusers' `multistep_uni_p_bh_update`.
    fn predictor(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let c = self.coefficients(i + 1, i, order)?;
        let base = self.base_update(&c, x)?;
        if c.d1s.is_empty() {
            return Ok(base);
        }
        let rhos = if order == 2 {
            vec![0.5f32]
        } else {
            let k = order - 1;
            let a = c.rows[..k].iter().map(|r| r[..k].to_vec()).collect();
            solve_f32(a, c.b[..k].to_vec()).ok_or_else(|| singular(i))?
        };
        let pred_res = weighted_sum(&rhos, &c.d1s)?;
        Ok((base - mul(&pred_res, self.residual_scale(&c))?)?)
    }

    /// diffusers' `multistep_uni_c_bh_update`: corrects the previous prediction `this_sample`
    /// (made from `last_sample`) with the model output at it.
    fn corrector(
        &self,
        i: usize,
        this_model_output: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let c = self.coefficients(i, i - 1, order)?;
        let base = self.base_update(&c, last_sample)?;
        let rhos = if order == 1 {
            vec![0.5f32]
        } else {
            solve_f32(c.rows.clone(), c.b.clone()).ok_or_else(|| singular(i))?
        };
        let d1_t = (this_model_output - &c.m0)?;
        let last = mul(&d1_t, rhos[rhos.len() - 1])?;
        let total = if c.d1s.is_empty() {
            last
        } else {
            (weighted_sum(&rhos[..rhos.len() - 1], &c.d1s)? + last)?
        };
        Ok((base - mul(&total, self.residual_scale(&c))?)?)
    }
}

fn singular(i: usize) -> Error {
    Error::InvalidSteps {
        class: CLASS.to_string(),
        steps: i,
        reason: "the UniPC coefficient system is singular (repeated sigmas)".to_string(),
    }
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`: `sum_k rhos[k] * D1s[k]`.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (r, d) in rhos.iter().zip(d1s) {
        let term = mul(d, *r)?;
        acc = Some(match acc {
            Some(a) => (a + term)?,
            None => term,
        });
    }
    acc.ok_or_else(|| singular(0))
}

/// Per-step scalars and history of one UniP/UniC update.
struct Coefficients {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    m0: Tensor,
    d1s: Vec<Tensor>,
    rows: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl Scheduler for UniPcMultistepScheduler {
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
        let i = self
            .index
            .for_step(CLASS, &self.timesteps, timestep, true)?;
        let (m, mut x) = (f32(model_output)?, f32(sample)?);
        let converted = self.convert_model_output(&m, &x, i)?;
        let use_corrector = i > 0 && !self.config.disable_corrector.contains(&(i - 1));
        if use_corrector {
            if let Some(last) = &self.last_sample {
                x = self.corrector(i, &converted, last, self.this_order)?;
            }
        }
        self.model_outputs.rotate_left(1);
        if let Some(slot) = self.model_outputs.last_mut() {
            *slot = Some(converted);
        }
        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final {
            order.min(self.timesteps.len() - i)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        let prev = self.predictor(i, &x, self.this_order)?;
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .index
            .for_add_noise(CLASS, &self.timesteps, timestep, true)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let noisy = (mul(&f32(original)?, alpha_t)? + mul(&f32(noise)?, sigma_t)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
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
    fn solves_with_pivoting() {
        let x = solve_f32(vec![vec![1.0, 1.0], vec![-3.0, 1.0]], vec![2.0, -2.0]).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
        assert!(solve_f32(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_none());
    }
}
