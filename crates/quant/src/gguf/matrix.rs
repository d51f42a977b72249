//! A GGUF tensor as a [`QuantizedMatrix`]: its ggml blocks kept as they are in the file and
//! decoded segment by segment while the CPU GEMM packs its panels.
//!
//! A numpy `[O, I]` weight (or a convolution's `[O, C, kh, kw]`) is `O` rows of `I` (`C*kh*kw`)
//! columns; ggml's rows run along `ne[0]`, the last numpy dimension, so each matrix row is
//! `cols / block_size` consecutive blocks.

use candle_core::DType;
use sdrs_kernels::QuantizedMatrix;

use super::blocks::{decode_blocks, GgmlType, MAX_BLOCK_SIZE};
use super::file::{GgufFile, TensorInfo};
use crate::{Error, Result};

/// A `rows x cols` matrix of ggml blocks.
#[derive(Debug, Clone)]
pub struct GgufMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
    dtype: DType,
}

impl GgufMatrix {
    /// A matrix of `rows` rows of `cols` values encoded as `ty` in `data` (row after row), which
    /// computes as `dtype` (f32, f16 or bf16).
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        dtype: DType,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidParameter {
                name: "dtype",
                value: format!("{dtype:?}"),
                expected: "f32, f16 or bf16".to_string(),
            });
        }
        let row_bytes = ty.bytes_for(cols).ok_or_else(|| Error::InvalidParameter {
            name: "cols",
            value: cols.to_string(),
            expected: format!("a multiple of the {ty} block size {}", ty.block_size()),
        })?;
        let want = rows.checked_mul(row_bytes);
        if want != Some(data.len()) {
            return Err(Error::InvalidParameter {
                name: "data.len()",
                value: data.len().to_string(),
                expected: format!(
                    "{} ({rows} rows of {row_bytes} bytes: {cols} {ty} values each)",
                    want.map_or("too many".to_string(), |n| n.to_string())
                ),
            });
        }
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            dtype,
        })
    }

    /// The tensor `info` of `file` as a matrix: `shape[0]` rows of the product of the other
    /// dimensions.
    pub fn from_file(file: &GgufFile, info: &TensorInfo, dtype: DType) -> Result<Self> {
        let (rows, cols) = match info.shape.split_first() {
            Some((&rows, rest)) if !rest.is_empty() => (rows, rest.iter().product()),
            _ => {
                return Err(Error::Tensor {
                    tensor: info.name.clone(),
                    reason: format!(
                        "shape {:?}: a matrix needs at least 2 dimensions",
                        info.shape
                    ),
                });
            }
        };
        let data = file.read_bytes(info)?;
        Self::new(info.ggml_type, rows, cols, data, dtype).map_err(|e| Error::Tensor {
            tensor: info.name.clone(),
            reason: e.to_string(),
        })
    }

    /// Rows `start .. start + count` as their own matrix (a fused q/k/v weight split by rows).
    pub fn slice_rows(&self, start: usize, count: usize) -> Result<GgufMatrix> {
        let end = start.checked_add(count).filter(|&end| end <= self.rows);
        let Some(end) = end else {
            return Err(Error::InvalidParameter {
                name: "rows",
                value: format!("{start}..{start}+{count}"),
                expected: format!("a range inside the matrix's {} rows", self.rows),
            });
        };
        Ok(Self {
            data: self.data[start * self.row_bytes..end * self.row_bytes].to_vec(),
            rows: count,
            ..*self
        })
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// The blocks, row after row.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl QuantizedMatrix for GgufMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn format(&self) -> &str {
        self.ty.name()
    }

    fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let inside = row < self.rows && col0.checked_add(out.len()).is_some_and(|e| e <= self.cols);
        if !inside {
            // The caller broke the trait's contract; NaNs make that visible downstream.
            out.fill(f32::NAN);
            return;
        }
        let bs = self.ty.block_size();
        let ts = self.ty.type_size();
        let row_data = &self.data[row * self.row_bytes..(row + 1) * self.row_bytes];
        let mut block = col0 / bs;
        let mut out = out;

        // A partial first block: decoded on the stack, its wanted part copied.
        let skip = col0 % bs;
        if skip != 0 {
            let mut buf = [0f32; MAX_BLOCK_SIZE];
            decode_blocks(
                self.ty,
                &row_data[block * ts..(block + 1) * ts],
                &mut buf[..bs],
            );
            let n = (bs - skip).min(out.len());
            out[..n].copy_from_slice(&buf[skip..skip + n]);
            out = &mut out[n..];
            block += 1;
        }

        // Whole blocks straight into `out`.
        let whole = out.len() / bs;
        let (head, tail) = out.split_at_mut(whole * bs);
        decode_blocks(self.ty, &row_data[block * ts..(block + whole) * ts], head);
        block += whole;

        // A partial last block.
        if !tail.is_empty() {
            let mut buf = [0f32; MAX_BLOCK_SIZE];
            decode_blocks(
                self.ty,
                &row_data[block * ts..(block + 1) * ts],
                &mut buf[..bs],
            );
            let n = tail.len();
            tail.copy_from_slice(&buf[..n]);
        }
    }
}
