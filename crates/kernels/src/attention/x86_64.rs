//! The flash attention rows on x86-64: the AVX-512 8x32 and AVX2 6x16 register tiles.

use super::*;
use crate::gemm::tile_fma;

/// # Safety
/// The CPU must have AVX-512F and FMA.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn rows_avx512(r: Rows) {
    flash_rows::<8, 32>(r.q, r.kv, r.out, r.rows, r.dims, |kc, a, b| {
        crate::gemm::tile_avx512(kc, a, b)
    })
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_avx2(r: Rows) {
    flash_rows::<6, 16>(r.q, r.kv, r.out, r.rows, r.dims, |kc, a, b| {
        tile_fma::<6, 16>(kc, a, b)
    })
}
