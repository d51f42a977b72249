//! Loading component weights from a single original-layout checkpoint: the key plan from
//! [`crate::loading::single_file`] carried out on tensors read from the file, giving each
//! component a `VarBuilder` in the diffusers key space.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::loading::single_file::{component_plan, detect_family, CheckpointFamily, Source};
use crate::loading::tensor_files::TensorFiles;

/// An open single-file checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    tensors: TensorFiles,
    keys: Vec<(String, Vec<usize>)>,
    family: CheckpointFamily,
}

impl Checkpoint {
    /// Opens `path` and detects which model it holds from its keys.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "a .safetensors checkpoint".to_string(),
            });
        }
        let tensors =
            TensorFiles::open(&[path.to_path_buf()]).map_err(|source| Error::Weights {
                component: "checkpoint",
                path: path.to_path_buf(),
                source,
            })?;
        let mut keys = tensors.shapes();
        keys.sort();
        let family = detect_family(&keys).map_err(|source| Error::SingleFile {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            keys,
            family,
        })
    }

    pub fn family(&self) -> CheckpointFamily {
        self.family
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The weights of `component` (`unet`, `vae`, `text_encoder`, `text_encoder_2`) under their
    /// diffusers names, shaped by the component's diffusers `config`, in `dtype` on `device`.
    pub fn var_builder(
        &self,
        component: &'static str,
        config: &serde_json::Value,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let plan =
            component_plan(self.family, component, config, &self.keys).map_err(|source| {
                Error::SingleFile {
                    path: self.path.clone(),
                    source,
                }
            })?;
        let mut tensors = HashMap::with_capacity(plan.len());
        for (name, source) in plan {
            let tensor = self.materialize(&source).map_err(|source| Error::Weights {
                component,
                path: self.path.clone(),
                source,
            })?;
            tensors.insert(name, tensor.to_dtype(dtype)?.to_device(device)?);
        }
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }

    fn materialize(&self, source: &Source) -> candle_core::Result<Tensor> {
        let tensor = self.tensors.load(source.key())?;
        match source {
            Source::Rename(_) => Ok(tensor),
            Source::Slice { index, parts, .. } => {
                let rows = tensor.dim(0)? / parts;
                tensor.narrow(0, index * rows, rows)?.contiguous()
            }
            Source::Transpose(_) => tensor.t()?.contiguous(),
            Source::Reshape { shape, .. } => tensor.reshape(shape.as_slice()),
        }
    }
}
