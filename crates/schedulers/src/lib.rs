//! Diffusion schedulers (samplers) that reproduce diffusers' `schedulers/scheduling_*.py` step for
//! step, built from a diffusers `scheduler_config.json`, plus a sampler-name layer for the CLI.
//!
//! Every scheduler computes its tables with the float widths diffusers uses (torch float32 for betas,
//! `alphas_cumprod` and sigmas; numpy float64 for spacing and interpolation) and steps in float32,
//! whatever the model's dtype, so that results agree with diffusers on CPU to about 1e-6.

mod config;
pub mod ddim;
pub mod dpmsolver_multistep;
mod error;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod heun_discrete;
pub mod lcm;
pub mod lms_discrete;
mod ops;
pub mod parity;
pub mod pndm;
mod rng;
mod sampler;
mod schedule;
mod sigmas;
pub mod unipc_multistep;

use candle_core::{DType, Device, Shape, Tensor};

pub use config::{
    parse_config_json, BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing,
};
pub use ddim::{DdimConfig, DdimScheduler};
pub use dpmsolver_multistep::{DpmSolverMultistepConfig, DpmSolverMultistepScheduler};
pub use error::{Error, Result};
pub use euler_ancestral_discrete::{EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler};
pub use euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler};
pub use heun_discrete::{HeunDiscreteConfig, HeunDiscreteScheduler};
pub use lcm::{LcmConfig, LcmScheduler};
pub use lms_discrete::{LmsDiscreteConfig, LmsDiscreteScheduler};
pub use pndm::{PndmConfig, PndmScheduler};
pub use rng::TorchGenerator;
pub use sampler::{Sampler, SigmaSchedule};
pub use unipc_multistep::{UniPcMultistepConfig, UniPcMultistepScheduler};

/// A diffusers scheduler after `set_timesteps`: the denoising loop asks it for the timesteps, scales
/// the model input, and steps the sample.
pub trait Scheduler: Send {
    /// Timesteps fed to the UNet, one model evaluation per entry (for Heun, the list repeats
    /// entries as diffusers does).
    fn timesteps(&self) -> &[f64];
    /// The factor diffusers multiplies the initial Gaussian noise by.
    fn init_noise_sigma(&self) -> f64;
    /// Scales the denoising model input to match the scheduler (`x / sqrt(sigma^2 + 1)` for the
    /// sigma-based samplers, identity for the others).
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor>;
    /// One denoising step: the sample at the next (lower) noise level. Noise, if the sampler
    /// needs any, is drawn from `noise` in diffusers' order.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// For image-to-image: noise `original` to the level of `timestep`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
    /// diffusers' `set_begin_index` (img2img starts part-way through the timesteps); a no-op for
    /// the schedulers that find their position from the timestep value (DDIM, PNDM).
    fn set_begin_index(&mut self, begin_index: usize);
    /// diffusers' `scheduler.order` (used by img2img to compute the start index).
    fn order(&self) -> usize;
}

/// Where schedulers that draw noise (ancestral, SDE, LCM, DDIM eta>0) take it from; the pipeline
/// passes the torch-compatible generator. Must return a tensor of `shape` in `dtype` on `device`.
pub trait NoiseSource {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// A [`NoiseSource`] that errors if asked (for deterministic schedulers with no generator).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn(&mut self, _shape: &Shape, _dtype: DType, _device: &Device) -> Result<Tensor> {
        Err(Error::NoNoiseSource {
            class: "a scheduler".to_string(),
        })
    }
}

/// The diffusers class names [`from_config`] accepts.
pub const SUPPORTED_CLASSES: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
];

/// Whether [`from_config`] implements the diffusers class `name`.
pub fn is_supported_class(name: &str) -> bool {
    SUPPORTED_CLASSES.contains(&name)
}

/// Builds a scheduler from a diffusers scheduler config JSON value: dispatches on its `_class_name`,
/// ignores the keys that class does not know, defaults missing keys as diffusers does, then runs
/// `set_timesteps(num_inference_steps)`.
pub fn from_config(
    config: &serde_json::Value,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let class = config
        .get("_class_name")
        .and_then(|v| v.as_str())
        .ok_or(Error::MissingClassName)?;
    Ok(match class {
        "DDIMScheduler" => Box::new(DdimScheduler::new(
            DdimConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "PNDMScheduler" => Box::new(PndmScheduler::new(
            PndmConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "EulerDiscreteScheduler" => Box::new(EulerDiscreteScheduler::new(
            EulerDiscreteConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "EulerAncestralDiscreteScheduler" => Box::new(EulerAncestralDiscreteScheduler::new(
            EulerAncestralDiscreteConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "HeunDiscreteScheduler" => Box::new(HeunDiscreteScheduler::new(
            HeunDiscreteConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "LMSDiscreteScheduler" => Box::new(LmsDiscreteScheduler::new(
            LmsDiscreteConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "DPMSolverMultistepScheduler" => Box::new(DpmSolverMultistepScheduler::new(
            DpmSolverMultistepConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "UniPCMultistepScheduler" => Box::new(UniPcMultistepScheduler::new(
            UniPcMultistepConfig::from_json(config)?,
            num_inference_steps,
        )?),
        "LCMScheduler" => Box::new(LcmScheduler::new(
            LcmConfig::from_json(config)?,
            num_inference_steps,
        )?),
        other => {
            return Err(Error::UnknownClass {
                name: other.to_string(),
                accepted: SUPPORTED_CLASSES.iter().map(|s| s.to_string()).collect(),
            })
        }
    })
}

/// Shared validation of the requested number of steps.
pub(crate) fn check_steps(class: &str, steps: usize, num_train_timesteps: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::InvalidSteps {
            class: class.to_string(),
            steps,
            reason: "at least one step is needed".to_string(),
        });
    }
    if steps > num_train_timesteps {
        return Err(Error::InvalidSteps {
            class: class.to_string(),
            steps,
            reason: format!("the model was trained with only {num_train_timesteps} timesteps"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_missing_class_names() {
        let err = from_config(&json!({"_class_name": "WarpScheduler"}), 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("WarpScheduler") && err.contains("EulerDiscreteScheduler"));
        assert!(matches!(
            from_config(&json!({"beta_start": 0.1}), 10),
            Err(Error::MissingClassName)
        ));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cfg = json!({"_class_name": "DDIMScheduler", "prediction_type": "flow"});
        let err = from_config(&cfg, 10).err().unwrap().to_string();
        assert!(
            err.contains("prediction_type") && err.contains("v_prediction"),
            "{err}"
        );
        let cfg = json!({"_class_name": "EulerDiscreteScheduler", "steps_offset": "one"});
        assert!(matches!(
            from_config(&cfg, 10),
            Err(Error::InvalidConfig { .. })
        ));
        let cfg = json!({"_class_name": "DDIMScheduler"});
        assert!(matches!(
            from_config(&cfg, 0),
            Err(Error::InvalidSteps { .. })
        ));
    }

    #[test]
    fn python_infinity_and_finite_lambda_clip() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "beta_schedule": "squaredcos_cap_v2", "_diffusers_version": "0.42.1"}"#;
        let s = from_config(&parse_config_json(text).unwrap(), 10).unwrap();
        assert_eq!(s.timesteps()[0], 999.0);
        // Clipping the lowest log-SNRs of the cosine schedule drops the last training timesteps.
        let clipped = json!({"_class_name": "DPMSolverMultistepScheduler",
                             "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1});
        let s = from_config(&clipped, 10).unwrap();
        assert!(s.timesteps()[0] < 999.0);
    }

    #[test]
    fn begin_index_starts_mid_schedule() -> Result<()> {
        use candle_core::{DType, Device, Tensor};
        let cfg = json!({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                         "beta_start": 0.00085, "beta_end": 0.012});
        let mut s = from_config(&cfg, 10)?;
        let t = s.timesteps()[4];
        s.set_begin_index(4);
        let x = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu)?;
        let noisy = s.add_noise(&x, &x, t)?;
        let scaled = s.scale_model_input(&noisy, t)?;
        let v = scaled.flatten_all()?.to_vec1::<f32>()?[0];
        let n = noisy.flatten_all()?.to_vec1::<f32>()?[0];
        // x + sigma, then / sqrt(sigma^2 + 1): both use sigma at index 4.
        let sigma = n - 1.0;
        assert!((v - n / (sigma * sigma + 1.0).sqrt()).abs() < 1e-6);
        Ok(())
    }

    /// Paths the fixtures do not cover (third order, SDE, PRK warm-up, v-prediction, thresholding)
    /// still run and stay finite.
    #[test]
    fn uncovered_variants_run() -> Result<()> {
        use candle_core::{DType, Device, Tensor};
        let base =
            json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012});
        let variants = [
            json!({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}),
            json!({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3,
                   "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
            json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver",
                   "final_sigmas_type": "sigma_min", "use_lu_lambdas": true}),
            json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver",
                   "final_sigmas_type": "sigma_min", "use_exponential_sigmas": true}),
            json!({"_class_name": "UniPCMultistepScheduler", "solver_order": 3, "solver_type": "bh1"}),
            json!({"_class_name": "UniPCMultistepScheduler", "predict_x0": false,
                   "use_karras_sigmas": true, "final_sigmas_type": "sigma_min"}),
            json!({"_class_name": "PNDMScheduler", "skip_prk_steps": false}),
            json!({"_class_name": "DDIMScheduler", "prediction_type": "sample", "thresholding": true}),
            json!({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
                   "timestep_type": "continuous", "rescale_betas_zero_snr": true}),
            json!({"_class_name": "HeunDiscreteScheduler", "use_exponential_sigmas": true,
                   "prediction_type": "v_prediction", "beta_schedule": "exp"}),
            json!({"_class_name": "LMSDiscreteScheduler", "use_karras_sigmas": true,
                   "timestep_spacing": "trailing"}),
        ];
        for variant in variants {
            let mut cfg = base.clone();
            for (k, v) in variant.as_object().into_iter().flatten() {
                cfg[k] = v.clone();
            }
            let mut s = from_config(&cfg, 12)?;
            let mut g = TorchGenerator::new(3);
            let mut x =
                (g.randn(&(1, 4, 2, 2).into(), DType::F32, &Device::Cpu)? * s.init_noise_sigma())?;
            for t in s.timesteps().to_vec() {
                let x_in = s.scale_model_input(&x, t)?;
                let eps = (x_in * 0.3)?.tanh()?;
                x = s.step(&eps, t, &x, &mut g)?;
            }
            let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
            assert!(v.iter().all(|v| v.is_finite()), "{cfg}: {v:?}");
            let _ = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        }
        Ok(())
    }
}
