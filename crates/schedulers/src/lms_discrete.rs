//! Linear multistep sampler (k-diffusion's `sample_lms`): the derivatives of the last (up to) four
//! steps combined with coefficients that integrate their Lagrange polynomials over the next sigma
//! interval, following diffusers' `schedulers/scheduling_lms_discrete.py`.

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{
    check_sigma_options, parse_config, BetaSchedule, PredictionType, TimestepSpacing, BETA_CHOICES,
};
use crate::ops::{div, f32, mul, StepIndex};
use crate::schedule::{self, beta_params};
use crate::sigmas::{self, SigmaOptions};
use crate::{check_steps, NoiseSource, Result, Scheduler};

const CLASS: &str = "LMSDiscreteScheduler";
/// diffusers' default `order` argument of `step`.
const LMS_ORDER: usize = 4;

/// `LMSDiscreteScheduler.__init__` arguments, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LmsDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// Not a constructor argument: diffusers reads `sigma_min` / `sigma_max` for the exponential
    /// schedule (its Karras conversion ignores them) through `hasattr(self.config, ...)`, which also sees keys carried over
    /// from another scheduler's config (diffusers keeps unknown keys as hidden config entries).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl Default for LmsDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

impl LmsDiscreteConfig {
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

/// Nodes (positive half, the last one 0) and weights of QUADPACK's 21-point Gauss-Kronrod rule
/// (`qk21`), as QUADPACK writes them.
#[allow(clippy::excessive_precision)]
const XGK: [f64; 11] = [
    0.995_657_163_025_808_080_735_527_280_689,
    0.973_906_528_517_171_720_077_964_012_084,
    0.930_157_491_355_708_226_001_207_180_060,
    0.865_063_366_688_984_510_732_096_688_423,
    0.780_817_726_586_416_897_063_717_578_345,
    0.679_409_568_299_024_406_234_327_365_115,
    0.562_757_134_668_604_683_339_000_099_273,
    0.433_395_394_129_247_190_799_265_943_166,
    0.294_392_862_701_460_198_131_126_603_104,
    0.148_874_338_981_631_210_884_826_001_130,
    0.0,
];
#[allow(clippy::excessive_precision)]
const WGK: [f64; 11] = [
    0.011_694_638_867_371_874_278_064_396_062,
    0.032_558_162_307_964_727_478_818_972_459,
    0.054_755_896_574_351_996_031_381_300_245,
    0.075_039_674_810_919_952_767_043_140_916,
    0.093_125_454_583_697_605_535_065_465_083,
    0.109_387_158_802_297_641_899_210_590_326,
    0.123_491_976_262_065_851_077_958_109_831,
    0.134_709_217_311_473_325_928_054_001_772,
    0.142_775_938_577_060_080_797_094_273_139,
    0.147_739_104_901_338_491_374_841_515_972,
    0.149_445_554_002_916_905_664_936_468_390,
];

/// `scipy.integrate.quad(f, a, b)` for the LMS integrands. They are polynomials of degree below 4,
/// which QUADPACK's first 21-point Gauss-Kronrod pass integrates exactly (its error estimate is far
/// below `epsrel = 1e-4`, so it never subdivides); the sum runs in QUADPACK's order.
fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    // QUADPACK adds the Gauss nodes (odd positions, 1-based even) first, then the Kronrod ones.
    for j in (1..10).step_by(2).chain((0..10).step_by(2)) {
        let absc = hlgth * XGK[j];
        resk += WGK[j] * (f(centr - absc) + f(centr + absc));
    }
    resk * hlgth
}

/// LMS: a fourth-order (after warm-up) linear multistep method in sigma.
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler {
    config: LmsDiscreteConfig,
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
    derivatives: Vec<Tensor>,
}

impl LmsDiscreteScheduler {
    /// Builds the tables and runs `set_timesteps(num_inference_steps)`.
    pub fn new(config: LmsDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
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
            derivatives: Vec::new(),
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
        let sigmas = sigmas::interpolate_sigmas(&spaced, &train_sigmas);
        let opts = SigmaOptions {
            karras: cfg.use_karras_sigmas,
            exponential: cfg.use_exponential_sigmas,
            // LMS's `_convert_to_karras` uses the interpolated extremes only.
            sigma_min: cfg.sigma_min.filter(|_| !cfg.use_karras_sigmas),
            sigma_max: cfg.sigma_max.filter(|_| !cfg.use_karras_sigmas),
        };
        let (mut sigmas, timesteps) =
            sigmas::apply_sigma_options(opts, sigmas, &spaced, &log_sigmas, n);
        sigmas.push(0.0);
        self.sigmas = sigmas.iter().map(|&s| s as f32).collect();
        self.timesteps = timesteps.iter().map(|&t| t as f32 as f64).collect();
        self.index = StepIndex::default();
        self.derivatives.clear();
        Ok(())
    }

    pub fn config(&self) -> &LmsDiscreteConfig {
        &self.config
    }

    /// The float32 sigmas, one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `get_lms_coefficient`: the integral over `[sigma_t, sigma_{t+1}]` of the Lagrange
    /// basis polynomial of node `current` among the last `order` sigmas. diffusers evaluates the
    /// integrand with float32 tensors (the node `tau` rounded to float32 first).
    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = &self.sigmas;
        let integrand = |tau: f64| -> f64 {
            let tau = tau as f32;
            let mut prod: Option<f32> = None;
            for k in (0..order).filter(|&k| k != current) {
                let factor = (tau - s[t - k]) / (s[t - current] - s[t - k]);
                prod = Some(prod.map_or(factor, |p| p * factor));
            }
            prod.map_or(1.0, |p| p as f64)
        };
        gauss_kronrod_21(integrand, s[t] as f64, s[t + 1] as f64)
    }
}

impl Scheduler for LmsDiscreteScheduler {
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
        let sigma = self.sigmas[i];
        let x0 = sigmas::sigma_x0(self.config.prediction_type, &m, &x, sigma)?;
        self.derivatives.push(div(&(&x - x0)?, sigma)?);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(LMS_ORDER);
        // Newest derivative pairs with coefficient 0 (Python's `sum` starts from 0).
        let mut sum: Option<Tensor> = None;
        for (k, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = mul(derivative, self.lms_coefficient(order, i, k) as f32)?;
            sum = Some(match sum {
                Some(acc) => (acc + term)?,
                None => term,
            });
        }
        let prev = match sum {
            Some(sum) => (x + sum)?,
            None => x,
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
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_kronrod_is_exact_for_cubics() {
        let f = |x: f64| 2.0 * x * x * x - x + 0.5;
        let exact = |x: f64| 0.5 * x.powi(4) - 0.5 * x * x + 0.5 * x;
        let got = gauss_kronrod_21(f, -0.3, 1.7);
        assert!((got - (exact(1.7) - exact(-0.3))).abs() < 1e-13);
    }
}
