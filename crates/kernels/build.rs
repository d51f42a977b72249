//! Build script: with the `cuda` feature, compiles our CUDA kernels (`cuda/kernels.cu`, which
//! includes every kernel file) with nvcc into one fatbin that `src/cuda` embeds, holding machine
//! code (SASS) for every architecture of [`ARCHITECTURES`] and PTX for forward compatibility,
//! and writes the kernels' PTX for each of [`PTX_FILES`] beside it for CI. Without the feature it
//! does nothing.
//!
//! nvcc is `$NVCC` when set, else `nvcc` on `PATH`, else `$CUDA_HOME/bin/nvcc` (or
//! `$CUDA_PATH/bin/nvcc`). With the feature on and no nvcc, the build fails saying so.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// The compute capabilities the fatbin holds SASS for, oldest first: A100 / A30 (80), RTX 30xx /
/// A10 / A40 (86), RTX 40xx / L4 / L40S (89), H100 / H200 (90), B200 / GB200 / B300 (100; sm_100
/// code also runs on 10.3), RTX 50xx / RTX PRO 6000 Blackwell (120; also runs on 12.1, DGX Spark).
/// SASS of X.y runs on X.z for z >= y only, so each major needs its own entry.
///
/// PTX is embedded for the oldest (compute_80: the driver can JIT it for any GPU of 8.0 or newer
/// that has no SASS here, e.g. Thor's 11.0) and the newest (compute_120: the best code for a
/// future major above 12). Never the arch-specific `a` variants (`sm_90a`): their code only
/// loads on exactly that architecture, so an sm_90a build does not load on sm_120.
const ARCHITECTURES: [u32; 6] = [80, 86, 89, 90, 100, 120];

/// The virtual architectures whose PTX is also written as a file into OUT_DIR (for CI, which
/// keeps the PTX of our kernels for H100-class and RTX 50-class GPUs), exposed to the crate as
/// `SDRS_CUDA_PTX_<arch>` (the file's path).
const PTX_FILES: [u32; 2] = [90, 120];

/// The translation unit with every kernel, under the package's folder.
const SOURCE: &str = "cuda/kernels.cu";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    // The kernel sources only: editing the README next to them rebuilds nothing.
    let sources = std::fs::read_dir(manifest_dir.join("cuda"))
        .unwrap_or_else(|e| fail(&format!("cannot list cuda/: {e}")));
    for entry in sources.flatten() {
        let path = entry.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("cu" | "cuh")
        ) {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "NVCC_CCBIN"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR is not set")));
    let source = manifest_dir.join(SOURCE);
    let nvcc = find_nvcc();
    let threads = env::var("NUM_JOBS").unwrap_or_else(|_| "1".into());

    let fatbin = out_dir.join("sdrs_kernels.fatbin");
    let mut command = nvcc_command(&nvcc);
    command.arg("--fatbin").arg("--threads").arg(&threads);
    for (i, arch) in ARCHITECTURES.iter().enumerate() {
        let with_ptx = i == 0 || i == ARCHITECTURES.len() - 1;
        let code = if with_ptx {
            format!("[sm_{arch},compute_{arch}]")
        } else {
            format!("sm_{arch}")
        };
        command
            .arg("-gencode")
            .arg(format!("arch=compute_{arch},code={code}"));
    }
    run(command.arg("-o").arg(&fatbin).arg(&source));
    println!("cargo::rustc-env=SDRS_CUDA_FATBIN={}", fatbin.display());

    for arch in PTX_FILES {
        let ptx = out_dir.join(format!("sdrs_kernels.compute_{arch}.ptx"));
        let mut command = nvcc_command(&nvcc);
        command.arg("--ptx").arg(format!("-arch=compute_{arch}"));
        run(command.arg("-o").arg(&ptx).arg(&source));
        println!("cargo::rustc-env=SDRS_CUDA_PTX_{arch}={}", ptx.display());
    }

    let list: Vec<String> = ARCHITECTURES.iter().map(|a| format!("sm_{a}")).collect();
    println!(
        "cargo::rustc-env=SDRS_CUDA_ARCHITECTURES={}",
        list.join(",")
    );
}

/// nvcc with the flags every compilation shares: exact math (no `--use_fast_math`: erf, exp and
/// the divisions stay IEEE-accurate, as the parity tests against the CPU kernels expect).
fn nvcc_command(nvcc: &Path) -> Command {
    let mut command = Command::new(nvcc);
    command.args(["-std=c++17", "-O3"]);
    command
}

fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| fail(&format!("could not run {command:?}: {e}")));
    if !status.success() {
        fail(&format!("{command:?} failed ({status})"));
    }
}

/// `$NVCC`, else `nvcc` on PATH, else under `$CUDA_HOME` or `$CUDA_PATH`.
fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    let works = |nvcc: &Path| {
        Command::new(nvcc)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if works(Path::new("nvcc")) {
        return PathBuf::from("nvcc");
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let nvcc = Path::new(&home).join("bin").join("nvcc");
            if works(&nvcc) {
                return nvcc;
            }
        }
    }
    fail(
        "the `cuda` feature needs nvcc (CUDA 12.8 or newer, for sm_120): none found. Set NVCC to \
         its path, put it on PATH, or set CUDA_HOME to the toolkit's folder (with bin/nvcc).",
    )
}

fn fail(message: &str) -> ! {
    eprintln!("sdrs-kernels build: {message}");
    exit(1)
}
