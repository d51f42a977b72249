//! Linear symmetric quantization of one weight as coremltools 9.0's `linear_quantize_weights`
//! (`optimize/_utils.py`: `compute_qparams_by_dtype`, `quantize_weight_by_dtype`,
//! `ios18_quant_params_to_ios16`) does it, written as the iOS16 `constexpr_affine_dequantize` or
//! the iOS18 `constexpr_blockwise_shift_scale` op.

use coreml_proto::proto::mil_spec::DataType;
use half::f16;

use super::{new_op, strides, Built, Target};
use crate::error::Result;
use crate::value::{dtype_name, TensorData, Values};

/// `linear_quantize_weights` in mode linear_symmetric (`compute_qparams_by_dtype`,
/// `quantize_weight_by_dtype`) and the op it becomes. The arithmetic runs in the weight's dtype
/// as numpy runs it: `scale = (max - min) / (qmax - qmin)` with `max = -min = max |w|`, then
/// `round_half_even(w / scale)` clipped to `[-(2^(b-1) - 1), 2^(b-1) - 1]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn quantize_op(
    data: &TensorData,
    bits: u32,
    block_size: Option<usize>,
    in_axis: usize,
    out_axis: usize,
    target: Target,
    name: &str,
) -> Result<Built> {
    let shape = &data.shape;
    let rank = shape.len();
    let mut blocks = vec![0usize; rank];
    if let Some(b) = block_size {
        if in_axis < rank {
            blocks[in_axis] = b;
        }
    }
    if out_axis < rank {
        blocks[out_axis] = 1;
    }
    let mut scale_shape = Vec::with_capacity(rank);
    for (axis, (&d, &b)) in shape.iter().zip(&blocks).enumerate() {
        if b > 0 {
            if !d.is_multiple_of(b) {
                return Ok(Built::Skip(format!(
                    "axis {axis} of size {d} is not divisible by the block size {b}"
                )));
            }
            scale_shape.push(d / b);
        } else {
            scale_shape.push(1);
        }
    }
    let qmax = (1i64 << (bits - 1)) - 1;
    let qrange = (2 * qmax) as f32;
    let numel = data.numel();
    let st = strides(shape);
    let sst = strides(&scale_shape);
    let cell_of = |flat: usize| -> usize {
        let mut cell = 0;
        for d in 0..rank {
            let i = (flat / st[d]) % shape[d];
            if let Some(block) = i.checked_div(blocks[d]) {
                cell += block * sst[d];
            }
        }
        cell
    };
    let cells: usize = scale_shape.iter().product();
    let cell_index: Vec<usize> = (0..numel).map(cell_of).collect();
    let mut max_abs = vec![0f32; cells];
    let w: Vec<f32> = match &data.values {
        Values::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        Values::F32(v) => v.clone(),
        _ => {
            return Ok(Built::Skip(format!(
                "{} weight; only fp16 and fp32 weights are quantized",
                dtype_name(data.dtype)
            )))
        }
    };
    if w.iter().any(|v| v.is_infinite()) {
        return Ok(Built::Skip(
            "it holds inf/-inf, which quantization does not support".into(),
        ));
    }
    for (k, &v) in w.iter().enumerate() {
        let c = cell_index[k];
        if v.abs() > max_abs[c] {
            max_abs[c] = v.abs();
        }
    }
    let is_f16 = data.dtype == DataType::Float16;
    // Rounds an f32 result to the weight's dtype, as numpy's half loops do after computing in
    // f32.
    let round_to = |x: f32| -> f32 {
        if is_f16 {
            f16::from_f32(x).to_f32()
        } else {
            x
        }
    };
    let scale: Vec<f32> = max_abs
        .iter()
        .map(|&m| round_to(round_to(m - (-m)) / qrange))
        .collect();
    let q: Vec<i64> = w
        .iter()
        .zip(&cell_index)
        .map(|(&v, &c)| {
            let r = round_to(v / scale[c]).round_ties_even();
            // A zero scale gives NaN (0/0); numpy's cast of it to an integer gives 0 on the
            // platforms coremltools runs on.
            if r.is_nan() {
                0
            } else {
                (r.clamp(-(qmax as f32), qmax as f32)) as i64
            }
        })
        .collect();
    let scale_values = if is_f16 {
        Values::F16(scale.iter().map(|&s| f16::from_f32(s)).collect())
    } else {
        Values::F32(scale)
    };
    let q_dtype = if bits == 8 {
        DataType::Int8
    } else {
        DataType::Int4
    };
    let op = if target.ios18 {
        new_op(
            "constexpr_blockwise_shift_scale",
            name,
            data.dtype,
            shape,
            vec![],
            vec![
                (
                    "data",
                    TensorData {
                        dtype: q_dtype,
                        shape: shape.clone(),
                        values: Values::Int(q),
                    },
                ),
                (
                    "scale",
                    TensorData {
                        dtype: data.dtype,
                        shape: scale_shape,
                        values: scale_values,
                    },
                ),
            ],
        )?
    } else {
        // `ios18_quant_params_to_ios16`: the axis is the first non-1 axis of the scale, scale
        // and a zero zero_point squeezed to rank 0 or 1.
        let non_single: Vec<usize> = scale_shape
            .iter()
            .enumerate()
            .filter(|(_, &d)| d > 1)
            .map(|(i, _)| i)
            .collect();
        if non_single.len() > 1 {
            return Ok(Built::Skip(format!(
                "scale of shape {scale_shape:?} has more than one axis above 1 (iOS16 affine form)"
            )));
        }
        let axis = non_single.first().copied().unwrap_or(0);
        let squeezed: Vec<usize> = scale_shape.iter().copied().filter(|&d| d != 1).collect();
        let n = cells;
        new_op(
            "constexpr_affine_dequantize",
            name,
            data.dtype,
            shape,
            vec![
                (
                    "quantized_data",
                    TensorData {
                        dtype: q_dtype,
                        shape: shape.clone(),
                        values: Values::Int(q),
                    },
                ),
                (
                    "zero_point",
                    TensorData {
                        dtype: q_dtype,
                        shape: squeezed.clone(),
                        values: Values::Int(vec![0; n]),
                    },
                ),
                (
                    "scale",
                    TensorData {
                        dtype: data.dtype,
                        shape: squeezed,
                        values: scale_values,
                    },
                ),
                (
                    "axis",
                    TensorData {
                        dtype: DataType::Int32,
                        shape: vec![],
                        values: Values::Int(vec![axis as i64]),
                    },
                ),
            ],
            vec![],
        )?
    };
    Ok(Built::Op { op, exact: false })
}
