//! Finding a component's `.safetensors` weights in a diffusers folder and opening them as a
//! `VarBuilder` of the compute dtype (with the quantized layers of a folder `sdrs quantize`
//! wrote), with errors that name the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdrs_kernels::weight::QuantizedSource;
use sdrs_kernels::QuantizedMatrix;
use sdrs_quant::Quantized;

use crate::error::{Error, Result};
use crate::loading::tensor_files::{with_shape, TensorFiles};

/// The file stems diffusers (`diffusion_pytorch_model`) and transformers (`model`) save weights under.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// The weight files of one component folder: a single file, or the shards an index names.
///
/// `variant` (e.g. `fp16`) is tried first when given; the plain files are the fallback, and the
/// other way round a folder that only has the variant files is still loaded.
pub fn find_weights(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut candidates = Vec::new();
    let variants: Vec<Option<&str>> = match variant {
        Some(v) => vec![Some(v), None],
        None => vec![None, Some("fp16")],
    };
    for variant in variants {
        for stem in STEMS {
            let base = match variant {
                Some(v) => format!("{stem}.{v}.safetensors"),
                None => format!("{stem}.safetensors"),
            };
            candidates.push(base.clone());
            let single = dir.join(&base);
            if single.is_file() {
                return Ok(vec![single]);
            }
            check_not_unreadable(&single)?;
            let index = dir.join(format!("{base}.index.json"));
            if index.is_file() {
                return shards_from_index(&index);
            }
        }
    }
    Err(Error::MissingWeights {
        dir: dir.to_path_buf(),
        looked_for: candidates.join(", "),
    })
}

/// Refuses a weights path that is there but is no readable file (a folder, a symlink loop, a
/// dangling link), which would otherwise read as "no weights in the folder".
fn check_not_unreadable(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("it is a folder, not a weights file"),
        }),
        Ok(_) => Ok(()),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The distinct shard files a `*.safetensors.index.json` maps tensors to, in a stable order.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let value = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::MissingWeights {
            dir: dir.to_path_buf(),
            looked_for: format!("the shards listed in {}", index.display()),
        });
    }
    for file in &files {
        if !file.is_file() {
            return Err(Error::MissingFile {
                path: file.clone(),
                what: format!("a shard listed in {}", index.display()),
            });
        }
    }
    Ok(files)
}

/// Opens `files` as one `VarBuilder` whose tensors come out in `dtype` on `device` (read one by
/// one when the model asks for them; see [`crate::loading::tensor_files`]), and, when the files
/// hold quantized tensors (`sdrs quantize`), the source of those layers, which stay compressed.
pub fn var_builder(
    component: &'static str,
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, Option<Arc<dyn QuantizedSource>>)> {
    let first = files.first().cloned().unwrap_or_default();
    let weights_error = |source: candle_core::Error| Error::Weights {
        component,
        path: first.clone(),
        source,
    };
    let tensors = TensorFiles::open(files).map_err(weights_error)?;
    let entries = sdrs_quant::format::read_entries(tensors.metadata())
        .map_err(|e| weights_error(candle_core::Error::Msg(e.to_string())))?;
    if entries.is_empty() {
        let vb = VarBuilder::from_backend(Box::new(tensors), dtype, device.clone());
        return Ok((vb, None));
    }
    let stored = Arc::new(StoredQuantized {
        tensors,
        entries,
        dtype,
    });
    let vb = VarBuilder::from_backend(
        Box::new(StoredBackend(stored.clone())),
        dtype,
        device.clone(),
    );
    Ok((vb, Some(stored)))
}

/// A folder's weight files with quantized tensors stored as parts ([`sdrs_quant::format`]):
/// layer weights come out as quantized matrices; anything else asks for a tensor densely (an
/// embedding table), which decodes it.
struct StoredQuantized {
    tensors: TensorFiles,
    entries: HashMap<String, serde_json::Value>,
    dtype: DType,
}

impl StoredQuantized {
    fn matrix(&self, name: &str, entry: &serde_json::Value) -> candle_core::Result<Quantized> {
        let load = |part: &str| self.tensors.load(part);
        sdrs_quant::format::from_parts(name, entry, &load, self.dtype)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl QuantizedSource for StoredQuantized {
    fn get(&self, name: &str, _: &Shape) -> Option<candle_core::Result<Arc<dyn QuantizedMatrix>>> {
        let entry = self.entries.get(name)?;
        Some(
            self.matrix(name, entry)
                .map(|m| Arc::new(m) as Arc<dyn QuantizedMatrix>),
        )
    }
}

/// [`StoredQuantized`] as the dense builder's backend.
struct StoredBackend(Arc<StoredQuantized>);

impl SimpleBackend for StoredBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.0.entries.contains_key(name) {
            return with_shape(name, self.get_unchecked(name, dtype, device)?, shape);
        }
        self.0.tensors.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.0.entries.get(name) {
            Some(entry) => {
                let shape = sdrs_quant::format::entry_shape(name, entry)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                self.0
                    .matrix(name, entry)?
                    .dequantize(device)?
                    .reshape(shape)?
                    .to_dtype(dtype)
            }
            None => self.0.tensors.get_unchecked(name, dtype, device),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.entries.contains_key(name) || self.0.tensors.contains(name)
    }
}

/// Reads and parses a JSON file; Python's `Infinity`/`NaN` literals (which diffusers writes) are accepted.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path)?;
    sdrs_schedulers::parse_config_json(&text).map_err(|_| {
        // Re-parse strictly only to get serde's line/column message for the error.
        match serde_json::from_str::<serde_json::Value>(&text) {
            Err(source) => Error::Json {
                path: path.to_path_buf(),
                source,
            },
            Ok(_) => Error::MissingFile {
                path: path.to_path_buf(),
                what: "a JSON object".to_string(),
            },
        }
    })
}

/// Reads a text file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                what: "not found".to_string(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plain_then_variant_then_sharded_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        assert!(matches!(
            find_weights(&dir, None),
            Err(Error::MissingWeights { .. })
        ));
        std::fs::write(dir.join("model.fp16.safetensors"), b"x").unwrap();
        assert_eq!(
            find_weights(&dir, None).unwrap(),
            vec![dir.join("model.fp16.safetensors")]
        );
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), b"x").unwrap();
        assert_eq!(
            find_weights(&dir, None).unwrap(),
            vec![dir.join("diffusion_pytorch_model.safetensors")]
        );
        assert_eq!(
            find_weights(&dir, Some("fp16")).unwrap(),
            vec![dir.join("model.fp16.safetensors")]
        );
    }

    #[test]
    fn sharded_index_lists_each_shard_once_and_checks_they_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-1.safetensors"}}"#,
        )
        .unwrap();
        let err = find_weights(&dir, None).unwrap_err().to_string();
        assert!(err.contains("m-1.safetensors"), "{err}");
        std::fs::write(dir.join("m-1.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("m-2.safetensors"), b"x").unwrap();
        let files = find_weights(&dir, None).unwrap();
        assert_eq!(
            files,
            vec![dir.join("m-1.safetensors"), dir.join("m-2.safetensors")]
        );
    }
}
