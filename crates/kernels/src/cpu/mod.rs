//! Which SIMD instruction sets the CPU offers, detected once at run time, so that one binary picks
//! the fastest kernels on any x86-64 (AVX2+FMA, AVX-512, AVX512-BF16, AMX) or aarch64 (NEON, NEON with
//! the BF16 dot products) machine. Each architecture's levels and detection live in its own file;
//! [`Level`] has only the variants of the architecture it is compiled for.
//!
//! The detected level is a fact of the machine; the level a pipeline runs at is chosen by its
//! [`crate::KernelOptions`] (which may cap it, e.g. from `SDRS_CPU_FEATURES`).

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::sync::OnceLock;

/// Kernel families of this architecture, from slowest to fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust, whatever the compiler vectorises for the baseline target.
    Portable,
    /// x86-64 AVX2 with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 AVX-512F.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// x86-64 AVX-512F with the AVX512-BF16 dot-product instructions.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    /// x86-64 AVX512-BF16 with Intel AMX-BF16 tiles (Sapphire Rapids and later), where the
    /// operating system grants the tile state (Linux, on request).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// aarch64 NEON (always present there).
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// aarch64 NEON with the BF16 dot products (FEAT_BF16: Apple M2 and later, AWS Graviton 3
    /// and later, Neoverse V1/N2 ...).
    #[cfg(target_arch = "aarch64")]
    NeonBf16,
}

impl Level {
    /// Every level of this architecture, slowest first.
    #[cfg(target_arch = "x86_64")]
    const ALL: &'static [Level] = &[
        Level::Portable,
        Level::Avx2,
        Level::Avx512,
        Level::Avx512Bf16,
        Level::Amx,
    ];
    #[cfg(target_arch = "aarch64")]
    const ALL: &'static [Level] = &[Level::Portable, Level::Neon, Level::NeonBf16];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ALL: &'static [Level] = &[Level::Portable];

    /// The accepted `SDRS_CPU_FEATURES` / `--cpu-features` names, for messages.
    #[cfg(target_arch = "x86_64")]
    pub const ACCEPTED: &'static str = "portable, avx2, avx512, avx512bf16, amx";
    #[cfg(target_arch = "aarch64")]
    pub const ACCEPTED: &'static str = "portable, neon, neon+bf16";
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub const ACCEPTED: &'static str = "portable";

    /// The name printed by the benchmark and accepted by [`Level::parse`].
    pub fn name(&self) -> &'static str {
        match self {
            Self::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2+fma",
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => "avx512bf16",
            #[cfg(target_arch = "x86_64")]
            Self::Amx => "amx",
            #[cfg(target_arch = "aarch64")]
            Self::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            Self::NeonBf16 => "neon+bf16",
        }
    }

    /// A level by name (`avx2` and `avx2+fma` both name the AVX2 level); `None` for a name of
    /// another architecture or none at all.
    pub fn parse(name: &str) -> Option<Level> {
        let name = name.trim().to_ascii_lowercase();
        let name = match name.as_str() {
            "avx2" => "avx2+fma",
            "neonbf16" | "neon-bf16" => "neon+bf16",
            other => other,
        };
        Self::ALL.iter().copied().find(|level| level.name() == name)
    }

    /// Every level this CPU can run, slowest first (for parity tests of each path).
    pub fn available() -> Vec<Level> {
        let best = detected();
        Self::ALL
            .iter()
            .copied()
            .filter(|level| *level <= best)
            .collect()
    }

    /// Whether this level has native bf16 dot products (the bf16 micro-kernels).
    pub fn has_bf16_dots(&self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 | Self::Amx => true,
            #[cfg(target_arch = "aarch64")]
            Self::NeonBf16 => true,
            _ => false,
        }
    }
}

/// The best level this CPU runs, detected once.
pub fn detected() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            x86_64::detect()
        }
        #[cfg(target_arch = "aarch64")]
        {
            aarch64::detect()
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Level::Portable
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_the_portable_one_is_always_there() {
        let available = Level::available();
        assert_eq!(available[0], Level::Portable);
        assert!(available.windows(2).all(|w| w[0] < w[1]));
        assert!(available.contains(&detected()));
    }

    #[test]
    fn every_level_parses_back_from_its_name() {
        for level in Level::ALL {
            assert_eq!(Level::parse(level.name()), Some(*level));
        }
        assert_eq!(Level::parse("PORTABLE"), Some(Level::Portable));
        assert_eq!(Level::parse("sse9"), None);
    }
}
