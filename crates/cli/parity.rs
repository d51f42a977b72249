//! `sdrs parity`: runs every reference case in a fixtures folder and prints one line per case.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use sdrs_tooling::parity::{self, ExtendedFixtures, Outcome, ParityOptions};

#[derive(Debug, Args)]
pub struct ParityArgs {
    /// Folder laid out like the project's `tests/fixtures` (models and `reference/`).
    #[arg(long, default_value = "tests/fixtures")]
    pub fixtures: PathBuf,

    /// Device to run on: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Compute dtype: f32, f16 or bf16; each is held to its own column of the tolerance table
    /// (`sdrs_tooling::tolerances`), half precision to looser bounds.
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// The extended fixture sets (`gguf/`, `coreml/`, `features/`), kept outside the repository
    /// (default: `SDRS_FIXTURES`, else `../shared/fixtures`). A missing set is reported as
    /// skipped, or fails the run when `CI=true`.
    #[arg(long)]
    pub extended: Option<PathBuf>,

    /// Run only the cases whose names start with this prefix (repeatable), e.g. `--only lora_sd15:`.
    #[arg(long)]
    pub only: Vec<String>,
}

/// The extended fixtures folder: the flag, else `SDRS_FIXTURES`, else `../shared/fixtures`.
pub fn extended_fixtures(flag: Option<PathBuf>) -> ExtendedFixtures {
    let root = flag
        .or_else(|| std::env::var_os("SDRS_FIXTURES").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/fixtures"));
    ExtendedFixtures {
        root,
        required: std::env::var("CI").is_ok_and(|v| v == "true"),
    }
}

pub fn run(args: ParityArgs) -> anyhow::Result<ExitCode> {
    let selection = args
        .device
        .parse::<sdrs_pipeline::DeviceChoice>()?
        .select()?;
    eprintln!("{}", selection.message());
    let options = ParityOptions {
        device: selection.device,
        dtype: sdrs_pipeline::parse_dtype(&args.dtype)?,
        kernels: crate::system::kernel_options(Default::default())?,
        extended: Some(extended_fixtures(args.extended)),
        only: args.only,
    };
    let only = options.only.clone();
    let results = parity::run(&args.fixtures, &options, &mut |case| println!("{case}"))?;
    if results.is_empty() && !only.is_empty() {
        anyhow::bail!(
            "no parity case's name starts with {}; names look like `tokenizer:0`, `unet_sd15`, \
             `lora_sd15:base`, `gguf_block:q4_0`",
            only.join(" or ")
        );
    }
    let failed = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
        .count();
    let passed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Pass)
        .count();
    let skipped = results.len() - passed - failed;
    if passed + failed == 0 && only.is_empty() {
        anyhow::bail!(
            "no parity case was checked ({skipped} skipped): the fixtures at {} hold nothing to \
             compare",
            args.fixtures.display()
        );
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use sdrs_tooling::tolerances::{self, CaseKind};

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ParityArgs,
    }

    #[test]
    fn parity_flags_default_to_the_project_fixtures_on_the_cpu_in_f32() {
        let args = Wrapper::try_parse_from(["x"]).unwrap().args;
        assert_eq!(args.fixtures, PathBuf::from("tests/fixtures"));
        assert_eq!(args.device, "cpu");
        assert_eq!(args.dtype, "f32");
        let args = Wrapper::try_parse_from(["x", "--fixtures", "/f", "--dtype", "bf16"])
            .unwrap()
            .args;
        assert_eq!(args.fixtures, PathBuf::from("/f"));
        assert_eq!(args.dtype, "bf16");
    }

    #[test]
    fn every_dtype_the_flag_takes_has_a_bound_for_every_case_kind() {
        for name in ["f32", "f16", "bf16"] {
            let dtype = sdrs_pipeline::parse_dtype(name).unwrap();
            for kind in CaseKind::ALL {
                let bound = tolerances::tolerance(kind, dtype);
                assert!(
                    bound.is_some_and(f64::is_finite),
                    "{name} {kind:?}: {bound:?}"
                );
            }
        }
    }
}
