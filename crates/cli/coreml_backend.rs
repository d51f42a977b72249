//! `sdrs generate --backend coreml`: the pipeline built from an Apple Core ML Stable Diffusion
//! resources folder (`sdrs_pipeline::pipeline::coreml`), with `--compute-units` as
//! `MLModelConfiguration.computeUnits` (Apple's `--compute-units` of its Swift CLI); everything
//! else (seeds, progress, PNG parameters) is the shared generate path's.

#[cfg(all(feature = "coreml", target_vendor = "apple"))]
use anyhow::Context;
use anyhow::{bail, Result};
use sdrs_pipeline::{LoadOptions, StableDiffusion};

use crate::generate::GenerateArgs;

/// Which runtime runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Our own (candle) components, on `--device`.
    #[default]
    Candle,
    /// Core ML (macOS/iOS): a resources folder's compiled models.
    CoreMl,
}

pub fn parse_backend(name: &str) -> Result<Backend, String> {
    match name {
        "candle" => Ok(Backend::Candle),
        "coreml" => Ok(Backend::CoreMl),
        _ => Err(format!(
            "unknown backend {name:?}; expected candle or coreml"
        )),
    }
}

/// `--compute-units`: the processors Core ML may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeUnits {
    #[default]
    All,
    CpuAndNe,
    CpuAndGpu,
    CpuOnly,
}

impl ComputeUnits {
    const NAMES: [(&'static str, ComputeUnits); 4] = [
        ("all", Self::All),
        ("cpu-and-ne", Self::CpuAndNe),
        ("cpu-and-gpu", Self::CpuAndGpu),
        ("cpu-only", Self::CpuOnly),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, units)| *units == self)
            .map_or("all", |(name, _)| name)
    }
}

pub fn parse_compute_units(name: &str) -> Result<ComputeUnits, String> {
    ComputeUnits::NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, units)| *units)
        .ok_or_else(|| {
            format!(
                "unknown compute units {name:?}; expected all, cpu-and-ne, cpu-and-gpu or cpu-only"
            )
        })
}

/// Why this build cannot run Core ML, if it cannot.
fn unavailable() -> Option<String> {
    if !cfg!(target_vendor = "apple") {
        return Some(format!(
            "Core ML runs only on macOS/iOS; this build is for {}",
            std::env::consts::OS
        ));
    }
    if !cfg!(feature = "coreml") {
        return Some("this build has no Core ML backend (built without the coreml feature)".into());
    }
    None
}

/// Checks the flags before anything is loaded or any output reserved: Core ML must exist here,
/// and what its compiled models cannot do is refused by its flag.
pub fn check(args: &GenerateArgs) -> Result<()> {
    if args.backend != Backend::CoreMl {
        return Ok(());
    }
    if let Some(reason) = unavailable() {
        bail!("--backend coreml: {reason}");
    }
    let refused = [
        ("--refiner", args.refiner.is_some()),
        ("--lora", !args.lora.is_empty()),
        ("--embedding-dir", args.embedding_dir.is_some()),
        ("--quantize", args.quantize.is_some()),
        ("--recipe", args.recipe.is_some()),
        ("--config", args.config.is_some()),
    ];
    if let Some((flag, _)) = refused.iter().find(|(_, given)| *given) {
        bail!(
            "{flag} does not apply to --backend coreml: a Core ML resources folder has its \
             weights compiled in"
        );
    }
    Ok(())
}

/// The pipeline of the resources folder `--model` names, on Core ML with `--compute-units`.
#[cfg(all(feature = "coreml", target_vendor = "apple"))]
pub fn load(args: &GenerateArgs, options: &LoadOptions) -> Result<StableDiffusion> {
    use sdrs_pipeline::pipeline::coreml::{apple_factory, CoreMlOptions};
    let units = match args.compute_units {
        ComputeUnits::All => sdrs_coreml::runtime::ComputeUnits::All,
        ComputeUnits::CpuAndNe => sdrs_coreml::runtime::ComputeUnits::CpuAndNeuralEngine,
        ComputeUnits::CpuAndGpu => sdrs_coreml::runtime::ComputeUnits::CpuAndGpu,
        ComputeUnits::CpuOnly => sdrs_coreml::runtime::ComputeUnits::CpuOnly,
    };
    let folder = std::path::PathBuf::from(&args.model);
    let factory = apple_factory(units);
    StableDiffusion::load_coreml(&folder, &factory, options, &CoreMlOptions::default())
        .with_context(|| format!("cannot load the Core ML resources at {}", folder.display()))
}

/// Without Core ML: [`check`] has refused the backend already; this says so again.
#[cfg(not(all(feature = "coreml", target_vendor = "apple")))]
pub fn load(_args: &GenerateArgs, _options: &LoadOptions) -> Result<StableDiffusion> {
    bail!(
        "--backend coreml: {}",
        unavailable().unwrap_or_else(|| "Core ML is not available in this build".into())
    )
}

/// The infotext fields that name the backend (none for the default one).
pub fn parameters(args: &GenerateArgs) -> Vec<(String, String)> {
    match args.backend {
        Backend::Candle => Vec::new(),
        Backend::CoreMl => vec![
            ("Backend".to_string(), "Core ML".to_string()),
            (
                "Compute units".to_string(),
                args.compute_units.name().to_string(),
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::tests::parse;

    #[test]
    fn the_backend_defaults_to_candle_and_names_itself_in_the_infotext() {
        let args = parse(&[]);
        assert_eq!(
            (args.backend, args.compute_units),
            (Backend::Candle, ComputeUnits::All)
        );
        assert!(parameters(&args).is_empty());
        let args = parse(&["--backend", "coreml", "--compute-units", "cpu-and-ne"]);
        assert_eq!(
            parameters(&args),
            [
                ("Backend".to_string(), "Core ML".to_string()),
                ("Compute units".to_string(), "cpu-and-ne".to_string())
            ]
        );
        assert!(check(&parse(&[])).is_ok());
    }

    #[cfg(not(target_vendor = "apple"))]
    #[test]
    fn generate_refuses_core_ml_off_apple_platforms_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.png");
        let args = parse(&["--backend", "coreml", "-o", output.to_str().unwrap()]);
        let message = format!("{:#}", crate::generate::run(args).unwrap_err());
        assert!(
            message.contains(&format!(
                "Core ML runs only on macOS/iOS; this build is for {}",
                std::env::consts::OS
            )),
            "{message}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[cfg(all(feature = "coreml", target_vendor = "apple"))]
    #[test]
    fn flags_core_ml_cannot_honour_are_refused_by_name() {
        let message = check(&parse(&["--backend", "coreml", "--quantize", "int8"]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("--quantize"), "{message}");
    }

    #[test]
    fn names_parse_and_unknown_ones_list_the_choices() {
        assert_eq!(parse_backend("coreml"), Ok(Backend::CoreMl));
        assert!(parse_backend("mps")
            .unwrap_err()
            .contains("candle or coreml"));
        for (name, units) in ComputeUnits::NAMES {
            assert_eq!(parse_compute_units(name), Ok(units));
            assert_eq!(units.name(), name);
        }
        assert!(parse_compute_units("gpu")
            .unwrap_err()
            .contains("cpu-and-ne"));
    }

    #[cfg(not(target_vendor = "apple"))]
    #[test]
    fn off_apple_platforms_the_backend_is_refused_naming_the_os() {
        let message = unavailable().unwrap();
        assert!(message.starts_with("Core ML runs only on macOS/iOS; this build is for "));
        assert!(message.ends_with(std::env::consts::OS), "{message}");
    }
}
