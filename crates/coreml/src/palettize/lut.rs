//! k-means palettization of one weight as coremltools 9.0's
//! `palettize_weights.grouped_channelwise_compress` (mode kmeans) does it, written as the iOS16 or
//! iOS18 `constexpr_lut_to_dense` op.

use coreml_proto::proto::mil_spec::DataType;

use super::{bits_list, new_op, strides, Built, Target};
use crate::error::{Error, Result};
use crate::value::{pack_bits, TensorData, Values};

fn uint_dtype(nbits: u32) -> Option<DataType> {
    Some(match nbits {
        1 => DataType::Uint1,
        2 => DataType::Uint2,
        3 => DataType::Uint3,
        4 => DataType::Uint4,
        6 => DataType::Uint6,
        8 => DataType::Uint8,
        _ => return None,
    })
}

/// For each element of the array with axes 0 and `axis` swapped (C order), its flat index in
/// the original array.
fn swapped_order(shape: &[usize], axis: usize) -> Vec<usize> {
    let mut sw = shape.to_vec();
    sw.swap(0, axis);
    let orig = strides(shape);
    let mut st = orig.clone();
    st.swap(0, axis);
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; sw.len()];
    for _ in 0..n {
        out.push(idx.iter().zip(&st).map(|(i, s)| i * s).sum());
        for d in (0..sw.len()).rev() {
            idx[d] += 1;
            if idx[d] < sw[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// k-means of one group: the table (in the weight's dtype) and an index per element; `exact`
/// when coremltools' own path (kmeans1d on fp16 of >= 10,000 elements) applies.
fn kmeans_group(values: &Values, nbits: u32) -> Result<(Values, Vec<u8>, bool)> {
    match values {
        Values::F16(w) => {
            let (lut, idx) = sdrs_quant::kmeans::palettize_f16(w, nbits)?;
            let exact = w.len() >= sdrs_quant::kmeans::COREMLTOOLS_EXACT_MIN_ELEMENTS;
            Ok((Values::F16(lut), idx, exact))
        }
        Values::F32(w) => {
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidParameter {
                    name: "weight",
                    value: format!("{} at element {i}", w[i]),
                    expected: "finite values to palettize".into(),
                });
            }
            // np.unique: ascending, -0 and +0 one value.
            let canon = |v: f32| if v == 0.0 { 0.0f32 } else { v };
            let mut distinct: Vec<f32> = w.iter().map(|&v| canon(v)).collect();
            distinct.sort_by(|a, b| a.total_cmp(b));
            distinct.dedup();
            let mut counts = vec![0f64; distinct.len()];
            let mut slot = Vec::with_capacity(w.len());
            for &v in w {
                let s = distinct
                    .binary_search_by(|d| d.total_cmp(&canon(v)))
                    .unwrap_or(0);
                counts[s] += 1.0;
                slot.push(s);
            }
            let values: Vec<f64> = distinct.iter().map(|&v| v as f64).collect();
            let lut_len = 1usize << nbits;
            let k = values.len().min(lut_len);
            let (clusters, centroids) = sdrs_quant::kmeans::cluster(&values, &counts, k)?;
            let mut lut = vec![0f32; lut_len];
            for (l, c) in lut.iter_mut().zip(&centroids) {
                *l = *c as f32;
            }
            let idx = slot.iter().map(|&s| clusters[s] as u8).collect();
            Ok((Values::F32(lut), idx, false))
        }
        _ => Err(Error::Unsupported {
            what: "weight".into(),
            reason: "only fp16 and fp32 weights are palettized".into(),
        }),
    }
}

fn select(values: &Values, order: &[usize]) -> Values {
    match values {
        Values::F16(v) => Values::F16(order.iter().map(|&i| v[i]).collect()),
        Values::F32(v) => Values::F32(order.iter().map(|&i| v[i]).collect()),
        other => other.clone(),
    }
}

fn slice(values: &Values, from: usize, to: usize) -> Values {
    match values {
        Values::F16(v) => Values::F16(v[from..to].to_vec()),
        Values::F32(v) => Values::F32(v[from..to].to_vec()),
        other => other.clone(),
    }
}

fn concat(parts: Vec<Values>) -> Values {
    let mut it = parts.into_iter();
    let Some(mut first) = it.next() else {
        return Values::F16(vec![]);
    };
    for p in it {
        match (&mut first, p) {
            (Values::F16(a), Values::F16(b)) => a.extend(b),
            (Values::F32(a), Values::F32(b)) => a.extend(b),
            _ => {}
        }
    }
    first
}

/// `palettize_weights.grouped_channelwise_compress` (mode kmeans) and the op it becomes.
pub(super) fn palettize_op(
    data: &TensorData,
    nbits: u32,
    group_size: Option<usize>,
    channel_axis: usize,
    target: Target,
    name: &str,
) -> Result<Built> {
    let shape = &data.shape;
    let rank = shape.len();
    let channel_axis = if channel_axis < rank { channel_axis } else { 0 };
    let channels = shape[channel_axis];
    let group = group_size.unwrap_or(channels);
    if group == 0 || !channels.is_multiple_of(group) {
        return Ok(Built::Skip(format!(
            "{channels} channels along axis {channel_axis} are not divisible by the group size {group}"
        )));
    }
    let groups = channels / group;
    let order = (channel_axis != 0).then(|| swapped_order(shape, channel_axis));
    let swapped = match &order {
        Some(o) => select(&data.values, o),
        None => data.values.clone(),
    };
    let numel = data.numel();
    let per_group = numel / groups.max(1);
    let mut luts = Vec::with_capacity(groups);
    let mut indices_swapped: Vec<u8> = Vec::with_capacity(numel);
    let mut exact = true;
    for g in 0..groups {
        let part = slice(&swapped, g * per_group, (g + 1) * per_group);
        let (lut, idx, ex) = kmeans_group(&part, nbits)?;
        exact &= ex;
        luts.push(lut);
        indices_swapped.extend(idx);
    }
    let indices: Vec<i64> = match &order {
        Some(o) => {
            let mut back = vec![0i64; numel];
            for (k, &orig) in o.iter().enumerate() {
                back[orig] = indices_swapped[k] as i64;
            }
            back
        }
        None => indices_swapped.iter().map(|&i| i as i64).collect(),
    };
    let lut_values = concat(luts);
    let entries = 1usize << nbits;

    let op = if target.ios18 {
        let idx_dtype = uint_dtype(nbits).ok_or_else(|| Error::InvalidParameter {
            name: "nbits",
            value: nbits.to_string(),
            expected: format!("one of {}", bits_list()),
        })?;
        let mut lut_shape = vec![1usize; rank + 2];
        lut_shape[channel_axis] = groups;
        lut_shape[rank] = entries;
        lut_shape[rank + 1] = 1;
        // The groups are stacked along axis 0 and then swapped to the channel axis; the other
        // axes are 1, so the stacked order is already the final one.
        new_op(
            "constexpr_lut_to_dense",
            name,
            data.dtype,
            shape,
            vec![],
            vec![
                (
                    "indices",
                    TensorData {
                        dtype: idx_dtype,
                        shape: shape.clone(),
                        values: Values::Int(indices),
                    },
                ),
                (
                    "lut",
                    TensorData {
                        dtype: data.dtype,
                        shape: lut_shape,
                        values: lut_values,
                    },
                ),
            ],
        )?
    } else {
        let (packed, _) = pack_bits(&indices, nbits);
        new_op(
            "constexpr_lut_to_dense",
            name,
            data.dtype,
            shape,
            vec![
                (
                    "indices",
                    TensorData {
                        dtype: DataType::Uint8,
                        shape: vec![packed.len()],
                        values: Values::Int(packed.into_iter().map(|b| b as i64).collect()),
                    },
                ),
                (
                    "lut",
                    TensorData {
                        dtype: data.dtype,
                        shape: vec![entries],
                        values: lut_values,
                    },
                ),
                (
                    "shape",
                    TensorData {
                        dtype: DataType::Uint32,
                        shape: vec![rank],
                        values: Values::Int(shape.iter().map(|&d| d as i64).collect()),
                    },
                ),
            ],
            vec![],
        )?
    };
    Ok(Built::Op { op, exact })
}
