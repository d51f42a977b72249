//! MIL constant values: a proto `Value` (inline, or a reference into weight.bin) read into a typed
//! host tensor, and written back. Inline values are stored as coremltools' `helper.py` stores them:
//! fp16, 8-bit, uint32 and sub-byte integers in the `bytes` field, fp32 in `floats`, fp64 in
//! `doubles`, int16/uint16/int32 in `ints`, (u)int64 in `longInts`, bools and strings in their own.

use coreml_proto::proto::mil_spec::{
    dimension, tensor_value, value, value_type, DataType, Dimension, TensorType, TensorValue,
    Value, ValueType,
};
use half::{bf16, f16};

use crate::blob::{BlobDtype, BlobFile};
use crate::error::{Error, Result};

/// A constant's elements, in C order.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Every integer dtype, sub-byte ones unpacked (int4 sign-extended).
    Int(Vec<i64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::F16(v) => v.len(),
            Values::BF16(v) => v.len(),
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::Int(v) => v.len(),
            Values::Bool(v) => v.len(),
            Values::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f32 (numeric values only).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        Some(match self {
            Values::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Values::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Values::F32(v) => v.clone(),
            Values::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Values::Int(v) => v.iter().map(|&x| x as f32).collect(),
            Values::Bool(_) | Values::Str(_) => return None,
        })
    }
}

/// A typed constant: MIL dtype, shape and elements.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub values: Values,
}

impl TensorData {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the value takes as numpy would hold it (sub-byte types one byte per element, as
    /// coremltools' numpy arrays hold them).
    pub fn nbytes(&self) -> usize {
        self.numel() * dtype_itemsize(self.dtype)
    }
}

/// Bits per element of a MIL dtype (0 for strings).
pub fn dtype_bits(dtype: DataType) -> u32 {
    use DataType::*;
    match dtype {
        Bool | Int8 | Uint8 | Float8e4m3fn | Float8e5m2 => 8,
        Float16 | Bfloat16 | Int16 | Uint16 => 16,
        Float32 | Int32 | Uint32 => 32,
        Float64 | Int64 | Uint64 => 64,
        Int4 | Uint4 => 4,
        Uint1 => 1,
        Uint2 => 2,
        Uint3 => 3,
        Uint6 => 6,
        String | UnusedType => 0,
    }
}

/// numpy's item size for the dtype coremltools holds a MIL dtype in (sub-byte types in uint8 or
/// int8 arrays).
pub fn dtype_itemsize(dtype: DataType) -> usize {
    match dtype_bits(dtype) {
        0 => 0,
        b if b < 8 => 1,
        b => (b / 8) as usize,
    }
}

/// The MIL name coremltools prints for a dtype (`fp16`, `uint4`, ...).
pub fn dtype_name(dtype: DataType) -> &'static str {
    use DataType::*;
    match dtype {
        Bool => "bool",
        String => "string",
        Float8e4m3fn => "fp8e4m3fn",
        Float8e5m2 => "fp8e5m2",
        Float16 => "fp16",
        Float32 => "fp32",
        Float64 => "fp64",
        Bfloat16 => "bf16",
        Int8 => "int8",
        Int16 => "int16",
        Int32 => "int32",
        Int64 => "int64",
        Int4 => "int4",
        Uint8 => "uint8",
        Uint16 => "uint16",
        Uint32 => "uint32",
        Uint64 => "uint64",
        Uint4 => "uint4",
        Uint2 => "uint2",
        Uint1 => "uint1",
        Uint6 => "uint6",
        Uint3 => "uint3",
        UnusedType => "unknown",
    }
}

fn is_signed(dtype: DataType) -> bool {
    matches!(
        dtype,
        DataType::Int4 | DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
    )
}

/// The tensor type of a value type: dtype and constant shape. `None` for non-tensors and for
/// shapes with unknown dimensions.
pub fn tensor_type(ty: &ValueType) -> Option<(DataType, Vec<usize>)> {
    let Some(value_type::Type::TensorType(t)) = &ty.r#type else {
        return None;
    };
    let dtype = DataType::try_from(t.data_type).ok()?;
    let mut shape = Vec::with_capacity(t.dimensions.len());
    for d in &t.dimensions {
        match d.dimension {
            Some(dimension::Dimension::Constant(c)) => shape.push(usize::try_from(c.size).ok()?),
            _ => return None,
        }
    }
    Some((dtype, shape))
}

/// A tensor value type of constant shape.
pub fn make_tensor_type(dtype: DataType, shape: &[usize]) -> ValueType {
    ValueType {
        r#type: Some(value_type::Type::TensorType(TensorType {
            data_type: dtype as i32,
            rank: shape.len() as i64,
            dimensions: shape
                .iter()
                .map(|&s| Dimension {
                    dimension: Some(dimension::Dimension::Constant(
                        dimension::ConstantDimension { size: s as u64 },
                    )),
                })
                .collect(),
            attributes: Default::default(),
        })),
    }
}

fn unsupported(what: &str, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// Unpacks `n` elements of `bits` bits each, LSB-first, as MIL packs sub-byte data.
pub fn unpack_bits(bytes: &[u8], bits: u32, n: usize, signed: bool) -> Option<Vec<i64>> {
    if bits == 0 || bits > 8 || (n * bits as usize).div_ceil(8) > bytes.len() {
        return None;
    }
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let bit = i * bits as usize;
        let (byte, shift) = (bit / 8, bit % 8);
        let lo = bytes[byte] as u32;
        let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u32;
        let v = ((lo | (hi << 8)) >> shift) & mask;
        let v = if signed && v & (1 << (bits - 1)) != 0 {
            v as i64 - (1i64 << bits)
        } else {
            v as i64
        };
        out.push(v);
    }
    Some(out)
}

/// Packs values of `bits` bits each LSB-first; returns the bytes and the unused bits at the end.
pub fn pack_bits(values: &[i64], bits: u32) -> (Vec<u8>, u64) {
    let total = values.len() * bits as usize;
    let mut out = vec![0u8; total.div_ceil(8)];
    let mask = (1u32 << bits) - 1;
    for (i, &v) in values.iter().enumerate() {
        let v = (v as u32) & mask;
        let bit = i * bits as usize;
        let (byte, shift) = (bit / 8, bit % 8);
        let wide = v << shift;
        out[byte] |= wide as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (wide >> 8) as u8;
        }
    }
    let padding = (out.len() * 8 - total) as u64;
    (out, padding)
}

/// Decodes `n` elements of `dtype` from little-endian bytes (packed for sub-byte types).
pub fn values_from_bytes(dtype: DataType, bytes: &[u8], n: usize) -> Option<Values> {
    use DataType::*;
    let bits = dtype_bits(dtype);
    if bits < 8 && bits > 0 {
        return unpack_bits(bytes, bits, n, is_signed(dtype)).map(Values::Int);
    }
    let size = (bits / 8) as usize;
    if size == 0 || bytes.len() < n.checked_mul(size)? {
        return None;
    }
    let chunks = bytes[..n * size].chunks_exact(size);
    Some(match dtype {
        Float16 => Values::F16(
            chunks
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        Bfloat16 => Values::BF16(
            chunks
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        Float32 => Values::F32(
            chunks
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Float64 => Values::F64(
            chunks
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        Int8 => Values::Int(chunks.map(|c| c[0] as i8 as i64).collect()),
        Uint8 => Values::Int(chunks.map(|c| c[0] as i64).collect()),
        Bool => Values::Bool(chunks.map(|c| c[0] != 0).collect()),
        Int16 => Values::Int(
            chunks
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
        ),
        Uint16 => Values::Int(
            chunks
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
        ),
        Int32 => Values::Int(
            chunks
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        Uint32 => Values::Int(
            chunks
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        Int64 | Uint64 => Values::Int(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        _ => return None,
    })
}

/// Encodes values as the little-endian bytes of `dtype` (packed for sub-byte types); returns the
/// bytes and the unused bits at the end.
pub fn values_to_bytes(dtype: DataType, values: &Values) -> Option<(Vec<u8>, u64)> {
    use DataType::*;
    let bits = dtype_bits(dtype);
    match values {
        Values::F16(v) if dtype == Float16 => Some((
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            0,
        )),
        Values::BF16(v) if dtype == Bfloat16 => Some((
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            0,
        )),
        Values::F32(v) if dtype == Float32 => {
            Some((v.iter().flat_map(|x| x.to_le_bytes()).collect(), 0))
        }
        Values::F64(v) if dtype == Float64 => {
            Some((v.iter().flat_map(|x| x.to_le_bytes()).collect(), 0))
        }
        Values::Bool(v) if dtype == Bool => Some((v.iter().map(|&b| b as u8).collect(), 0)),
        Values::Int(v) if bits > 0 && bits < 8 => Some(pack_bits(v, bits)),
        Values::Int(v) => {
            let size = (bits / 8) as usize;
            if size == 0
                || !matches!(
                    dtype,
                    Int8 | Uint8 | Int16 | Uint16 | Int32 | Uint32 | Int64 | Uint64
                )
            {
                return None;
            }
            Some((
                v.iter()
                    .flat_map(|x| x.to_le_bytes().into_iter().take(size))
                    .collect(),
                0,
            ))
        }
        _ => None,
    }
}

/// Reads a constant value. `blobs` is the package's weight.bin (needed for blob references).
pub fn read_value(v: &Value, blobs: Option<&BlobFile>) -> Result<TensorData> {
    let ty = v
        .r#type
        .as_ref()
        .ok_or_else(|| unsupported("value", "no type"))?;
    let (dtype, shape) =
        tensor_type(ty).ok_or_else(|| unsupported("value", "not a tensor of constant shape"))?;
    let n: usize = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| unsupported("value", format!("shape {shape:?} overflows")))?;
    match &v.value {
        Some(value::Value::BlobFileValue(b)) => {
            let file = blobs.ok_or_else(|| {
                unsupported(
                    "value",
                    format!("refers to {} but the package has no weights", b.file_name),
                )
            })?;
            let blob = file.blob(b.offset)?;
            if BlobDtype::from_mil(dtype) != Some(blob.dtype) {
                return Err(crate::error::format(
                    file.path(),
                    format!(
                        "blob at offset {} holds {:?}, the program declares {}",
                        b.offset,
                        blob.dtype,
                        dtype_name(dtype)
                    ),
                ));
            }
            let values = values_from_bytes(dtype, blob.data, n).ok_or_else(|| {
                crate::error::format(
                    file.path(),
                    format!(
                        "blob at offset {}: {} bytes for {n} elements of {}",
                        b.offset,
                        blob.data.len(),
                        dtype_name(dtype)
                    ),
                )
            })?;
            Ok(TensorData {
                dtype,
                shape,
                values,
            })
        }
        Some(value::Value::ImmediateValue(iv)) => {
            use coreml_proto::proto::mil_spec::value::immediate_value::Value as Iv;
            let Some(Iv::Tensor(t)) = &iv.value else {
                return Err(unsupported(
                    "value",
                    "an immediate tuple, list or dictionary",
                ));
            };
            let values = immediate_values(dtype, t, n)?;
            if values.len() != n {
                return Err(unsupported(
                    "value",
                    format!("{} elements inline for shape {shape:?} ({n})", values.len()),
                ));
            }
            Ok(TensorData {
                dtype,
                shape,
                values,
            })
        }
        None => Err(unsupported("value", "neither inline nor in weight.bin")),
    }
}

fn immediate_values(dtype: DataType, t: &TensorValue, n: usize) -> Result<Values> {
    use tensor_value::Value as Tv;
    let bad = || {
        unsupported(
            "inline value",
            format!(
                "{} elements stored in an unexpected field",
                dtype_name(dtype)
            ),
        )
    };
    Ok(match &t.value {
        Some(Tv::Bytes(b)) => values_from_bytes(dtype, &b.values, n).ok_or_else(bad)?,
        Some(Tv::Floats(f)) => match dtype {
            DataType::Float32 => Values::F32(f.values.clone()),
            DataType::Float16 => Values::F16(f.values.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => return Err(bad()),
        },
        Some(Tv::Doubles(d)) => Values::F64(d.values.clone()),
        Some(Tv::Ints(i)) => Values::Int(i.values.iter().map(|&x| x as i64).collect()),
        Some(Tv::LongInts(i)) => Values::Int(i.values.clone()),
        Some(Tv::Bools(b)) => Values::Bool(b.values.clone()),
        Some(Tv::Strings(s)) => Values::Str(s.values.clone()),
        None if n == 0 => match dtype {
            DataType::String => Values::Str(vec![]),
            _ => Values::Int(vec![]),
        },
        None => return Err(bad()),
    })
}

/// An inline value, stored as coremltools stores it.
pub fn immediate_value(data: &TensorData) -> Result<Value> {
    use tensor_value::Value as Tv;
    use DataType::*;
    let bad = || {
        unsupported(
            "inline value",
            format!("{} from {:?}", dtype_name(data.dtype), data.values),
        )
    };
    let field = match (data.dtype, &data.values) {
        (Float32, Values::F32(v)) => Tv::Floats(tensor_value::RepeatedFloats { values: v.clone() }),
        (Float64, Values::F64(v)) => {
            Tv::Doubles(tensor_value::RepeatedDoubles { values: v.clone() })
        }
        (Bool, Values::Bool(v)) => Tv::Bools(tensor_value::RepeatedBools { values: v.clone() }),
        (String, Values::Str(v)) => {
            Tv::Strings(tensor_value::RepeatedStrings { values: v.clone() })
        }
        (Int64 | Uint64, Values::Int(v)) => {
            Tv::LongInts(tensor_value::RepeatedLongInts { values: v.clone() })
        }
        (Int16 | Uint16 | Int32, Values::Int(v)) => Tv::Ints(tensor_value::RepeatedInts {
            values: v.iter().map(|&x| x as i32).collect(),
        }),
        (dtype, values) => {
            let (bytes, _) = values_to_bytes(dtype, values).ok_or_else(bad)?;
            Tv::Bytes(tensor_value::RepeatedBytes { values: bytes })
        }
    };
    Ok(Value {
        doc_string: std::string::String::new(),
        r#type: Some(make_tensor_type(data.dtype, &data.shape)),
        value: Some(value::Value::ImmediateValue(value::ImmediateValue {
            value: Some(value::immediate_value::Value::Tensor(TensorValue {
                value: Some(field),
            })),
        })),
    })
}

/// A reference to a blob of weight.bin.
pub fn blob_value(offset: u64, dtype: DataType, shape: &[usize]) -> Value {
    Value {
        doc_string: String::new(),
        r#type: Some(make_tensor_type(dtype, shape)),
        value: Some(value::Value::BlobFileValue(value::BlobFileValue {
            file_name: crate::package::WEIGHT_FILE_REF.to_string(),
            offset,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_byte_values_pack_lsb_first_and_round_trip() {
        // Two 4-bit values 0x1, 0x2 are the byte 0x21.
        assert_eq!(pack_bits(&[1, 2], 4), (vec![0x21], 0));
        for bits in [1u32, 2, 3, 4, 6] {
            let v: Vec<i64> = (0..37).map(|i| (i * 7) % (1 << bits)).collect();
            let (bytes, pad) = pack_bits(&v, bits);
            assert_eq!(bytes.len() * 8 - pad as usize, 37 * bits as usize);
            assert_eq!(unpack_bits(&bytes, bits, 37, false).unwrap(), v);
        }
        // int4 is signed: 0xF is -1.
        assert_eq!(unpack_bits(&[0x8f], 4, 2, true).unwrap(), vec![-1, -8]);
    }

    #[test]
    fn inline_values_round_trip_in_coremltools_fields() {
        let cases = [
            TensorData {
                dtype: DataType::Float16,
                shape: vec![3],
                values: Values::F16(vec![f16::ONE, f16::ZERO, f16::NEG_ONE]),
            },
            TensorData {
                dtype: DataType::Int32,
                shape: vec![2],
                values: Values::Int(vec![-3, 7]),
            },
            TensorData {
                dtype: DataType::Uint4,
                shape: vec![3],
                values: Values::Int(vec![1, 15, 0]),
            },
            TensorData {
                dtype: DataType::Float32,
                shape: vec![],
                values: Values::F32(vec![0.5]),
            },
            TensorData {
                dtype: DataType::String,
                shape: vec![],
                values: Values::Str(vec!["valid".into()]),
            },
        ];
        for c in cases {
            let v = immediate_value(&c).unwrap();
            assert_eq!(read_value(&v, None).unwrap(), c);
        }
    }
}
