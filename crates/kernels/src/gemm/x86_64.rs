//! x86-64 micro-kernels: the AVX-512 f32 tile in zmm intrinsics, AVX2+FMA, and the AVX512-BF16
//! dot-product kernel (`vdpbf16ps`) over packed bf16 pairs.

use super::*;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must have AVX-512F and FMA; see [`store`] for `c`.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn kernel_avx512(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    store(&tile_avx512(kc, a, b), c, ldc, mr, nr)
}

/// The 8 x 32 register tile in 16 zmm accumulators, written out with intrinsics: LLVM
/// vectorises [`tile_fma`] with 256-bit vectors even where AVX-512 is enabled (it prefers
/// them on most CPUs), and an 8 x 32 tile of ymm registers spills, which measured 8 GFLOP/s
/// instead of the hundreds this tile reaches.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn tile_avx512(kc: usize, a: &[f32], b: &[f32]) -> [[f32; 32]; 8] {
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    for (ap, bp) in a.chunks_exact(8).zip(b.chunks_exact(32)).take(kc) {
        let b0 = _mm512_loadu_ps(bp.as_ptr());
        let b1 = _mm512_loadu_ps(bp.as_ptr().add(16));
        for (row, &value) in acc.iter_mut().zip(ap) {
            let av = _mm512_set1_ps(value);
            row[0] = _mm512_fmadd_ps(av, b0, row[0]);
            row[1] = _mm512_fmadd_ps(av, b1, row[1]);
        }
    }
    let mut tile = [[0f32; 32]; 8];
    for (out, row) in tile.iter_mut().zip(&acc) {
        _mm512_storeu_ps(out.as_mut_ptr(), row[0]);
        _mm512_storeu_ps(out.as_mut_ptr().add(16), row[1]);
    }
    tile
}

/// # Safety
/// The CPU must have AVX2 and FMA; see [`store`] for `c`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel_avx2(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    store(&tile_fma::<6, 16>(kc, a, b), c, ldc, mr, nr)
}

const MR: usize = 8;
const NR: usize = 32;

/// Whether the AVX512-BF16 path gives the f32 kernels' result on this CPU (checked once).
pub fn bf16_kernel_verified() -> bool {
    static VERIFIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERIFIED.get_or_init(|| bf16_agrees_with_f32::<Bf16Pairs, 8, 32>(kernel_bf16))
}

/// `c[8 x 32] += a · b` over `kp` K pairs with `vdpbf16ps`: 16 accumulators, two B vectors
/// per pair, and each A pair broadcast to all lanes.
///
/// # Safety
/// The CPU must have AVX512-BF16; see [`store`] for `c`.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
pub unsafe fn kernel_bf16(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kp) {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.as_ptr().cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.as_ptr().add(16).cast()));
        for i in 0..MR {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(ap[i] as i32));
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
        }
    }
    let mut tile = [[0f32; NR]; MR];
    for i in 0..MR {
        _mm512_storeu_ps(tile[i].as_mut_ptr(), acc[i][0]);
        _mm512_storeu_ps(tile[i].as_mut_ptr().add(16), acc[i][1]);
    }
    store(&tile, c, ldc, mr, nr)
}
