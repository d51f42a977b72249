//! What `sdrs coreml inspect` reports: a model's inputs and outputs, op counts, weight bytes by
//! dtype and compression, and for a resources folder which Stable Diffusion pipeline it holds
//! (the bundle names Apple's converter writes: `TextEncoder`, `TextEncoder2`, `Unet` or
//! `UnetChunk1..N`, `VAEDecoder`, `VAEEncoder`), whether its UNet is chunked, the attention
//! implementation, and whether each model's weights fit a Neural Engine budget.
//!
//! `.mlpackage` files are read whole (the program is walked); a compiled `.mlmodelc` is described
//! by the `metadata.json` Core ML's compiler writes beside its program.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coreml_proto::proto::{array_feature_type, feature_type, FeatureDescription};
use serde::Serialize;

use crate::decode::is_constexpr;
use crate::error::{format, io, Error, Result};
use crate::package::{model_type_name, MlPackage};
use crate::program::{const_val, main_block};
use crate::runtime::resources::{find_model, ModelFormat};
use crate::value::{dtype_name, read_value, tensor_type, TensorData};

/// Apple's guidance for the Neural Engine on iOS/iPadOS (the target of `--chunk-unet`): each
/// model under 1 GiB of weights. Larger models may fall back to the CPU without a word.
pub const DEFAULT_ANE_BUDGET_BYTES: u64 = 1 << 30;

/// One input or output: name, type (`MultiArray`, ...), dtype and shape.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Feature {
    pub name: String,
    pub kind: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// Weight bytes of one storage form (dense `const` of a dtype, or one `constexpr_*` op type).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct WeightBytes {
    /// How many constants (or compressed weights).
    pub count: usize,
    /// Bytes as stored (packed indices, lookup tables, scales included).
    pub stored: u64,
    /// Bytes of the dense weights they stand for (equal to `stored` for dense constants).
    pub dense: u64,
}

/// One model: a package or a compiled model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    pub path: PathBuf,
    pub format: String,
    pub specification_version: i64,
    pub model_type: String,
    pub opset: Option<String>,
    pub inputs: Vec<Feature>,
    pub outputs: Vec<Feature>,
    /// Op counts by type (`const` excluded; it is in `weights`).
    pub ops: BTreeMap<String, usize>,
    /// `const` ops in the program (a compiled model does not report them).
    pub const_ops: Option<usize>,
    /// Dense constants by dtype (`fp16`, ...) and compressed ones by op type.
    pub weights: BTreeMap<String, WeightBytes>,
    /// Size of the weight file on disk.
    pub weight_file_bytes: u64,
    pub metadata: BTreeMap<String, String>,
}

impl ModelReport {
    /// Bytes the weights take as stored (what must fit the Neural Engine).
    pub fn stored_weight_bytes(&self) -> u64 {
        if self.weights.is_empty() {
            self.weight_file_bytes
        } else {
            self.weights.values().map(|w| w.stored).sum()
        }
    }
}

/// Which pipeline a resources folder holds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FolderReport {
    pub path: PathBuf,
    /// `SD1.5-like`, `SDXL`, `SDXL refiner`, or `unknown`.
    pub pipeline: String,
    pub chunked: bool,
    /// `SPLIT_EINSUM`, `ORIGINAL` or `unknown`, from the UNet's op counts.
    pub attention: String,
    /// The bundle names found, in Apple's order.
    pub models: Vec<String>,
    pub tokenizer: bool,
}

/// What `inspect` found at a path.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub folder: Option<FolderReport>,
    pub models: Vec<ModelReport>,
    pub ane_budget_bytes: u64,
}

impl Inspection {
    /// Whether a model's stored weights fit the budget.
    pub fn fits_ane(&self, m: &ModelReport) -> bool {
        m.stored_weight_bytes() <= self.ane_budget_bytes
    }
}

/// The bundle names of a resources folder, in the order Apple's pipeline loads them; the UNet's
/// chunks (`UnetChunk1`, `UnetChunk2`, ...) come after `Unet`.
pub const BUNDLE_NAMES: &[&str] = &[
    "TextEncoder",
    "TextEncoder2",
    "Unet",
    "UnetRefiner",
    "VAEDecoder",
    "VAEEncoder",
    "SafetyChecker",
];

/// Inspects a `.mlpackage`, a `.mlmodelc` or a resources folder holding them.
pub fn inspect(path: &Path, ane_budget_bytes: u64) -> Result<Inspection> {
    if is_package(path) {
        return Ok(Inspection {
            folder: None,
            models: vec![inspect_package(path)?],
            ane_budget_bytes,
        });
    }
    if is_compiled(path) {
        return Ok(Inspection {
            folder: None,
            models: vec![inspect_compiled(path)?],
            ane_budget_bytes,
        });
    }
    if !path.is_dir() {
        return Err(Error::InvalidParameter {
            name: "path",
            value: path.display().to_string(),
            expected: "an .mlpackage, an .mlmodelc or a folder of them".into(),
        });
    }
    let mut files = Vec::new();
    for name in BUNDLE_NAMES {
        files.extend(find_model(path, name));
        if *name == "Unet" {
            let mut k = 1;
            while let Some(chunk) = find_model(path, &format!("UnetChunk{k}")) {
                files.push(chunk);
                k += 1;
            }
        }
    }
    let mut found = Vec::new();
    let mut models = Vec::new();
    for file in files {
        models.push(match file.format {
            ModelFormat::Package => inspect_package(&file.path)?,
            ModelFormat::Compiled => inspect_compiled(&file.path)?,
        });
        found.push(file.name);
    }
    if models.is_empty() {
        return Err(format(
            path,
            format!(
                "no Core ML models here (expected {} as .mlmodelc or .mlpackage)",
                BUNDLE_NAMES[..3].join(", ")
            ),
        ));
    }
    let folder = folder_report(path, &found, &models);
    Ok(Inspection {
        folder: Some(folder),
        models,
        ane_budget_bytes,
    })
}

fn is_package(p: &Path) -> bool {
    p.join("Manifest.json").is_file()
}

fn is_compiled(p: &Path) -> bool {
    p.is_dir()
        && (p.extension().is_some_and(|e| e == "mlmodelc") || p.join("coremldata.bin").is_file())
}

fn folder_report(path: &Path, found: &[String], models: &[ModelReport]) -> FolderReport {
    let has = |n: &str| found.iter().any(|f| f == n);
    let chunked = has("UnetChunk1") && has("UnetChunk2");
    let unet = models
        .iter()
        .zip(found)
        .find(|(_, n)| n.as_str() == "Unet" || n.as_str() == "UnetChunk1");
    let unet_inputs: Vec<&str> = unet
        .map(|(m, _)| m.inputs.iter().map(|f| f.name.as_str()).collect())
        .unwrap_or_default();
    let time_ids = unet.and_then(|(m, _)| m.inputs.iter().find(|f| f.name == "time_ids"));
    let pipeline = match (has("TextEncoder"), has("TextEncoder2"), time_ids) {
        (_, true, Some(t)) if t.shape.last() == Some(&5) => "SDXL refiner",
        (true, true, _) => "SDXL",
        (false, true, _) => "SDXL refiner",
        (true, false, None) if !unet_inputs.is_empty() => "SD1.5-like",
        _ => "unknown",
    };
    // Apple's SPLIT_EINSUM attention gives each head its own softmax; ORIGINAL has one softmax per
    // attention layer. A transformer block has three layer norms and two attention layers.
    let attention = {
        let all: Vec<&ModelReport> = models
            .iter()
            .zip(found)
            .filter(|(_, n)| n.starts_with("Unet"))
            .map(|(m, _)| m)
            .collect();
        let count = |op: &str| -> usize {
            all.iter()
                .map(|m| {
                    m.ops
                        .iter()
                        .filter(|(k, _)| {
                            k.eq_ignore_ascii_case(op) || k.ends_with(&format!(".{op}"))
                        })
                        .map(|(_, v)| *v)
                        .sum::<usize>()
                })
                .sum()
        };
        let softmax = count("softmax");
        let attention_layers = count("layer_norm").max(count("layerNorm")) / 3 * 2;
        match (softmax, attention_layers) {
            (0, _) | (_, 0) => "unknown",
            (s, a) if s == a => "ORIGINAL",
            (s, a) if s > a => "SPLIT_EINSUM",
            _ => "unknown",
        }
    };
    FolderReport {
        path: path.to_path_buf(),
        pipeline: pipeline.into(),
        chunked,
        attention: attention.into(),
        models: found.to_vec(),
        tokenizer: path.join("vocab.json").is_file() && path.join("merges.txt").is_file(),
    }
}

fn features(list: &[FeatureDescription]) -> Vec<Feature> {
    list.iter()
        .map(|f| {
            let (kind, dtype, shape) = match f.r#type.as_ref().and_then(|t| t.r#type.as_ref()) {
                Some(feature_type::Type::MultiArrayType(a)) => (
                    "MultiArray",
                    array_feature_type::ArrayDataType::try_from(a.data_type)
                        .map(|d| match d {
                            array_feature_type::ArrayDataType::Float32 => "Float32",
                            array_feature_type::ArrayDataType::Float16 => "Float16",
                            array_feature_type::ArrayDataType::Double => "Double",
                            array_feature_type::ArrayDataType::Int32 => "Int32",
                            array_feature_type::ArrayDataType::Int8 => "Int8",
                            array_feature_type::ArrayDataType::InvalidArrayDataType => "invalid",
                        })
                        .unwrap_or("invalid"),
                    a.shape.clone(),
                ),
                Some(feature_type::Type::ImageType(_)) => ("Image", "", vec![]),
                Some(feature_type::Type::StringType(_)) => ("String", "", vec![]),
                Some(feature_type::Type::Int64Type(_)) => ("Int64", "", vec![]),
                Some(feature_type::Type::DoubleType(_)) => ("Double", "", vec![]),
                Some(feature_type::Type::StateType(_)) => ("State", "", vec![]),
                Some(_) => ("other", "", vec![]),
                None => ("none", "", vec![]),
            };
            Feature {
                name: f.name.clone(),
                kind: kind.into(),
                dtype: dtype.into(),
                shape,
            }
        })
        .collect()
}

/// Bytes a constant takes in storage: sub-byte types packed.
fn stored_bytes(t: &TensorData) -> u64 {
    let bits = crate::value::dtype_bits(t.dtype) as u64;
    (t.numel() as u64 * bits).div_ceil(8)
}

fn inspect_package(path: &Path) -> Result<ModelReport> {
    let pkg = MlPackage::open(path)?;
    let desc = pkg.model.description.clone().unwrap_or_default();
    let mut metadata = BTreeMap::new();
    if let Some(m) = &desc.metadata {
        for (k, v) in &m.user_defined {
            metadata.insert(k.clone(), v.clone());
        }
        for (k, v) in [
            ("author", &m.author),
            ("version", &m.version_string),
            ("license", &m.license),
        ] {
            if !v.is_empty() {
                metadata.insert(k.into(), v.clone());
            }
        }
    }
    let mut ops = BTreeMap::new();
    let mut weights: BTreeMap<String, WeightBytes> = BTreeMap::new();
    let mut opset = None;
    let mut const_ops = None;
    if let Ok(program) = pkg.program() {
        let (_, set, block) = main_block(program)?;
        opset = Some(set.to_string());
        let mut n_const = 0;
        let consts = crate::program::const_producers(block);
        // Constants that feed a constexpr op are counted with it, not as dense weights.
        let mut feeds_constexpr = std::collections::HashSet::new();
        for op in &block.operations {
            if is_constexpr(op) {
                for name in crate::program::input_var_names(op) {
                    feeds_constexpr.insert(name.to_string());
                }
            }
        }
        for op in &block.operations {
            if op.r#type == "const" {
                n_const += 1;
                let Some(v) = const_val(op) else { continue };
                let Some((dtype, shape)) = v.r#type.as_ref().and_then(tensor_type) else {
                    continue;
                };
                if shape.is_empty() {
                    continue;
                }
                let name = op.outputs.first().map(|o| o.name.as_str()).unwrap_or("");
                let bits = crate::value::dtype_bits(dtype) as u64;
                let bytes = (shape.iter().product::<usize>() as u64 * bits).div_ceil(8);
                if feeds_constexpr.contains(name) {
                    continue;
                }
                let w = weights.entry(dtype_name(dtype).to_string()).or_default();
                w.count += 1;
                w.stored += bytes;
                w.dense += bytes;
                continue;
            }
            *ops.entry(op.r#type.clone()).or_insert(0) += 1;
            if is_constexpr(op) {
                let mut stored = 0;
                for v in op.attributes.values() {
                    if let Ok(t) = read_value(v, pkg.weights.as_ref()) {
                        if !t.shape.is_empty() {
                            stored += stored_bytes(&t);
                        }
                    }
                }
                for name in crate::program::input_var_names(op) {
                    if let Some(v) = consts.get(name).and_then(|c| const_val(c)) {
                        if let Ok(t) = read_value(v, pkg.weights.as_ref()) {
                            if !t.shape.is_empty() {
                                stored += stored_bytes(&t);
                            }
                        }
                    }
                }
                let dense = crate::program::output_type(op)
                    .map(|(d, s)| {
                        (s.iter().product::<usize>() as u64 * crate::value::dtype_bits(d) as u64)
                            .div_ceil(8)
                    })
                    .unwrap_or(0);
                let w = weights.entry(op.r#type.clone()).or_default();
                w.count += 1;
                w.stored += stored;
                w.dense += dense;
            }
        }
        const_ops = Some(n_const);
    }
    Ok(ModelReport {
        path: path.to_path_buf(),
        format: "mlpackage".into(),
        specification_version: pkg.model.specification_version as i64,
        model_type: model_type_name(&pkg.model).into(),
        opset,
        inputs: features(&desc.input),
        outputs: features(&desc.output),
        ops,
        const_ops,
        weights,
        weight_file_bytes: pkg.weights.as_ref().map_or(0, |w| w.len_bytes()),
        metadata,
    })
}

/// `metadata.json` of a compiled model: a JSON array of one object (see the fixtures' README).
fn inspect_compiled(path: &Path) -> Result<ModelReport> {
    let meta_path = path.join("metadata.json");
    let text = std::fs::read_to_string(&meta_path).map_err(io(&meta_path))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format(&meta_path, format!("not JSON: {e}")))?;
    let obj = json
        .as_array()
        .and_then(|a| a.first())
        .or(Some(&json))
        .and_then(|v| v.as_object())
        .ok_or_else(|| format(&meta_path, "expected an array of one object"))?;
    let schema = |key: &str| -> Vec<Feature> {
        obj.get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|f| Feature {
                        name: f["name"].as_str().unwrap_or("").into(),
                        kind: f["type"].as_str().unwrap_or("").into(),
                        dtype: f["dataType"].as_str().unwrap_or("").into(),
                        shape: f["shape"]
                            .as_str()
                            .and_then(|s| serde_json::from_str::<Vec<i64>>(s).ok())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let ops = obj
        .get("mlProgramOperationTypeHistogram")
        .and_then(|v| v.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0) as usize))
                .collect()
        })
        .unwrap_or_default();
    let metadata = obj
        .get("userDefinedMetadata")
        .and_then(|v| v.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let weight_file = path.join("weights").join("weight.bin");
    Ok(ModelReport {
        path: path.to_path_buf(),
        format: "mlmodelc".into(),
        specification_version: obj
            .get("specificationVersion")
            .and_then(|v| v.as_i64())
            .unwrap_or(0),
        model_type: obj
            .get("modelType")
            .and_then(|v| v["name"].as_str())
            .unwrap_or("")
            .trim_start_matches("MLModelType_")
            .to_string(),
        opset: None,
        inputs: schema("inputSchema"),
        outputs: schema("outputSchema"),
        ops,
        const_ops: None,
        weights: BTreeMap::new(),
        weight_file_bytes: std::fs::metadata(&weight_file).map_or(0, |m| m.len()),
        metadata,
    })
}
