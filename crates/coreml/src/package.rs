//! `.mlpackage` folders: `Manifest.json`, `Data/com.apple.CoreML/model.mlmodel` (the
//! `CoreML.Specification.Model` protobuf) and `Data/com.apple.CoreML/weights/weight.bin`, read and
//! written. A package is written into a temporary folder beside its destination and renamed into
//! place, so an interrupted write leaves no half package.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use coreml_proto::proto::mil_spec::{value, DataType, Program, Value};
use coreml_proto::proto::{model, Model};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::blob::{BlobDtype, BlobFile, BlobWriter};
use crate::error::{format, io, Error, Result};
use crate::program::for_each_value_mut;
use crate::value::{blob_value, dtype_name, read_value, tensor_type, values_to_bytes};

/// How a program names its weight file.
pub const WEIGHT_FILE_REF: &str = "@model_path/weights/weight.bin";
const MODEL_PATH: &str = "com.apple.CoreML/model.mlmodel";
const WEIGHTS_PATH: &str = "com.apple.CoreML/weights";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub file_format_version: String,
    pub item_info_entries: BTreeMap<String, ItemInfo>,
    pub root_model_identifier: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemInfo {
    pub author: String,
    pub description: String,
    pub name: String,
    pub path: String,
}

/// An opened package: its model protobuf and its weight file.
pub struct MlPackage {
    pub path: PathBuf,
    pub model: Model,
    pub weights: Option<BlobFile>,
}

impl MlPackage {
    pub fn open(path: &Path) -> Result<Self> {
        let (model, model_path) = Self::read_spec(path)?;
        let data = path.join("Data");
        let weights_path = model_path
            .parent()
            .map(|p| p.join("weights").join("weight.bin"))
            .unwrap_or_else(|| data.join(WEIGHTS_PATH).join("weight.bin"));
        let weights = if weights_path.is_file() {
            Some(BlobFile::open(&weights_path)?)
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            model,
            weights,
        })
    }

    /// The package's model protobuf alone (its description, its program), without reading the
    /// weight file, and the path it was read from.
    pub fn read_spec(path: &Path) -> Result<(Model, PathBuf)> {
        if !path.is_dir() {
            return Err(format(
                path,
                "not an .mlpackage folder (expected a folder with Manifest.json)",
            ));
        }
        let manifest_path = path.join("Manifest.json");
        let text = std::fs::read_to_string(&manifest_path).map_err(io(&manifest_path))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| format(&manifest_path, format!("not a package manifest: {e}")))?;
        let root = manifest
            .item_info_entries
            .get(&manifest.root_model_identifier)
            .ok_or_else(|| {
                format(
                    &manifest_path,
                    format!(
                        "rootModelIdentifier {} names no item of itemInfoEntries",
                        manifest.root_model_identifier
                    ),
                )
            })?;
        let data = path.join("Data");
        let model_path = data.join(&root.path);
        if !model_path.starts_with(&data) || root.path.contains("..") {
            return Err(format(
                &manifest_path,
                format!("root model path {} leaves the package", root.path),
            ));
        }
        let bytes = std::fs::read(&model_path).map_err(io(&model_path))?;
        let model = Model::decode(bytes.as_slice())
            .map_err(|e| format(&model_path, format!("not a Core ML model protobuf: {e}")))?;
        Ok((model, model_path))
    }

    /// The ML program, or an error for other model types (neural networks, pipelines).
    pub fn program(&self) -> Result<&Program> {
        program_of(&self.model).ok_or_else(|| {
            format(
                &self.path,
                format!(
                    "not an ML program (model type {})",
                    model_type_name(&self.model)
                ),
            )
        })
    }

    /// Bytes of the package's files (manifest, model and weights).
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.path)
    }
}

pub fn program_of(m: &Model) -> Option<&Program> {
    match &m.r#type {
        Some(model::Type::MlProgram(p)) => Some(p),
        _ => None,
    }
}

pub fn program_of_mut(m: &mut Model) -> Option<&mut Program> {
    match &mut m.r#type {
        Some(model::Type::MlProgram(p)) => Some(p),
        _ => None,
    }
}

/// A short name of the model's type for messages and `inspect`.
pub fn model_type_name(m: &Model) -> &'static str {
    match &m.r#type {
        Some(model::Type::MlProgram(_)) => "mlProgram",
        Some(model::Type::NeuralNetwork(_)) => "neuralNetwork",
        Some(model::Type::Pipeline(_)) => "pipeline",
        Some(_) => "other",
        None => "none",
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Writes a new package: blobs first (through [`PackageWriter::blobs`]), then the model.
pub struct PackageWriter {
    dest: PathBuf,
    tmp: tempfile::TempDir,
    blobs: BlobWriter,
}

impl PackageWriter {
    /// Starts a package that will be `dest` once finished. `dest` may exist only as a package
    /// (it is replaced then).
    pub fn create(dest: &Path) -> Result<Self> {
        if dest.exists() && !dest.join("Manifest.json").is_file() {
            return Err(Error::InvalidParameter {
                name: "output",
                value: dest.display().to_string(),
                expected: "a new path, or an existing .mlpackage to replace".into(),
            });
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let tmp = tempfile::Builder::new()
            .prefix(".sdrs-")
            .suffix(".mlpackage.tmp")
            .tempdir_in(&parent)
            .map_err(io(&parent))?;
        let weights_dir = tmp.path().join("Data").join(WEIGHTS_PATH);
        std::fs::create_dir_all(&weights_dir).map_err(io(&weights_dir))?;
        let blobs = BlobWriter::create(&weights_dir.join("weight.bin"))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            tmp,
            blobs,
        })
    }

    pub fn blobs(&mut self) -> &mut BlobWriter {
        &mut self.blobs
    }

    /// Writes model.mlmodel and Manifest.json and moves the package into place.
    pub fn finish(self, model: &Model) -> Result<PathBuf> {
        let Self { dest, tmp, blobs } = self;
        blobs.finish()?;
        let model_path = tmp.path().join("Data").join(MODEL_PATH);
        std::fs::write(&model_path, model.encode_to_vec()).map_err(io(&model_path))?;
        let manifest = new_manifest();
        let manifest_path = tmp.path().join("Manifest.json");
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Unsupported {
            what: "Manifest.json".into(),
            reason: e.to_string(),
        })?;
        std::fs::write(&manifest_path, text).map_err(io(&manifest_path))?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        let tmp_path = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp_path, &dest) {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(io(&dest)(e));
        }
        Ok(dest)
    }
}

/// Whether coremltools (`backend/mil/load.py::should_use_weight_file`) keeps a constant in
/// weight.bin rather than inline: at least 10 elements of fp16, fp32, uint8 or int8 (sub-byte types
/// are uint8/int8 arrays there), and from specification 9 (iOS18) also 16- and 32-bit integers.
pub fn uses_weight_file(dtype: DataType, numel: usize, specification_version: i32) -> bool {
    use DataType::*;
    let base = matches!(
        dtype,
        Float16 | Float32 | Uint8 | Int8 | Int4 | Uint1 | Uint2 | Uint3 | Uint4 | Uint6
    );
    let ios18 = specification_version >= 9 && matches!(dtype, Uint16 | Int16 | Int32 | Uint32);
    numel >= 10 && (base || ios18)
}

/// Writes `model` as the package `dest`: every constant its program refers to in `src` (the
/// weight file of the package it came from) is copied into the new weight.bin, and every inline
/// constant coremltools would keep in weight.bin ([`uses_weight_file`]) is moved there.
pub fn write_package(model: &mut Model, src: Option<&BlobFile>, dest: &Path) -> Result<PathBuf> {
    let spec = model.specification_version;
    let mut writer = PackageWriter::create(dest)?;
    {
        let program = program_of_mut(model).ok_or_else(|| Error::Unsupported {
            what: "model".into(),
            reason: "only ML programs can be written".into(),
        })?;
        let mut copied: HashMap<u64, u64> = HashMap::new();
        let mut visit = |v: &mut Value| -> Result<()> {
            match &v.value {
                Some(value::Value::BlobFileValue(b)) => {
                    let offset = b.offset;
                    let new = match copied.get(&offset) {
                        Some(&n) => n,
                        None => {
                            let file = src.ok_or_else(|| Error::Unsupported {
                                what: "model".into(),
                                reason: format!(
                                    "refers to weight.bin offset {offset} but no weights were given"
                                ),
                            })?;
                            let blob = file.blob(offset)?;
                            let n = writer
                                .blobs()
                                .add(blob.dtype, blob.data, blob.padding_bits)?;
                            copied.insert(offset, n);
                            n
                        }
                    };
                    if let Some(value::Value::BlobFileValue(b)) = &mut v.value {
                        b.offset = new;
                        b.file_name = WEIGHT_FILE_REF.to_string();
                    }
                }
                Some(value::Value::ImmediateValue(_)) => {
                    let Some((dtype, shape)) = v.r#type.as_ref().and_then(tensor_type) else {
                        return Ok(());
                    };
                    let numel: usize = shape.iter().product();
                    if !uses_weight_file(dtype, numel, spec) {
                        return Ok(());
                    }
                    let data = read_value(v, None)?;
                    let blob_dtype =
                        BlobDtype::from_mil(dtype).ok_or_else(|| Error::Unsupported {
                            what: "constant".into(),
                            reason: format!("{} in weight.bin", dtype_name(dtype)),
                        })?;
                    let (bytes, padding) =
                        values_to_bytes(dtype, &data.values).ok_or_else(|| Error::Unsupported {
                            what: "constant".into(),
                            reason: format!("{} values as bytes", dtype_name(dtype)),
                        })?;
                    let offset = writer.blobs().add(blob_dtype, &bytes, padding)?;
                    *v = blob_value(offset, dtype, &shape);
                }
                None => {}
            }
            Ok(())
        };
        let mut names: Vec<String> = program.functions.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(f) = program.functions.get_mut(&name) else {
                continue;
            };
            let mut opsets: Vec<String> = f.block_specializations.keys().cloned().collect();
            opsets.sort();
            for opset in opsets {
                if let Some(block) = f.block_specializations.get_mut(&opset) {
                    for_each_value_mut(block, &mut visit)?;
                }
            }
        }
    }
    writer.finish(model)
}

/// A manifest like coremltools writes: one entry for the model, one for the weights folder, each
/// under a fresh identifier.
fn new_manifest() -> Manifest {
    let model_id = identifier();
    let weights_id = identifier();
    let mut entries = BTreeMap::new();
    entries.insert(
        model_id.clone(),
        ItemInfo {
            author: "com.apple.CoreML".into(),
            description: "CoreML Model Specification".into(),
            name: "model.mlmodel".into(),
            path: MODEL_PATH.into(),
        },
    );
    entries.insert(
        weights_id,
        ItemInfo {
            author: "com.apple.CoreML".into(),
            description: "CoreML Model Weights".into(),
            name: "weights".into(),
            path: WEIGHTS_PATH.into(),
        },
    );
    Manifest {
        file_format_version: "1.0.0".into(),
        item_info_entries: entries,
        root_model_identifier: model_id,
    }
}

/// A random UUID (version 4) in the upper-case form the manifest uses.
fn identifier() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_uuid_shaped_and_differ() {
        let a = identifier();
        let b = identifier();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, b);
    }

    #[test]
    fn a_folder_without_manifest_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = MlPackage::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("Manifest.json"), "{e}");
        let e = MlPackage::open(&dir.path().join("missing.mlpackage"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not an .mlpackage folder"), "{e}");
    }
}
