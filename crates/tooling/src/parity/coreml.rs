//! `coreml/`: Apple's Core ML packages made from the tiny fixture models with coremltools 9.0.
//! `coreml_decode:<package>:<weight>`: every compressed constant recorded in
//! `compressed/<package>.decoded.safetensors` materialises bit for bit as coremltools
//! materialised it (the case's difference is the number of differing values).
//! `coreml_palettize:<package>`: the package's base compressed by sdrs with the settings
//! `compressed/compressed.json` records for it: the same weights compressed, each bit for bit
//! where coremltools' result is deterministic (linear quantization; k-means per table of at least
//! 10,000 fp16 values) and with no larger squared error elsewhere (coremltools clusters small
//! tables with scikit-learn's randomly seeded k-means); the difference is the number of weights
//! that break this.
//! `coreml_chunk:<folder>`: each `*-chunked/` folder's source UNet cut in two by sdrs as
//! coremltools' `bisect_model` cut it (`chunks.json`): the same incision op, the same tensors
//! crossing the cut, each chunk's inputs and outputs (names, dtypes, shapes, as a set: coremltools
//! orders them from a Python set), the same original inputs kept by chunk 2 and the same op counts
//! and weight bytes per chunk; the difference is the number of facts that differ.

use std::collections::HashMap;
use std::path::Path;

use coreml_proto::proto::mil_spec::{DataType, Operation};
use sdrs_coreml::chunk::{chunk_model, ChunkOptions};
use sdrs_coreml::palettize::{
    compress_program, CompressOptions, Granularity, LinearDtype, Mode, Recipe,
    DEFAULT_WEIGHT_THRESHOLD, RECIPE_KEEP_BITS,
};
use sdrs_coreml::program::{const_producers, const_val, main_block, op_name};
use sdrs_coreml::value::{read_value, TensorData, Values};
use sdrs_coreml::{decode, MlPackage};
use sdrs_pipeline::{Error, Result};

use super::{ExtendedFixtures, Runner};
use crate::tolerances::CaseKind;

/// A Core ML error as the parity runner's error, naming the fixture.
fn coreml_error(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidParameter {
        name: "coreml fixture",
        value: what.display().to_string(),
        expected: format!("a package sdrs-coreml reads ({e})"),
    }
}

impl Runner<'_> {
    /// Every case of the extended set `coreml/` (reported missing as the other sets are).
    pub(super) fn coreml_cases(&mut self, extended: &ExtendedFixtures) -> Result<()> {
        let Some(dir) = self.extended_set(extended, "coreml/compressed", CaseKind::BitExact) else {
            return Ok(());
        };
        self.coreml_decode_cases(&dir)?;
        self.coreml_palettize_cases(&dir)?;
        let root = dir.parent().unwrap_or(&dir).to_path_buf();
        self.coreml_chunk_cases(&root)
    }

    fn coreml_chunk_cases(&mut self, root: &Path) -> Result<()> {
        let mut folders: Vec<_> = std::fs::read_dir(root)
            .map_err(|source| Error::Io {
                path: root.to_path_buf(),
                source,
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("chunks.json").is_file())
            .collect();
        folders.sort();
        if folders.is_empty() {
            self.push(super::CaseResult {
                name: "coreml_chunk".to_string(),
                max_diff: None,
                tolerance: 0.0,
                outcome: super::Outcome::Fail(Some(format!(
                    "no folder with a chunks.json in {}",
                    root.display()
                ))),
            });
        }
        for folder in folders {
            let name = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.case(format!("coreml_chunk:{name}"), CaseKind::BitExact, |_| {
                chunk_diff(root, &folder)
            });
        }
        Ok(())
    }

    fn coreml_palettize_cases(&mut self, dir: &Path) -> Result<()> {
        let info = sdrs_pipeline::weights::read_json(&dir.join("compressed.json"))?;
        let models = info["models"].as_object().cloned().unwrap_or_default();
        let threshold = info["weight_threshold"]
            .as_u64()
            .map_or(DEFAULT_WEIGHT_THRESHOLD, |t| t as usize);
        if models.is_empty() {
            self.push(super::CaseResult {
                name: "coreml_palettize".to_string(),
                max_diff: None,
                tolerance: 0.0,
                outcome: super::Outcome::Fail(Some("compressed.json lists no models".into())),
            });
        }
        let root = dir.parent().unwrap_or(dir).to_path_buf();
        for (stem, entry) in models {
            self.case(
                format!("coreml_palettize:{stem}"),
                CaseKind::BitExact,
                |_| palettize_diff(&root, dir, &stem, &entry, threshold),
            );
        }
        Ok(())
    }

    fn coreml_decode_cases(&mut self, dir: &Path) -> Result<()> {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".decoded.safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            self.push(super::CaseResult {
                name: "coreml_decode".to_string(),
                max_diff: None,
                tolerance: 0.0,
                outcome: super::Outcome::Fail(Some(format!(
                    "{} has no *.decoded.safetensors",
                    dir.display()
                ))),
            });
        }
        for file in files {
            let stem = file.trim_end_matches(".decoded.safetensors").to_string();
            let package = dir.join(format!("{stem}.mlpackage"));
            let reference = dir.join(&file);
            let names = match reference_names(&reference) {
                Ok(n) => n,
                Err(e) => {
                    self.case(format!("coreml_decode:{stem}"), CaseKind::BitExact, |_| {
                        Err(e)
                    });
                    continue;
                }
            };
            let opened = MlPackage::open(&package).map_err(|e| coreml_error(&package, e));
            let pkg = match opened {
                Ok(p) => p,
                Err(e) => {
                    self.case(format!("coreml_decode:{stem}"), CaseKind::BitExact, |_| {
                        Err(e)
                    });
                    continue;
                }
            };
            for name in names {
                self.case(
                    format!("coreml_decode:{stem}:{name}"),
                    CaseKind::BitExact,
                    |_| decode_diff(&pkg, &reference, &name),
                );
            }
        }
        Ok(())
    }
}

fn reference_names(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| coreml_error(path, e))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    Ok(names)
}

/// The number of values of `name` that differ from coremltools' (a shape or dtype mismatch is
/// an error).
fn decode_diff(pkg: &MlPackage, reference: &Path, name: &str) -> Result<f64> {
    let bytes = std::fs::read(reference).map_err(|source| Error::Io {
        path: reference.to_path_buf(),
        source,
    })?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| coreml_error(reference, e))?;
    let want = st.tensor(name).map_err(|e| coreml_error(reference, e))?;
    let program = pkg.program().map_err(|e| coreml_error(&pkg.path, e))?;
    let (_, _, block) = main_block(program).map_err(|e| coreml_error(&pkg.path, e))?;
    let op = block
        .operations
        .iter()
        .find(|op| decode::is_constexpr(op) && op.outputs.iter().any(|o| o.name == name))
        .ok_or_else(|| Error::InvalidParameter {
            name: "coreml weight",
            value: name.to_string(),
            expected: format!("a constexpr op of {}", pkg.path.display()),
        })?;
    let got = decode::materialize(op, &const_producers(block), pkg.weights.as_ref())
        .map_err(|e| coreml_error(&pkg.path, e))?;
    if got.shape != want.shape() {
        return Err(Error::InvalidParameter {
            name: "coreml decoded shape",
            value: format!("{name}: {:?}", got.shape),
            expected: format!("{:?} as coremltools materialises it", want.shape()),
        });
    }
    let ours: Vec<u16> = match (&got.values, want.dtype()) {
        (Values::F16(v), safetensors::Dtype::F16) => v.iter().map(|x| x.to_bits()).collect(),
        (_, dtype) => {
            return Err(Error::InvalidParameter {
                name: "coreml decoded dtype",
                value: format!("{name}: {}", sdrs_coreml::value::dtype_name(got.dtype)),
                expected: format!("{dtype:?} as coremltools materialises it"),
            })
        }
    };
    let theirs = want
        .data()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    Ok(ours.iter().zip(theirs).filter(|(a, b)| **a != *b).count() as f64)
}

/// The settings coremltools was run with, from a `compressed.json` entry's description (e.g.
/// "palettize_weights kmeans nbits=6 per_tensor") or its mixed-bit recipe.
fn recorded_options(
    stem: &str,
    entry: &serde_json::Value,
    threshold: usize,
) -> Result<CompressOptions> {
    let bad = |what: &str| Error::InvalidParameter {
        name: "compressed.json description",
        value: format!("{stem}: {}", entry["description"]),
        expected: what.to_string(),
    };
    let how = entry["description"].as_str().unwrap_or_default();
    let number = |key: &str| -> Option<usize> {
        let rest = &how[how.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let mode = if let Some(recipe) = entry["recipe_nbits_by_const_name"].as_object() {
        let mut bits = std::collections::BTreeMap::new();
        for (name, b) in recipe {
            let b = b.as_u64().ok_or_else(|| bad("recipe bits as numbers"))? as u32;
            bits.insert(name.clone(), if b >= 16 { RECIPE_KEEP_BITS } else { b });
        }
        Mode::Recipe(Recipe { bits })
    } else if how.contains("palettize_weights") {
        let nbits = number("nbits=").ok_or_else(|| bad("nbits=N"))? as u32;
        let granularity = if how.contains("per_grouped_channel") {
            Granularity::PerGroupedChannel {
                group_size: number("group_size=").ok_or_else(|| bad("group_size=G"))?,
            }
        } else {
            Granularity::PerTensor
        };
        Mode::Palettize { nbits, granularity }
    } else if how.contains("linear_quantize_weights") && how.contains("linear_symmetric") {
        let dtype = if how.contains("int4") {
            LinearDtype::Int4
        } else {
            LinearDtype::Int8
        };
        let block_size = if how.contains("per_block") {
            Some(number("block_size=").ok_or_else(|| bad("block_size=B"))?)
        } else {
            None
        };
        Mode::Linear { dtype, block_size }
    } else {
        return Err(bad(
            "palettize_weights or linear_quantize_weights linear_symmetric",
        ));
    };
    Ok(CompressOptions {
        mode,
        weight_threshold: threshold,
    })
}

fn f16_bits(t: &TensorData) -> Option<Vec<u16>> {
    match &t.values {
        Values::F16(v) => Some(v.iter().map(|x| x.to_bits()).collect()),
        _ => None,
    }
}

fn squared_error(a: &TensorData, b: &TensorData) -> f64 {
    let (Some(a), Some(b)) = (a.values.to_f32(), b.values.to_f32()) else {
        return f64::INFINITY;
    };
    a.iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum()
}

/// The number of weights whose compression differs from coremltools' (see the module doc).
fn palettize_diff(
    root: &Path,
    dir: &Path,
    stem: &str,
    entry: &serde_json::Value,
    threshold: usize,
) -> Result<f64> {
    let opts = recorded_options(stem, entry, threshold)?;
    let base_path = root.join(entry["base"].as_str().unwrap_or_default());
    let base = MlPackage::open(&base_path).map_err(|e| coreml_error(&base_path, e))?;
    let theirs_path = dir.join(format!("{stem}.mlpackage"));
    let theirs = MlPackage::open(&theirs_path).map_err(|e| coreml_error(&theirs_path, e))?;
    let mut ours = base.model.clone();
    compress_program(&mut ours, base.weights.as_ref(), &opts)
        .map_err(|e| coreml_error(&base_path, e))?;
    let block = |m: &coreml_proto::proto::Model, p: &Path| -> Result<_> {
        let program = sdrs_coreml::package::program_of(m)
            .ok_or_else(|| coreml_error(p, "not an ML program"))?;
        Ok(main_block(program)
            .map_err(|e| coreml_error(p, e))?
            .2
            .clone())
    };
    let (ob, tb, bb) = (
        block(&ours, &base_path)?,
        block(&theirs.model, &theirs_path)?,
        block(&base.model, &base_path)?,
    );
    let compressed = |b: &coreml_proto::proto::mil_spec::Block| -> HashMap<String, Operation> {
        b.operations
            .iter()
            .filter(|op| decode::is_constexpr(op))
            .map(|op| (op.outputs[0].name.clone(), op.clone()))
            .collect()
    };
    let (oc, tc) = (compressed(&ob), compressed(&tb));
    let originals: HashMap<&str, &Operation> = bb
        .operations
        .iter()
        .filter(|op| op.r#type == "const")
        .map(|op| (op_name(op), op))
        .collect();
    let (ocp, tcp) = (const_producers(&ob), const_producers(&tb));
    let mut failures = oc.keys().filter(|k| !tc.contains_key(*k)).count();
    for (name, t) in &tc {
        let Some(o) = oc.get(name) else {
            failures += 1;
            continue;
        };
        let om = decode::materialize(o, &ocp, base.weights.as_ref())
            .map_err(|e| coreml_error(&base_path, e))?;
        let tm = decode::materialize(t, &tcp, theirs.weights.as_ref())
            .map_err(|e| coreml_error(&theirs_path, e))?;
        if om.shape != tm.shape || om.dtype != tm.dtype {
            failures += 1;
            continue;
        }
        let dense = op_name(t)
            .strip_suffix("_palettized")
            .or_else(|| op_name(t).strip_suffix("_quantized"))
            .unwrap_or(op_name(t));
        let original = originals
            .get(dense)
            .and_then(|c| const_val(c))
            .map(|v| read_value(v, base.weights.as_ref()))
            .transpose()
            .map_err(|e| coreml_error(&base_path, e))?;
        let Some(original) = original else {
            failures += 1;
            continue;
        };
        let exact = if t.r#type == "constexpr_lut_to_dense" {
            // One table per group (an iOS18 lut's leading axes), else one per tensor.
            let tables = sdrs_coreml::program::input_arg(t, "lut")
                .and_then(|_| {
                    let lut =
                        sdrs_coreml::program::const_input(t, "lut", &tcp, theirs.weights.as_ref())
                            .ok()?;
                    Some(
                        lut.shape[..lut.shape.len().saturating_sub(2)]
                            .iter()
                            .product::<usize>(),
                    )
                })
                .unwrap_or(1)
                .max(1);
            original.dtype == DataType::Float16
                && original.numel() / tables >= sdrs_quant::kmeans::COREMLTOOLS_EXACT_MIN_ELEMENTS
        } else {
            true
        };
        let ok = if exact {
            f16_bits(&om).is_some() && f16_bits(&om) == f16_bits(&tm)
        } else {
            squared_error(&om, &original) <= squared_error(&tm, &original)
        };
        if !ok {
            failures += 1;
        }
    }
    Ok(failures as f64)
}

/// A model description's features as (name, dtype, shape), sorted.
fn described(m: &coreml_proto::proto::Model, outputs: bool) -> Vec<(String, String, Vec<i64>)> {
    use coreml_proto::proto::{array_feature_type::ArrayDataType, feature_type};
    let Some(d) = &m.description else {
        return vec![];
    };
    let list = if outputs { &d.output } else { &d.input };
    let mut v: Vec<_> = list
        .iter()
        .map(
            |f| match f.r#type.as_ref().and_then(|t| t.r#type.as_ref()) {
                Some(feature_type::Type::MultiArrayType(a)) => (
                    f.name.clone(),
                    ArrayDataType::try_from(a.data_type)
                        .map(|d| format!("{d:?}"))
                        .unwrap_or_default(),
                    a.shape.clone(),
                ),
                _ => (f.name.clone(), String::new(), vec![]),
            },
        )
        .collect();
    v.sort();
    v
}

fn op_counts(m: &coreml_proto::proto::Model) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    if let Some(block) = sdrs_coreml::package::program_of(m)
        .and_then(|p| main_block(p).ok())
        .map(|(_, _, b)| b)
    {
        for op in &block.operations {
            *counts.entry(op.r#type.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// The number of facts of `chunks.json` and of coremltools' chunk packages that sdrs' two chunks
/// of the same source do not reproduce.
fn chunk_diff(root: &Path, folder: &Path) -> Result<f64> {
    let info = sdrs_pipeline::weights::read_json(&folder.join("chunks.json"))?;
    let src = root.join(info["source"].as_str().unwrap_or_default());
    let pkg = MlPackage::open(&src).map_err(|e| coreml_error(&src, e))?;
    let chunked =
        chunk_model(&pkg.model, &ChunkOptions::default()).map_err(|e| coreml_error(&src, e))?;
    let mut differ = 0usize;
    let mut check = |same: bool| differ += usize::from(!same);
    let inc = &info["incision_op"];
    match chunked.incisions.as_slice() {
        [got] => {
            check(inc["name"].as_str() == Some(got.name.as_str()));
            check(inc["type"].as_str() == Some(got.op_type.as_str()));
            check(inc["index"].as_u64() == Some(got.index as u64));
            check(inc["n_ops_in_main_block"].as_u64() == Some(got.n_ops as u64));
        }
        _ => check(false),
    }
    let want_cut: std::collections::BTreeSet<(String, String, Vec<usize>)> = info["cut_tensors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap_or_default().to_string(),
                        c["mil_dtype"].as_str().unwrap_or_default().to_string(),
                        c["shape"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .filter_map(|d| d.as_u64())
                                    .map(|d| d as usize)
                                    .collect()
                            })
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let got_cut: std::collections::BTreeSet<_> = chunked
        .cut_tensors
        .first()
        .map(|c| c.iter().cloned().collect())
        .unwrap_or_default();
    check(!want_cut.is_empty() && got_cut == want_cut);
    check(chunked.models.len() == 2);
    for (k, model) in chunked.models.iter().enumerate() {
        let key = format!("chunk{}", k + 1);
        let theirs_path = folder.join(format!("UnetChunk{}.mlpackage", k + 1));
        let theirs = MlPackage::open(&theirs_path).map_err(|e| coreml_error(&theirs_path, e))?;
        check(described(model, false) == described(&theirs.model, false));
        check(described(model, true) == described(&theirs.model, true));
        check(op_counts(model) == op_counts(&theirs.model));
        check(info[&key]["const_weight_bytes"].as_u64() == chunked.const_bytes.get(k).copied());
        if k == 1 {
            let kept: Vec<String> = info["chunk2"]["original_inputs_kept"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let originals: Vec<String> = described(&pkg.model, false)
                .into_iter()
                .map(|f| f.0)
                .collect();
            let ours: Vec<String> = described(model, false)
                .into_iter()
                .map(|f| f.0)
                .filter(|n| originals.contains(n))
                .collect();
            let mut kept_sorted = kept.clone();
            kept_sorted.sort();
            check(ours == kept_sorted);
        }
    }
    Ok(differ as f64)
}
