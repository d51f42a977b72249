//! Flash attention's two products on bf16 pairs, for layers whose weights are bf16 (as PyTorch's
//! bf16 attention rounds queries, keys, values and probabilities to bf16; scores, the softmax and
//! the output accumulate in f32): on AMX tiles, or with AVX512-BF16 dot products.
//!
//! The scheme is [`flash_rows`](super::flash_rows)' (scores transposed, `[key][query]`, one query
//! per lane), on 32 x 32 products: `Sᵀ = K Qᵀ` with K as the A operand (`[key][d pairs]`) and the
//! block's queries as B (`[d pair][query]`), then `Oᵀ += Vᵀ Pᵀ` with Vᵀ as A (`[dv][key pairs]`)
//! and the probabilities paired along keys as B. Depths are padded with zeros to whole steps of
//! the product ([`PairProduct::STEP`]: 16 pairs on tiles, 1 for dot products).

#[cfg(test)]
use std::marker::PhantomData;

use rayon::prelude::*;

use super::{for_each_query_block, rescale, softmax_block, write_rows, Dims, View, BLOCK_K};
#[cfg(test)]
use crate::gemm::amx::{accumulate_two_on, product_on, Tiles};
use crate::gemm::amx::{TileBlock, MR, NR};
use crate::gemm::{pair, Aligned, Element};

/// A `32 x 32` product of bf16 pairs, `acc = a · b` (f32 accumulation).
pub(super) trait PairProduct: Sized {
    /// Depths are padded with zero pairs to a multiple of this.
    const STEP: usize;

    /// `acc[..rows] = a · b` over `kp` pairs (a multiple of [`Self::STEP`]): `a` has [`MR`] rows
    /// of `kp` pairs, `a_stride` pairs apart; `b` has `kp` rows of [`NR`] pairs. Rows of `acc`
    /// from `rows` on may hold anything afterwards.
    ///
    /// # Safety
    /// The product's instructions must run on this CPU, and the pointers must be valid for
    /// those reads.
    unsafe fn product(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        rows: usize,
        acc: &mut [[f32; NR]; MR],
    );

    /// `acc[..rows] += a · b[0] + a · b[1]`, the operands as for [`Self::product`].
    ///
    /// # Safety
    /// As for [`Self::product`].
    unsafe fn accumulate_two(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: [*const u32; 2],
        rows: usize,
        acc: &mut TileBlock,
    ) {
        let mut tile = TileBlock::default();
        for part in b {
            Self::product(kp, a, a_stride, part, rows, &mut tile);
            let dst = acc[..rows].as_flattened_mut();
            for (x, y) in dst.iter_mut().zip(tile[..rows].as_flattened()) {
                *x += y;
            }
        }
    }

    /// `exp(x)` for `x <= 0`, as the softmax takes it.
    #[inline(always)]
    fn exp_neg(x: f32) -> f32 {
        crate::math::exp_neg(x)
    }

    /// Two neighbouring keys' probabilities (`even`, `odd`, one query per lane) as the high and
    /// low bf16 pairs of [`split_pair`], `high.len()` (at most [`NR`]) lanes.
    ///
    /// # Safety
    /// As for [`Self::product`]: an override may use the product's instructions.
    #[inline(always)]
    unsafe fn split_rows(even: &[f32; NR], odd: &[f32; NR], high: &mut [u32], low: &mut [u32]) {
        for (i, (high, low)) in high.iter_mut().zip(low.iter_mut()).enumerate() {
            (*high, *low) = split_pair(even[i], odd[i]);
        }
    }

    /// [`rows`] with this product (a product may wrap it to compile it for its instructions).
    ///
    /// # Safety
    /// As for [`Self::product`].
    unsafe fn rows(
        q: &[u32],
        kv: &HeadPairs,
        out: &mut [f32],
        count: usize,
        dims: Dims,
        scale: f32,
    ) {
        rows::<Self>(q, kv, out, count, dims, scale)
    }
}

/// The product on model tiles (`T`), for the tests; the hardware's is
/// [`AmxTiles`](super::x86_64::AmxTiles).
#[cfg(test)]
pub(super) struct OnTiles<T>(PhantomData<T>);

#[cfg(test)]
impl<T: Tiles + Default> PairProduct for OnTiles<T> {
    const STEP: usize = crate::gemm::amx::STEP;

    unsafe fn product(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        _rows: usize,
        acc: &mut [[f32; NR]; MR],
    ) {
        product_on::<T>(kp, a, a_stride, b, acc)
    }

    unsafe fn accumulate_two(
        kp: usize,
        a: *const u32,
        a_stride: usize,
        b: [*const u32; 2],
        _rows: usize,
        acc: &mut TileBlock,
    ) {
        accumulate_two_on::<T>(kp, a, a_stride, b, acc)
    }
}

/// `out[x] = (value(2x), value(2x + 1))` as bf16 pairs for the `len` values, zero past the end.
#[inline(always)]
fn pair_line(len: usize, value: impl Fn(usize) -> f32, out: &mut [u32]) {
    for (x, o) in out.iter_mut().take(len.div_ceil(2)).enumerate() {
        let hi = if 2 * x + 1 < len {
            value(2 * x + 1)
        } else {
            0.0
        };
        *o = pair(value(2 * x), hi);
    }
}

/// `(a, b)` as two bf16 pairs whose sums give them to 16 bits: the rounded values, and the
/// rounding errors rounded.
#[inline(always)]
pub(super) fn split_pair(a: f32, b: f32) -> (u32, u32) {
    let high = pair(a, b);
    let rounded = |bits: u32| f32::from_bits(bits << 16);
    let low = pair(a - rounded(high & 0xffff), b - rounded(high >> 16));
    (high, low)
}

/// One (batch, head)'s keys and transposed values as bf16 pairs, zero-padded.
pub(super) struct HeadPairs {
    /// `[key][d pair]`, `dp` pairs per key, keys padded to whole panels of [`MR`].
    k: Aligned<u32>,
    /// `[dv][key pair]`, `lkp` pairs per row, rows padded to whole panels of [`MR`].
    vt: Aligned<u32>,
    dp: usize,
    lkp: usize,
}

fn pack_head<E: Element>(
    k: &View<E>,
    v: &View<E>,
    dims: Dims,
    step: usize,
    bi: usize,
    hi: usize,
) -> HeadPairs {
    let Dims { d, lk, dv, .. } = dims;
    let dp = d.div_ceil(2).next_multiple_of(step);
    let lk_padded = lk.next_multiple_of(MR);
    let lkp = lk_padded / 2;
    let mut kp = Aligned::new(lk_padded * dp);
    for (j, row) in kp.chunks_exact_mut(dp).take(lk).enumerate() {
        pair_line(d, |x| k.at(bi, hi, j, x), row);
    }
    let mut vt = Aligned::new(dv.next_multiple_of(MR) * lkp);
    for (x, row) in vt.chunks_exact_mut(lkp).take(dv).enumerate() {
        pair_line(lk, |j| v.at(bi, hi, j, x), row);
    }
    HeadPairs { k: kp, vt, dp, lkp }
}

/// A key block's scores, `[key][query]`, on a cache-line boundary for the tile stores.
#[repr(C, align(64))]
struct Scores([[f32; NR]; BLOCK_K]);

impl Default for Scores {
    fn default() -> Self {
        Self([[0.0; NR]; BLOCK_K])
    }
}

/// Up to [`NR`] query rows of one head; `q` is the block's queries as pairs `[dp][NR]`. The
/// scores are scaled in f32, inside the softmax (rounding `q · scale` to bf16 instead would add a
/// rounding that PyTorch's bf16 attention does not have).
#[inline(always)]
pub(super) fn rows<P: PairProduct>(
    q: &[u32],
    kv: &HeadPairs,
    out: &mut [f32],
    rows: usize,
    dims: Dims,
    scale: f32,
) {
    let Dims { lk, dv, .. } = dims;
    let v_panels = dv.div_ceil(MR);
    let mut max = [f32::NEG_INFINITY; NR];
    let mut sum = [0f32; NR];
    let mut scores = Scores::default();
    let probability_len = BLOCK_K.div_ceil(2).next_multiple_of(P::STEP) * NR;
    let mut probabilities = Aligned::new(2 * probability_len);
    let mut acc = vec![TileBlock::default(); v_panels];
    const ZERO: [f32; NR] = [0.0; NR];
    for j0 in (0..lk).step_by(BLOCK_K) {
        let width = BLOCK_K.min(lk - j0);
        for panel in 0..width.div_ceil(MR) {
            let key0 = j0 + panel * MR;
            let rows_here = MR.min(width - panel * MR);
            // Straight into the block's scores: whole panels fit, BLOCK_K being a multiple of MR.
            let target: &mut [[f32; NR]; MR] = (&mut scores.0[panel * MR..(panel + 1) * MR])
                .try_into()
                .expect("BLOCK_K is a multiple of MR");
            // SAFETY: the keys are padded to whole panels of `dp` pairs, q holds `dp * NR` pairs,
            // and the caller checked that `P` runs on this CPU.
            unsafe {
                P::product(
                    kv.dp,
                    kv.k.as_ptr().add(key0 * kv.dp),
                    kv.dp,
                    q.as_ptr(),
                    rows_here,
                    target,
                )
            };
        }
        let block = &mut scores.0[..width];
        let correction = softmax_block(block, &mut max, &mut sum, scale, P::exp_neg);
        rescale(TileBlock::arrays_mut(&mut acc), &correction);
        // Pᵀ as B: probabilities of neighbouring keys paired, zero past the block's keys, as
        // the sum of two bf16 parts (the rounded value and what rounding left), so that they
        // keep 16 bits instead of 8: one bf16 rounding of P alone moved a seeded 4-step
        // generation by more than the parity bound. Costs a third product.
        let depth = width.div_ceil(2).next_multiple_of(P::STEP);
        let (high, low) = probabilities.split_at_mut(probability_len);
        for (p, (high, low)) in high
            .chunks_exact_mut(NR)
            .zip(low.chunks_exact_mut(NR))
            .take(depth)
            .enumerate()
        {
            let even = block.get(2 * p).unwrap_or(&ZERO);
            let odd = block.get(2 * p + 1).unwrap_or(&ZERO);
            // SAFETY: the caller checked that `P` runs on this CPU.
            unsafe { P::split_rows(even, odd, high, low) };
        }
        for (vp, target) in acc.iter_mut().enumerate() {
            let rows_here = MR.min(dv - vp * MR);
            // SAFETY: rows of Vᵀ hold `lkp` pairs, keys padded to whole panels, so the `depth`
            // pairs from key j0 (a multiple of MR) stay inside each row; see above for `P`.
            unsafe {
                P::accumulate_two(
                    depth,
                    kv.vt.as_ptr().add(vp * MR * kv.lkp + j0 / 2),
                    kv.lkp,
                    [high.as_ptr(), low.as_ptr()],
                    rows_here,
                    target,
                )
            };
        }
    }
    write_rows(TileBlock::arrays(&acc), &sum, out, rows, dv);
}

/// Flash attention over all (batch, head, query block)s in parallel, with the product `P`.
///
/// # Safety
/// `P` must run on this CPU (for the hardware tiles: the AMX level was detected; for the dot
/// products: AVX512-BF16).
pub(super) unsafe fn run<P: PairProduct, E: Element>(
    scale: f32,
    q: View<E>,
    k: View<E>,
    v: View<E>,
    dims: Dims,
) -> Vec<f32> {
    let Dims {
        b, h, lq, d, dv, ..
    } = dims;
    let heads: Vec<HeadPairs> = (0..b * h)
        .into_par_iter()
        .map(|bh| pack_head(&k, &v, dims, P::STEP, bh / h, bh % h))
        .collect();
    let dp = d.div_ceil(2).next_multiple_of(P::STEP);
    let mut out = vec![0f32; b * h * lq * dv];
    for_each_query_block(&mut out, dims, NR, |bh, i0, count, rows_out| {
        let (bi, hi) = (bh / h, bh % h);
        let mut q_pairs = Aligned::new(dp * NR);
        let mut line = vec![0u32; dp];
        for i in 0..count {
            pair_line(d, |x| q.at(bi, hi, i0 + i, x), &mut line);
            for (x, pair) in line.iter().enumerate() {
                q_pairs[x * NR + i] = *pair;
            }
        }
        // SAFETY: the caller checked that `P` runs on this CPU.
        unsafe { P::rows(&q_pairs, &heads[bh], rows_out, count, dims, scale) };
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::amx::Model;

    /// The tile attention on model tiles against an f64 softmax over the same bf16-rounded
    /// inputs, over head dims and lengths that leave partial tiles, pairs and key blocks.
    #[test]
    fn tile_attention_on_model_tiles_matches_a_direct_softmax() {
        matches_a_direct_softmax::<OnTiles<Model>>();
    }

    /// The same with AVX512-BF16 dot products, where this CPU has them.
    #[test]
    fn dot_product_attention_matches_a_direct_softmax() {
        if crate::cpu::detected() >= crate::cpu::Level::Avx512Bf16 {
            matches_a_direct_softmax::<super::super::x86_64::Dots>();
        } else {
            eprintln!("skipped: this CPU has no AVX512-BF16");
        }
    }

    /// The same on the CPU's AMX tiles, where this CPU has them.
    #[test]
    fn amx_tile_attention_matches_a_direct_softmax() {
        if crate::cpu::detected() == crate::cpu::Level::Amx {
            matches_a_direct_softmax::<super::super::x86_64::AmxTiles>();
        } else {
            eprintln!("skipped: this CPU has no usable AMX-BF16 tiles");
        }
    }

    fn matches_a_direct_softmax<P: PairProduct>() {
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        for (lq, lk, d) in [
            (1, 1, 1),
            (5, 7, 3),
            (33, 100, 40),
            (40, 97, 80),
            (3, 200, 64),
            (64, 300, 160),
            (2, 77, 40),
        ] {
            let (b, h) = (1, 2);
            let value = |i: usize, salt: usize| (((i * 31 + salt * 7) % 29) as f32 - 14.0) / 9.0;
            let q: Vec<f32> = (0..b * h * lq * d).map(|i| round(value(i, 1))).collect();
            let k: Vec<f32> = (0..b * h * lk * d).map(|i| round(value(i, 2))).collect();
            let v: Vec<f32> = (0..b * h * lk * d).map(|i| round(value(i, 3))).collect();
            fn view(data: &[f32], h: usize, l: usize, d: usize) -> View<'_, f32> {
                View {
                    data,
                    offset: 0,
                    stride: [h * l * d, l * d, d, 1],
                }
            }
            let dims = Dims {
                b,
                h,
                lq,
                d,
                lk,
                dv: d,
            };
            let scale = 1.0 / (d as f32).sqrt();
            // SAFETY: the model tiles run anywhere; the callers check the CPU for the others.
            let got = unsafe {
                run::<P, f32>(
                    scale,
                    view(&q, h, lq, d),
                    view(&k, h, lk, d),
                    view(&v, h, lk, d),
                    dims,
                )
            };
            for hi in 0..h {
                for i in 0..lq {
                    let qrow = &q[(hi * lq + i) * d..][..d];
                    let scores: Vec<f64> = (0..lk)
                        .map(|j| {
                            let krow = &k[(hi * lk + j) * d..][..d];
                            qrow.iter()
                                .zip(krow)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for x in 0..d {
                        let want: f64 = (0..lk)
                            .map(|j| weights[j] * v[(hi * lk + j) * d + x] as f64)
                            .sum::<f64>()
                            / total;
                        let have = got[((hi * lq) + i) * d + x] as f64;
                        // The probabilities keep 16 bits (two bf16 parts); one bf16 part alone
                        // (8 bits, about 0.4% each) misses this bound.
                        assert!(
                            (have - want).abs() <= 2e-4 * want.abs().max(1.0),
                            "lq {lq} lk {lk} d {d} head {hi} row {i} col {x}: {have} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
