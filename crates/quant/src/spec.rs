//! What `--quantize` and `sdrs quantize` ask for, as one [`QuantSpec`]: parsed from the names users
//! type (`kmeans6`, `kmeans4:grouped16`, `int8`, `int8:zp`, `int4:block32`, `q8_0`, ...), which
//! weights it applies to, and the quantization of one weight tensor into a [`Quantized`] matrix.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::linear::LinearMode;
use crate::quantized::Quantized;

/// The bit widths k-means palettization accepts.
pub const KMEANS_BITS: [u32; 6] = [1, 2, 3, 4, 6, 8];

/// Weights with fewer elements stay dense (coremltools' `weight_threshold` default: small
/// tensors save nothing worth their lookup tables).
pub const MIN_ELEMENTS: usize = 2048;

/// The GGUF block formats `--quantize` and `sdrs quantize --format gguf` can write.
pub const GGUF_TYPES: [GgmlType; 10] = [
    GgmlType::Q8_0,
    GgmlType::Q5_1,
    GgmlType::Q5_0,
    GgmlType::Q4_1,
    GgmlType::Q4_0,
    GgmlType::Q6K,
    GgmlType::Q5K,
    GgmlType::Q4K,
    GgmlType::Q3K,
    GgmlType::Q2K,
];

/// One quantization method and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantSpec {
    /// k-means palettization: a lookup table of `2^bits` f16 values per tensor (`group: None`) or
    /// per `group` output channels, each weight an index.
    Kmeans { bits: u32, group: Option<usize> },
    /// Linear int8 per output channel: symmetric, or with a zero point.
    Int8 { zero_point: bool },
    /// Linear int4 per block of `block` input features, symmetric.
    Int4 { block: usize },
    /// A GGUF block format, on the tensors stable-diffusion.cpp's converter quantizes.
    Gguf(GgmlType),
}

impl QuantSpec {
    /// Whether a weight of `shape` is quantized by this spec (else it stays dense): matrices and
    /// convolution kernels of at least [`MIN_ELEMENTS`]; for GGUF, as sd.cpp decides it, those
    /// whose last dimension is a whole number of blocks.
    pub fn applies_to(&self, shape: &[usize]) -> bool {
        let elements: usize = shape.iter().product();
        let matrix = matches!(shape.len(), 2 | 4) && elements >= MIN_ELEMENTS;
        match self {
            Self::Kmeans { group, .. } => {
                matrix
                    && group
                        .is_none_or(|g| shape.first().is_some_and(|&rows| rows.is_multiple_of(g)))
            }
            Self::Int8 { .. } => matrix,
            Self::Int4 { block } => {
                let cols = elements / shape.first().copied().unwrap_or(1).max(1);
                matrix && cols.is_multiple_of(*block)
            }
            Self::Gguf(ty) => {
                matches!(shape.len(), 2 | 4)
                    && shape
                        .last()
                        .is_some_and(|&d| d.is_multiple_of(ty.block_size()))
            }
        }
    }

    /// The same method at another bit width (a recipe's per-layer choice), where it has one.
    pub fn with_bits(&self, bits: u32) -> Result<Self> {
        match self {
            Self::Kmeans { group, .. } => {
                check_kmeans_bits(bits)?;
                Ok(Self::Kmeans {
                    bits,
                    group: *group,
                })
            }
            _ => Err(Error::InvalidParameter {
                name: "recipe",
                value: self.to_string(),
                expected: "a kmeans method (recipes choose palettization bits per layer)"
                    .to_string(),
            }),
        }
    }

    /// Quantizes `weight` (`[rows, ...]`, any float dtype), which computes as `dtype`. `name`
    /// is for messages.
    pub fn quantize(&self, name: &str, weight: &Tensor, dtype: DType) -> Result<Quantized> {
        let dims = weight.dims();
        let rows = dims.first().copied().unwrap_or(1);
        let cols = weight.elem_count() / rows.max(1);
        let tensor_error = |reason: String| Error::Tensor {
            tensor: name.to_string(),
            reason,
        };
        if !self.applies_to(dims) {
            return Err(tensor_error(format!(
                "{self} does not apply to a tensor of shape {dims:?}"
            )));
        }
        let flat = weight.flatten_all()?;
        Ok(match *self {
            Self::Kmeans { bits, group } => {
                let values = flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
                Quantized::Palette(crate::palette::PalettizedMatrix::kmeans(
                    &values, rows, cols, bits, group, dtype,
                )?)
            }
            Self::Int8 { zero_point } => {
                let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let mode = if zero_point {
                    LinearMode::Affine
                } else {
                    LinearMode::Symmetric
                };
                Quantized::Int8(crate::linear::Int8Matrix::quantize_f32(
                    &values, rows, cols, mode, dtype,
                )?)
            }
            Self::Int4 { block } => {
                let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                Quantized::Int4(crate::linear::Int4BlockMatrix::quantize_f32(
                    &values,
                    rows,
                    cols,
                    block,
                    LinearMode::Symmetric,
                    dtype,
                )?)
            }
            Self::Gguf(ty) => {
                let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let mut data = Vec::new();
                crate::gguf::quantize(ty, &values, &mut data)?;
                Quantized::Gguf(crate::gguf::GgufMatrix::new(ty, rows, cols, data, dtype)?)
            }
        })
    }
}

fn check_kmeans_bits(bits: u32) -> Result<()> {
    if KMEANS_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name: "bits",
            value: bits.to_string(),
            expected: format!("one of {KMEANS_BITS:?}"),
        })
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kmeans { bits, group: None } => write!(f, "kmeans{bits}"),
            Self::Kmeans {
                bits,
                group: Some(g),
            } => write!(f, "kmeans{bits}:grouped{g}"),
            Self::Int8 { zero_point: false } => write!(f, "int8"),
            Self::Int8 { zero_point: true } => write!(f, "int8:zp"),
            Self::Int4 { block } => write!(f, "int4:block{block}"),
            Self::Gguf(ty) => write!(f, "{}", ty.name()),
        }
    }
}

/// What the accepted spellings are, for error messages.
pub fn accepted_specs() -> String {
    let gguf: Vec<&str> = GGUF_TYPES.iter().map(|t| t.name()).collect();
    format!(
        "kmeans<bits> (bits {KMEANS_BITS:?}) with an optional :grouped<G> or :per-tensor, \
         int8, int8:zp, int4 or int4:block<B>, or a GGUF type ({})",
        gguf.join(", ")
    )
}

impl FromStr for QuantSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::InvalidParameter {
            name: "quantization",
            value: format!("{text:?}"),
            expected: accepted_specs(),
        };
        let lower = text.trim().to_ascii_lowercase();
        let (method, option) = match lower.split_once(':') {
            Some((m, o)) => (m, Some(o)),
            None => (lower.as_str(), None),
        };
        let number = |digits: &str| -> Result<usize> {
            digits
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0 && n <= 1 << 20)
                .ok_or_else(bad)
        };
        if let Some(bits) = method.strip_prefix("kmeans") {
            let bits = u32::try_from(number(bits)?).map_err(|_| bad())?;
            check_kmeans_bits(bits)?;
            let group = match option {
                None | Some("per-tensor") => None,
                Some(o) => Some(number(o.strip_prefix("grouped").ok_or_else(bad)?)?),
            };
            return Ok(Self::Kmeans { bits, group });
        }
        match (method, option) {
            ("int8", None) => Ok(Self::Int8 { zero_point: false }),
            ("int8", Some("zp")) => Ok(Self::Int8 { zero_point: true }),
            ("int4", None) => Ok(Self::Int4 { block: 32 }),
            ("int4", Some(o)) => Ok(Self::Int4 {
                block: number(o.strip_prefix("block").ok_or_else(bad)?)?,
            }),
            (name, None) => GGUF_TYPES
                .iter()
                .find(|t| t.name() == name)
                .map(|&t| Self::Gguf(t))
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_and_prints_back() {
        for text in [
            "kmeans6",
            "kmeans4:grouped16",
            "kmeans1",
            "kmeans3",
            "kmeans8",
            "int8",
            "int8:zp",
            "int4:block32",
            "int4:block64",
            "q8_0",
            "q4_0",
            "q4_k",
        ] {
            let spec: QuantSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!(
            "kmeans6:per-tensor".parse::<QuantSpec>().unwrap(),
            QuantSpec::Kmeans {
                bits: 6,
                group: None
            }
        );
        assert_eq!(
            "int4".parse::<QuantSpec>().unwrap(),
            QuantSpec::Int4 { block: 32 }
        );
    }

    #[test]
    fn bad_spellings_name_the_value_and_what_is_accepted() {
        for text in [
            "kmeans5",
            "kmeans",
            "kmeans6:grouped0",
            "kmeans6:grouped",
            "int16",
            "int4:block0",
            "q9_0",
            "iq4_nl",
            "",
            "kmeans99999999999999999999",
        ] {
            let message = text.parse::<QuantSpec>().unwrap_err().to_string();
            assert!(message.contains("expected"), "{text}: {message}");
        }
        let message = "q9_0".parse::<QuantSpec>().unwrap_err().to_string();
        assert!(
            message.contains("\"q9_0\"") && message.contains("q8_0"),
            "{message}"
        );
    }

    #[test]
    fn gguf_follows_the_converter_rule_and_kmeans_skips_small_tensors() {
        let q8 = QuantSpec::Gguf(GgmlType::Q8_0);
        assert!(q8.applies_to(&[320, 768]));
        assert!(!q8.applies_to(&[320, 320, 3, 3]), "3x3 kernels stay f16");
        assert!(!q8.applies_to(&[320, 320, 1, 1]));
        assert!(!q8.applies_to(&[320]));
        let k6: QuantSpec = "kmeans6".parse().unwrap();
        assert!(k6.applies_to(&[320, 320, 3, 3]));
        assert!(!k6.applies_to(&[32, 32]), "1024 elements stay dense");
        assert!(!k6.applies_to(&[4096]));
        let grouped: QuantSpec = "kmeans4:grouped16".parse().unwrap();
        assert!(grouped.applies_to(&[320, 768]));
        assert!(!grouped.applies_to(&[328 + 1, 768]));
        let int4: QuantSpec = "int4:block32".parse().unwrap();
        assert!(int4.applies_to(&[64, 64]) && !int4.applies_to(&[64, 100]));
    }
}
