//! Linear quantization of weight matrices as coremltools 9.0's `linear_quantize_weights` makes
//! it (`optimize/_utils.py`, `quantize_weight_by_dtype` and `compute_qparams_by_dtype`): int8 per
//! output channel ([`Int8Matrix`], `granularity="per_channel"`) and int4 per block of input
//! columns ([`Int4BlockMatrix`], `granularity="per_block"`), decoded row segment by row segment
//! for the CPU GEMM as `(q - zero_point) * scale` in f32.
//!
//! coremltools' formulas, per quantization group (a row, or a row's block), with the range
//! `[qmin, qmax]` of its `get_quant_range`:
//! - `mode="linear_symmetric"` ([`LinearMode::Symmetric`]): `m = max |w|`, `[lo, hi] = [-m, m]`,
//!   `qmin = -(2^(b-1) - 1)`, `qmax = 2^(b-1) - 1` (int8: -127..127, int4: -7..7),
//!   `scale = (hi - lo) / (qmax - qmin)` (so m / 127 for int8),
//!   `q = clip(round(w / scale), qmin, qmax)`, no zero point;
//! - `mode="linear"` ([`LinearMode::Affine`]): `[lo, hi] = [min(0, min w), max(0, max w)]`,
//!   `qmin = -2^(b-1)`, `qmax = 2^(b-1) - 1` (int8: -128..127),
//!   `scale = (hi - lo) / (qmax - qmin)` (/ 255 for int8),
//!   `zero_point = clip(round((qmin hi - qmax lo) / (hi - lo)), qmin, qmax)`,
//!   `q = clip(round(w / scale) + zero_point, qmin, qmax)`.
//!
//! `round` is numpy's (half to even), and every operation runs in the weight's float type, as
//! numpy does: a float16 weight ([`Int8Matrix::quantize_f16`]) is quantized in float16
//! arithmetic (each step rounded to float16), a float32 one in float32, so the integers and
//! scales are coremltools' own. The scale is stored as the weight's float type (float16 for a
//! float16 weight) in coremltools; here it is kept as the f32 of that value. A group of zeros
//! (scale 0, where coremltools divides 0 by 0) gets `q = 0` and zero point 0.

use std::fmt;

use candle_core::DType;
use half::f16;
use sdrs_kernels::QuantizedMatrix;

use crate::{Error, Result};

/// How a group's range maps to the integers (coremltools' `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearMode {
    /// `"linear_symmetric"`: `[-max|w|, max|w|]` onto `[-(2^(b-1) - 1), 2^(b-1) - 1]`, no zero
    /// point.
    Symmetric,
    /// `"linear"`: `[min(0, min w), max(0, max w)]` onto `[-2^(b-1), 2^(b-1) - 1]` with a zero
    /// point.
    Affine,
}

impl LinearMode {
    /// `(qmin, qmax)` for signed `bits`-bit integers, as coremltools' `get_quant_range`.
    fn range(self, bits: u32) -> (i32, i32) {
        let half = 1i32 << (bits - 1);
        match self {
            Self::Symmetric => (-half + 1, half - 1),
            Self::Affine => (-half, half - 1),
        }
    }
}

/// The float type numpy computes in: each operation's result is rounded to it.
#[derive(Clone, Copy)]
enum Precision {
    F16,
    F32,
}

impl Precision {
    /// An f32 result rounded to the precision. For +, -, *, / of two float16 values the f32
    /// result rounded to float16 is the correctly rounded float16 result (f32 has more than
    /// 2 x 11 + 2 bits), which is what numpy's float16 loops compute.
    #[inline]
    fn r(self, x: f32) -> f32 {
        match self {
            Self::F16 => f16::from_f32(x).to_f32(),
            Self::F32 => x,
        }
    }
}

/// Quantizes one group (`values` already in `p`) into `out`; returns `(scale, zero_point)`.
fn quantize_group(
    values: &[f32],
    mode: LinearMode,
    bits: u32,
    p: Precision,
    out: &mut [i8],
) -> (f32, i8) {
    let (qmin, qmax) = mode.range(bits);
    let (qmin_f, qmax_f) = (qmin as f32, qmax as f32);
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (lo, hi) = match mode {
        LinearMode::Symmetric => {
            let m = lo.abs().max(hi.abs());
            (-m, m)
        }
        LinearMode::Affine => (lo.min(0.0), hi.max(0.0)),
    };
    let span = p.r(hi - lo);
    let scale = p.r(span / (qmax_f - qmin_f));
    if scale == 0.0 {
        out.fill(0);
        return (0.0, 0);
    }
    let zero_point = match mode {
        LinearMode::Symmetric => 0.0,
        LinearMode::Affine => {
            let num = p.r(p.r(qmin_f * hi) - p.r(qmax_f * lo));
            p.r(num / span).round_ties_even().clamp(qmin_f, qmax_f)
        }
    };
    for (q, &w) in out.iter_mut().zip(values) {
        let v = p.r(p.r(w / scale).round_ties_even() + zero_point);
        // Within [qmin, qmax] after the clamp, so within i8.
        *q = v.clamp(qmin_f, qmax_f) as i8;
    }
    (scale, zero_point as i8)
}

fn check_dims(len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidParameter {
            name: "rows x cols",
            value: format!("{rows}x{cols}"),
            expected: "a matrix with at least one row and one column".into(),
        });
    }
    if rows.checked_mul(cols) != Some(len) {
        return Err(Error::Tensor {
            tensor: "weight".into(),
            reason: format!("{len} elements for a {rows}x{cols} matrix"),
        });
    }
    Ok(())
}

fn check_finite(values: impl Iterator<Item = f32>) -> Result<()> {
    for (i, v) in values.enumerate() {
        if !v.is_finite() {
            return Err(Error::InvalidParameter {
                name: "weight",
                value: format!("{v} at element {i}"),
                expected: "finite values to quantize".into(),
            });
        }
    }
    Ok(())
}

fn check_scales(scales: &[f32], want: usize, what: &str) -> Result<()> {
    if scales.len() != want {
        return Err(Error::Tensor {
            tensor: "scales".into(),
            reason: format!("{} scales, expected {want} ({what})", scales.len()),
        });
    }
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(Error::Tensor {
            tensor: "scales".into(),
            reason: format!("scale {i} is {}", scales[i]),
        });
    }
    Ok(())
}

/// `None` when every zero point is 0 (the symmetric case, which Core ML's iOS16 op stores as
/// zeros).
fn canonical_zero_points(zero_points: Option<Vec<i8>>) -> Option<Vec<i8>> {
    zero_points.filter(|z| z.iter().any(|&v| v != 0))
}

/// A `rows x cols` matrix of int8 values with a scale (and optionally a zero point) per row:
/// `w[r][c] = (q[r][c] - zero_point[r]) * scale[r]`. Core ML's `constexpr_affine_dequantize`
/// with `axis = 0`. Format `"int8"`, or `"int8:zp"` with zero points.
#[derive(Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
    zero_points: Option<Vec<i8>>,
    dtype: DType,
}

impl fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Int8Matrix({}, {}x{}, {:?})",
            self.format(),
            self.rows,
            self.cols,
            self.dtype
        )
    }
}

impl Int8Matrix {
    fn quantize(
        values: &[f32],
        rows: usize,
        cols: usize,
        mode: LinearMode,
        p: Precision,
        dtype: DType,
    ) -> Result<Self> {
        check_dims(values.len(), rows, cols)?;
        check_finite(values.iter().copied())?;
        let mut data = vec![0i8; rows * cols];
        let mut scales = Vec::with_capacity(rows);
        let mut zero_points = Vec::with_capacity(rows);
        for (src, dst) in values.chunks_exact(cols).zip(data.chunks_exact_mut(cols)) {
            let (scale, zp) = quantize_group(src, mode, 8, p, dst);
            scales.push(scale);
            zero_points.push(zp);
        }
        let zero_points = (mode == LinearMode::Affine).then_some(zero_points);
        Self::from_parts(rows, cols, data, scales, zero_points, dtype)
    }

    /// coremltools' int8 `per_channel` quantization of the float16 `rows x cols` matrix
    /// `weight` (row-major; rows are the output channels), in float16 arithmetic as coremltools
    /// runs it on a float16 weight. `dtype` is the dtype the layer computes in.
    pub fn quantize_f16(
        weight: &[f16],
        rows: usize,
        cols: usize,
        mode: LinearMode,
        dtype: DType,
    ) -> Result<Self> {
        let values: Vec<f32> = weight.iter().map(|v| v.to_f32()).collect();
        Self::quantize(&values, rows, cols, mode, Precision::F16, dtype)
    }

    /// The same for a float32 weight, in float32 arithmetic.
    pub fn quantize_f32(
        weight: &[f32],
        rows: usize,
        cols: usize,
        mode: LinearMode,
        dtype: DType,
    ) -> Result<Self> {
        Self::quantize(weight, rows, cols, mode, Precision::F32, dtype)
    }

    /// A matrix from its stored parts: `rows * cols` values row-major, one scale per row and
    /// optionally one zero point per row (all-zero zero points are dropped).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        data: Vec<i8>,
        scales: Vec<f32>,
        zero_points: Option<Vec<i8>>,
        dtype: DType,
    ) -> Result<Self> {
        check_dims(data.len(), rows, cols).map_err(|e| match e {
            Error::Tensor { reason, .. } => Error::Tensor {
                tensor: "quantized data".into(),
                reason,
            },
            e => e,
        })?;
        check_scales(&scales, rows, "one per row")?;
        if let Some(z) = &zero_points {
            if z.len() != rows {
                return Err(Error::Tensor {
                    tensor: "zero points".into(),
                    reason: format!("{} zero points, expected one per row ({rows})", z.len()),
                });
            }
        }
        Ok(Self {
            rows,
            cols,
            data,
            scales,
            zero_points: canonical_zero_points(zero_points),
            dtype,
        })
    }

    /// A matrix from uint8 parts (coremltools' `dtype="uint8"`): `q - zero_point` is kept by
    /// shifting both by 128 into int8.
    pub fn from_parts_unsigned(
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
        zero_points: Vec<u8>,
        dtype: DType,
    ) -> Result<Self> {
        let shift = |v: u8| (v as i16 - 128) as i8;
        let data = data.into_iter().map(shift).collect();
        let zero_points = zero_points.into_iter().map(shift).collect();
        Self::from_parts(rows, cols, data, scales, Some(zero_points), dtype)
    }

    /// The int8 values, row-major.
    pub fn data(&self) -> &[i8] {
        &self.data
    }

    /// One scale per row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// One zero point per row, `None` when they are all 0.
    pub fn zero_points(&self) -> Option<&[i8]> {
        self.zero_points.as_deref()
    }
}

impl QuantizedMatrix for Int8Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn format(&self) -> &str {
        if self.zero_points.is_some() {
            "int8:zp"
        } else {
            "int8"
        }
    }

    fn storage_bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4 + self.zero_points.as_ref().map_or(0, Vec::len)
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let scale = self.scales[row];
        let start = row * self.cols + col0;
        let q = &self.data[start..start + out.len()];
        match &self.zero_points {
            None => {
                for (o, &q) in out.iter_mut().zip(q) {
                    *o = q as f32 * scale;
                }
            }
            Some(zero_points) => {
                let zp = zero_points[row] as i32;
                for (o, &q) in out.iter_mut().zip(q) {
                    *o = (q as i32 - zp) as f32 * scale;
                }
            }
        }
    }
}

/// A `rows x cols` matrix of int4 values with a scale (and optionally a zero point) per row and
/// block of `block` consecutive columns: `w[r][c] = (q[r][c] - zp[r][c / block]) * scale[r][c /
/// block]`. Core ML's iOS18 `constexpr_blockwise_shift_scale` with blocks along the input axis.
///
/// `block` counts matrix columns: for a convolution `[O, C, kh, kw]` quantized by coremltools
/// with `block_size=32` (blocks of 32 input channels, whole kernel extent), it is `32 * kh * kw`.
/// `cols` must be a multiple of `block` (coremltools skips the weight otherwise).
///
/// Layout: rows byte-aligned, `ceil(cols / 2)` bytes each; column `2j` in the low nibble of byte
/// `j`, `2j + 1` in the high nibble (LSB first, as Core ML packs int4), two's complement.
/// Scales (and zero points) row-major, `cols / block` per row. Format `"int4:block{block}"`,
/// with `":zp"` appended when there are zero points.
#[derive(Clone)]
pub struct Int4BlockMatrix {
    rows: usize,
    cols: usize,
    block: usize,
    row_bytes: usize,
    packed: Vec<u8>,
    scales: Vec<f32>,
    zero_points: Option<Vec<i8>>,
    dtype: DType,
    format: String,
}

impl fmt::Debug for Int4BlockMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Int4BlockMatrix({}, {}x{}, {:?})",
            self.format, self.rows, self.cols, self.dtype
        )
    }
}

/// The signed values of a byte's two nibbles (low, high).
#[inline(always)]
fn nibbles(b: u8) -> (i32, i32) {
    (((b << 4) as i8 >> 4) as i32, (b as i8 >> 4) as i32)
}

impl Int4BlockMatrix {
    #[allow(clippy::too_many_arguments)]
    fn quantize(
        values: &[f32],
        rows: usize,
        cols: usize,
        block: usize,
        mode: LinearMode,
        p: Precision,
        dtype: DType,
    ) -> Result<Self> {
        check_dims(values.len(), rows, cols)?;
        check_block(cols, block)?;
        check_finite(values.iter().copied())?;
        let blocks = rows * (cols / block);
        let mut q = vec![0i8; rows * cols];
        let mut scales = Vec::with_capacity(blocks);
        let mut zero_points = Vec::with_capacity(blocks);
        for (src, dst) in values.chunks_exact(block).zip(q.chunks_exact_mut(block)) {
            let (scale, zp) = quantize_group(src, mode, 4, p, dst);
            scales.push(scale);
            zero_points.push(zp);
        }
        let row_bytes = cols.div_ceil(2);
        let mut packed = vec![0u8; rows * row_bytes];
        for (src, dst) in q.chunks_exact(cols).zip(packed.chunks_exact_mut(row_bytes)) {
            for (pair, byte) in src.chunks(2).zip(dst.iter_mut()) {
                let lo = pair[0] as u8 & 0x0f;
                let hi = pair.get(1).map_or(0, |&v| v as u8 & 0x0f);
                *byte = lo | (hi << 4);
            }
        }
        let zero_points = (mode == LinearMode::Affine).then_some(zero_points);
        Self::from_parts(rows, cols, block, packed, scales, zero_points, dtype)
    }

    /// coremltools' int4 `per_block` quantization of the float16 `rows x cols` matrix `weight`
    /// (row-major) in blocks of `block` columns, in float16 arithmetic as coremltools runs it on
    /// a float16 weight.
    pub fn quantize_f16(
        weight: &[f16],
        rows: usize,
        cols: usize,
        block: usize,
        mode: LinearMode,
        dtype: DType,
    ) -> Result<Self> {
        let values: Vec<f32> = weight.iter().map(|v| v.to_f32()).collect();
        Self::quantize(&values, rows, cols, block, mode, Precision::F16, dtype)
    }

    /// The same for a float32 weight, in float32 arithmetic.
    pub fn quantize_f32(
        weight: &[f32],
        rows: usize,
        cols: usize,
        block: usize,
        mode: LinearMode,
        dtype: DType,
    ) -> Result<Self> {
        Self::quantize(weight, rows, cols, block, mode, Precision::F32, dtype)
    }

    /// A matrix from its stored parts (laid out as the type's documentation says). Zero points,
    /// when given, are in -8..=7 (all-zero ones are dropped).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        block: usize,
        packed: Vec<u8>,
        scales: Vec<f32>,
        zero_points: Option<Vec<i8>>,
        dtype: DType,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::InvalidParameter {
                name: "rows x cols",
                value: format!("{rows}x{cols}"),
                expected: "a matrix with at least one row and one column".into(),
            });
        }
        check_block(cols, block)?;
        let row_bytes = cols.div_ceil(2);
        if rows.checked_mul(row_bytes) != Some(packed.len()) {
            return Err(Error::Tensor {
                tensor: "quantized data".into(),
                reason: format!(
                    "{} bytes, expected {rows} rows of ceil({cols} / 2) = {row_bytes} bytes",
                    packed.len()
                ),
            });
        }
        let blocks = rows * (cols / block);
        check_scales(&scales, blocks, "one per row and block")?;
        if let Some(z) = &zero_points {
            if z.len() != blocks {
                return Err(Error::Tensor {
                    tensor: "zero points".into(),
                    reason: format!(
                        "{} zero points, expected {blocks} (one per row and block)",
                        z.len()
                    ),
                });
            }
            if let Some(i) = z.iter().position(|v| !(-8..=7).contains(v)) {
                return Err(Error::Tensor {
                    tensor: "zero points".into(),
                    reason: format!("zero point {i} is {}, outside int4's -8..=7", z[i]),
                });
            }
        }
        let zero_points = canonical_zero_points(zero_points);
        let format = if zero_points.is_some() {
            format!("int4:block{block}:zp")
        } else {
            format!("int4:block{block}")
        };
        Ok(Self {
            rows,
            cols,
            block,
            row_bytes,
            packed,
            scales,
            zero_points,
            dtype,
            format,
        })
    }

    /// Columns per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The packed nibbles (rows byte-aligned, low nibble first).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// One scale per row and block, row-major.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// One zero point per row and block, `None` when they are all 0.
    pub fn zero_points(&self) -> Option<&[i8]> {
        self.zero_points.as_deref()
    }

    /// Every int4 value, row-major (`rows * cols`).
    pub fn unpacked(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for row in self.packed.chunks_exact(self.row_bytes) {
            for col in 0..self.cols {
                let (lo, hi) = nibbles(row[col / 2]);
                out.push(if col % 2 == 0 { lo } else { hi } as i8);
            }
        }
        out
    }
}

fn check_block(cols: usize, block: usize) -> Result<()> {
    if block == 0 || !cols.is_multiple_of(block) {
        return Err(Error::InvalidParameter {
            name: "block",
            value: block.to_string(),
            expected: format!("a divisor of the {cols} columns"),
        });
    }
    Ok(())
}

/// Decodes columns `col .. col + out.len()` of the packed `row`, all within one block.
#[inline(always)]
fn decode_int4(row: &[u8], col: usize, out: &mut [f32], scale: f32, zp: i32) {
    let odd = (col % 2).min(out.len());
    let (head, out) = out.split_at_mut(odd);
    if let Some(first) = head.first_mut() {
        *first = (nibbles(row[col / 2]).1 - zp) as f32 * scale;
    }
    let col = col + odd;
    let pairs = out.len() / 2;
    let bytes = &row[col / 2..col / 2 + pairs];
    let (body, tail) = out.split_at_mut(pairs * 2);
    for (o, &b) in body.chunks_exact_mut(2).zip(bytes) {
        let (lo, hi) = nibbles(b);
        o[0] = (lo - zp) as f32 * scale;
        o[1] = (hi - zp) as f32 * scale;
    }
    if let Some(last) = tail.first_mut() {
        *last = (nibbles(row[col / 2 + pairs]).0 - zp) as f32 * scale;
    }
}

impl QuantizedMatrix for Int4BlockMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn storage_bytes(&self) -> usize {
        self.packed.len() + self.scales.len() * 4 + self.zero_points.as_ref().map_or(0, Vec::len)
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let bytes = &self.packed[row * self.row_bytes..(row + 1) * self.row_bytes];
        let blocks_per_row = self.cols / self.block;
        let end = col0 + out.len();
        let mut col = col0;
        let mut done = 0;
        while col < end {
            let b = col / self.block;
            let seg_end = ((b + 1) * self.block).min(end);
            let i = row * blocks_per_row + b;
            let zp = self.zero_points.as_ref().map_or(0, |z| z[i] as i32);
            let seg = &mut out[done..done + seg_end - col];
            decode_int4(bytes, col, seg, self.scales[i], zp);
            done += seg_end - col;
            col = seg_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::tests::{as_f16, fixture_dir, read_safetensors, Rng};

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn decode_all(m: &dyn QuantizedMatrix) -> Vec<f32> {
        let (rows, cols) = m.dims();
        let mut out = vec![0f32; rows * cols];
        for (r, chunk) in out.chunks_exact_mut(cols).enumerate() {
            m.read_row(r, 0, chunk);
        }
        out
    }

    // Expected values worked out with numpy's float16 / float32 semantics (each operation
    // rounded to the weight's type, round half to even), following quantize_weight_by_dtype.
    #[test]
    fn int8_symmetric_on_hand_made_rows() {
        let m = Int8Matrix::quantize_f16(
            &h(&[-1.0, 0.0, 0.5, 1.0]),
            1,
            4,
            LinearMode::Symmetric,
            DType::F32,
        )
        .expect("quantize");
        // scale = fp16(2 / 254) = 0.00787353515625; 0.5 / scale = 63.5 in fp16, to even: 64.
        assert_eq!(m.scales(), [0.007_873_535_f32]);
        assert_eq!(m.data(), [-127, 0, 64, 127]);
        assert_eq!(m.format(), "int8");
        assert!(m.zero_points().is_none());
        let m =
            Int8Matrix::quantize_f32(&[-3.0, -1.0, 0.25], 1, 3, LinearMode::Symmetric, DType::F32)
                .expect("quantize");
        assert_eq!(m.scales(), [3.0f32 * 2.0 / 254.0]);
        assert_eq!(m.data(), [-127, -42, 11]);
        let mut out = [0f32; 3];
        m.read_row(0, 0, &mut out);
        assert_eq!(
            out,
            [
                -127.0 * m.scales()[0],
                -42.0 * m.scales()[0],
                11.0 * m.scales()[0]
            ]
        );
    }

    #[test]
    fn int8_affine_on_hand_made_rows() {
        // fp16: scale = fp16(2 / 255); zero point round(-0.5) = 0; -1 / scale = -127.5 in fp16
        // (to even: -128); in f32 the quotient is -127.49999 (-127).
        let m = Int8Matrix::quantize_f16(
            &h(&[-1.0, 0.0, 0.5, 1.0]),
            1,
            4,
            LinearMode::Affine,
            DType::F32,
        )
        .expect("quantize");
        assert_eq!(m.scales(), [0.007_843_018_f32]);
        assert_eq!(m.data(), [-128, 0, 64, 127]);
        assert!(m.zero_points().is_none(), "zero point 0 is dropped");
        let m =
            Int8Matrix::quantize_f32(&[-1.0, 0.0, 0.5, 1.0], 1, 4, LinearMode::Affine, DType::F32)
                .expect("quantize");
        assert_eq!(m.data(), [-127, 0, 64, 127]);
        // All positive: the range is [0, 2], zero point -128.
        let m = Int8Matrix::quantize_f16(
            &h(&[0.5, 1.0, 2.0, -3.0, -1.0, 0.25]),
            2,
            3,
            LinearMode::Affine,
            DType::F32,
        )
        .expect("quantize");
        assert_eq!(m.zero_points(), Some(&[-128i8, 107][..]));
        assert_eq!(m.data(), [-64, 0, 127, -128, 29, 127]);
        assert_eq!(m.format(), "int8:zp");
        let s = m.scales();
        let mut out = [0f32; 3];
        m.read_row(1, 0, &mut out);
        assert_eq!(
            out,
            [
                (-128.0 - 107.0) * s[1],
                (29.0 - 107.0) * s[1],
                (127.0 - 107.0) * s[1]
            ]
        );
        let m = Int8Matrix::quantize_f32(&[0.5, 1.0, 2.0], 1, 3, LinearMode::Affine, DType::F32)
            .expect("quantize");
        assert_eq!(m.data(), [-64, -1, 127]);
    }

    #[test]
    fn int4_symmetric_on_hand_made_rows() {
        let w = h(&[-1.0, 0.0, 0.5, 1.0, 0.5, 1.0, 2.0, 0.0]);
        let m = Int4BlockMatrix::quantize_f16(&w, 2, 4, 4, LinearMode::Symmetric, DType::F32)
            .expect("quantize");
        // fp16: scale = fp16(2 / 14) = 0.142822265625, 0.5 / scale = 3.5 (to even: 4).
        assert_eq!(m.scales(), [0.142_822_27_f32, 0.285_644_53]);
        assert_eq!(m.unpacked(), [-7, 0, 4, 7, 2, 4, 7, 0]);
        assert_eq!(m.format(), "int4:block4");
        // -7 = 0x9 low, 0 high; 4 low, 7 high.
        assert_eq!(&m.packed()[..2], [0x09, 0x74]);
        let m = Int4BlockMatrix::quantize_f32(
            &[-1.0, 0.0, 0.5, 1.0],
            1,
            4,
            2,
            LinearMode::Symmetric,
            DType::F32,
        )
        .expect("quantize");
        // In f32, 0.5 / fp32(1 / 7) = 3.4999998: 3.
        assert_eq!(m.unpacked(), [-7, 0, 3, 7]);
        assert_eq!(m.scales(), [1.0f32 / 7.0, 1.0 / 7.0]);
    }

    #[test]
    fn error_is_within_half_a_step() {
        let mut rng = Rng(42);
        let (rows, cols) = (7, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (rng.next_f64() as f32 - 0.5) * (1 + i % 5) as f32)
            .collect();
        for mode in [LinearMode::Symmetric, LinearMode::Affine] {
            let m8 = Int8Matrix::quantize_f32(&w, rows, cols, mode, DType::F32).expect("int8");
            let d = decode_all(&m8);
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let s = m8.scales()[i / cols];
                // Half a step plus f32 rounding of the division.
                assert!(
                    (a - b).abs() <= s * 0.5001,
                    "int8 {mode:?} element {i}: {a} vs {b}"
                );
            }
            let m4 =
                Int4BlockMatrix::quantize_f32(&w, rows, cols, 32, mode, DType::F32).expect("int4");
            let d = decode_all(&m4);
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let s = m4.scales()[i / 32];
                assert!(
                    (a - b).abs() <= s * 0.5001,
                    "int4 {mode:?} element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn read_row_over_odd_ranges_equals_the_full_decode() {
        let mut rng = Rng(3);
        let (rows, cols) = (3, 90);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.next_f64() as f32 * 2.0 - 0.7)
            .collect();
        let mats: Vec<Box<dyn QuantizedMatrix>> = vec![
            Box::new(
                Int8Matrix::quantize_f32(&w, rows, cols, LinearMode::Symmetric, DType::F32)
                    .expect("q"),
            ),
            Box::new(
                Int8Matrix::quantize_f32(&w, rows, cols, LinearMode::Affine, DType::F32)
                    .expect("q"),
            ),
            Box::new(
                Int4BlockMatrix::quantize_f32(
                    &w,
                    rows,
                    cols,
                    10,
                    LinearMode::Symmetric,
                    DType::F32,
                )
                .expect("q"),
            ),
            Box::new(
                Int4BlockMatrix::quantize_f32(&w, rows, cols, 9, LinearMode::Affine, DType::F32)
                    .expect("q"),
            ),
        ];
        for m in &mats {
            let full = decode_all(m.as_ref());
            for row in 0..rows {
                for col0 in 0..cols {
                    for len in [0, 1, 2, 3, 9, 10, 11, 31, cols - col0] {
                        let len = len.min(cols - col0);
                        let mut out = vec![0f32; len];
                        m.read_row(row, col0, &mut out);
                        assert_eq!(
                            &out[..],
                            &full[row * cols + col0..row * cols + col0 + len],
                            "{} row {row} {col0}+{len}",
                            m.format()
                        );
                    }
                }
            }
        }
        // Decoded values of the int4 matrix are (q - zp) * scale.
        let m = Int4BlockMatrix::quantize_f32(&w, rows, cols, 9, LinearMode::Affine, DType::F32)
            .expect("q");
        let q = m.unpacked();
        let full = decode_all(&m);
        let zp = m.zero_points().expect("zero points").to_vec();
        for (i, v) in full.iter().enumerate() {
            let b = i / 9;
            assert_eq!(*v, (q[i] as i32 - zp[b] as i32) as f32 * m.scales()[b]);
        }
    }

    #[test]
    fn parts_round_trip_and_bad_parts_are_errors() {
        let w: Vec<f32> = (0..24).map(|i| i as f32 - 11.5).collect();
        let m = Int4BlockMatrix::quantize_f32(&w, 2, 12, 4, LinearMode::Affine, DType::BF16)
            .expect("q");
        let again = Int4BlockMatrix::from_parts(
            2,
            12,
            m.block(),
            m.packed().to_vec(),
            m.scales().to_vec(),
            m.zero_points().map(<[i8]>::to_vec),
            DType::BF16,
        )
        .expect("parts");
        assert_eq!(decode_all(&again), decode_all(&m));
        assert_eq!(again.dtype(), DType::BF16);
        assert!(
            Int4BlockMatrix::from_parts(2, 12, 5, vec![0; 12], vec![1.0; 6], None, DType::F32)
                .is_err()
        );
        assert!(
            Int4BlockMatrix::from_parts(2, 12, 4, vec![0; 11], vec![1.0; 6], None, DType::F32)
                .is_err()
        );
        assert!(
            Int4BlockMatrix::from_parts(2, 12, 4, vec![0; 12], vec![1.0; 5], None, DType::F32)
                .is_err()
        );
        assert!(Int4BlockMatrix::from_parts(
            2,
            12,
            4,
            vec![0; 12],
            vec![1.0; 6],
            Some(vec![9; 6]),
            DType::F32
        )
        .is_err());
        let e = Int4BlockMatrix::quantize_f32(&w, 2, 12, 5, LinearMode::Symmetric, DType::F32)
            .expect_err("block 5");
        assert!(e.to_string().contains("block = 5"), "{e}");

        let m = Int8Matrix::quantize_f32(&w, 2, 12, LinearMode::Affine, DType::F32).expect("q");
        let again = Int8Matrix::from_parts(
            2,
            12,
            m.data().to_vec(),
            m.scales().to_vec(),
            m.zero_points().map(<[i8]>::to_vec),
            DType::F32,
        )
        .expect("parts");
        assert_eq!(decode_all(&again), decode_all(&m));
        assert!(
            Int8Matrix::from_parts(2, 12, vec![0; 23], vec![1.0; 2], None, DType::F32).is_err()
        );
        assert!(
            Int8Matrix::from_parts(2, 12, vec![0; 24], vec![1.0; 3], None, DType::F32).is_err()
        );
        assert!(
            Int8Matrix::from_parts(2, 12, vec![0; 24], vec![f32::NAN; 2], None, DType::F32)
                .is_err()
        );
        assert!(Int8Matrix::quantize_f32(
            &[1.0, f32::INFINITY],
            1,
            2,
            LinearMode::Symmetric,
            DType::F32
        )
        .is_err());
        // uint8 parts: q - zp is kept.
        let u = Int8Matrix::from_parts_unsigned(
            1,
            3,
            vec![0, 128, 255],
            vec![0.5],
            vec![128],
            DType::F32,
        )
        .expect("parts");
        let mut out = [0f32; 3];
        u.read_row(0, 0, &mut out);
        assert_eq!(out, [-64.0, 0.0, 63.5]);
        // A row of zeros: scale 0, values 0.
        let z = Int8Matrix::quantize_f32(&[0.0; 4], 1, 4, LinearMode::Affine, DType::F32)
            .expect("zeros");
        assert_eq!(decode_all(&z), [0.0; 4]);
    }

    /// Our int8 / int4 of the tiny SD1.5 UNet's float16 weights, decoded and rounded to float16,
    /// against what coremltools materializes from the compressed packages: the same bits.
    #[test]
    fn quantization_matches_the_decoded_core_ml_packages() {
        let (Some(compressed), Some(unet)) = (
            fixture_dir("coreml/compressed"),
            fixture_dir("tiny-sd15/unet"),
        ) else {
            return;
        };
        let originals = read_safetensors(&unet.join("diffusion_pytorch_model.safetensors"));
        let keys: Vec<String> = originals.keys().cloned().collect();
        for package in ["Unet_int8_perchannel_ios16", "Unet_int4_block32_ios18"] {
            let decoded =
                read_safetensors(&compressed.join(format!("{package}.decoded.safetensors")));
            let mut names: Vec<&String> = decoded.keys().collect();
            names.sort();
            for name in names {
                let stem = name.split("_to_fp16").next().unwrap_or_default();
                let Some(key) = keys.iter().find(|k| k.replace('.', "_") == stem) else {
                    panic!("{package}: no diffusers weight for {name}");
                };
                let w = as_f16(&originals[key]);
                let shape = &decoded[name].1;
                let (rows, cols) = (shape[0], w.len() / shape[0]);
                let m: Box<dyn QuantizedMatrix> = if package.contains("int8") {
                    Box::new(
                        Int8Matrix::quantize_f16(&w, rows, cols, LinearMode::Symmetric, DType::F16)
                            .expect("int8"),
                    )
                } else {
                    let kernel: usize = shape[2..].iter().product();
                    Box::new(
                        Int4BlockMatrix::quantize_f16(
                            &w,
                            rows,
                            cols,
                            32 * kernel,
                            LinearMode::Symmetric,
                            DType::F16,
                        )
                        .expect("int4"),
                    )
                };
                let got: Vec<u16> = decode_all(m.as_ref())
                    .iter()
                    .map(|&v| f16::from_f32(v).to_bits())
                    .collect();
                let want: Vec<u16> = as_f16(&decoded[name]).iter().map(|v| v.to_bits()).collect();
                let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
                assert_eq!(same, want.len(), "{package}: {name} ({})", m.format());
            }
            println!(
                "{package}: {} tensors identical to the Core ML decode",
                decoded.len()
            );
        }
    }
}
