//! x86-64 level detection: AVX2+FMA, AVX-512F, AVX512-BF16 (with AVX512BW for its loads).

use super::Level;

/// The best level of this CPU.
pub(super) fn detect() -> Level {
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
        Level::Avx2
    } else {
        Level::Portable
    }
}
