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

/// `1073741824`, `1GiB`, `1.5GB`, `900MiB`, `512k`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a byte count such as 1073741824, 1GiB or 900MB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    let bytes = value * scale;
    if !(1.0..=1e15).contains(&bytes) {
        return Err(format!("{s:?}: expected 1 byte to 1 PB"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_units_and_refuse_nonsense() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("900MB"), Ok(900_000_000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_bytes("-5").is_err());
    }

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
