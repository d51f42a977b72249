//! The `VarBuilder` the models are built from: candle's, plus the pipeline's [`KernelOptions`]
//! (attention mode, CPU level) that every layer keeps, and an optional [`QuantizedSource`] whose
//! tensors become [`Weight::Quantized`] layer weights. Checkpoint key paths work as in candle
//! (`vb.pp("down_blocks").pp(0)`), so model code reads the same.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};

use crate::dispatch::KernelOptions;
use crate::weight::{QuantizedSource, Weight};

/// candle's `VarBuilder` with the kernel options and quantized weights of one pipeline.
#[derive(Clone)]
pub struct VarBuilder<'a> {
    inner: candle_nn::VarBuilder<'a>,
    options: KernelOptions,
    quantized: Option<Arc<dyn QuantizedSource>>,
}

impl<'a> VarBuilder<'a> {
    pub fn new(inner: candle_nn::VarBuilder<'a>, options: KernelOptions) -> Self {
        Self {
            inner,
            options,
            quantized: None,
        }
    }

    /// Layer weights found in `source` are taken from it (quantized), the rest from the dense
    /// builder.
    pub fn with_quantized(mut self, source: Arc<dyn QuantizedSource>) -> Self {
        self.quantized = Some(source);
        self
    }

    /// The builder for the sub-module `name` (a checkpoint key segment).
    pub fn pp<S: ToString>(&self, name: S) -> Self {
        Self {
            inner: self.inner.pp(name),
            options: self.options,
            quantized: self.quantized.clone(),
        }
    }

    /// A dense tensor of `shape` under `name`.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.inner.get(shape, name)
    }

    /// A layer weight of `shape` under `name`: quantized when the quantized source has it (its
    /// shape checked against `shape`), else the dense tensor.
    pub fn get_weight<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Weight> {
        let shape = shape.into();
        if let Some(source) = &self.quantized {
            let full = self.path(name);
            if let Some(matrix) = source.get(&full, &shape) {
                let weight = Weight::quantized(matrix?, shape)
                    .map_err(|e| e.context(format!("tensor {full}")))?;
                // Only the CPU kernels decode while they pack; a GPU layer gets the dense
                // weight, decoded once here (it computes with candle's operations).
                return match self.device() {
                    Device::Cpu => Ok(weight),
                    device => Ok(Weight::Dense(weight.dense(device)?)),
                };
            }
        }
        Ok(Weight::Dense(self.inner.get(shape, name)?))
    }

    /// A dense tensor under `name` whatever its shape (for layouts read from the weights).
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        self.inner.get_unchecked(name)
    }

    /// The key path of this builder (`down_blocks.0`).
    pub fn prefix(&self) -> String {
        self.inner.prefix()
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }

    pub fn device(&self) -> &Device {
        self.inner.device()
    }

    pub fn dtype(&self) -> DType {
        self.inner.dtype()
    }

    /// The kernel options the layers built from here keep.
    pub fn options(&self) -> KernelOptions {
        self.options
    }

    /// candle's builder, for candle-nn layers (embeddings) that take it.
    pub fn candle(&self) -> &candle_nn::VarBuilder<'a> {
        &self.inner
    }

    /// The full tensor name of `name` under this builder's prefix.
    fn path(&self, name: &str) -> String {
        let prefix = self.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }
}

/// A builder with the default options (`auto` attention, the CPU's best level).
impl<'a> From<candle_nn::VarBuilder<'a>> for VarBuilder<'a> {
    fn from(inner: candle_nn::VarBuilder<'a>) -> Self {
        Self::new(inner, KernelOptions::default())
    }
}
