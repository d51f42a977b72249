//! The flash attention rows on x86-64: the AVX-512 8x32 and AVX2 6x16 register tiles, and the
//! AVX512-BF16 dot products of the bf16 attention.

use std::arch::x86_64::*;

use super::pairs::{self, HeadPairs, PairProduct};
use super::*;
use crate::gemm::amx::{TileBlock, MR, NR};
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

/// The bf16 attention's products with AVX512-BF16 dot products (`vdpbf16ps`): each 8 rows of
/// the product in 16 accumulators, two B vectors per pair and each A pair broadcast to all lanes,
/// as the GEMM's bf16 micro-kernel. Unlike tiles, it needs no depth padding and computes only the
/// rows asked for (rounded up to 8), so a head dim of 40 costs 40 rows, not 64.
pub(super) struct Dots;

impl PairProduct for Dots {
    const STEP: usize = 1;

    #[inline(always)]
    fn exp_neg(x: f32) -> f32 {
        crate::math::exp_neg_fused(x)
    }

    #[inline(always)]
    unsafe fn split_rows(even: &[f32; NR], odd: &[f32; NR], high: &mut [u32], low: &mut [u32]) {
        split_rows_bf16(even, odd, high, low)
    }

    unsafe fn product(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        rows: usize,
        acc: &mut [[f32; NR]; MR],
    ) {
        product_dots(kp, a, a_stride, b, rows, acc)
    }

    unsafe fn rows(
        q: &[u32],
        kv: &HeadPairs,
        out: &mut [f32],
        count: usize,
        dims: Dims,
        scale: f32,
    ) {
        rows_avx512bf16::<Self>(q, kv, out, count, dims, scale)
    }
}

/// [`pairs::rows`] with the product `P`, compiled for AVX-512 (the softmax and the pairing
/// vectorise with it; left to the generic build they ran as SSE code and took longer than the
/// products).
///
/// # Safety
/// The CPU must have AVX512-BF16, and `P`'s product must run on it.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn rows_avx512bf16<P: PairProduct>(
    q: &[u32],
    kv: &HeadPairs,
    out: &mut [f32],
    count: usize,
    dims: Dims,
    scale: f32,
) {
    pairs::rows::<P>(q, kv, out, count, dims, scale)
}

/// The bf16 attention's products on the CPU's AMX tiles, the rest of the rows (the online
/// softmax, the pairing of the probabilities) compiled for AVX-512.
pub(super) struct AmxTiles;

impl PairProduct for AmxTiles {
    const STEP: usize = crate::gemm::amx::STEP;

    #[inline(always)]
    fn exp_neg(x: f32) -> f32 {
        crate::math::exp_neg_fused(x)
    }

    #[inline(always)]
    unsafe fn split_rows(even: &[f32; NR], odd: &[f32; NR], high: &mut [u32], low: &mut [u32]) {
        split_rows_bf16(even, odd, high, low)
    }

    unsafe fn product(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        _rows: usize,
        acc: &mut [[f32; NR]; MR],
    ) {
        crate::gemm::amx::product_on::<crate::gemm::amx::Hardware>(kp, a, a_stride, b, acc)
    }

    unsafe fn accumulate_two(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: [*const u32; 2],
        _rows: usize,
        acc: &mut TileBlock,
    ) {
        crate::gemm::amx::accumulate_two_on::<crate::gemm::amx::Hardware>(kp, a, a_stride, b, acc)
    }

    unsafe fn rows(
        q: &[u32],
        kv: &HeadPairs,
        out: &mut [f32],
        count: usize,
        dims: Dims,
        scale: f32,
    ) {
        // The CPU has AMX-BF16, which implies AVX512-BF16.
        rows_avx512bf16::<Self>(q, kv, out, count, dims, scale)
    }
}

/// See [`PairProduct::product`].
///
/// # Safety
/// The CPU must have AVX512-BF16; `a` must hold `rows` rounded up to 8 rows (at most [`MR`]).
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn product_dots(
    kp: usize,
    a: *const u32,
    a_stride: usize,
    b: *const u32,
    rows: usize,
    acc: &mut [[f32; NR]; MR],
) {
    const ROWS: usize = 8;
    for r0 in (0..rows.min(MR)).step_by(ROWS) {
        let mut c = [[_mm512_setzero_ps(); 2]; ROWS];
        let a0 = a.add(r0 * a_stride);
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for (i, row) in c.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a0.add(i * a_stride + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        for (out, row) in acc[r0..r0 + ROWS].iter_mut().zip(&c) {
            _mm512_storeu_ps(out.as_mut_ptr(), row[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), row[1]);
        }
    }
}

/// Word `2i` of a pair vector is word `i` (the even key's) of `vcvtne2ps2bf16`'s result, word
/// `2i + 1` its word `16 + i` (the odd key's).
const INTERLEAVE: [u16; 32] = {
    let mut index = [0u16; 32];
    let mut i = 0;
    while i < 16 {
        index[2 * i] = i as u16;
        index[2 * i + 1] = 16 + i as u16;
        i += 1;
    }
    index
};

/// [`PairProduct::split_rows`] with `vcvtne2ps2bf16`: the same pairs as the scalar rounding,
/// except that values below f32's normal range become zero, as the bf16 products read them
/// anyway.
///
/// # Safety
/// The CPU must have AVX512-BF16; `high` and `low` hold whole vectors of 16 lanes.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
#[inline]
unsafe fn split_rows_bf16(even: &[f32; NR], odd: &[f32; NR], high: &mut [u32], low: &mut [u32]) {
    let index = _mm512_loadu_si512(INTERLEAVE.as_ptr().cast());
    let upper = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    let lanes = high.len().min(low.len()).min(NR);
    debug_assert!(lanes.is_multiple_of(16));
    for x in (0..lanes).step_by(16) {
        let e = _mm512_loadu_ps(even.as_ptr().add(x));
        let o = _mm512_loadu_ps(odd.as_ptr().add(x));
        let pairs = |e: __m512, o: __m512| {
            let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
            _mm512_permutexvar_epi16(index, halves)
        };
        let hi = pairs(e, o);
        let rounded_e = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi));
        let rounded_o = _mm512_castsi512_ps(_mm512_and_si512(hi, upper));
        let lo = pairs(_mm512_sub_ps(e, rounded_e), _mm512_sub_ps(o, rounded_o));
        _mm512_storeu_si512(high.as_mut_ptr().add(x).cast(), hi);
        _mm512_storeu_si512(low.as_mut_ptr().add(x).cast(), lo);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector split gives the scalar split's bits for every normal value (and zero), on
    /// probabilities, ties of the bf16 rounding and values of every sign and range.
    #[test]
    fn vector_split_matches_the_scalar_split() {
        if crate::cpu::detected() < crate::cpu::Level::Avx512Bf16 {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let tie = f32::from_bits(0x3f80_8000);
        let specials = [
            0.0,
            1.0,
            tie,
            -tie,
            0.5,
            1e-30,
            -3.75e7,
            f32::MIN_POSITIVE,
            0.999_999,
        ];
        for round in 0..64u32 {
            let value = |i: usize| {
                let k = (i as u32).wrapping_mul(2_654_435_761u32.wrapping_add(round));
                match k % 4 {
                    0 => specials[(k as usize / 4) % specials.len()],
                    1 => (k % 10_007) as f32 / 10_007.0,
                    _ => {
                        f32::from_bits(0x0080_0000 + k % 0x7e00_0000)
                            * if k & 8 == 0 { 1.0 } else { -1.0 }
                    }
                }
            };
            let even: [f32; NR] = std::array::from_fn(|i| value(2 * i));
            let odd: [f32; NR] = std::array::from_fn(|i| value(2 * i + 1));
            let (mut high, mut low) = ([0u32; NR], [0u32; NR]);
            // SAFETY: checked above that the CPU has AVX512-BF16.
            unsafe { split_rows_bf16(&even, &odd, &mut high, &mut low) };
            for i in 0..NR {
                let want = pairs::split_pair(even[i], odd[i]);
                let subnormal = |x: f32| x != 0.0 && x.abs() < f32::MIN_POSITIVE;
                // Residuals below f32's normal range are zero for the hardware (and for the
                // products that read them); compare the high parts alone there.
                let residual_e = even[i] - f32::from_bits((want.0 & 0xffff) << 16);
                let residual_o = odd[i] - f32::from_bits(want.0 & 0xffff_0000);
                assert_eq!(high[i], want.0, "high of {} {}", even[i], odd[i]);
                if !subnormal(residual_e) && !subnormal(residual_o) {
                    assert_eq!(low[i], want.1, "low of {} {}", even[i], odd[i]);
                }
            }
        }
    }
}
