//! Sampler names as users know them (stable-diffusion.cpp's `--sampling-method` names and
//! AUTOMATIC1111's labels) and the diffusers scheduler config each one stands for, derived from a
//! model's `scheduler_config.json` as diffusers' `XScheduler.from_config(base, **overrides)` does.

use serde_json::{Map, Value};

use crate::{is_supported_class, Error, Result};

/// A sampling method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sampler {
    Euler,
    EulerA,
    Heun,
    Dpmpp2m,
    Dpmpp2mSde,
    Ddim,
    DdimTrailing,
    Pndm,
    Lms,
    Unipc,
    Lcm,
}

/// The sigma schedule ("Schedule type" in AUTOMATIC1111).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SigmaSchedule {
    /// The scheduler's own (interpolated training) sigmas.
    #[default]
    Discrete,
    /// Karras et al. (2022), rho = 7.
    Karras,
    /// Log-uniform sigmas.
    Exponential,
}

/// One accepted spelling of a sampler, and the schedule its name implies (A1111's "DPM++ 2M Karras").
struct Name {
    name: &'static str,
    sampler: Sampler,
    schedule: Option<SigmaSchedule>,
}

const fn name(name: &'static str, sampler: Sampler) -> Name {
    Name {
        name,
        sampler,
        schedule: None,
    }
}

const fn karras(name: &'static str, sampler: Sampler) -> Name {
    Name {
        name,
        sampler,
        schedule: Some(SigmaSchedule::Karras),
    }
}

/// stable-diffusion.cpp names first, then AUTOMATIC1111 labels and common aliases.
const NAMES: &[Name] = &[
    name("euler", Sampler::Euler),
    name("euler_a", Sampler::EulerA),
    name("heun", Sampler::Heun),
    name("dpm++2m", Sampler::Dpmpp2m),
    name("dpm++2m_sde", Sampler::Dpmpp2mSde),
    name("ddim", Sampler::Ddim),
    name("ddim_trailing", Sampler::DdimTrailing),
    name("pndm", Sampler::Pndm),
    name("lms", Sampler::Lms),
    name("unipc", Sampler::Unipc),
    name("lcm", Sampler::Lcm),
    name("Euler a", Sampler::EulerA),
    name("DPM++ 2M", Sampler::Dpmpp2m),
    karras("DPM++ 2M Karras", Sampler::Dpmpp2m),
    name("DPM++ 2M SDE", Sampler::Dpmpp2mSde),
    karras("DPM++ 2M SDE Karras", Sampler::Dpmpp2mSde),
    name("PLMS", Sampler::Pndm),
    karras("LMS Karras", Sampler::Lms),
    name("UniPC", Sampler::Unipc),
    name("dpmpp_2m", Sampler::Dpmpp2m),
    name("dpmpp_2m_sde", Sampler::Dpmpp2mSde),
    name("euler_ancestral", Sampler::EulerA),
];

/// Case-, space-, dash- and underscore-insensitive form of a name.
fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

impl Sampler {
    /// The diffusers scheduler class this sampler runs on.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerA => "EulerAncestralDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::Dpmpp2m | Self::Dpmpp2mSde => "DPMSolverMultistepScheduler",
            Self::Ddim | Self::DdimTrailing => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Lms => "LMSDiscreteScheduler",
            Self::Unipc => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// Whether this build implements the sampler's scheduler.
    pub fn is_implemented(&self) -> bool {
        is_supported_class(self.class_name())
    }

    /// The names [`Sampler::from_name`] accepts (implemented samplers only).
    pub fn accepted_names() -> Vec<String> {
        NAMES
            .iter()
            .filter(|n| n.sampler.is_implemented())
            .map(|n| n.name.to_string())
            .collect()
    }

    /// Case-insensitive: stable-diffusion.cpp names (`euler`, `euler_a`, `heun`, `dpm++2m`,
    /// `dpm++2m_sde`, `ddim_trailing`, `lcm`, ...) and AUTOMATIC1111 labels (`Euler a`, `DPM++ 2M`,
    /// `DPM++ 2M Karras` (which implies the Karras schedule), `DPM++ 2M SDE`, `UniPC`, `DDIM`, `PLMS`,
    /// `LMS`, `Heun`, `LCM`).
    pub fn from_name(name: &str) -> Result<(Sampler, Option<SigmaSchedule>)> {
        let wanted = normalize(name);
        NAMES
            .iter()
            .filter(|n| n.sampler.is_implemented())
            .find(|n| normalize(n.name) == wanted)
            .map(|n| (n.sampler, n.schedule))
            .ok_or_else(|| Error::UnknownSampler {
                name: name.to_string(),
                accepted: Self::accepted_names(),
            })
    }

    /// AUTOMATIC1111's label ("DPM++ 2M", "Euler a", ...), without the schedule.
    pub fn a1111_label(&self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::EulerA => "Euler a",
            Self::Heun => "Heun",
            Self::Dpmpp2m => "DPM++ 2M",
            Self::Dpmpp2mSde => "DPM++ 2M SDE",
            Self::Ddim | Self::DdimTrailing => "DDIM",
            Self::Pndm => "PLMS",
            Self::Lms => "LMS",
            Self::Unipc => "UniPC",
            Self::Lcm => "LCM",
        }
    }

    /// Whether the sampler's diffusers class has `use_karras_sigmas` / `use_exponential_sigmas`.
    fn supports_sigma_schedules(&self) -> bool {
        matches!(
            self,
            Self::Euler | Self::Heun | Self::Dpmpp2m | Self::Dpmpp2mSde | Self::Lms | Self::Unipc
        )
    }

    /// The diffusers config for this sampler, derived from a model's `scheduler_config.json` value
    /// as `XScheduler.from_config(base, **overrides)` does: keys the base class only had as
    /// defaults (`_use_default_values`) are dropped so the new class uses its own defaults, the
    /// remaining keys carry over, then `_class_name` and the overrides are set.
    pub fn config(&self, base: &Value, schedule: SigmaSchedule) -> Result<Value> {
        let base = base.as_object().ok_or_else(|| Error::BadConfigValue {
            class: self.class_name().to_string(),
            key: "(scheduler config)".to_string(),
            value: base.to_string(),
            accepted: vec!["a JSON object".to_string()],
        })?;
        let defaults: Vec<&str> = base
            .get("_use_default_values")
            .and_then(Value::as_array)
            .map(|keys| keys.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out: Map<String, Value> = base
            .iter()
            .filter(|(k, _)| !k.starts_with('_') && !defaults.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.insert("_class_name".into(), self.class_name().into());
        let mut set = |key: &str, value: Value| {
            out.insert(key.to_string(), value);
        };
        match self {
            Self::Dpmpp2m => {
                set("algorithm_type", "dpmsolver++".into());
                set("solver_order", 2.into());
            }
            Self::Dpmpp2mSde => {
                set("algorithm_type", "sde-dpmsolver++".into());
                set("solver_order", 2.into());
            }
            Self::DdimTrailing => set("timestep_spacing", "trailing".into()),
            _ => {}
        }
        if self.supports_sigma_schedules() {
            set(
                "use_karras_sigmas",
                (schedule == SigmaSchedule::Karras).into(),
            );
            set(
                "use_exponential_sigmas",
                (schedule == SigmaSchedule::Exponential).into(),
            );
        } else if schedule != SigmaSchedule::Discrete {
            return Err(Error::BadConfigValue {
                class: self.class_name().to_string(),
                key: "sigma schedule".to_string(),
                value: schedule.name().to_string(),
                accepted: vec!["discrete".to_string()],
            });
        }
        Ok(Value::Object(out))
    }
}

impl SigmaSchedule {
    const ALL: [SigmaSchedule; 3] = [Self::Discrete, Self::Karras, Self::Exponential];

    /// `discrete`, `karras` or `exponential` (case-insensitive).
    pub fn from_name(name: &str) -> Result<SigmaSchedule> {
        Self::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| Error::UnknownSchedule {
                name: name.to_string(),
                accepted: Self::ALL.iter().map(|s| s.name().to_string()).collect(),
            })
    }

    /// The lower-case name (`discrete`, `karras`, `exponential`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Discrete => "discrete",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
        }
    }

    /// AUTOMATIC1111's "Schedule type" label; `None` for the sampler's own schedule.
    pub fn a1111_label(&self) -> Option<&'static str> {
        match self {
            Self::Discrete => None,
            Self::Karras => Some("Karras"),
            Self::Exponential => Some("Exponential"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_case_and_separator_insensitive() {
        assert_eq!(Sampler::from_name("EULER").unwrap(), (Sampler::Euler, None));
        assert_eq!(
            Sampler::from_name("DPM++ 2M Karras").unwrap(),
            (Sampler::Dpmpp2m, Some(SigmaSchedule::Karras))
        );
        assert_eq!(Sampler::from_name("dpm++2m").unwrap().0, Sampler::Dpmpp2m);
        assert_eq!(
            Sampler::from_name("ddim_trailing").unwrap().0,
            Sampler::DdimTrailing
        );
        assert_eq!(Sampler::from_name("PLMS").unwrap().0, Sampler::Pndm);
    }

    #[test]
    fn unknown_sampler_lists_accepted_names() {
        let err = Sampler::from_name("warp").unwrap_err().to_string();
        assert!(err.contains("warp") && err.contains("euler") && err.contains("DPM++ 2M"));
    }

    #[test]
    fn schedules() {
        assert_eq!(
            SigmaSchedule::from_name("Karras").unwrap(),
            SigmaSchedule::Karras
        );
        assert!(SigmaSchedule::from_name("sideways").is_err());
        assert_eq!(SigmaSchedule::Discrete.a1111_label(), None);
        assert_eq!(
            SigmaSchedule::Exponential.a1111_label(),
            Some("Exponential")
        );
    }

    #[test]
    fn config_carries_base_keys_and_drops_base_defaults() {
        let base = json!({
            "_class_name": "PNDMScheduler",
            "beta_schedule": "scaled_linear",
            "steps_offset": 1,
            "skip_prk_steps": true,
            "prediction_type": "epsilon",
            "_use_default_values": ["prediction_type"],
        });
        let cfg = Sampler::Dpmpp2m
            .config(&base, SigmaSchedule::Karras)
            .unwrap();
        assert_eq!(cfg["_class_name"], "DPMSolverMultistepScheduler");
        assert_eq!(cfg["beta_schedule"], "scaled_linear");
        assert_eq!(cfg["steps_offset"], 1);
        assert_eq!(cfg["use_karras_sigmas"], true);
        assert_eq!(cfg["algorithm_type"], "dpmsolver++");
        assert!(cfg.get("prediction_type").is_none());
        assert!(cfg.get("_use_default_values").is_none());
        let ddim = Sampler::DdimTrailing
            .config(&base, SigmaSchedule::Discrete)
            .unwrap();
        assert_eq!(ddim["timestep_spacing"], "trailing");
        assert!(Sampler::Ddim.config(&base, SigmaSchedule::Karras).is_err());
    }
}

#[cfg(test)]
mod build_tests {
    use super::*;
    use crate::{from_config, parse_config_json, NoiseSource, TorchGenerator};
    use candle_core::{DType, Device, Tensor};

    /// Every sampler and schedule it supports builds from a real model's scheduler config and
    /// runs a few steps (with a generator for the stochastic ones).
    #[test]
    fn every_sampler_runs_from_the_sd15_config() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-sd15/scheduler/scheduler_config.json"
        ))
        .unwrap();
        let base = parse_config_json(&text).unwrap();
        for name in Sampler::accepted_names() {
            let (sampler, implied) = Sampler::from_name(&name).unwrap();
            let schedules = match implied {
                Some(s) => vec![s],
                None if sampler.supports_sigma_schedules() => vec![
                    SigmaSchedule::Discrete,
                    SigmaSchedule::Karras,
                    SigmaSchedule::Exponential,
                ],
                None => vec![SigmaSchedule::Discrete],
            };
            for schedule in schedules {
                let cfg = sampler.config(&base, schedule).unwrap();
                let mut s =
                    from_config(&cfg, 6).unwrap_or_else(|e| panic!("{name} {schedule:?}: {e}"));
                let mut g = TorchGenerator::new(1);
                let mut x = (g
                    .randn(&(1, 4, 2, 2).into(), DType::F32, &Device::Cpu)
                    .unwrap()
                    * s.init_noise_sigma())
                .unwrap();
                for t in s.timesteps().to_vec() {
                    let x_in = s.scale_model_input(&x, t).unwrap();
                    let eps = (x_in * 0.5).unwrap();
                    x = s.step(&eps, t, &x, &mut g).unwrap();
                }
                let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    v.iter().all(|v| v.is_finite()),
                    "{name} {schedule:?}: {v:?}"
                );
            }
        }
        let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
    }
}
