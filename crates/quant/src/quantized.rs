//! [`Quantized`]: every matrix type of this crate behind one enum, so that loaders and writers can
//! tell them apart (the kernels only see the [`QuantizedMatrix`] trait).

use candle_core::DType;
use sdrs_kernels::QuantizedMatrix;

use crate::gguf::GgufMatrix;
use crate::linear::{Int4BlockMatrix, Int8Matrix};
use crate::palette::PalettizedMatrix;

/// A quantized weight matrix of any of this crate's formats.
#[derive(Debug)]
pub enum Quantized {
    Palette(PalettizedMatrix),
    Int8(Int8Matrix),
    Int4(Int4BlockMatrix),
    Gguf(GgufMatrix),
}

impl Quantized {
    fn inner(&self) -> &dyn QuantizedMatrix {
        match self {
            Self::Palette(m) => m,
            Self::Int8(m) => m,
            Self::Int4(m) => m,
            Self::Gguf(m) => m,
        }
    }
}

impl QuantizedMatrix for Quantized {
    fn dims(&self) -> (usize, usize) {
        self.inner().dims()
    }

    fn dtype(&self) -> DType {
        self.inner().dtype()
    }

    fn format(&self) -> &str {
        self.inner().format()
    }

    fn storage_bytes(&self) -> usize {
        self.inner().storage_bytes()
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        self.inner().read_row(row, col0, out)
    }
}
