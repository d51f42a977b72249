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

/// [`bf16_bits`](super::bf16_bits) of 16 lanes, in the low halves: the same rounding (to nearest,
/// ties to even; a NaN stays a quiet NaN), bit for bit.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bf16_bits16(x: __m512i) -> __m512i {
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bias));
    let magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
    _mm512_mask_blend_epi32(nan, rounded, quiet)
}

/// See [`pair_rows`](super::pair_rows): 16 pairs per step.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pair_rows_avx512(even: &[f32], odd: &[f32], out: &mut [u32]) {
    let n = out.len().min(even.len()).min(odd.len());
    let whole = n - n % 16;
    for j in (0..whole).step_by(16) {
        let lo = bf16_bits16(_mm512_loadu_si512(even.as_ptr().add(j).cast()));
        let hi = bf16_bits16(_mm512_loadu_si512(odd.as_ptr().add(j).cast()));
        let pairs = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
        _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), pairs);
    }
    for j in whole..n {
        out[j] = pair(even[j], odd[j]);
    }
}

/// See [`pair_adjacent`](super::pair_adjacent): 16 pairs (32 values) per step.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pair_adjacent_avx512(line: &[f32], out: &mut [u32]) {
    let n = out.len().min(line.len() / 2);
    let whole = n - n % 16;
    for p in (0..whole).step_by(16) {
        let first = bf16_bits16(_mm512_loadu_si512(line.as_ptr().add(2 * p).cast()));
        let second = bf16_bits16(_mm512_loadu_si512(line.as_ptr().add(2 * p + 16).cast()));
        // Each lane's low half is one bf16; truncating the lanes to 16 bits packs neighbours
        // into one 32-bit pair, the first of them low.
        let first = _mm512_cvtepi32_epi16(first);
        let second = _mm512_cvtepi32_epi16(second);
        let pairs = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second);
        _mm512_storeu_si512(out.as_mut_ptr().add(p).cast(), pairs);
    }
    for p in whole..n {
        out[p] = pair(line[2 * p], line[2 * p + 1]);
    }
}
