//! Scaled dot-product attention, `softmax(q kᵀ · scale) v`, three ways:
//! - `flash`: tiled over query and key blocks with an online softmax (FlashAttention, Dao et al.
//!   2022), so the `Lq x Lk` score matrix never exists; parallel over batch x heads x query
//!   blocks, vectorised for the CPU's SIMD level, f32 accumulation for every input dtype;
//! - `sliced`: diffusers' sliced attention, the full softmax for a few (batch x head) slices at a
//!   time (memory grows with the slice, not with the batch);
//! - `naive`: candle's matmul and softmax, in query chunks of bounded size (the reference, and
//!   the path of devices without our kernels).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{self, Level};
use crate::gemm::Element;

/// How attention is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// The fastest that fits: flash on the CPU, naive elsewhere.
    #[default]
    Auto,
    Naive,
    /// `Some(n)`: `n` (batch x head) slices at a time; `None`: one.
    Sliced(Option<usize>),
    Flash,
}

impl AttentionMode {
    pub const ACCEPTED: &'static str = "auto, naive, sliced, sliced:N (N >= 1), flash";
}

impl FromStr for AttentionMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "unknown attention {s:?}: expected one of {}",
                Self::ACCEPTED
            )
        };
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "naive" => Ok(Self::Naive),
            "flash" => Ok(Self::Flash),
            "sliced" => Ok(Self::Sliced(None)),
            other => match other.strip_prefix("sliced:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Ok(Self::Sliced(Some(n))),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Naive => write!(f, "naive"),
            Self::Sliced(None) => write!(f, "sliced"),
            Self::Sliced(Some(n)) => write!(f, "sliced:{n}"),
            Self::Flash => write!(f, "flash"),
        }
    }
}

static DEFAULT_MODE: Mutex<AttentionMode> = Mutex::new(AttentionMode::Auto);

/// Sets the mode [`default_attention`] returns (the CLI's `--attention`), for the whole process.
pub fn set_default_attention(mode: AttentionMode) {
    *DEFAULT_MODE.lock().unwrap_or_else(|e| e.into_inner()) = mode;
}

/// The process-wide attention mode (`auto` unless set).
pub fn default_attention() -> AttentionMode {
    *DEFAULT_MODE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The mode `auto` resolves to for these inputs.
pub fn resolve(mode: AttentionMode, q: &Tensor) -> AttentionMode {
    let ours = q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16);
    match mode {
        AttentionMode::Auto if ours => AttentionMode::Flash,
        AttentionMode::Auto => AttentionMode::Naive,
        AttentionMode::Flash if !ours => AttentionMode::Naive,
        other => other,
    }
}

/// `softmax(q kᵀ · scale) v` for `q [B, H, Lq, D]`, `k [B, H, Lk, D]`, `v [B, H, Lk, Dv]`, in the
/// dtype of `q`. Scores and softmax are always computed in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mode: AttentionMode,
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
    match resolve(mode, q) {
        AttentionMode::Flash => flash_at(cpu::level(), q, k, v, scale),
        AttentionMode::Sliced(slice) => sliced(q, k, v, scale, slice.unwrap_or(1)),
        _ => naive(q, k, v, scale),
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

/// Keys per inner block (a multiple of every micro-tile width).
const BLOCK_K: usize = 64;
/// Query panels (of the micro-tile height) per task.
const PANELS_Q: usize = 4;

struct FlashAttention {
    scale: f64,
    level: Level,
}

/// Flash attention on the CPU with the kernels of `level` (at most the CPU's own: tests run every
/// level this machine has against the same reference).
pub fn flash_at(level: Level, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let level = level.min(cpu::level());
    q.apply_op3_no_bwd(k, v, &FlashAttention { scale, level })
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

/// One (batch, head)'s keys and values in f32, laid out as the micro-tiles read them: keys in
/// panels of `NR` keys (`[panel][d][NR]`), values in panels of `NR` output columns
/// (`[panel][key][NR]`), both zero-padded to whole blocks. O(L·D) memory, never O(L²).
struct HeadKv {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Keys rounded up to a whole number of blocks.
    lk_padded: usize,
}

fn pack_head<T: Element, const NR: usize>(
    k: &View<T>,
    v: &View<T>,
    dims: Dims,
    bi: usize,
    hi: usize,
) -> HeadKv {
    let Dims { d, lk, dv, .. } = dims;
    let lk_padded = lk.div_ceil(BLOCK_K) * BLOCK_K;
    let mut kp = vec![0f32; lk_padded * d];
    for j in 0..lk {
        let (panel, lane) = (j / NR, j % NR);
        for x in 0..d {
            kp[(panel * d + x) * NR + lane] = k.at(bi, hi, j, x);
        }
    }
    let v_panels = dv.div_ceil(NR);
    let mut vp = vec![0f32; v_panels * lk_padded * NR];
    for j in 0..lk {
        for x in 0..dv {
            let (panel, lane) = (x / NR, x % NR);
            vp[(panel * lk_padded + j) * NR + lane] = v.at(bi, hi, j, x);
        }
    }
    HeadKv {
        k: kp,
        v: vp,
        lk_padded,
    }
}

/// `e^x` for `x <= 0` to about 2e-7 relative: `2^n · p(r)` with `x = n ln2 + r`, `|r| <= ln2/2`
/// and a degree-6 Taylor polynomial. Written so the compiler vectorises it (no library call).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Rows `i0 .. i0 + rows` (at most `PANELS_Q * MR`) of one head: for each key block, the scores
/// `S = Q Kᵀ` and then `O += P V` as register tiles, with the online softmax in between.
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
    let q_panels = rows.div_ceil(MR);
    let v_panels = dv.div_ceil(NR);
    let mut max = [f32::NEG_INFINITY; 64];
    let mut sum = [0f32; 64];
    let mut scores = vec![[0f32; BLOCK_K]; q_panels * MR];
    // P of each query panel, packed `[key][MR]` as the tile reads A.
    let mut p_packed = vec![0f32; q_panels * BLOCK_K * MR];
    let mut acc = vec![[[0f32; NR]; MR]; q_panels * v_panels];
    for j0 in (0..lk).step_by(BLOCK_K) {
        let width = BLOCK_K.min(lk - j0);
        for qp in 0..q_panels {
            let a = &q[qp * d * MR..(qp + 1) * d * MR];
            for kp in 0..BLOCK_K / NR {
                let panel = j0 / NR + kp;
                let b = &kv.k[panel * d * NR..(panel + 1) * d * NR];
                let t = tile(d, a, b);
                for (r, row) in t.iter().enumerate() {
                    scores[qp * MR + r][kp * NR..(kp + 1) * NR].copy_from_slice(row);
                }
            }
        }
        for (i, s) in scores.iter_mut().enumerate() {
            for value in s[width..].iter_mut() {
                *value = f32::NEG_INFINITY;
            }
            let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[i].max(block_max);
            let correction = exp_neg(max[i] - new_max);
            let mut block_sum = 0.0;
            for value in s.iter_mut() {
                *value = exp_neg(*value - new_max);
                block_sum += *value;
            }
            sum[i] = sum[i] * correction + block_sum;
            max[i] = new_max;
            let (qp, r) = (i / MR, i % MR);
            for (j, value) in s.iter().enumerate() {
                p_packed[(qp * BLOCK_K + j) * MR + r] = *value;
            }
            if correction != 1.0 {
                for vp in 0..v_panels {
                    for value in acc[qp * v_panels + vp][r].iter_mut() {
                        *value *= correction;
                    }
                }
            }
        }
        for qp in 0..q_panels {
            let a = &p_packed[qp * BLOCK_K * MR..(qp + 1) * BLOCK_K * MR];
            for vp in 0..v_panels {
                let start = (vp * kv.lk_padded + j0) * NR;
                let t = tile(BLOCK_K, a, &kv.v[start..start + BLOCK_K * NR]);
                let target = &mut acc[qp * v_panels + vp];
                for (dst, src) in target.iter_mut().zip(&t) {
                    for (x, y) in dst.iter_mut().zip(src) {
                        *x += y;
                    }
                }
            }
        }
    }
    for i in 0..rows {
        let (qp, r) = (i / MR, i % MR);
        let inv = 1.0 / sum[i];
        for x in 0..dv {
            out[i * dv + x] = acc[qp * v_panels + x / NR][r][x % NR] * inv;
        }
    }
}

impl FlashAttention {
    fn run<T: Element>(&self, q: View<T>, k: View<T>, v: View<T>, dims: Dims) -> Vec<f32> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Bf16 => {
                self.run_tiled::<T, 8, 32>(q, k, v, dims, |r| unsafe {
                    // SAFETY: the level was detected on this CPU.
                    x86::rows_avx512(r)
                })
            }
            #[cfg(target_arch = "x86_64")]
            Level::Simd256 => self.run_tiled::<T, 6, 16>(q, k, v, dims, |r| unsafe {
                // SAFETY: the level was detected on this CPU.
                x86::rows_avx2(r)
            }),
            #[cfg(target_arch = "aarch64")]
            Level::Simd256 | Level::Avx512 | Level::Avx512Bf16 => {
                self.run_tiled::<T, 6, 16>(q, k, v, dims, |r| {
                    flash_rows::<6, 16>(r.q, r.kv, r.out, r.rows, r.dims, crate::gemm::tile_fma)
                })
            }
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
            .map(|bh| pack_head::<T, NR>(&k, &v, dims, bh / h, bh % h))
            .collect();
        let block_rows = PANELS_Q * MR;
        let scale = self.scale as f32;
        let mut out = vec![0f32; b * h * lq * dv];
        let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (bh, head_out) in out.chunks_mut(lq * dv).enumerate() {
            for (block, rows_out) in head_out.chunks_mut(block_rows * dv).enumerate() {
                tasks.push((bh, block, rows_out));
            }
        }
        tasks.into_par_iter().for_each(|(bh, block, rows_out)| {
            let (bi, hi) = (bh / h, bh % h);
            let i0 = block * block_rows;
            let rows = block_rows.min(lq - i0);
            // Q rows in panels of MR, `[panel][d][MR]`, pre-scaled.
            let mut q_packed = vec![0f32; rows.div_ceil(MR) * MR * d];
            for i in 0..rows {
                let (panel, r) = (i / MR, i % MR);
                for x in 0..d {
                    q_packed[(panel * d + x) * MR + r] = q.at(bi, hi, i0 + i, x) * scale;
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
mod x86 {
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
}

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
    fn modes_parse_and_print() {
        for text in ["auto", "naive", "sliced", "sliced:4", "flash"] {
            let mode: AttentionMode = text.parse().unwrap();
            assert_eq!(mode.to_string(), text);
        }
        for bad in ["fast", "sliced:0", "sliced:x", ""] {
            let error = bad.parse::<AttentionMode>().unwrap_err();
            assert!(error.contains("sliced:N"), "{error}");
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=20000 {
            let x = -87.0 * i as f32 / 20000.0;
            let got = exp_neg(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-6, "{worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
    }
}
