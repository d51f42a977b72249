//! The weight seam: a layer's weight is either a dense tensor or a quantized matrix behind
//! [`QuantizedMatrix`], which the CPU GEMM decodes row segment by row segment while it packs
//! its panels, so a compressed weight never exists as a dense copy on the CPU. Other devices ask
//! for the dense tensor ([`QuantizedMatrix::dequantize`]).
//!
//! A new weight format (palettized, int8, GGUF blocks, ...) is one more implementation of the
//! trait, handed to the layers through [`crate::VarBuilder::with_quantized`].

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};
use half::f16;

use crate::gemm::Operand;

/// A weight matrix stored in some compressed form: `rows` output features by `cols` input
/// features (a convolution's `[O, C, kh, kw]` weight is `O x C*kh*kw`).
pub trait QuantizedMatrix: Send + Sync + fmt::Debug {
    /// `(rows, cols)`.
    fn dims(&self) -> (usize, usize);
    /// The dtype the weight computes as (what a dense copy would hold), which also picks the
    /// product kernels (bf16 dot products for bf16).
    fn dtype(&self) -> DType;
    /// The format's name, for messages and `inspect` tables.
    fn format(&self) -> &str;
    /// Bytes the matrix holds in memory.
    fn storage_bytes(&self) -> usize;
    /// Decodes elements `(row, col0 .. col0 + out.len())` as f32: what the CPU GEMM calls while it
    /// packs its panels. `row < rows` and `col0 + out.len() <= cols` (callers check shapes).
    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]);

    /// The whole matrix as a dense `[rows, cols]` tensor of [`Self::dtype`] on `device` (GPUs and
    /// candle's operations). The default decodes row by row.
    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        let mut values = vec![0f32; rows * cols];
        if cols > 0 {
            for (row, out) in values.chunks_exact_mut(cols).enumerate() {
                self.read_row(row, 0, out);
            }
        }
        Tensor::from_vec(values, (rows, cols), device)?.to_dtype(self.dtype())
    }
}

/// A quantized matrix as the GEMM's operand (rows of output features).
pub(crate) struct QuantizedRows<'a>(pub &'a dyn QuantizedMatrix);

impl Operand for QuantizedRows<'_> {
    fn rows(&self) -> usize {
        self.0.dims().0
    }

    fn cols(&self) -> usize {
        self.0.dims().1
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        self.0.read_row(row, col0, out)
    }
}

/// A layer's weight.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    /// A quantized matrix and the layer's shape of it (`[out, in]`, or `[O, C, kh, kw]`).
    Quantized {
        matrix: Arc<dyn QuantizedMatrix>,
        shape: Shape,
    },
}

impl fmt::Debug for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dense(t) => write!(f, "Dense({:?}, {:?})", t.shape(), t.dtype()),
            Self::Quantized { matrix, shape } => {
                write!(f, "Quantized({}, {shape:?})", matrix.format())
            }
        }
    }
}

impl From<Tensor> for Weight {
    fn from(tensor: Tensor) -> Self {
        Self::Dense(tensor)
    }
}

impl Weight {
    /// A quantized weight of the layer shape `shape`, whose product of all but the first
    /// dimension must be the matrix's columns.
    pub fn quantized(matrix: Arc<dyn QuantizedMatrix>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        let (rows, cols) = matrix.dims();
        let dims = shape.dims();
        let fits = dims
            .split_first()
            .is_some_and(|(&r, rest)| r == rows && rest.iter().product::<usize>() == cols);
        if !fits {
            candle_core::bail!(
                "quantized weight: a {rows}x{cols} {} matrix cannot have the layer shape {shape:?}",
                matrix.format()
            );
        }
        Ok(Self::Quantized { matrix, shape })
    }

    pub fn shape(&self) -> &Shape {
        match self {
            Self::Dense(t) => t.shape(),
            Self::Quantized { shape, .. } => shape,
        }
    }

    /// The dtype the weight computes as.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Quantized { matrix, .. } => matrix.dtype(),
        }
    }

    /// The dense tensor (decoded, in the layer's shape, on `device`, for a quantized weight).
    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quantized { matrix, shape } => matrix.dequantize(device)?.reshape(shape),
        }
    }

    /// Bytes the weight holds in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized { matrix, .. } => matrix.storage_bytes(),
        }
    }
}

/// Where a [`crate::VarBuilder`] finds quantized weights: by full tensor name (`a.b.weight`) and
/// the layer's shape of it (a source that quantizes at load decides from the shape, before it
/// reads anything).
pub trait QuantizedSource: Send + Sync {
    /// The quantized matrix for `name`, `None` when that tensor stays dense.
    fn get(&self, name: &str, shape: &Shape) -> Option<Result<Arc<dyn QuantizedMatrix>>>;
}

/// Weights kept as f16 values in memory and widened to f32 while the GEMM packs them: the
/// simplest compressed form (half the bytes of f32), used by tests of the seam and wherever f16
/// storage with f32 products is wanted.
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    values: Vec<f16>,
    rows: usize,
    cols: usize,
}

impl HalfMatrix {
    /// The `[rows, cols, ...]` tensor `weight` (any float dtype) as f16 rows of its first
    /// dimension.
    pub fn from_tensor(weight: &Tensor) -> Result<Self> {
        let rows = weight.dims().first().copied().unwrap_or(1);
        let cols = weight.elem_count() / rows.max(1);
        let values = weight
            .to_dtype(DType::F16)?
            .flatten_all()?
            .to_vec1::<f16>()?;
        Ok(Self { values, rows, cols })
    }
}

impl QuantizedMatrix for HalfMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn format(&self) -> &str {
        "f16"
    }

    fn storage_bytes(&self) -> usize {
        self.values.len() * 2
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let start = row * self.cols + col0;
        let values = &self.values[start..start + out.len()];
        for (o, v) in out.iter_mut().zip(values) {
            *o = v.to_f32();
        }
    }
}

/// A [`QuantizedSource`] that stores every tensor whose name passes `keep` as a [`HalfMatrix`]
/// (from a dense source's tensors): what the seam's tests load models through.
pub struct HalfSource {
    tensors: std::collections::HashMap<String, Arc<dyn QuantizedMatrix>>,
}

impl HalfSource {
    /// Every 2-D and 4-D tensor of `tensors` named `*.weight`, as f16 matrices.
    pub fn from_tensors(tensors: &std::collections::HashMap<String, Tensor>) -> Result<Self> {
        let mut out = std::collections::HashMap::new();
        for (name, tensor) in tensors {
            if name.ends_with(".weight") && matches!(tensor.rank(), 2 | 4) {
                let matrix: Arc<dyn QuantizedMatrix> = Arc::new(HalfMatrix::from_tensor(tensor)?);
                out.insert(name.clone(), matrix);
            }
        }
        Ok(Self { tensors: out })
    }

    /// How many tensors it holds.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

impl QuantizedSource for HalfSource {
    fn get(&self, name: &str, _: &Shape) -> Option<Result<Arc<dyn QuantizedMatrix>>> {
        self.tensors.get(name).cloned().map(Ok)
    }
}
