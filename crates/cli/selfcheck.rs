//! `sdrs selfcheck`: runs our CUDA kernels against our CPU kernels on the GPU, on seeded inputs of
//! the shapes SD1.5 and SDXL use (the same checks as `crates/kernels/tests/cuda_parity.rs`), so
//! that a GPU machine without a Rust toolchain can check a binary built elsewhere.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use sdrs_pipeline::DeviceChoice;

#[derive(Debug, Args)]
pub struct SelfcheckArgs {
    /// The GPU to check: cuda or cuda:N.
    #[arg(long, default_value = "cuda", value_parser = crate::generate::parse_device)]
    pub device: DeviceChoice,
}

pub fn run(args: SelfcheckArgs) -> Result<ExitCode> {
    let selection = args.device.select()?;
    eprintln!("{}", selection.message());
    check(&selection.device, &args.device)
}

#[cfg(feature = "cuda")]
fn check(device: &candle_core::Device, choice: &DeviceChoice) -> Result<ExitCode> {
    if !device.is_cuda() {
        anyhow::bail!("--device {choice}: `sdrs selfcheck` checks the CUDA kernels: name a CUDA device (cuda or cuda:N)");
    }
    let results = sdrs_kernels::cuda::self_check(device)?;
    for result in &results {
        println!("{result}");
    }
    let failed = results.iter().filter(|r| !r.pass).count();
    println!("{} passed, {failed} failed", results.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(not(feature = "cuda"))]
fn check(_device: &candle_core::Device, choice: &DeviceChoice) -> Result<ExitCode> {
    anyhow::bail!(
        "--device {choice}: this sdrs was built without CUDA support, so it has no CUDA kernels to check (rebuild with `--features cuda`)"
    )
}
