//! Scaled dot-product attention, `softmax(q kᵀ · scale) v`, three ways:
//! - `flash`: tiled over query and key blocks with an online softmax (FlashAttention, Dao et al.
//!   2022), so the `Lq x Lk` score matrix never exists; parallel over batch x heads x query
//!   blocks, vectorised for the CPU's SIMD level, f32 accumulation for every input dtype;
//! - `sliced`: diffusers' sliced attention, the full softmax for a few (batch x head) slices at a
//!   time (memory grows with the slice, not with the batch);
//! - `naive`: candle's matmul and softmax, in query chunks of bounded size (the reference, and
//!   the path of devices without a fused kernel).
//!
//! Flash attention runs where [`KernelOptions`] routes it: our CPU kernels here, our CUDA kernel
//! (`cuda/flash_attention.cu`), or candle-nn's fused SDPA on a Metal device.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{self, Level};
pub use crate::dispatch::AttentionMode;
use crate::dispatch::{metal_sdpa_head_dim, KernelOptions, Route};
use crate::gemm::Element;

/// `softmax(q kᵀ · scale) v` for `q [B, H, Lq, D]`, `k [B, H, Lk, D]`, `v [B, H, Lk, Dv]`, in the
/// dtype of `q`, by the algorithm and kernels `options` choose for these inputs. Scores and softmax
/// are always computed in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    options: &KernelOptions,
) -> Result<Tensor> {
    attention_for_weights(q, k, v, scale, options, q.dtype())
}

/// [`attention`] in a layer whose projections' weights compute as `weights`: with bf16 weights,
/// on a CPU level whose bf16 products run faster than its f32 ones (AMX tiles, or AVX512-BF16 dot
/// products), `q kᵀ` and the product with `v` take bf16 inputs, as PyTorch's bf16 attention does
/// (the scores, the softmax and the output stay f32).
pub fn attention_for_weights(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    options: &KernelOptions,
    weights: DType,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (bk, hk, lk, dk) = k.dims4()?;
    let (bv, hv, lv, _) = v.dims4()?;
    if (bk, hk, dk) != (b, h, d) || (bv, hv, lv) != (b, h, lk) {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit together",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    match options.attention_for(q) {
        AttentionMode::Flash => flash(q, k, v, scale, options, weights),
        AttentionMode::Sliced(slice) => sliced(q, k, v, scale, slice.unwrap_or(1)),
        _ => naive(q, k, v, scale),
    }
}

/// Flash attention by the kernels `options` route `q` to.
fn flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    options: &KernelOptions,
    weights: DType,
) -> Result<Tensor> {
    match options.route(q) {
        Route::Cpu { level, .. } => {
            let bf16_products = weights == DType::BF16 && crate::gemm::bf16_dots_pay(level);
            flash_on(level, bf16_products, q, k, v, scale)
        }
        #[cfg(feature = "cuda")]
        Route::Cuda => crate::cuda::flash_attention(q, k, v, scale),
        Route::Metal => metal_sdpa(q, k, v, scale),
        _ => naive(q, k, v, scale),
    }
}

/// candle-nn's fused SDPA (its Metal kernels) with the head dim zero-padded to one it has
/// ([`metal_sdpa_head_dim`] says which, and why padding beats the naive path); the naive path
/// when no supported head dim is large enough.
fn metal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (lq, d, dv) = (q.dim(2)?, q.dim(3)?, v.dim(3)?);
    let Some(padded) = metal_sdpa_head_dim(d.max(dv), lq, q.dtype()) else {
        return naive(q, k, v, scale);
    };
    // Contiguous inputs: the kernels take strides, but nothing here can test strided heads on
    // a Mac, and the copy is small next to the attention.
    let pad = |t: &Tensor, from: usize| {
        if from == padded {
            t.contiguous()
        } else {
            t.pad_with_zeros(3, 0, padded - from)
        }
    };
    let (q, k, v) = (pad(q, d)?, pad(k, d)?, pad(v, dv)?);
    // softcapping 1.0 is none.
    let out = candle_nn::ops::sdpa(&q, &k, &v, None, false, scale as f32, 1.0)?;
    if dv == padded {
        Ok(out)
    } else {
        out.narrow(3, 0, dv)
    }
}

/// Score elements the naive path computes at once (256 MiB in f32).
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// candle's matmul + softmax, over query chunks of at most [`MAX_SCORE_ELEMENTS`] scores.
pub fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = q.dtype();
    let compute = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let k_t = k.to_dtype(compute)?.transpose(2, 3)?.contiguous()?;
    let v = v.to_dtype(compute)?.contiguous()?;
    let rows_per_chunk = (MAX_SCORE_ELEMENTS / (b * h * nk).max(1)).clamp(1, nq.max(1));
    let mut outputs = Vec::with_capacity(nq.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < nq {
        let rows = rows_per_chunk.min(nq - start);
        let q = (q.narrow(2, start, rows)?.to_dtype(compute)? * scale)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k_t)?)?;
        outputs.push(probs.matmul(&v)?.to_dtype(dtype)?);
        start += rows;
    }
    if outputs.len() == 1 {
        Ok(outputs.remove(0))
    } else {
        Tensor::cat(&outputs, 2)
    }
}

/// diffusers' sliced attention: `slice` (batch x head) pairs at a time, each with its full
/// softmax.
pub fn sliced(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, slice: usize) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let (lk, dv) = (k.dim(2)?, v.dim(3)?);
    let q = q.reshape((b * h, 1, lq, d))?;
    let k = k.reshape((b * h, 1, lk, d))?;
    let v = v.reshape((b * h, 1, lk, dv))?;
    let slice = slice.max(1);
    let mut outputs = Vec::with_capacity((b * h).div_ceil(slice));
    for start in (0..b * h).step_by(slice) {
        let len = slice.min(b * h - start);
        outputs.push(naive(
            &q.narrow(0, start, len)?,
            &k.narrow(0, start, len)?,
            &v.narrow(0, start, len)?,
            scale,
        )?);
    }
    Tensor::cat(&outputs, 0)?.reshape((b, h, lq, dv))
}

/// Keys per inner block (a multiple of every micro-tile height: 4, 6 and 8).
const BLOCK_K: usize = 96;

struct FlashAttention {
    scale: f64,
    level: Level,
    /// Whether the products may take bf16 inputs where the level has bf16 products (AMX tiles or
    /// AVX512-BF16 dot products).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bf16_products: bool,
}

/// Flash attention on the CPU with the kernels of `level` (at most the CPU's own: tests run every
/// level this machine has against the same reference), products in f32.
pub fn flash_at(level: Level, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    flash_on(level, false, q, k, v, scale)
}

/// [`flash_at`], with the products on bf16 inputs where `bf16_products` and the level has bf16
/// products (AMX tiles or AVX512-BF16 dot products, verified on this CPU).
pub fn flash_on(
    level: Level,
    bf16_products: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let level = level.min(cpu::detected());
    q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttention {
            scale,
            level,
            bf16_products,
        },
    )
}

/// A 4-D strided view: element `(b, h, i, d)`.
struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 4],
}

impl<T: Element> View<'_, T> {
    #[inline(always)]
    fn at(&self, b: usize, h: usize, i: usize, d: usize) -> f32 {
        let s = &self.stride;
        self.data[self.offset + b * s[0] + h * s[1] + i * s[2] + d * s[3]].to_f32()
    }
}

fn view<'a, T>(data: &'a [T], layout: &Layout) -> Result<View<'a, T>> {
    let stride = layout.stride();
    if stride.len() != 4 {
        candle_core::bail!(
            "flash attention: expected 4-D inputs, got {:?}",
            layout.shape()
        );
    }
    Ok(View {
        data,
        offset: layout.start_offset(),
        stride: [stride[0], stride[1], stride[2], stride[3]],
    })
}

/// Sizes of one flash attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    lq: usize,
    d: usize,
    lk: usize,
    dv: usize,
}

/// One (batch, head)'s keys and values in f32, laid out as the micro-tiles read their A operand:
/// keys in panels of `MR` keys (`[panel][d][MR]`), and values transposed, in panels of `MR`
/// output columns (`[panel][key][MR]`), zero-padded to whole panels. O(L·D) memory, never O(L²).
struct HeadKv {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Keys rounded up to a whole number of panels.
    lk_padded: usize,
}

fn pack_head<T: Element, const MR: usize>(
    k: &View<T>,
    v: &View<T>,
    dims: Dims,
    bi: usize,
    hi: usize,
) -> HeadKv {
    let Dims { d, lk, dv, .. } = dims;
    let lk_padded = lk.div_ceil(MR) * MR;
    let mut kp = vec![0f32; lk_padded * d];
    for j in 0..lk {
        let (panel, lane) = (j / MR, j % MR);
        for x in 0..d {
            kp[(panel * d + x) * MR + lane] = k.at(bi, hi, j, x);
        }
    }
    let v_panels = dv.div_ceil(MR);
    let mut vp = vec![0f32; v_panels * lk_padded * MR];
    for j in 0..lk {
        for x in 0..dv {
            let (panel, lane) = (x / MR, x % MR);
            vp[(panel * lk_padded + j) * MR + lane] = v.at(bi, hi, j, x);
        }
    }
    HeadKv {
        k: kp,
        v: vp,
        lk_padded,
    }
}

/// The larger of two scores without `f32::max`'s NaN handling (which stays scalar).
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// One key block of the online softmax over scores `block` (`[key][query]`), each to be
/// multiplied by `scale` (positive): turns each score into `exp((score - max) * scale)` with the
/// running maximum of its query (with `exp_neg`, [`crate::math::exp_neg`] or its fused form),
/// updates the running `max` and `sum`, and returns the factor by which each query's output so
/// far must be scaled.
#[inline(always)]
fn softmax_block<const NR: usize>(
    block: &mut [[f32; NR]],
    max: &mut [f32; NR],
    sum: &mut [f32; NR],
    scale: f32,
    exp_neg: impl Fn(f32) -> f32 + Copy,
) -> [f32; NR] {
    let mut new_max = *max;
    for row in block.iter() {
        for (m, s) in new_max.iter_mut().zip(row) {
            *m = larger(*m, *s);
        }
    }
    let mut correction = [0f32; NR];
    for ((c, old), new) in correction.iter_mut().zip(max.iter()).zip(&new_max) {
        *c = exp_neg((old - new) * scale);
    }
    let mut block_sum = [0f32; NR];
    for row in block.iter_mut() {
        for ((s, m), total) in row.iter_mut().zip(&new_max).zip(block_sum.iter_mut()) {
            *s = exp_neg((*s - m) * scale);
            *total += *s;
        }
    }
    for (((total, c), b), (m, new)) in sum
        .iter_mut()
        .zip(&correction)
        .zip(&block_sum)
        .zip(max.iter_mut().zip(&new_max))
    {
        *total = *total * c + b;
        *m = *new;
    }
    correction
}

/// Scales each query's accumulated output by its softmax `correction` (skipped when all are 1).
#[inline(always)]
fn rescale<const MR: usize, const NR: usize>(acc: &mut [[[f32; NR]; MR]], correction: &[f32; NR]) {
    if correction.iter().any(|&c| c != 1.0) {
        for row in acc.iter_mut().flatten() {
            for (x, c) in row.iter_mut().zip(correction) {
                *x *= c;
            }
        }
    }
}

/// Writes the first `rows` queries of the transposed accumulators (`acc[dv panel][dv][query]`)
/// to `out` (`[query][dv]`), divided by their softmax sums.
#[inline(always)]
fn write_rows<const MR: usize, const NR: usize>(
    acc: &[[[f32; NR]; MR]],
    sum: &[f32; NR],
    out: &mut [f32],
    rows: usize,
    dv: usize,
) {
    for (i, row) in out.chunks_exact_mut(dv).take(rows).enumerate() {
        let inv = 1.0 / sum[i];
        for (x, value) in row.iter_mut().enumerate() {
            *value = acc[x / MR][x % MR][i] * inv;
        }
    }
}

/// Splits `out` (`[batch x head][Lq][Dv]`) into blocks of `block` query rows and runs
/// `task(batch x head, first row, rows, block's output)` for every block in parallel.
fn for_each_query_block(
    out: &mut [f32],
    dims: Dims,
    block: usize,
    task: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    let Dims { lq, dv, .. } = dims;
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (bh, head_out) in out.chunks_mut(lq * dv).enumerate() {
        for (index, rows_out) in head_out.chunks_mut(block * dv).enumerate() {
            tasks.push((bh, index * block, rows_out));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(bh, i0, rows_out)| task(bh, i0, block.min(lq - i0), rows_out));
}

/// Up to `NR` query rows of one head, computed transposed so that every step is a register
/// tile or a vertical vector operation: for each block of keys, `Sᵀ = K Qᵀ` (`[key][query]`, keys
/// as the tile's rows), the online softmax down each column (one query per SIMD lane, no
/// horizontal reductions and no transposes), then `Oᵀ += Vᵀ Pᵀ` with `Pᵀ` read in place as the
/// tile's B operand. `q` is the query block packed `[d][NR]`, pre-scaled.
#[inline(always)]
fn flash_rows<const MR: usize, const NR: usize>(
    q: &[f32],
    kv: &HeadKv,
    out: &mut [f32],
    rows: usize,
    dims: Dims,
    tile: impl Fn(usize, &[f32], &[f32]) -> [[f32; NR]; MR],
) {
    let Dims { d, lk, dv, .. } = dims;
    let v_panels = dv.div_ceil(MR);
    let mut max = [f32::NEG_INFINITY; NR];
    let mut sum = [0f32; NR];
    let mut scores = [[0f32; NR]; BLOCK_K];
    let mut acc = vec![[[0f32; NR]; MR]; v_panels];
    for j0 in (0..lk).step_by(BLOCK_K) {
        let width = BLOCK_K.min(lk - j0);
        for kp in 0..width.div_ceil(MR) {
            let panel = j0 / MR + kp;
            let t = tile(d, &kv.k[panel * d * MR..(panel + 1) * d * MR], q);
            let rows_here = MR.min(BLOCK_K - kp * MR);
            scores[kp * MR..kp * MR + rows_here].copy_from_slice(&t[..rows_here]);
        }
        let block = &mut scores[..width];
        let correction = softmax_block(block, &mut max, &mut sum, 1.0, crate::math::exp_neg);
        rescale(&mut acc, &correction);
        let p = block.as_flattened();
        for (vp, target) in acc.iter_mut().enumerate() {
            let start = (vp * kv.lk_padded + j0) * MR;
            let t = tile(width, &kv.v[start..start + width * MR], p);
            for (dst, src) in target.iter_mut().zip(&t) {
                for (x, y) in dst.iter_mut().zip(src) {
                    *x += y;
                }
            }
        }
    }
    write_rows(&acc, &sum, out, rows, dv);
}

impl FlashAttention {
    fn run<T: Element>(&self, q: View<T>, k: View<T>, v: View<T>, dims: Dims) -> Vec<f32> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Amx if self.bf16_products && crate::gemm::amx::amx_kernel_verified() => {
                // SAFETY: the AMX level was detected on this CPU and its tiles verified.
                unsafe { pairs::run::<x86_64::AmxTiles, T>(self.scale as f32, q, k, v, dims) }
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Bf16 | Level::Amx
                if self.bf16_products && crate::gemm::x86_64::bf16_kernel_verified() =>
            {
                // SAFETY: the level (AVX512-BF16 or above) was detected on this CPU and its dot
                // products verified.
                unsafe { pairs::run::<x86_64::Dots, T>(self.scale as f32, q, k, v, dims) }
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Bf16 | Level::Amx => {
                self.run_tiled::<T, 8, 32>(q, k, v, dims, |r| unsafe {
                    // SAFETY: the level was detected on this CPU.
                    x86_64::rows_avx512(r)
                })
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => self.run_tiled::<T, 6, 16>(q, k, v, dims, |r| unsafe {
                // SAFETY: the level was detected on this CPU.
                x86_64::rows_avx2(r)
            }),
            #[cfg(target_arch = "aarch64")]
            Level::Neon | Level::NeonBf16 => self.run_tiled::<T, 6, 16>(q, k, v, dims, |r| {
                flash_rows::<6, 16>(r.q, r.kv, r.out, r.rows, r.dims, crate::gemm::tile_fma)
            }),
            _ => self.run_tiled::<T, 4, 8>(q, k, v, dims, |r| {
                flash_rows::<4, 8>(r.q, r.kv, r.out, r.rows, r.dims, crate::gemm::tile_plain)
            }),
        }
    }

    fn run_tiled<T: Element, const MR: usize, const NR: usize>(
        &self,
        q: View<T>,
        k: View<T>,
        v: View<T>,
        dims: Dims,
        rows_kernel: impl Fn(Rows) + Sync,
    ) -> Vec<f32> {
        let Dims {
            b, h, lq, d, dv, ..
        } = dims;
        let heads: Vec<HeadKv> = (0..b * h)
            .into_par_iter()
            .map(|bh| pack_head::<T, MR>(&k, &v, dims, bh / h, bh % h))
            .collect();
        let scale = self.scale as f32;
        let mut out = vec![0f32; b * h * lq * dv];
        for_each_query_block(&mut out, dims, NR, |bh, i0, rows, rows_out| {
            let (bi, hi) = (bh / h, bh % h);
            // The block's queries as the tile's B operand, `[d][NR]`, pre-scaled.
            let mut q_packed = vec![0f32; d * NR];
            for i in 0..rows {
                for x in 0..d {
                    q_packed[x * NR + i] = q.at(bi, hi, i0 + i, x) * scale;
                }
            }
            rows_kernel(Rows {
                q: &q_packed,
                kv: &heads[bh],
                out: rows_out,
                rows,
                dims,
            });
        });
        out
    }
}

/// The arguments of one task, passed through the target-feature wrappers.
struct Rows<'a> {
    q: &'a [f32],
    kv: &'a HeadKv,
    out: &'a mut [f32],
    rows: usize,
    dims: Dims,
}

#[cfg(target_arch = "x86_64")]
mod pairs;
#[cfg(target_arch = "x86_64")]
mod x86_64;

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "sdrs-flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, lq, d) = l1.shape().dims4()?;
        let lk = l2.shape().dims4()?.2;
        let dv = l3.shape().dims4()?.3;
        let dims = Dims {
            b,
            h,
            lq,
            d,
            lk,
            dv,
        };
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.run(view(q, l1)?, view(k, l2)?, view(v, l3)?, dims)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.run(view(q, l1)?, view(k, l2)?, view(v, l3)?, dims)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.run(view(q, l1)?, view(k, l2)?, view(v, l3)?, dims)
            }
            _ => candle_core::bail!(
                "flash attention: q, k and v must share an f32/bf16/f16 dtype, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        let storage = match s1.dtype() {
            DType::BF16 => CpuStorage::BF16(out.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(out.into_iter().map(f16::from_f32).collect()),
            _ => CpuStorage::F32(out),
        };
        Ok((storage, Shape::from((b, h, lq, dv))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn larger_ignores_nan_rules() {
        assert_eq!(larger(1.0, 2.0), 2.0);
        assert_eq!(larger(-3.0, -4.0), -3.0);
    }
}
