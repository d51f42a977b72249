//! Process-level settings and readings shared by the commands: the CPU worker threads, the
//! kernels in use, and the peak resident memory.

use anyhow::{bail, Context, Result};

/// Sets the number of CPU worker threads (default: the physical cores) before any kernel runs,
/// for rayon's global pool (our kernels) and for candle's own matmul, which reads
/// `RAYON_NUM_THREADS`. Returns the count in use.
pub fn configure_threads(requested: Option<usize>) -> Result<usize> {
    let threads = match requested {
        Some(0) => bail!("--threads 0: give at least 1 (or leave it out for the physical cores)"),
        Some(n) => n,
        None => num_cpus::get_physical().max(1),
    };
    // Only this process reads it, before any worker thread exists.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // A second call (tests run commands in one process) finds the pool built: not an error.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    Ok(threads)
}

/// The CPU kernels chosen at run time, for the benchmark's header.
pub fn kernel_description() -> String {
    format!(
        "{} kernels {}",
        std::env::consts::ARCH,
        sdrs_kernels::cpu::level().name()
    )
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
    use super::*;

    #[test]
    fn zero_threads_is_refused() {
        let error = configure_threads(Some(0)).unwrap_err().to_string();
        assert!(error.contains("--threads 0"), "{error}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_is_read_on_linux() {
        let before = peak_rss().unwrap();
        let block = vec![1u8; 64 << 20];
        let after = peak_rss().unwrap();
        assert!(
            after >= before && after >= block.len() as u64,
            "{before} {after}"
        );
    }
}
