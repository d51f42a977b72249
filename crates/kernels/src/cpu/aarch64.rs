//! aarch64 level detection: NEON is always there; FEAT_BF16 adds the BFDOT dot products.

use super::Level;

/// The best level of this CPU.
pub(super) fn detect() -> Level {
    if std::arch::is_aarch64_feature_detected!("bf16") {
        Level::NeonBf16
    } else {
        Level::Neon
    }
}
