//! The flash attention rows on x86-64: the AVX-512 8x32 and AVX2 6x16 register tiles, and the
//! AVX512-BF16 dot products of the bf16 attention.

use std::arch::x86_64::*;

use super::pairs::{self, HeadPairs, PairProduct};
use super::*;
use crate::gemm::amx::{MR, NR};
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
        rows_dots(q, kv, out, count, dims, scale)
    }
}

/// [`pairs::rows`] compiled for AVX-512 (the softmax and the pairing vectorise with it).
///
/// # Safety
/// The CPU must have AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn rows_dots(
    q: &[u32],
    kv: &HeadPairs,
    out: &mut [f32],
    count: usize,
    dims: Dims,
    scale: f32,
) {
    pairs::rows::<Dots>(q, kv, out, count, dims, scale)
}

/// The bf16 attention's products on the CPU's AMX tiles, with the rest of the rows (scaling,
/// the online softmax, the pairing of the probabilities) compiled for AVX-512: left to the
/// generic build, that part ran as SSE code and took more time than the products.
pub(super) struct AmxTiles;

impl PairProduct for AmxTiles {
    const STEP: usize = crate::gemm::amx::STEP;

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

    unsafe fn rows(
        q: &[u32],
        kv: &HeadPairs,
        out: &mut [f32],
        count: usize,
        dims: Dims,
        scale: f32,
    ) {
        rows_amx(q, kv, out, count, dims, scale)
    }
}

/// [`pairs::rows`] on tiles, compiled for AVX-512.
///
/// # Safety
/// The CPU must have AMX-BF16 (which implies AVX512-BF16) and the process the tile permission.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn rows_amx(
    q: &[u32],
    kv: &HeadPairs,
    out: &mut [f32],
    count: usize,
    dims: Dims,
    scale: f32,
) {
    pairs::rows::<AmxTiles>(q, kv, out, count, dims, scale)
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
