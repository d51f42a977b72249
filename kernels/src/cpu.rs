//! Which SIMD instruction sets the CPU offers, detected once at run time, so that one binary picks
//! the fastest kernels on any x86-64 (AVX2+FMA, AVX-512, AVX512-BF16) or aarch64 (NEON, NEON with
//! the BF16 dot products) machine.
//!
//! `SDRS_CPU_FEATURES=portable|avx2|neon|avx512` caps the level (to compare kernels, or to check the
//! slower paths on a fast machine).

use std::sync::OnceLock;

/// Kernel families, from slowest to fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, whatever the compiler vectorises for the baseline target.
    Portable,
    /// x86-64 AVX2 with FMA, or aarch64 NEON (always present there).
    Simd256,
    /// aarch64 NEON with the BF16 dot products (FEAT_BF16: Apple M2 and later, AWS Graviton 3
    /// and later, Neoverse V1/N2 ...).
    NeonBf16,
    /// x86-64 AVX-512F.
    Avx512,
    /// x86-64 AVX-512F with the AVX512-BF16 dot-product instructions.
    Avx512Bf16,
}

impl Level {
    /// The name printed by the benchmark.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Simd256 if cfg!(target_arch = "aarch64") => "neon",
            Self::Simd256 => "avx2+fma",
            Self::Avx512 => "avx512",
            Self::NeonBf16 => "neon+bf16",
            Self::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Every level this CPU can run, slowest first (for parity tests of each path).
    pub fn available() -> Vec<Level> {
        let best = detected();
        let levels: &[Level] = if cfg!(target_arch = "aarch64") {
            &[Self::Portable, Self::Simd256, Self::NeonBf16]
        } else {
            &[
                Self::Portable,
                Self::Simd256,
                Self::Avx512,
                Self::Avx512Bf16,
            ]
        };
        levels
            .iter()
            .copied()
            .filter(|level| *level <= best)
            .collect()
    }
}

fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let avx512 = avx2 && std::is_x86_feature_detected!("avx512f");
        let bf16 = avx512
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw");
        if bf16 {
            Level::Avx512Bf16
        } else if avx512 {
            Level::Avx512
        } else if avx2 {
            Level::Simd256
        } else {
            Level::Portable
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("bf16") {
            Level::NeonBf16
        } else {
            Level::Simd256
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Level::Portable
    }
}

/// The level the kernels use: the CPU's best, capped by `SDRS_CPU_FEATURES`.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("SDRS_CPU_FEATURES").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") | Ok("neon") => Level::Simd256,
            Ok("avx512") => Level::Avx512,
            _ => Level::Avx512Bf16,
        };
        detected().min(cap)
    })
}

/// Whether bf16 is the fast dtype here (native bf16 dot products), which makes it the default.
pub fn has_native_bf16() -> bool {
    matches!(level(), Level::Avx512Bf16 | Level::NeonBf16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_the_portable_one_is_always_there() {
        let available = Level::available();
        assert_eq!(available[0], Level::Portable);
        assert!(available.windows(2).all(|w| w[0] < w[1]));
        assert!(available.contains(&level()));
    }
}
