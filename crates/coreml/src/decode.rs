//! Materialising compressed constants: the dense tensor each `constexpr_*` op stands for, with the
//! arithmetic coremltools 9.0 uses in `materialized_val_inference` (`iOS16/constexpr_ops.py`,
//! `iOS18/compression.py`, `optimize/_utils.py`), so that the values match bit for bit.
//!
//! - iOS16 `constexpr_lut_to_dense`: attributes `lut` [2^n], `indices` (n-bit, packed LSB-first
//!   into uint8), `shape`.
//! - iOS16 `constexpr_affine_dequantize`: attributes `quantized_data`, `zero_point`, `scale`,
//!   `axis`; `(q - zp) * scale` in f32, rounded once to the scale's dtype.
//! - iOS16 `constexpr_sparse_to_dense`: attributes `nonzero_data`, `mask` (bits), `shape`.
//! - iOS18 `constexpr_lut_to_dense`: inputs `indices` (weight shape, uint1..uint8) and `lut`
//!   [G0, .., Gr-1, 2^n, V]: group `c / (dim / G)` along each axis, `V > 1` vectors along
//!   `vector_axis`.
//! - iOS18 `constexpr_blockwise_shift_scale`: inputs `data`, `scale` and optional `offset` of the
//!   data's rank, blocks `dim / scale_dim` along each axis; computed in the scale's dtype.

use std::collections::HashMap;

use coreml_proto::proto::mil_spec::{DataType, Operation};
use half::f16;

use crate::blob::BlobFile;
use crate::error::{Error, Result};
use crate::program::{as_int, attribute, const_input, op_name};
use crate::value::{unpack_bits, TensorData, Values};

/// Whether an op is one of the compile-time decompression ops.
pub fn is_constexpr(op: &Operation) -> bool {
    op.r#type.starts_with("constexpr_")
}

fn op_error(op: &Operation, reason: impl Into<String>) -> Error {
    Error::Op {
        op: op_name(op).to_string(),
        op_type: op.r#type.clone(),
        reason: reason.into(),
    }
}

/// The dense value a `constexpr_*` op materialises. `consts` maps var names to their `const` ops
/// (see [`crate::program::const_producers`]).
pub fn materialize(
    op: &Operation,
    consts: &HashMap<&str, &Operation>,
    blobs: Option<&BlobFile>,
) -> Result<TensorData> {
    // The iOS16 forms keep their operands as attributes, the iOS18 forms as inputs.
    let ios16 = !op.inputs.contains_key("indices")
        && !op.inputs.contains_key("data")
        && !op.inputs.contains_key("mask");
    match (op.r#type.as_str(), ios16) {
        ("constexpr_lut_to_dense", true) => {
            let lut = attribute(op, "lut", blobs)?;
            let indices = attribute(op, "indices", blobs)?;
            let shape = attribute(op, "shape", blobs)?;
            lut_to_dense_ios16(op, &lut, &indices, &shape)
        }
        ("constexpr_lut_to_dense", false) => {
            let indices = const_input(op, "indices", consts, blobs)?;
            let lut = const_input(op, "lut", consts, blobs)?;
            let vector_axis = match op.inputs.contains_key("vector_axis") {
                true => as_int(&const_input(op, "vector_axis", consts, blobs)?),
                false => None,
            };
            lut_to_dense(op, &indices, &lut, vector_axis)
        }
        ("constexpr_affine_dequantize", _) => {
            let q = attribute(op, "quantized_data", blobs)?;
            let zp = attribute(op, "zero_point", blobs)?;
            let scale = attribute(op, "scale", blobs)?;
            let axis = as_int(&attribute(op, "axis", blobs)?).unwrap_or(0);
            affine_dequantize(op, &q, &zp, &scale, axis)
        }
        ("constexpr_blockwise_shift_scale", _) => {
            let data = const_input(op, "data", consts, blobs)?;
            let scale = const_input(op, "scale", consts, blobs)?;
            let offset = match op.inputs.contains_key("offset") {
                true => Some(const_input(op, "offset", consts, blobs)?),
                false => None,
            };
            blockwise_shift_scale(op, &data, &scale, offset.as_ref())
        }
        ("constexpr_sparse_to_dense", true) => {
            let nonzero = attribute(op, "nonzero_data", blobs)?;
            let mask = attribute(op, "mask", blobs)?;
            let shape = attribute(op, "shape", blobs)?;
            sparse_to_dense_ios16(op, &nonzero, &mask, &shape)
        }
        (other, _) => Err(Error::Unsupported {
            what: format!("op {} ({other})", op_name(op)),
            reason: "decoded forms: constexpr_lut_to_dense (iOS16, iOS18), \
                     constexpr_affine_dequantize, constexpr_blockwise_shift_scale, \
                     constexpr_sparse_to_dense (iOS16)"
                .into(),
        }),
    }
}

fn shape_of(op: &Operation, t: &TensorData) -> Result<Vec<usize>> {
    match &t.values {
        Values::Int(v) => v
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| op_error(op, format!("shape entry {d}"))))
            .collect(),
        _ => Err(op_error(op, "shape is not an integer tensor")),
    }
}

fn checked_numel(op: &Operation, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 8)
        .ok_or_else(|| op_error(op, format!("shape {shape:?} is too large")))
}

fn packed_bytes(op: &Operation, t: &TensorData) -> Result<Vec<u8>> {
    match &t.values {
        Values::Int(v) => Ok(v.iter().map(|&x| x as u8).collect()),
        _ => Err(op_error(op, "packed data is not a uint8 tensor")),
    }
}

/// Gathers `lut[idx]` into a tensor of the lut's dtype.
fn gather(op: &Operation, lut: &Values, idx: impl Iterator<Item = usize>) -> Result<Values> {
    let oob = |i: usize, n: usize| op_error(op, format!("index {i} outside the {n}-entry table"));
    Ok(match lut {
        Values::F16(l) => Values::F16(
            idx.map(|i| l.get(i).copied().ok_or_else(|| oob(i, l.len())))
                .collect::<Result<_>>()?,
        ),
        Values::F32(l) => Values::F32(
            idx.map(|i| l.get(i).copied().ok_or_else(|| oob(i, l.len())))
                .collect::<Result<_>>()?,
        ),
        Values::Int(l) => Values::Int(
            idx.map(|i| l.get(i).copied().ok_or_else(|| oob(i, l.len())))
                .collect::<Result<_>>()?,
        ),
        _ => return Err(op_error(op, "lookup table of an unsupported dtype")),
    })
}

fn lut_to_dense_ios16(
    op: &Operation,
    lut: &TensorData,
    indices: &TensorData,
    shape: &TensorData,
) -> Result<TensorData> {
    let shape = shape_of(op, shape)?;
    let n = checked_numel(op, &shape)?;
    let entries = lut.numel();
    if !entries.is_power_of_two() || !(2..=256).contains(&entries) {
        return Err(op_error(
            op,
            format!("lut of {entries} entries (expected 2^n, n 1..8)"),
        ));
    }
    let nbits = entries.trailing_zeros();
    let bytes = packed_bytes(op, indices)?;
    let idx = unpack_bits(&bytes, nbits, n, false).ok_or_else(|| {
        op_error(
            op,
            format!("{} index bytes for {n} {nbits}-bit indices", bytes.len()),
        )
    })?;
    let values = gather(op, &lut.values, idx.into_iter().map(|i| i as usize))?;
    Ok(TensorData {
        dtype: lut.dtype,
        shape,
        values,
    })
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn lut_to_dense(
    op: &Operation,
    indices: &TensorData,
    lut: &TensorData,
    vector_axis: Option<i64>,
) -> Result<TensorData> {
    let rank = indices.shape.len();
    if lut.shape.len() != rank + 2 {
        return Err(op_error(
            op,
            format!(
                "lut shape {:?} for indices {:?} (expected rank {})",
                lut.shape,
                indices.shape,
                rank + 2
            ),
        ));
    }
    let palette = lut.shape[rank];
    let vsize = lut.shape[rank + 1];
    let mut blocks = Vec::with_capacity(rank);
    for a in 0..rank {
        let g = lut.shape[a];
        if g == 0 || !indices.shape[a].is_multiple_of(g) {
            return Err(op_error(
                op,
                format!(
                    "axis {a}: {} indices do not split into {g} groups",
                    indices.shape[a]
                ),
            ));
        }
        blocks.push(indices.shape[a] / g);
    }
    let Values::Int(idx) = &indices.values else {
        return Err(op_error(op, "indices are not integers"));
    };
    let vaxis = match (vsize, vector_axis) {
        (1, _) => None,
        (_, Some(a)) => {
            let a = if a < 0 { a + rank as i64 } else { a };
            if a < 0 || a as usize >= rank {
                return Err(op_error(op, format!("vector_axis {a} for rank {rank}")));
            }
            Some(a as usize)
        }
        (_, None) => return Err(op_error(op, "vector lut without vector_axis")),
    };
    let mut out_shape = indices.shape.clone();
    if let Some(a) = vaxis {
        out_shape[a] *= vsize;
    }
    checked_numel(op, &out_shape)?;
    let in_strides = strides(&indices.shape);
    let out_strides = strides(&out_shape);
    let lut_strides = strides(&lut.shape);
    // For each index: its group's table row, then V entries placed along the vector axis.
    let mut positions = vec![0usize; out_shape.iter().product()];
    let mut coord = vec![0usize; rank];
    for (flat, &i) in idx.iter().enumerate() {
        let mut rem = flat;
        for a in 0..rank {
            coord[a] = rem / in_strides[a];
            rem %= in_strides[a];
        }
        let i = i as usize;
        if i >= palette {
            return Err(op_error(
                op,
                format!("index {i} outside the {palette}-entry table"),
            ));
        }
        let mut base = i * lut_strides[rank];
        for a in 0..rank {
            base += (coord[a] / blocks[a]) * lut_strides[a];
        }
        for v in 0..vsize {
            let mut o = 0;
            for a in 0..rank {
                let c = match vaxis {
                    Some(va) if va == a => coord[a] * vsize + v,
                    _ => coord[a],
                };
                o += c * out_strides[a];
            }
            positions[o] = base + v;
        }
    }
    let values = gather(op, &lut.values, positions.into_iter())?;
    Ok(TensorData {
        dtype: lut.dtype,
        shape: out_shape,
        values,
    })
}

/// A per-axis parameter (scalar or 1-D along `axis`) broadcast to index `flat` of `shape`.
fn param_index(param_len: usize, shape: &[usize], axis: usize, flat: usize) -> usize {
    if param_len <= 1 {
        return 0;
    }
    let s = strides(shape);
    (flat / s[axis]) % shape[axis]
}

fn affine_dequantize(
    op: &Operation,
    q: &TensorData,
    zp: &TensorData,
    scale: &TensorData,
    axis: i64,
) -> Result<TensorData> {
    let rank = q.shape.len() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    if axis < 0 || axis >= rank.max(1) {
        return Err(op_error(op, format!("axis {axis} for rank {rank}")));
    }
    let axis = axis as usize;
    let Values::Int(qv) = &q.values else {
        return Err(op_error(op, "quantized_data is not an integer tensor"));
    };
    let zpv: Vec<f32> = zp
        .values
        .to_f32()
        .ok_or_else(|| op_error(op, "zero_point is not numeric"))?;
    let sv: Vec<f32> = scale
        .values
        .to_f32()
        .ok_or_else(|| op_error(op, "scale is not numeric"))?;
    for (name, len) in [("zero_point", zpv.len()), ("scale", sv.len())] {
        if len > 1 && q.shape.get(axis) != Some(&len) {
            return Err(op_error(
                op,
                format!("{name} of {len} values for axis {axis} of {:?}", q.shape),
            ));
        }
    }
    let f = |flat: usize, x: i64| {
        let z = zpv[param_index(zpv.len(), &q.shape, axis, flat)];
        let s = sv[param_index(sv.len(), &q.shape, axis, flat)];
        (x as f32 - z) * s
    };
    let values = match scale.dtype {
        DataType::Float16 => Values::F16(
            qv.iter()
                .enumerate()
                .map(|(i, &x)| f16::from_f32(f(i, x)))
                .collect(),
        ),
        DataType::Float32 => Values::F32(qv.iter().enumerate().map(|(i, &x)| f(i, x)).collect()),
        _ => return Err(op_error(op, "scale is neither fp16 nor fp32")),
    };
    Ok(TensorData {
        dtype: scale.dtype,
        shape: q.shape.clone(),
        values,
    })
}

/// The flat index into a blockwise parameter for element `flat` of `shape`.
fn block_index(shape: &[usize], pshape: &[usize], flat: usize) -> usize {
    let s = strides(shape);
    let ps = strides(pshape);
    let mut rem = flat;
    let mut out = 0;
    for a in 0..shape.len() {
        let c = rem / s[a];
        rem %= s[a];
        out += (c / (shape[a] / pshape[a])) * ps[a];
    }
    out
}

fn blockwise_shift_scale(
    op: &Operation,
    data: &TensorData,
    scale: &TensorData,
    offset: Option<&TensorData>,
) -> Result<TensorData> {
    for (name, p) in [("scale", Some(scale)), ("offset", offset)] {
        let Some(p) = p else { continue };
        let fits = p.shape.len() == data.shape.len()
            && p.shape
                .iter()
                .zip(&data.shape)
                .all(|(&ps, &ds)| ps > 0 && ds % ps == 0);
        if !fits {
            return Err(op_error(
                op,
                format!(
                    "{name} shape {:?} does not divide data shape {:?}",
                    p.shape, data.shape
                ),
            ));
        }
    }
    let dv = data
        .values
        .to_f32()
        .ok_or_else(|| op_error(op, "data is not numeric"))?;
    let sv = scale
        .values
        .to_f32()
        .ok_or_else(|| op_error(op, "scale is not numeric"))?;
    let ov = match offset {
        Some(o) => Some(
            o.values
                .to_f32()
                .ok_or_else(|| op_error(op, "offset is not numeric"))?,
        ),
        None => None,
    };
    let values = match scale.dtype {
        // numpy in float16: data cast to fp16, each operation rounded to fp16.
        DataType::Float16 => {
            let h = |x: f32| f16::from_f32(x).to_f32();
            Values::F16(
                dv.iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        let mut d = h(x);
                        if let (Some(ov), Some(o)) = (&ov, offset) {
                            d = h(d - ov[block_index(&data.shape, &o.shape, i)]);
                        }
                        f16::from_f32(sv[block_index(&data.shape, &scale.shape, i)] * d)
                    })
                    .collect(),
            )
        }
        DataType::Float32 => Values::F32(
            dv.iter()
                .enumerate()
                .map(|(i, &x)| {
                    let mut d = x;
                    if let (Some(ov), Some(o)) = (&ov, offset) {
                        d -= ov[block_index(&data.shape, &o.shape, i)];
                    }
                    sv[block_index(&data.shape, &scale.shape, i)] * d
                })
                .collect(),
        ),
        _ => return Err(op_error(op, "scale is neither fp16 nor fp32")),
    };
    Ok(TensorData {
        dtype: scale.dtype,
        shape: data.shape.clone(),
        values,
    })
}

fn sparse_to_dense_ios16(
    op: &Operation,
    nonzero: &TensorData,
    mask: &TensorData,
    shape: &TensorData,
) -> Result<TensorData> {
    let shape = shape_of(op, shape)?;
    let n = checked_numel(op, &shape)?;
    let bytes = packed_bytes(op, mask)?;
    let bits = unpack_bits(&bytes, 1, n, false)
        .ok_or_else(|| op_error(op, format!("{} mask bytes for {n} elements", bytes.len())))?;
    let set = bits.iter().filter(|&&b| b != 0).count();
    if set != nonzero.numel() {
        return Err(op_error(
            op,
            format!("mask has {set} bits set for {} values", nonzero.numel()),
        ));
    }
    let mut next = 0usize;
    let mut pick = |b: &i64| {
        if *b != 0 {
            next += 1;
            Some(next - 1)
        } else {
            None
        }
    };
    let values = match &nonzero.values {
        Values::F16(v) => Values::F16(
            bits.iter()
                .map(|b| pick(b).map_or(f16::ZERO, |i| v[i]))
                .collect(),
        ),
        Values::F32(v) => Values::F32(bits.iter().map(|b| pick(b).map_or(0.0, |i| v[i])).collect()),
        Values::Int(v) => Values::Int(bits.iter().map(|b| pick(b).map_or(0, |i| v[i])).collect()),
        _ => return Err(op_error(op, "nonzero_data of an unsupported dtype")),
    };
    Ok(TensorData {
        dtype: nonzero.dtype,
        shape,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::immediate_value;

    fn attr(
        dtype: DataType,
        shape: &[usize],
        values: Values,
    ) -> coreml_proto::proto::mil_spec::Value {
        immediate_value(&TensorData {
            dtype,
            shape: shape.to_vec(),
            values,
        })
        .unwrap()
    }

    #[test]
    fn ios16_sparse_to_dense_places_values_at_the_mask_bits_lsb_first() {
        let mut op = Operation {
            r#type: "constexpr_sparse_to_dense".into(),
            ..Default::default()
        };
        let nz = [1.0f32, 2.0, 3.0].map(f16::from_f32).to_vec();
        op.attributes.insert(
            "nonzero_data".into(),
            attr(DataType::Float16, &[3], Values::F16(nz)),
        );
        // Bits 0, 2 and 5 set.
        op.attributes.insert(
            "mask".into(),
            attr(DataType::Uint8, &[1], Values::Int(vec![0b0010_0101])),
        );
        op.attributes.insert(
            "shape".into(),
            attr(DataType::Uint32, &[2], Values::Int(vec![2, 3])),
        );
        let t = materialize(&op, &HashMap::new(), None).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(
            t.values.to_f32().unwrap(),
            vec![1.0, 0.0, 2.0, 0.0, 0.0, 3.0]
        );
        // A mask whose bit count does not match the values is refused.
        op.attributes.insert(
            "mask".into(),
            attr(DataType::Uint8, &[1], Values::Int(vec![0b0000_0101])),
        );
        let e = materialize(&op, &HashMap::new(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 bits set for 3 values"), "{e}");
    }

    #[test]
    fn an_unknown_constexpr_op_is_refused_with_the_forms_we_read() {
        let op = Operation {
            r#type: "constexpr_cast".into(),
            ..Default::default()
        };
        let e = materialize(&op, &HashMap::new(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("constexpr_cast") && e.contains("decoded forms"),
            "{e}"
        );
    }
}
