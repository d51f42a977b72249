//! Quantization of f32 values into ggml blocks, following ggml's reference quantizers
//! (`quantize_row_*_ref` in `ggml/src/ggml-quants.c`): Q4_0 to Q8_0, f16 and bf16 in the float
//! arithmetic gguf-py 0.19.0 (`gguf-py/gguf/quants.py`) uses to reproduce them bit for bit, the
//! K-quants (no importance matrix) in [`super::kquants`].
//!
//! Where ggml's result depends on whether the C compiler fuses `x * id + 8.5f` (Q4_0, Q5_0),
//! this code rounds the product before the sum, as gguf-py 0.19.0 does (its files are the
//! reference: a q4_0 fixture tensor has a value at 3 - 1e-7 in f64 that gguf-py rounds to level 3).

use half::f16;

use super::blocks::GgmlType;
use super::kquants;
use crate::{Error, Result};

/// The types [`quantize`] writes.
pub const QUANTIZE_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Appends `values` quantized as `ty` to `out`; `values.len()` must be a multiple of `ty`'s block
/// size.
pub fn quantize(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if !QUANTIZE_TYPES.contains(&ty) {
        return Err(Error::InvalidParameter {
            name: "ggml type",
            value: ty.name().to_string(),
            expected: format!(
                "a type this crate quantizes to: {}",
                QUANTIZE_TYPES.map(GgmlType::name).join(", ")
            ),
        });
    }
    let bs = ty.block_size();
    if !values.len().is_multiple_of(bs) {
        return Err(Error::InvalidParameter {
            name: "values.len()",
            value: values.len().to_string(),
            expected: format!("a multiple of the {ty} block size {bs}"),
        });
    }
    out.reserve(values.len() / bs * ty.type_size());
    match ty {
        GgmlType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(
            values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes()),
        ),
        GgmlType::BF16 => out.extend(values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes())),
        GgmlType::Q4_0 => blocks(values, out, quantize_q4_0),
        GgmlType::Q4_1 => blocks(values, out, quantize_q4_1),
        GgmlType::Q5_0 => blocks(values, out, quantize_q5_0),
        GgmlType::Q5_1 => blocks(values, out, quantize_q5_1),
        GgmlType::Q8_0 => blocks(values, out, quantize_q8_0),
        GgmlType::Q2K => blocks(values, out, kquants::quantize_q2_k),
        GgmlType::Q3K => blocks(values, out, kquants::quantize_q3_k),
        GgmlType::Q4K => blocks(values, out, kquants::quantize_q4_k),
        GgmlType::Q5K => blocks(values, out, kquants::quantize_q5_k),
        GgmlType::Q6K => blocks(values, out, kquants::quantize_q6_k),
        // Refused above.
        GgmlType::IQ4NL => {}
    }
    Ok(())
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaNs kept NaN and made quiet.
pub fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    // No overflow: the largest non-NaN pattern, 0xFF80_0000, is far from u32::MAX.
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

fn blocks<const BS: usize, const TS: usize>(
    values: &[f32],
    out: &mut Vec<u8>,
    block: fn(&[f32; BS]) -> [u8; TS],
) {
    let (chunks, _) = values.as_chunks::<BS>();
    for x in chunks {
        out.extend_from_slice(&block(x));
    }
}

/// The value of largest magnitude, with its sign (the first of equal magnitudes).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `trunc(x * id + offset)` in f32, the product rounded before the sum (no fused multiply-add),
/// as gguf-py 0.19.0's Q4_0/Q5_0 compute it, clamped to `0..=max`.
fn level_offset(x: f32, id: f32, offset: f32, max: i32) -> u8 {
    let v = x * id + offset;
    (v.trunc() as i32).clamp(0, max) as u8
}

/// `trunc((x - min) * id + 0.5)` in f32, clamped to `0..=max`.
fn level_f32(x: f32, min: f32, id: f32, max: i32) -> u8 {
    let v = (x - min) * id + 0.5;
    (v.trunc() as i32).clamp(0, max) as u8
}

fn quantize_q8_0(x: &[f32; 32]) -> [u8; 34] {
    let amax = x
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a { v.abs() } else { a });
    let d = amax / 127.0;
    let id = inverse(d);
    let mut b = [0u8; 34];
    b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    for (q, &v) in b[2..].iter_mut().zip(x) {
        // f32::round rounds half away from zero, as C's roundf and gguf-py's np_roundf.
        *q = (v * id).round() as i8 as u8;
    }
    b
}

fn quantize_q4_0(x: &[f32; 32]) -> [u8; 18] {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    let mut b = [0u8; 18];
    b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    for j in 0..16 {
        let lo = level_offset(x[j], id, 8.5, 15);
        let hi = level_offset(x[j + 16], id, 8.5, 15);
        b[2 + j] = lo | hi << 4;
    }
    b
}

fn quantize_q4_1(x: &[f32; 32]) -> [u8; 20] {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let mut b = [0u8; 20];
    b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
    for j in 0..16 {
        let lo = level_f32(x[j], min, id, 15);
        let hi = level_f32(x[j + 16], min, id, 15);
        b[4 + j] = lo | hi << 4;
    }
    b
}

/// The low nibbles and the fifth bits (bit j of the u32 for value j) of 32 5-bit levels.
fn pack_5bit(q: &[u8; 32], qs: &mut [u8], qh: &mut [u8]) {
    let mut high = 0u32;
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | (q[j + 16] & 0x0F) << 4;
    }
    for (j, &q) in q.iter().enumerate() {
        high |= u32::from(q >> 4 & 1) << j;
    }
    qh.copy_from_slice(&high.to_le_bytes());
}

fn quantize_q5_0(x: &[f32; 32]) -> [u8; 22] {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    let q = x.map(|v| level_offset(v, id, 16.5, 31));
    let mut b = [0u8; 22];
    b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    let (qh, qs) = b[2..].split_at_mut(4);
    pack_5bit(&q, qs, qh);
    b
}

fn quantize_q5_1(x: &[f32; 32]) -> [u8; 24] {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let q = x.map(|v| level_f32(v, min, id, 31));
    let mut b = [0u8; 24];
    b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
    let (qh, qs) = b[4..].split_at_mut(4);
    pack_5bit(&q, qs, qh);
    b
}
