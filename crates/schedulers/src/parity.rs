//! Replays one case of the reference `schedulers.json` fixture: the scheduler built from the case's
//! config runs a denoising loop with a fixed stand-in for the model,
//! `eps = tanh(scale_model_input(x, t) * 0.7 + w * (t / 1000))`, `w = linspace(-1, 1, channels)`,
//! and the samples after the first step and at the end are compared with diffusers'.
//!
//! How the comparison is measured: diffusers ran on x86-64 torch, whose float32 `sqrt`, `exp`,
//! `log` and `tanh` come from MKL and are not always correctly rounded, so the reference carries
//! float32 rounding noise of its own that grows with the magnitude of the sample (the 20-step
//! DDIM / DPM++ finals reach |x| ~ 30, where one float32 ulp is 2e-6; recomputing them in float64
//! lands 1.0e-5 away from the reference). The error reported is therefore the absolute difference
//! for values of magnitude up to 1 and the relative difference above: `|a - b| / max(1, |b|)`.
//! Timesteps with integer values must match exactly; fractional ones (Karras sigmas interpolated
//! into timesteps) within 4 float32 ulps, since they inherit the one-ulp differences of MKL's sqrt
//! in the sigma table.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor};
use serde_json::Value;

use crate::schedule::torch_linspace_f32;
use crate::{from_config, Error, NoNoise, NoiseSource, Result, Scheduler, TorchGenerator};

/// The generator seed of cases whose scheduler draws noise, when the case does not name one: the
/// fixture README documents `torch.Generator().manual_seed(5)` for the LCM case.
const DEFAULT_NOISE_SEED: u64 = 5;

/// The fixture script handed `step` a freshly seeded `torch.Generator().manual_seed(seed)` on every
/// call (a single continuing stream reproduces the first LCM step but not the second; re-seeding
/// reproduces all of them), so each draw starts the stream again.
struct ReseededNoise(u64);

impl NoiseSource for ReseededNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        TorchGenerator::new(self.0).randn(shape, dtype, device)
    }
}

/// How many float32 ulps a fractional timestep may differ by.
const TIMESTEP_ULPS: f32 = 4.0;

/// Result of replaying one case.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// Error of the sample after the first step: `max |a - b| / max(1, |b|)`.
    pub after_first_step: f64,
    /// Error of the final sample, measured the same way.
    pub last: f64,
    /// Plain max |a - b| of the final sample.
    pub last_abs: f64,
    /// Largest |value| of the reference final sample.
    pub scale: f64,
    /// Largest timestep difference (0 when they match exactly).
    pub timesteps: f64,
}

impl CaseReport {
    /// The case's error: the larger of the two sample errors.
    pub fn max(&self) -> f64 {
        self.after_first_step.max(self.last)
    }
}

fn fixture(case: &str, what: impl Into<String>) -> Error {
    Error::Fixture {
        case: case.to_string(),
        what: what.into(),
    }
}

fn tensor<'a>(
    reference: &'a HashMap<String, Tensor>,
    case: &str,
    suffix: &str,
) -> Result<&'a Tensor> {
    let key = format!("{case}_{suffix}");
    reference
        .get(&key)
        .ok_or_else(|| fixture(case, format!("missing tensor {key}")))
}

fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// Largest absolute difference between two tensors of the same shape (infinite if the shapes differ).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (cpu_f32(a)?, cpu_f32(b)?);
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

/// `max |a - b| / max(1, |b|)`: absolute below magnitude 1, relative above.
pub fn max_scaled_diff(a: &Tensor, expected: &Tensor) -> Result<f64> {
    let (a, b) = (cpu_f32(a)?, cpu_f32(expected)?);
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    let scale = b.abs()?.maximum(1f32)?;
    Ok(((a - &b)?.abs()? / scale)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64)
}

/// The scheduler of a `schedulers.json` case (its `class` and `config`, with `steps`).
pub fn case_scheduler(key: &str, case: &Value) -> Result<Box<dyn Scheduler>> {
    let class = case["class"]
        .as_str()
        .ok_or_else(|| fixture(key, "no \"class\" string"))?;
    let steps = case["steps"]
        .as_u64()
        .ok_or_else(|| fixture(key, "no \"steps\" integer"))?;
    let mut config = case["config"].clone();
    let map = config
        .as_object_mut()
        .ok_or_else(|| fixture(key, "\"config\" is not an object"))?;
    map.insert("_class_name".into(), class.into());
    from_config(&config, steps as usize)
}

/// Runs a `schedulers.json` case against the reference tensors and returns its error (see the
/// module docs); timesteps that do not match are an error.
pub fn check_stand_in_case(
    key: &str,
    case: &Value,
    reference: &HashMap<String, Tensor>,
) -> Result<f64> {
    Ok(run_case(key, case, reference)?.max())
}

/// Compares timesteps: integer-valued ones exactly, fractional ones within a few float32 ulps.
fn check_timesteps(key: &str, got: &[f32], expected: &[f32]) -> Result<f64> {
    let mismatch = || {
        fixture(
            key,
            format!("timesteps differ: got {got:?}, expected {expected:?}"),
        )
    };
    if got.len() != expected.len() {
        return Err(mismatch());
    }
    let mut worst = 0f64;
    for (&g, &e) in got.iter().zip(expected) {
        let allowed = if e.fract() == 0.0 {
            0.0
        } else {
            TIMESTEP_ULPS * (f32::from_bits(e.abs().to_bits() + 1) - e.abs())
        };
        let diff = (g - e).abs();
        if diff > allowed || diff.is_nan() {
            return Err(mismatch());
        }
        worst = worst.max(diff as f64);
    }
    Ok(worst)
}

/// Like [`check_stand_in_case`], with the comparisons reported separately.
pub fn run_case(
    key: &str,
    case: &Value,
    reference: &HashMap<String, Tensor>,
) -> Result<CaseReport> {
    let mut scheduler = case_scheduler(key, case)?;
    let expected_ts = cpu_f32(tensor(reference, key, "timesteps")?)?.to_vec1::<f32>()?;
    let ts = scheduler.timesteps().to_vec();
    let ts32: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
    let timesteps = check_timesteps(key, &ts32, &expected_ts)?;

    let initial = cpu_f32(tensor(reference, key, "initial")?)?;
    let channels = initial.dim(1)?;
    let w = Tensor::from_vec(
        torch_linspace_f32(-1.0, 1.0, channels),
        (1, channels, 1, 1),
        initial.device(),
    )?;
    let seed = case["generator_seed"]
        .as_u64()
        .unwrap_or(DEFAULT_NOISE_SEED);
    let mut generator = ReseededNoise(seed);
    let mut no_noise = NoNoise;
    let noise: &mut dyn NoiseSource = if draws_noise(case) {
        &mut generator
    } else {
        &mut no_noise
    };
    let mut x = initial;
    let mut after_first = None;
    for &t in &ts {
        let x_in = scheduler.scale_model_input(&x, t)?;
        // torch: `t / 1000` is a float32 division (t is the int64 or float32 timestep).
        let t_scaled = (t as f32 / 1000.0) as f64;
        let arg = x_in
            .affine(0.7f32 as f64, 0.0)?
            .broadcast_add(&w.affine(t_scaled, 0.0)?)?;
        let eps = arg.tanh()?;
        x = scheduler.step(&eps, t, &x, noise)?;
        if after_first.is_none() {
            after_first = Some(x.clone());
        }
    }
    let after_first = after_first.ok_or_else(|| fixture(key, "no timesteps"))?;
    let expected_first = tensor(reference, key, "after_first_step")?;
    let expected_final = tensor(reference, key, "final")?;
    Ok(CaseReport {
        after_first_step: max_scaled_diff(&after_first, expected_first)?,
        last: max_scaled_diff(&x, expected_final)?,
        last_abs: max_abs_diff(&x, expected_final)?,
        scale: cpu_f32(expected_final)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()? as f64,
        timesteps,
    })
}

/// Whether the case's scheduler draws noise during sampling.
fn draws_noise(case: &Value) -> bool {
    let class = case["class"].as_str().unwrap_or_default();
    let algorithm = case["config"]["algorithm_type"]
        .as_str()
        .unwrap_or_default();
    matches!(class, "LCMScheduler" | "EulerAncestralDiscreteScheduler")
        || algorithm.starts_with("sde-")
}
