//! Host multi-arrays and feature descriptions: what crosses a Core ML model's boundary, in the
//! dtypes Core ML's `MLMultiArrayDataType` has (Float16, Float32, Float64, Int32), C order, and
//! the names, dtypes and shapes a model declares (from its spec or a compiled `metadata.json`).

use std::path::Path;

use coreml_proto::proto::array_feature_type::ArrayDataType;
use coreml_proto::proto::feature_type::Type as FeatureKind;
use coreml_proto::proto::{FeatureDescription, Model};
use half::f16;

use crate::error::{format, io, model as model_error};
use crate::{Error, Result};

/// The element types of a Core ML multi-array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArrayDtype {
    F16,
    F32,
    F64,
    I32,
}

impl ArrayDtype {
    /// Core ML's own name (`Float16`, as `metadata.json` and `formattedType` write it).
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "Float16",
            Self::F32 => "Float32",
            Self::F64 => "Float64",
            Self::I32 => "Int32",
        }
    }

    /// Reads Core ML's names (`Double` is the spec's name for Float64).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "Float16" => Self::F16,
            "Float32" => Self::F32,
            "Float64" | "Double" => Self::F64,
            "Int32" => Self::I32,
            _ => return None,
        })
    }

    fn from_spec(data_type: i32) -> Option<Self> {
        Some(match ArrayDataType::try_from(data_type).ok()? {
            ArrayDataType::Float16 => Self::F16,
            ArrayDataType::Float32 => Self::F32,
            ArrayDataType::Double => Self::F64,
            ArrayDataType::Int32 => Self::I32,
            _ => return None,
        })
    }

    pub fn itemsize(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::F64 => 8,
        }
    }
}

/// The elements of a multi-array, in its dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    F16(Vec<f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
}

/// A dense, C-ordered host multi-array.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiArray {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl MultiArray {
    /// `values` of `shape` as f32; an error when their count is not the shape's.
    pub fn from_f32(shape: &[usize], values: Vec<f32>) -> Result<Self> {
        Self::new(shape, ArrayData::F32(values))
    }

    pub fn new(shape: &[usize], data: ArrayData) -> Result<Self> {
        let len = match &data {
            ArrayData::F16(v) => v.len(),
            ArrayData::F32(v) => v.len(),
            ArrayData::F64(v) => v.len(),
            ArrayData::I32(v) => v.len(),
        };
        if len != numel(shape) {
            return Err(Error::InvalidParameter {
                name: "multi-array",
                value: format!("{len} values"),
                expected: format!("{} values for shape {shape:?}", numel(shape)),
            });
        }
        Ok(Self {
            shape: shape.to_vec(),
            data,
        })
    }

    /// `values` stored as `dtype` (rounded to nearest for f16, truncated toward zero for i32).
    pub fn from_f32_as(dtype: ArrayDtype, shape: &[usize], values: &[f32]) -> Result<Self> {
        let data = match dtype {
            ArrayDtype::F16 => ArrayData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            ArrayDtype::F32 => ArrayData::F32(values.to_vec()),
            ArrayDtype::F64 => ArrayData::F64(values.iter().map(|&v| f64::from(v)).collect()),
            ArrayDtype::I32 => ArrayData::I32(values.iter().map(|&v| v as i32).collect()),
        };
        Self::new(shape, data)
    }

    pub fn dtype(&self) -> ArrayDtype {
        match &self.data {
            ArrayData::F16(_) => ArrayDtype::F16,
            ArrayData::F32(_) => ArrayDtype::F32,
            ArrayData::F64(_) => ArrayDtype::F64,
            ArrayData::I32(_) => ArrayDtype::I32,
        }
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Every element as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            ArrayData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            ArrayData::F32(v) => v.clone(),
            ArrayData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            ArrayData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The same values in `dtype` (a copy; the same array when it is that dtype already).
    pub fn to_dtype(&self, dtype: ArrayDtype) -> MultiArray {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = match (dtype, &self.data) {
            (ArrayDtype::F64, ArrayData::F64(v)) => ArrayData::F64(v.clone()),
            (ArrayDtype::F64, ArrayData::I32(v)) => {
                ArrayData::F64(v.iter().map(|&x| f64::from(x)).collect())
            }
            (ArrayDtype::F64, _) => {
                ArrayData::F64(self.to_f32().into_iter().map(f64::from).collect())
            }
            (ArrayDtype::I32, ArrayData::F64(v)) => {
                ArrayData::I32(v.iter().map(|&x| x as i32).collect())
            }
            (ArrayDtype::F16, ArrayData::F64(v)) => {
                ArrayData::F16(v.iter().map(|&x| f16::from_f64(x)).collect())
            }
            (other, _) => {
                // Every other pair goes through f32 exactly (f16 and i32 below 2^24 are f32's).
                let values = self.to_f32();
                return Self {
                    shape: self.shape.clone(),
                    data: match other {
                        ArrayDtype::F16 => {
                            ArrayData::F16(values.iter().map(|&v| f16::from_f32(v)).collect())
                        }
                        ArrayDtype::F32 => ArrayData::F32(values),
                        ArrayDtype::F64 => {
                            ArrayData::F64(values.into_iter().map(f64::from).collect())
                        }
                        ArrayDtype::I32 => {
                            ArrayData::I32(values.iter().map(|&v| v as i32).collect())
                        }
                    },
                };
            }
        };
        Self {
            shape: self.shape.clone(),
            data,
        }
    }

    /// The elements as little-endian bytes (what an `MLMultiArray` of this dtype holds on Apple
    /// silicon).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            ArrayData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ArrayData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ArrayData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ArrayData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Rows `start..start + len` along the first axis.
    pub fn rows(&self, start: usize, len: usize) -> Result<MultiArray> {
        let rows = self.shape.first().copied().unwrap_or(1);
        if start + len > rows {
            return Err(Error::InvalidParameter {
                name: "rows",
                value: format!("{start}..{}", start + len),
                expected: format!("within the {rows} rows of a {:?} array", self.shape),
            });
        }
        let per = numel(self.shape.get(1..).unwrap_or(&[]));
        let range = start * per..(start + len) * per;
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = len;
        }
        let data = match &self.data {
            ArrayData::F16(v) => ArrayData::F16(v[range].to_vec()),
            ArrayData::F32(v) => ArrayData::F32(v[range].to_vec()),
            ArrayData::F64(v) => ArrayData::F64(v[range].to_vec()),
            ArrayData::I32(v) => ArrayData::I32(v[range].to_vec()),
        };
        Ok(Self { shape, data })
    }

    /// `parts` (one dtype, equal trailing shapes) stacked along the first axis.
    pub fn concat_rows(parts: &[MultiArray]) -> Result<MultiArray> {
        let Some(first) = parts.first() else {
            return Err(Error::InvalidParameter {
                name: "rows",
                value: "none".to_string(),
                expected: "at least one array to concatenate".to_string(),
            });
        };
        let tail = first.shape.get(1..).unwrap_or(&[]).to_vec();
        let mut rows = 0;
        let mut values = Vec::new();
        for part in parts {
            if part.shape.get(1..).unwrap_or(&[]) != tail.as_slice() {
                return Err(Error::InvalidParameter {
                    name: "rows",
                    value: format!("{:?}", part.shape),
                    expected: format!("[_, {tail:?}] as the first part"),
                });
            }
            rows += part.shape.first().copied().unwrap_or(1);
            values.extend(part.to_f32());
        }
        let mut shape = vec![rows];
        shape.extend(tail);
        Ok(Self::from_f32_as(first.dtype(), &shape, &values)?.with_data_of(parts))
    }

    /// f64/i32 parts concatenated exactly rather than through f32.
    fn with_data_of(self, parts: &[MultiArray]) -> MultiArray {
        let data = match self.dtype() {
            ArrayDtype::F64 => ArrayData::F64(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        ArrayData::F64(v) => v.clone(),
                        _ => Vec::new(),
                    })
                    .collect(),
            ),
            ArrayDtype::I32 => ArrayData::I32(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        ArrayData::I32(v) => v.clone(),
                        _ => Vec::new(),
                    })
                    .collect(),
            ),
            _ => return self,
        };
        Self {
            shape: self.shape,
            data,
        }
    }

    /// A safetensors tensor (F16, F32, F64, I32; other dtypes are an error naming `name`).
    pub fn from_safetensors(
        name: &str,
        view: &safetensors::tensor::TensorView<'_>,
    ) -> Result<Self> {
        use safetensors::Dtype;
        let bytes = view.data();
        let shape = view.shape().to_vec();
        let data = match view.dtype() {
            Dtype::F16 => ArrayData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            Dtype::F32 => ArrayData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F64 => ArrayData::F64(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect(),
            ),
            Dtype::I32 => ArrayData::I32(
                bytes
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            other => {
                return Err(Error::Unsupported {
                    what: format!("tensor {name} of dtype {other:?}"),
                    reason: "Core ML multi-arrays are Float16, Float32, Float64 or Int32"
                        .to_string(),
                })
            }
        };
        Self::new(&shape, data)
    }
}

/// Every tensor of a safetensors file, by name.
pub fn read_safetensors(path: &Path) -> Result<std::collections::HashMap<String, MultiArray>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format(path, format!("not a safetensors file: {e}")))?;
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| Ok((name.clone(), MultiArray::from_safetensors(&name, &view)?)))
        .collect()
}

/// One multi-array input or output a model declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureInfo {
    pub name: String,
    pub dtype: ArrayDtype,
    pub shape: Vec<usize>,
}

impl FeatureInfo {
    /// This feature's description of `array`, or why it does not fit (for `model`'s messages).
    pub fn check_shape(&self, model: &str, array: &MultiArray) -> Result<()> {
        if array.shape == self.shape {
            Ok(())
        } else {
            Err(model_error(
                model,
                format!(
                    "input {} has shape {:?}; the model was compiled for {:?}",
                    self.name, array.shape, self.shape
                ),
            ))
        }
    }
}

/// The inputs and outputs of one model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelDescription {
    pub inputs: Vec<FeatureInfo>,
    pub outputs: Vec<FeatureInfo>,
}

impl ModelDescription {
    pub fn input(&self, name: &str) -> Option<&FeatureInfo> {
        self.inputs.iter().find(|f| f.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&FeatureInfo> {
        self.outputs.iter().find(|f| f.name == name)
    }

    /// The description in a model's spec (`.mlpackage`); every feature must be a multi-array of
    /// fixed shape, the only kind Stable Diffusion's models have.
    pub fn from_spec(model: &Model, origin: &Path) -> Result<Self> {
        let description = model
            .description
            .as_ref()
            .ok_or_else(|| format(origin, "the model has no description"))?;
        let read = |features: &[FeatureDescription]| -> Result<Vec<FeatureInfo>> {
            features
                .iter()
                .map(|f| {
                    let array = match f.r#type.as_ref().and_then(|t| t.r#type.as_ref()) {
                        Some(FeatureKind::MultiArrayType(array)) => array,
                        _ => {
                            return Err(Error::Unsupported {
                                what: format!("{}: feature {}", origin.display(), f.name),
                                reason: "only multi-array features are run".to_string(),
                            })
                        }
                    };
                    let dtype = ArrayDtype::from_spec(array.data_type).ok_or_else(|| {
                        Error::Unsupported {
                            what: format!("{}: feature {}", origin.display(), f.name),
                            reason: format!(
                                "array data type {}; accepted: Float16, Float32, Double, Int32",
                                array.data_type
                            ),
                        }
                    })?;
                    let shape = array
                        .shape
                        .iter()
                        .map(|&d| usize::try_from(d))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|_| {
                            format(origin, format!("feature {}: negative dimension", f.name))
                        })?;
                    Ok(FeatureInfo {
                        name: f.name.clone(),
                        dtype,
                        shape,
                    })
                })
                .collect()
        };
        Ok(Self {
            inputs: read(&description.input)?,
            outputs: read(&description.output)?,
        })
    }

    /// The description Core ML's compiler writes into `X.mlmodelc/metadata.json` (a one-element
    /// array with `inputSchema` / `outputSchema`, shapes as strings like `"[1, 77]"`).
    pub fn from_metadata_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format(path, format!("not JSON: {e}")))?;
        let entry = json
            .as_array()
            .and_then(|a| a.first())
            .or(json.as_object().map(|_| &json))
            .ok_or_else(|| format(path, "expected an array of one model entry"))?;
        let read = |key: &str| -> Result<Vec<FeatureInfo>> {
            let schema = entry[key]
                .as_array()
                .ok_or_else(|| format(path, format!("no {key} array")))?;
            schema
                .iter()
                .map(|f| {
                    let name = f["name"]
                        .as_str()
                        .ok_or_else(|| format(path, format!("{key} entry without a name")))?;
                    let kind = f["type"].as_str().unwrap_or("MultiArray");
                    let dtype_name = f["dataType"].as_str().unwrap_or("");
                    let dtype = match (kind, ArrayDtype::from_name(dtype_name)) {
                        ("MultiArray", Some(dtype)) => dtype,
                        _ => {
                            return Err(Error::Unsupported {
                                what: format!("{}: feature {name}", path.display()),
                                reason: format!(
                                    "type {kind} {dtype_name}; accepted: MultiArray of Float16, \
                                     Float32, Float64 or Int32"
                                ),
                            })
                        }
                    };
                    let shape = parse_shape(&f["shape"]).ok_or_else(|| {
                        format(
                            path,
                            format!("feature {name}: shape {} is not [d, ...]", f["shape"]),
                        )
                    })?;
                    Ok(FeatureInfo {
                        name: name.to_string(),
                        dtype,
                        shape,
                    })
                })
                .collect()
        };
        Ok(Self {
            inputs: read("inputSchema")?,
            outputs: read("outputSchema")?,
        })
    }
}

/// `"[1, 77]"` (the compiler's string form) or `[1, 77]`.
fn parse_shape(value: &serde_json::Value) -> Option<Vec<usize>> {
    if let Some(items) = value.as_array() {
        return items
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect();
    }
    let text = value.as_str()?.trim();
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    if inner.trim().is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|d| d.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_and_rows_slice() {
        let a = MultiArray::from_f32(&[2, 2], vec![1.0, 2.5, -3.0, 1e-8]).unwrap();
        let h = a.to_dtype(ArrayDtype::F16);
        assert_eq!(h.dtype(), ArrayDtype::F16);
        assert_eq!(h.to_f32()[..3], [1.0, 2.5, -3.0]);
        assert_eq!(a.rows(1, 1).unwrap().to_f32(), vec![-3.0, 1e-8]);
        let both =
            MultiArray::concat_rows(&[a.rows(1, 1).unwrap(), a.rows(0, 1).unwrap()]).unwrap();
        assert_eq!(both.to_f32(), vec![-3.0, 1e-8, 1.0, 2.5]);
        assert!(MultiArray::from_f32(&[3], vec![1.0]).is_err());
        assert_eq!(
            parse_shape(&serde_json::json!("[2, 4, 16]")),
            Some(vec![2, 4, 16])
        );
    }
}
