//! How sdrs stores quantized weights in a model folder: ordinary `.safetensors` files in which
//! each quantized tensor `W` is replaced by its parts, described in the file's metadata.
//!
//! The `__metadata__` key [`METADATA_KEY`] holds a JSON object from each quantized tensor's name
//! to its entry: `{"method": ..., "shape": [...]}` plus the method's parameters. The parts:
//!
//! | method | entry | parts |
//! |---|---|---|
//! | `kmeans` | `bits`, `group` (rows per table) | `W.lut` f16 `[tables, 2^bits]`; `W.indices` u8 `[rows, ceil(cols*bits/8)]`, each row an LSB-first bit stream |
//! | `int8` | | `W.q` u8 `[rows, cols]` (int8 two's complement); `W.scale` f32 `[rows]`; `W.zero_point` u8 `[rows]` (int8) when not symmetric |
//! | `int4` | `block` | `W.q` u8 `[rows, ceil(cols/2)]` (int4 two's complement, low nibble first); `W.scale` f32 `[rows, cols/block]`; `W.zero_point` u8 `[rows, cols/block]` (int4 in a byte) when not symmetric |
//! | `gguf` | `type` (`q8_0`, ...) | `W.blocks` u8 `[rows, row bytes]`: the ggml blocks of each row |
//!
//! `rows` is the tensor's first dimension and `cols` the product of the others. Every other
//! tensor is stored as it is.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::QuantizedMatrix;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufMatrix};
use crate::linear::{Int4BlockMatrix, Int8Matrix};
use crate::palette::PalettizedMatrix;
use crate::quantized::Quantized;

/// The `__metadata__` key of the quantized tensors' entries.
pub const METADATA_KEY: &str = "sdrs.quantization";

fn bytes_of_i8(values: &[i8]) -> Vec<u8> {
    values.iter().map(|&v| v as u8).collect()
}

fn u8_tensor(values: Vec<u8>, shape: (usize, usize)) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// The entry and parts that store `matrix`, the tensor `name` of `shape`.
pub fn to_parts(
    name: &str,
    shape: &[usize],
    matrix: &Quantized,
) -> Result<(Value, Vec<(String, Tensor)>)> {
    let (rows, cols) = matrix.dims();
    let part = |suffix: &str| format!("{name}.{suffix}");
    Ok(match matrix {
        Quantized::Palette(m) => {
            let tables = rows / m.group().max(1);
            let lut = Tensor::from_vec(
                m.luts().to_vec(),
                (tables, 1usize << m.nbits()),
                &Device::Cpu,
            )?;
            let row_bytes = m.packed().len() / rows.max(1);
            let indices = u8_tensor(m.packed().to_vec(), (rows, row_bytes))?;
            (
                json!({"method": "kmeans", "shape": shape, "bits": m.nbits(), "group": m.group()}),
                vec![(part("lut"), lut), (part("indices"), indices)],
            )
        }
        Quantized::Int8(m) => {
            let mut parts = vec![
                (part("q"), u8_tensor(bytes_of_i8(m.data()), (rows, cols))?),
                (
                    part("scale"),
                    Tensor::from_vec(m.scales().to_vec(), rows, &Device::Cpu)?,
                ),
            ];
            if let Some(zp) = m.zero_points() {
                parts.push((
                    part("zero_point"),
                    Tensor::from_vec(bytes_of_i8(zp), rows, &Device::Cpu)?,
                ));
            }
            (json!({"method": "int8", "shape": shape}), parts)
        }
        Quantized::Int4(m) => {
            let blocks = cols / m.block().max(1);
            let row_bytes = m.packed().len() / rows.max(1);
            let mut parts = vec![
                (
                    part("q"),
                    u8_tensor(m.packed().to_vec(), (rows, row_bytes))?,
                ),
                (
                    part("scale"),
                    Tensor::from_vec(m.scales().to_vec(), (rows, blocks), &Device::Cpu)?,
                ),
            ];
            if let Some(zp) = m.zero_points() {
                parts.push((
                    part("zero_point"),
                    u8_tensor(bytes_of_i8(zp), (rows, blocks))?,
                ));
            }
            (
                json!({"method": "int4", "shape": shape, "block": m.block()}),
                parts,
            )
        }
        Quantized::Gguf(m) => {
            let row_bytes = m.data().len() / rows.max(1);
            (
                json!({"method": "gguf", "shape": shape, "type": m.ggml_type().name()}),
                vec![(
                    part("blocks"),
                    u8_tensor(m.data().to_vec(), (rows, row_bytes))?,
                )],
            )
        }
    })
}

/// The entries of a file's metadata (none when the file holds no quantized tensors).
pub fn read_entries(metadata: &HashMap<String, String>) -> Result<HashMap<String, Value>> {
    let Some(text) = metadata.get(METADATA_KEY) else {
        return Ok(HashMap::new());
    };
    let value: Value = serde_json::from_str(text).map_err(|e| Error::InvalidParameter {
        name: METADATA_KEY,
        value: e.to_string(),
        expected: "a JSON object of quantized tensor entries".to_string(),
    })?;
    match value {
        Value::Object(map) => Ok(map.into_iter().collect()),
        _ => Err(Error::InvalidParameter {
            name: METADATA_KEY,
            value: "not an object".to_string(),
            expected: "a JSON object of quantized tensor entries".to_string(),
        }),
    }
}

/// The layer shape an entry records.
pub fn entry_shape(name: &str, entry: &Value) -> Result<Vec<usize>> {
    entry["shape"]
        .as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .ok_or_else(|| Error::Tensor {
            tensor: name.to_string(),
            reason: format!("its {METADATA_KEY} entry has no shape: {entry}"),
        })
}

/// Rebuilds tensor `name` from its `entry` and its parts (read through `load`), computing as
/// `dtype`. Every size is checked against the entry before it is used.
pub fn from_parts(
    name: &str,
    entry: &Value,
    load: &dyn Fn(&str) -> candle_core::Result<Tensor>,
    dtype: DType,
) -> Result<Quantized> {
    let shape = entry_shape(name, entry)?;
    let bad = |reason: String| Error::Tensor {
        tensor: name.to_string(),
        reason,
    };
    let rows = shape.first().copied().unwrap_or(0);
    let cols = shape
        .iter()
        .skip(1)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("the shape {shape:?} overflows")))?;
    let part = |suffix: &str| -> Result<Tensor> {
        load(&format!("{name}.{suffix}")).map_err(|e| bad(format!("part {suffix}: {e}")))
    };
    let bytes = |suffix: &str| -> Result<Vec<u8>> {
        Ok(part(suffix)?
            .flatten_all()?
            .to_dtype(DType::U8)?
            .to_vec1::<u8>()?)
    };
    let signed = |b: Vec<u8>| -> Vec<i8> { b.into_iter().map(|v| v as i8).collect() };
    let floats = |suffix: &str| -> Result<Vec<f32>> {
        Ok(part(suffix)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    };
    let number = |key: &str| -> Result<usize> {
        entry[key]
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(format!("its entry has no {key}: {entry}")))
    };
    // The zero points are stored only when there are any (symmetric matrices have none).
    let zero_points = || -> Result<Option<Vec<i8>>> {
        match load(&format!("{name}.zero_point")) {
            Ok(tensor) => Ok(Some(signed(
                tensor.flatten_all()?.to_dtype(DType::U8)?.to_vec1::<u8>()?,
            ))),
            Err(_) => Ok(None),
        }
    };
    Ok(match entry["method"].as_str() {
        Some("kmeans") => {
            let bits =
                u32::try_from(number("bits")?).map_err(|_| bad("bits out of range".into()))?;
            let group = number("group")?;
            let luts = part("lut")?
                .flatten_all()?
                .to_dtype(DType::F16)?
                .to_vec1::<half::f16>()?;
            Quantized::Palette(PalettizedMatrix::from_parts(
                bits,
                Some(group),
                rows,
                cols,
                luts,
                bytes("indices")?,
                dtype,
            )?)
        }
        Some("int8") => {
            let zero_points = zero_points()?;
            Quantized::Int8(Int8Matrix::from_parts(
                rows,
                cols,
                signed(bytes("q")?),
                floats("scale")?,
                zero_points,
                dtype,
            )?)
        }
        Some("int4") => {
            let zero_points = zero_points()?;
            Quantized::Int4(Int4BlockMatrix::from_parts(
                rows,
                cols,
                number("block")?,
                bytes("q")?,
                floats("scale")?,
                zero_points,
                dtype,
            )?)
        }
        Some("gguf") => {
            let ty = entry["type"]
                .as_str()
                .ok_or_else(|| bad(format!("its entry has no type: {entry}")))
                .and_then(GgmlType::from_name)?;
            Quantized::Gguf(GgufMatrix::new(ty, rows, cols, bytes("blocks")?, dtype)?)
        }
        other => {
            return Err(bad(format!(
                "unknown method {other:?}; accepted: kmeans, int8, int4, gguf"
            )))
        }
    })
}

/// The names of the parts that store a quantized tensor `name` (to tell them from dense tensors).
pub fn is_part_of(part: &str, name: &str) -> bool {
    part.strip_prefix(name).is_some_and(|rest| {
        matches!(
            rest,
            ".lut" | ".indices" | ".q" | ".scale" | ".zero_point" | ".blocks"
        )
    })
}

/// Writes `tensors` as one `.safetensors` file with `metadata`.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, tensor) in tensors {
        let flat = tensor.flatten_all()?;
        let (dtype, bytes) = match tensor.dtype() {
            DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
            DType::F16 => (
                safetensors::Dtype::F16,
                bytemuck::cast_slice(
                    &flat
                        .to_vec1::<half::f16>()?
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<u16>>(),
                )
                .to_vec(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                bytemuck::cast_slice(
                    &flat
                        .to_vec1::<half::bf16>()?
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<u16>>(),
                )
                .to_vec(),
            ),
            DType::F32 => (
                safetensors::Dtype::F32,
                bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
            ),
            DType::F64 => (
                safetensors::Dtype::F64,
                bytemuck::cast_slice(&flat.to_vec1::<f64>()?).to_vec(),
            ),
            DType::U32 => (
                safetensors::Dtype::U32,
                bytemuck::cast_slice(&flat.to_vec1::<u32>()?).to_vec(),
            ),
            DType::I64 => (
                safetensors::Dtype::I64,
                bytemuck::cast_slice(&flat.to_vec1::<i64>()?).to_vec(),
            ),
            other => {
                return Err(Error::Tensor {
                    tensor: name.clone(),
                    reason: format!("no safetensors writer for {other:?}"),
                })
            }
        };
        data.push((name.clone(), dtype, tensor.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| Error::Tensor {
                    tensor: name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
