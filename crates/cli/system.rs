//! Settings and readings shared by the commands: the kernel options of the command line, the
//! kernels in use, and the peak resident memory.

use anyhow::{Context, Result};
use sdrs_kernels::attention::AttentionMode;
use sdrs_kernels::KernelOptions;

/// The kernel options of the command line: `--attention`, and the CPU level capped by
/// `SDRS_CPU_FEATURES` when it is set.
pub fn kernel_options(attention: AttentionMode) -> Result<KernelOptions> {
    KernelOptions::from_env(attention).map_err(anyhow::Error::msg)
}

/// The CPU kernels chosen at run time, for the benchmark's header: the level, and where it has
/// bf16 dot products, how they measured against its f32 kernels and whether bf16 weights use them.
pub fn kernel_description(options: &KernelOptions) -> String {
    let level = options.cpu_level();
    let dots = match sdrs_kernels::gemm::bf16_speedup(level) {
        Some(speedup) => format!(
            " (bf16 dot products {speedup:.2}x the f32 kernels: {})",
            if sdrs_kernels::gemm::bf16_dots_pay(level) {
                "used for bf16 weights"
            } else {
                "not used, bf16 weights take the f32 kernels"
            }
        ),
        None => String::new(),
    };
    format!("{} kernels {}{dots}", std::env::consts::ARCH, level.name())
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`); `None` elsewhere.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Restarts the peak-memory reading from the current resident size (Linux `clear_refs`), so
/// that a measurement does not include what earlier, already freed work used.
pub fn reset_peak_rss() {
    // Best effort: without it the reading is an upper bound, which the table still labels.
    let _ = std::fs::write("/proc/self/clear_refs", "5").context("clear_refs");
}

#[cfg(test)]
mod tests {
    // Only the Linux test reads the peak memory.
    #[cfg(target_os = "linux")]
    use super::*;

    #[test]
    fn a_bad_cpu_cap_names_the_accepted_levels() {
        // Read through the same parser as SDRS_CPU_FEATURES.
        let error = sdrs_kernels::dispatch::parse_cpu_cap("fast").unwrap_err();
        assert!(
            error.contains("SDRS_CPU_FEATURES") && error.contains("portable"),
            "{error}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_is_read_on_linux() {
        let before = peak_rss().unwrap();
        // Kept observable: an optimised build may otherwise drop the unread block.
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = peak_rss().unwrap();
        assert!(
            after >= before && after >= block.len() as u64,
            "{before} {after}"
        );
    }
}
