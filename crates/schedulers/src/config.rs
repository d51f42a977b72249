//! Config plumbing shared by every scheduler: the string-valued diffusers options as enums, and the
//! parser that turns a diffusers `scheduler_config.json` value into a scheduler's config struct.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{Error, Result};

/// A diffusers string option as a Rust enum: serde names, the accepted strings (aliases included)
/// for error messages, and the canonical name back.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text $(, alias = $alias)*)] $variant ),+
        }

        impl $name {
            /// Every string diffusers accepts for this option.
            pub const ACCEPTED: &'static [&'static str] = &[$($text $(, $alias)*),+];

            /// The canonical diffusers string.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text ),+
                }
            }
        }
    };
}
pub(crate) use config_enum;

config_enum! {
    /// `beta_schedule`.
    BetaSchedule {
        Linear = "linear",
        ScaledLinear = "scaled_linear",
        SquaredcosCapV2 = "squaredcos_cap_v2",
        /// `betas_for_alpha_bar` with `exp(-12 t)`; only the Heun scheduler accepts it.
        Exp = "exp",
    }
}

config_enum! {
    /// `prediction_type`: what the model predicts.
    PredictionType {
        Epsilon = "epsilon",
        /// The Euler-family schedulers also accept diffusers' older name `original_sample`.
        Sample = "sample" | "original_sample",
        VPrediction = "v_prediction",
    }
}

config_enum! {
    /// `timestep_spacing`: how the inference timesteps are spread over the training ones.
    TimestepSpacing {
        Linspace = "linspace",
        Leading = "leading",
        Trailing = "trailing",
    }
}

config_enum! {
    /// `final_sigmas_type`: the sigma the last step lands on.
    FinalSigmasType {
        Zero = "zero",
        SigmaMin = "sigma_min",
    }
}

/// A diffusers config key and the strings it accepts, checked before deserializing so that a bad
/// value is reported with its key.
pub(crate) type Choice = (&'static str, &'static [&'static str]);

/// The choices every beta-schedule based scheduler shares.
pub(crate) const BETA_CHOICES: [Choice; 2] = [
    (
        "beta_schedule",
        &["linear", "scaled_linear", "squaredcos_cap_v2"],
    ),
    ("timestep_spacing", TimestepSpacing::ACCEPTED),
];

/// Parses a scheduler config from a diffusers JSON object. Keys the struct does not know are
/// ignored; `null` values mean "use the default" (diffusers writes `null` for unset optional keys);
/// string options are checked against `choices` first so errors name the key and accepted values.
pub(crate) fn parse_config<T: DeserializeOwned>(
    class: &str,
    value: &Value,
    choices: &[Choice],
) -> Result<T> {
    let mut value = value.clone();
    if let Value::Object(map) = &mut value {
        map.retain(|_, v| !v.is_null());
        for (key, accepted) in choices {
            if let Some(v) = map.get(*key) {
                let ok = v.as_str().is_some_and(|s| accepted.contains(&s));
                if !ok {
                    return Err(Error::BadConfigValue {
                        class: class.to_string(),
                        key: key.to_string(),
                        value: v.to_string(),
                        accepted: accepted.iter().map(|s| s.to_string()).collect(),
                    });
                }
            }
        }
        check_training_schedule(class, map)?;
    }
    serde_json::from_value(value).map_err(|source| Error::InvalidConfig {
        class: class.to_string(),
        source,
    })
}

/// The most training timesteps a config may declare: every released model uses 1000, and the
/// tables built from the count (betas, alphas, sigmas) would otherwise take any memory asked for.
pub const MAX_TRAIN_TIMESTEPS: u64 = 100_000;

/// Values of the training schedule that can only be mistakes, refused before any table is built:
/// a timestep count above [`MAX_TRAIN_TIMESTEPS`], betas outside `(0, 1)` or inverted (which would
/// otherwise surface as a confusing error from the sampling loop).
fn check_training_schedule(class: &str, map: &serde_json::Map<String, Value>) -> Result<()> {
    if let Some(v) = map.get("num_train_timesteps") {
        if !v
            .as_u64()
            .is_some_and(|n| (1..=MAX_TRAIN_TIMESTEPS).contains(&n))
        {
            return Err(bad_value(
                class,
                "num_train_timesteps",
                v,
                &[&format!("a whole number from 1 to {MAX_TRAIN_TIMESTEPS}")],
            ));
        }
    }
    if let Some(Value::Array(trained)) = map.get("trained_betas") {
        if trained.len() as u64 > MAX_TRAIN_TIMESTEPS {
            return Err(bad_value(
                class,
                "trained_betas",
                format!("a list of {}", trained.len()),
                &[&format!("at most {MAX_TRAIN_TIMESTEPS} values")],
            ));
        }
        return Ok(());
    }
    let accepted = "a number strictly between 0 and 1, beta_start below beta_end";
    let mut betas = [None, None];
    for (slot, key) in betas.iter_mut().zip(["beta_start", "beta_end"]) {
        if let Some(v) = map.get(key) {
            match v.as_f64() {
                Some(b) if b > 0.0 && b < 1.0 => *slot = Some(b),
                _ => return Err(bad_value(class, key, v, &[accepted])),
            }
        }
    }
    if let [Some(start), Some(end)] = betas {
        if start >= end {
            return Err(bad_value(
                class,
                "beta_start / beta_end",
                format!("{start} / {end}"),
                &[accepted],
            ));
        }
    }
    Ok(())
}

/// An error for a config value that parses but that this scheduler does not support.
pub(crate) fn bad_value(class: &str, key: &str, value: impl ToString, accepted: &[&str]) -> Error {
    Error::BadConfigValue {
        class: class.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        accepted: accepted.iter().map(|s| s.to_string()).collect(),
    }
}

/// diffusers allows at most one of `use_karras_sigmas`, `use_exponential_sigmas`,
/// `use_beta_sigmas`; beta sigmas (scipy's beta quantile) are not implemented here.
pub(crate) fn check_sigma_options(
    class: &str,
    karras: bool,
    exponential: bool,
    beta: bool,
) -> Result<()> {
    if beta {
        return Err(bad_value(
            class,
            "use_beta_sigmas",
            true,
            &["false (beta sigmas are not implemented)"],
        ));
    }
    if karras && exponential {
        return Err(bad_value(
            class,
            "use_exponential_sigmas",
            true,
            &["false when use_karras_sigmas is true"],
        ));
    }
    Ok(())
}

/// Parses diffusers JSON text, which may hold Python's `Infinity`, `-Infinity` and `NaN` (diffusers
/// writes `"lambda_min_clipped": -Infinity`), which strict JSON and serde_json reject. A JSON number
/// cannot hold an infinity, so those bare tokens become the JSON strings `"Infinity"`, `"-Infinity"`
/// and `"NaN"`; the config structs read such strings back as floats wherever diffusers has a float key.
pub fn parse_config_json(text: &str) -> Result<Value> {
    let rewritten = rewrite_python_floats(text);
    serde_json::from_str(&rewritten).map_err(|source| Error::Json { source })
}

/// Replaces the bare tokens `Infinity`, `-Infinity` and `NaN` outside strings by quoted strings.
fn rewrite_python_floats(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.char_indices().peekable();
    let mut in_string = false;
    let mut escaped = false;
    while let Some((i, c)) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            continue;
        }
        let rest = &text[i..];
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(token) => {
                out.push('"');
                out.push_str(token);
                out.push('"');
                for _ in 1..token.len() {
                    chars.next();
                }
            }
            None => out.push(c),
        }
    }
    out
}

/// Serde helper for float keys that diffusers may write as `Infinity`/`-Infinity`/`NaN` (which
/// [`parse_config_json`] turns into strings) or as plain numbers.
pub(crate) mod float_or_inf {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(x) => Ok(x),
            Repr::Text(s) => match s.as_str() {
                "Infinity" | "inf" => Ok(f64::INFINITY),
                "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" | "nan" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, Infinity, -Infinity or NaN, found {other:?}"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_train_timesteps_one_trillion_is_refused_before_allocating() {
        let config = serde_json::json!({
            "_class_name": "EulerDiscreteScheduler",
            "num_train_timesteps": 1_000_000_000_000u64
        });
        let message = crate::from_config(&config, 20).err().unwrap().to_string();
        assert!(
            message.contains("num_train_timesteps") && message.contains("100000"),
            "{message}"
        );
    }

    #[test]
    fn inverted_or_out_of_range_betas_name_the_betas_not_the_step_count() {
        for betas in [
            serde_json::json!({"beta_start": 0.012, "beta_end": 0.00085}),
            serde_json::json!({"beta_start": -0.1}),
            serde_json::json!({"beta_end": 2.0}),
        ] {
            let mut config = betas.clone();
            config["_class_name"] = "DPMSolverMultistepScheduler".into();
            let message = crate::from_config(&config, 3).err().unwrap().to_string();
            assert!(message.contains("beta_"), "{betas}: {message}");
            assert!(!message.contains("step called"), "{message}");
        }
    }

    #[test]
    fn python_floats_become_strings_outside_strings_only() {
        let v = parse_config_json(
            r#"{"a": -Infinity, "b": Infinity, "c": NaN, "d": "Infinity \" NaN", "e": [1.5, -Infinity]}"#,
        )
        .unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "Infinity");
        assert_eq!(v["c"], "NaN");
        assert_eq!(v["d"], "Infinity \" NaN");
        assert_eq!(v["e"][1], "-Infinity");
        assert_eq!(v["e"][0], 1.5);
    }

    #[test]
    fn bad_choice_names_key_and_accepted_values() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            timestep_spacing: TimestepSpacing,
        }
        let err = parse_config::<C>(
            "X",
            &serde_json::json!({"timestep_spacing": "sideways"}),
            &BETA_CHOICES,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("timestep_spacing")
                && err.contains("sideways")
                && err.contains("trailing")
        );
    }
}
