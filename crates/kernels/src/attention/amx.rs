//! Flash attention's two products on AMX tiles, for layers whose weights are bf16 (as PyTorch's
//! bf16 attention rounds queries, keys, values and probabilities to bf16; scores, the softmax and
//! the output accumulate in f32).
//!
//! The scheme is [`flash_rows`](super::flash_rows)' (scores transposed, `[key][query]`, one query
//! per lane), on 32 x 32 tiles: `Sᵀ = K Qᵀ` with K as the A operand (`[key][d pairs]`) and the
//! block's queries as B (`[d pair][query]`), then `Oᵀ += Vᵀ Pᵀ` with Vᵀ as A (`[dv][key pairs]`)
//! and the probabilities paired along keys as B. Depths are padded with zeros to whole tile steps.

use rayon::prelude::*;

use super::{for_each_query_block, rescale, softmax_block, write_rows, Dims, View, BLOCK_K};
use crate::gemm::amx::{product_on, Tiles, MR, NR, STEP};
use crate::gemm::{pair, Element};

/// One (batch, head)'s keys and transposed values as bf16 pairs, zero-padded.
struct HeadPairs {
    /// `[key][d pair]`, `dp` pairs per key, keys padded to whole panels of [`MR`].
    k: Vec<u32>,
    /// `[dv][key pair]`, `lkp` pairs per row, rows padded to whole panels of [`MR`].
    vt: Vec<u32>,
    dp: usize,
    lkp: usize,
}

fn pack_head<E: Element>(k: &View<E>, v: &View<E>, dims: Dims, bi: usize, hi: usize) -> HeadPairs {
    let Dims { d, lk, dv, .. } = dims;
    let dp = d.div_ceil(2).next_multiple_of(STEP);
    let lk_padded = lk.next_multiple_of(MR);
    let lkp = lk_padded / 2;
    let mut kp = vec![0u32; lk_padded * dp];
    for (j, row) in kp.chunks_exact_mut(dp).take(lk).enumerate() {
        for (x, o) in row.iter_mut().take(d.div_ceil(2)).enumerate() {
            let hi_value = if 2 * x + 1 < d {
                k.at(bi, hi, j, 2 * x + 1)
            } else {
                0.0
            };
            *o = pair(k.at(bi, hi, j, 2 * x), hi_value);
        }
    }
    let mut vt = vec![0u32; dv.next_multiple_of(MR) * lkp];
    for (x, row) in vt.chunks_exact_mut(lkp).take(dv).enumerate() {
        for (j, o) in row.iter_mut().take(lk.div_ceil(2)).enumerate() {
            let hi_value = if 2 * j + 1 < lk {
                v.at(bi, hi, 2 * j + 1, x)
            } else {
                0.0
            };
            *o = pair(v.at(bi, hi, 2 * j, x), hi_value);
        }
    }
    HeadPairs { k: kp, vt, dp, lkp }
}

/// Up to [`NR`] query rows of one head; `q` is the block's queries as pairs `[dp][NR]`, scaled.
fn rows<T: Tiles + Default>(q: &[u32], kv: &HeadPairs, out: &mut [f32], rows: usize, dims: Dims) {
    let Dims { lk, dv, .. } = dims;
    let v_panels = dv.div_ceil(MR);
    let mut max = [f32::NEG_INFINITY; NR];
    let mut sum = [0f32; NR];
    let mut scores = [[0f32; NR]; BLOCK_K];
    let mut probabilities = vec![0u32; BLOCK_K.div_ceil(2).next_multiple_of(STEP) * NR];
    let mut acc = vec![[[0f32; NR]; MR]; v_panels];
    let mut tile = [[0f32; NR]; MR];
    for j0 in (0..lk).step_by(BLOCK_K) {
        let width = BLOCK_K.min(lk - j0);
        for panel in 0..width.div_ceil(MR) {
            let key0 = j0 + panel * MR;
            // SAFETY: the keys are padded to whole panels of `dp` pairs, q holds `dp * NR` pairs,
            // and the caller checked that `T` runs on this CPU.
            unsafe {
                product_on::<T>(
                    kv.dp,
                    kv.k.as_ptr().add(key0 * kv.dp),
                    kv.dp,
                    q.as_ptr(),
                    &mut tile,
                )
            };
            let rows_here = MR.min(width - panel * MR);
            scores[panel * MR..panel * MR + rows_here].copy_from_slice(&tile[..rows_here]);
        }
        let block = &mut scores[..width];
        let correction = softmax_block(block, &mut max, &mut sum);
        rescale(&mut acc, &correction);
        // Pᵀ as B: probabilities of neighbouring keys paired, zero past the block's keys.
        let depth = width.div_ceil(2).next_multiple_of(STEP);
        for (p, line) in probabilities.chunks_exact_mut(NR).take(depth).enumerate() {
            let (lo, hi) = (block.get(2 * p), block.get(2 * p + 1));
            for (i, o) in line.iter_mut().enumerate() {
                *o = pair(lo.map_or(0.0, |r| r[i]), hi.map_or(0.0, |r| r[i]));
            }
        }
        for (vp, target) in acc.iter_mut().enumerate() {
            // SAFETY: rows of Vᵀ hold `lkp` pairs, keys padded to whole panels, so the `depth`
            // pairs from key j0 (a multiple of MR) stay inside each row; see above for `T`.
            unsafe {
                product_on::<T>(
                    depth,
                    kv.vt.as_ptr().add(vp * MR * kv.lkp + j0 / 2),
                    kv.lkp,
                    probabilities.as_ptr(),
                    &mut tile,
                )
            };
            for (dst, src) in target.iter_mut().zip(&tile) {
                for (x, y) in dst.iter_mut().zip(src) {
                    *x += y;
                }
            }
        }
    }
    write_rows(&acc, &sum, out, rows, dv);
}

/// Flash attention over all (batch, head, query block)s in parallel, on `T` tiles.
///
/// # Safety
/// `T` must run on this CPU (for the hardware tiles: the AMX level was detected).
pub(super) unsafe fn run<T: Tiles + Default, E: Element>(
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
        .map(|bh| pack_head(&k, &v, dims, bh / h, bh % h))
        .collect();
    let dp = d.div_ceil(2).next_multiple_of(STEP);
    let mut out = vec![0f32; b * h * lq * dv];
    for_each_query_block(&mut out, dims, NR, |bh, i0, count, rows_out| {
        let (bi, hi) = (bh / h, bh % h);
        let mut q_pairs = vec![0u32; dp * NR];
        for i in 0..count {
            for x in 0..d.div_ceil(2) {
                let hi_value = if 2 * x + 1 < d {
                    q.at(bi, hi, i0 + i, 2 * x + 1) * scale
                } else {
                    0.0
                };
                q_pairs[x * NR + i] = pair(q.at(bi, hi, i0 + i, 2 * x) * scale, hi_value);
            }
        }
        rows::<T>(&q_pairs, &heads[bh], rows_out, count, dims);
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
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        for (lq, lk, d) in [
            (1, 1, 1),
            (5, 7, 3),
            (33, 100, 40),
            (40, 97, 80),
            (3, 200, 64),
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
            // A power-of-two scale keeps the scaled queries bf16-exact.
            let scale = 0.25f32;
            // SAFETY: the model tiles run anywhere.
            let got = unsafe {
                run::<Model, f32>(
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
                        // The probabilities are rounded to bf16 (8 bits): about 0.4% each.
                        assert!(
                            (have - want).abs() <= 1e-2 * want.abs().max(1.0),
                            "lq {lq} lk {lk} d {d} head {hi} row {i} col {x}: {have} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
