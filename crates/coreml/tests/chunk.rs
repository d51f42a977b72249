//! Chunking every `../shared/fixtures/coreml/*-chunked/` source UNet reproduces what coremltools
//! 9.0's `bisect_model` wrote there (incision, cut tensors, chunk descriptions, op histograms,
//! constants), N-chunk splits chain, and bad requests are refused.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use coreml_proto::proto::mil_spec::{argument::binding::Binding, Block};
use coreml_proto::proto::{feature_type, FeatureDescription, Model};
use sdrs_coreml::chunk::{bisect_point, chunk_model, chunk_package, const_bytes, ChunkOptions};
use sdrs_coreml::program::main_block;
use sdrs_coreml::value::{read_value, values_to_bytes, TensorData};
use sdrs_coreml::MlPackage;
use serde_json::Value as Json;

fn fixture_dir(sub: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(sub)
}

/// Every `*-chunked/` folder with a chunks.json, and the json.
fn chunked_folders(coreml: &Path) -> Vec<(PathBuf, Json)> {
    let mut out: Vec<_> = std::fs::read_dir(coreml)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("-chunked"))
                && p.join("chunks.json").is_file()
        })
        .collect();
    out.sort();
    out.into_iter()
        .map(|p| {
            let j = serde_json::from_str(&std::fs::read_to_string(p.join("chunks.json")).unwrap())
                .unwrap();
            (p, j)
        })
        .collect()
}

type Feature = (String, String, Vec<i64>);

fn features(d: &[FeatureDescription]) -> BTreeSet<Feature> {
    d.iter()
        .map(
            |f| match f.r#type.as_ref().and_then(|t| t.r#type.as_ref()) {
                Some(feature_type::Type::MultiArrayType(a)) => (
                    f.name.clone(),
                    format!("{:?}", a.data_type()),
                    a.shape.clone(),
                ),
                other => panic!("{}: not a multi-array ({other:?})", f.name),
            },
        )
        .collect()
}

fn json_features(j: &Json) -> BTreeSet<Feature> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["dataType"].as_str().unwrap().to_string(),
                f["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_i64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

fn histogram(block: &Block) -> BTreeMap<String, u64> {
    let mut h = BTreeMap::new();
    for op in &block.operations {
        *h.entry(op.r#type.clone()).or_insert(0) += 1;
    }
    h
}

fn json_histogram(j: &Json) -> BTreeMap<String, u64> {
    j.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

fn desc(m: &Model) -> (Vec<FeatureDescription>, Vec<FeatureDescription>) {
    let d = m.description.as_ref().unwrap();
    (d.input.clone(), d.output.clone())
}

fn bytes_of(t: &TensorData) -> Vec<u8> {
    values_to_bytes(t.dtype, &t.values)
        .map(|(b, _)| b)
        .unwrap_or_else(|| format!("{:?}", t.values).into_bytes())
}

/// Every var an op reads is a function input or made by an earlier op; outputs are made.
fn assert_closed(pkg: &MlPackage) {
    let (f, _, block) = main_block(pkg.program().unwrap()).unwrap();
    let mut defined: HashSet<String> = f.inputs.iter().map(|i| i.name.clone()).collect();
    for op in &block.operations {
        for n in sdrs_coreml::program::input_var_names(op) {
            assert!(
                defined.contains(n),
                "{}: op {} reads {n} before it is made",
                pkg.path.display(),
                sdrs_coreml::program::op_name(op)
            );
        }
        for o in &op.outputs {
            assert!(defined.insert(o.name.clone()), "{} made twice", o.name);
        }
    }
    for o in &block.outputs {
        assert!(defined.contains(o), "output {o} is not made");
    }
    let (ins, outs) = desc(&pkg.model);
    let fn_in: Vec<_> = f.inputs.iter().map(|i| i.name.clone()).collect();
    let d_in: Vec<_> = ins.iter().map(|i| i.name.clone()).collect();
    assert_eq!(fn_in, d_in, "function inputs and described inputs differ");
    let d_out: Vec<_> = outs.iter().map(|o| o.name.clone()).collect();
    assert_eq!(
        block.outputs, d_out,
        "block outputs and described outputs differ"
    );
}

#[test]
fn two_chunks_match_coremltools_bisect_model() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    let folders = chunked_folders(&coreml);
    assert!(
        !folders.is_empty(),
        "no *-chunked folder in {}",
        coreml.display()
    );
    for (dir, j) in folders {
        let src = coreml.join(j["source"].as_str().unwrap());
        let out = tempfile::tempdir().unwrap();
        let report = chunk_package(&src, out.path(), &ChunkOptions::default()).unwrap();
        let what = dir.display().to_string();

        let inc = &j["incision_op"];
        assert_eq!(report.incisions.len(), 1, "{what}");
        let got = &report.incisions[0];
        assert_eq!(got.name, inc["name"].as_str().unwrap(), "{what}");
        assert_eq!(got.op_type, inc["type"].as_str().unwrap(), "{what}");
        assert_eq!(got.index as u64, inc["index"].as_u64().unwrap(), "{what}");
        assert_eq!(
            got.n_ops as u64,
            inc["n_ops_in_main_block"].as_u64().unwrap(),
            "{what}"
        );
        let src_pkg = MlPackage::open(&src).unwrap();
        let (_, _, src_block) = main_block(src_pkg.program().unwrap()).unwrap();
        assert_eq!(bisect_point(src_block).unwrap(), *got, "{what}");
        assert_eq!(
            const_bytes(src_block),
            j["original"]["const_weight_bytes"].as_u64().unwrap(),
            "{what}"
        );

        let want_cut: BTreeSet<(String, String, Vec<usize>)> = j["cut_tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["mil_dtype"].as_str().unwrap().to_string(),
                    c["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect();
        let got_cut: BTreeSet<_> = report.cut_tensors[0].iter().cloned().collect();
        assert_eq!(got_cut, want_cut, "{what}");
        assert_eq!(report.cut_tensors[0].len(), want_cut.len(), "{what}");

        assert_eq!(report.chunks.len(), 2, "{what}");
        for (k, summary) in report.chunks.iter().enumerate() {
            let key = format!("chunk{}", k + 1);
            let name = format!("UnetChunk{}.mlpackage", k + 1);
            assert_eq!(summary.path, out.path().join(&name));
            let ours = MlPackage::open(&summary.path).unwrap();
            let theirs = MlPackage::open(&dir.join(&name)).unwrap();
            assert_closed(&ours);
            let (oi, oo) = desc(&ours.model);
            let (ti, to) = desc(&theirs.model);
            assert_eq!(features(&oi), features(&ti), "{what} {key} inputs");
            assert_eq!(features(&oo), features(&to), "{what} {key} outputs");
            assert_eq!(features(&oi), json_features(&j[&key]["inputs"]), "{what}");
            assert_eq!(features(&oo), json_features(&j[&key]["outputs"]), "{what}");
            let names: Vec<_> = oi.iter().map(|d| d.name.clone()).collect();
            assert_eq!(summary.inputs, names);
            let names: Vec<_> = oo.iter().map(|d| d.name.clone()).collect();
            assert_eq!(summary.outputs, names);
            // coremltools keeps the original inputs first, in their order.
            if k == 1 {
                let kept: Vec<String> = j["chunk2"]["original_inputs_kept"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(summary.inputs[..kept.len()], kept[..], "{what}");
                assert_eq!(
                    summary.inputs.len(),
                    kept.len() + report.cut_tensors[0].len(),
                    "{what}"
                );
            }
            assert_eq!(
                ours.model.specification_version,
                theirs.model.specification_version
            );

            let (of, oset, ob) = main_block(ours.program().unwrap()).unwrap();
            let (_, tset, tb) = main_block(theirs.program().unwrap()).unwrap();
            assert_eq!(oset, tset, "{what} {key} opset");
            assert_eq!(of.inputs.len(), oi.len());
            assert_eq!(histogram(ob), histogram(tb), "{what} {key} op types");
            assert_eq!(
                histogram(ob),
                json_histogram(&j[&key]["op_type_counts"]),
                "{what}"
            );
            let want_bytes = j[&key]["const_weight_bytes"].as_u64().unwrap();
            assert_eq!(summary.const_bytes, want_bytes, "{what} {key} const bytes");
            assert_eq!(const_bytes(ob), want_bytes, "{what} {key}");

            let theirs_by_out: BTreeMap<&str, _> = tb
                .operations
                .iter()
                .filter(|op| op.r#type.starts_with("const"))
                .map(|op| (op.outputs[0].name.as_str(), op))
                .collect();
            let mut compared = 0;
            for op in ob
                .operations
                .iter()
                .filter(|o| o.r#type.starts_with("const"))
            {
                let out_name = op.outputs[0].name.as_str();
                let t = theirs_by_out.get(out_name).unwrap_or_else(|| {
                    panic!("{what} {key}: const {out_name} not in coremltools'")
                });
                assert_eq!(op.r#type, t.r#type, "{out_name}");
                let keys: BTreeSet<_> = op.attributes.keys().filter(|k| *k != "name").collect();
                let tkeys: BTreeSet<_> = t.attributes.keys().filter(|k| *k != "name").collect();
                assert_eq!(keys, tkeys, "{out_name}");
                for k in keys {
                    let a = read_value(&op.attributes[k], ours.weights.as_ref()).unwrap();
                    let b = read_value(&t.attributes[k], theirs.weights.as_ref()).unwrap();
                    assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{out_name}.{k}");
                    assert!(
                        bytes_of(&a) == bytes_of(&b),
                        "{what} {key}: {out_name}.{k} differs"
                    );
                }
                compared += 1;
            }
            assert_eq!(compared, theirs_by_out.len(), "{what} {key}: const count");
        }
    }
}

/// The chunks chain: each chunk's inputs are original inputs or outputs of earlier chunks (same
/// name, dtype, shape), the last chunk's outputs are the original's, every program is closed, every
/// non-const op of the source is in some chunk, and constants keep their values.
fn assert_chain(src: &MlPackage, report: &sdrs_coreml::chunk::ChunkReport) {
    let (orig_in, orig_out) = desc(&src.model);
    let (_, _, sb) = main_block(src.program().unwrap()).unwrap();
    let src_consts: BTreeMap<&str, _> = sb
        .operations
        .iter()
        .filter(|op| op.r#type.starts_with("const"))
        .map(|op| (op.outputs[0].name.as_str(), op))
        .collect();
    let mut available = features(&orig_in);
    let mut made: HashSet<String> = HashSet::new();
    let n = report.chunks.len();
    for (k, s) in report.chunks.iter().enumerate() {
        let what = s.path.display().to_string();
        let pkg = MlPackage::open(&s.path).unwrap();
        assert_closed(&pkg);
        let (ins, outs) = desc(&pkg.model);
        for f in features(&ins) {
            assert!(
                available.contains(&f),
                "{what}: input {f:?} comes from nowhere"
            );
        }
        if k + 1 == n {
            assert_eq!(features(&outs), features(&orig_out), "{what}");
        } else {
            assert!(!outs.is_empty(), "{what}");
            available.extend(features(&outs));
        }
        let (_, _, b) = main_block(pkg.program().unwrap()).unwrap();
        assert_eq!(const_bytes(b), s.const_bytes, "{what}");
        for op in &b.operations {
            for o in &op.outputs {
                made.insert(o.name.clone());
            }
            if !op.r#type.starts_with("const") {
                continue;
            }
            let name = op.outputs[0].name.as_str();
            let Some(orig) = src_consts.get(name) else {
                assert_eq!(op.r#type, "const", "{what}: new {name}");
                continue;
            };
            for (key, v) in op.attributes.iter().filter(|(k, _)| *k != "name") {
                let a = read_value(v, pkg.weights.as_ref()).unwrap();
                let b = read_value(&orig.attributes[key], src.weights.as_ref()).unwrap();
                assert!(bytes_of(&a) == bytes_of(&b), "{what}: {name}.{key} changed");
            }
            for (param, arg) in &op.inputs {
                let theirs = &orig.inputs[param];
                assert_eq!(
                    arg.arguments.len(),
                    theirs.arguments.len(),
                    "{what}: {name}"
                );
                for (x, y) in arg.arguments.iter().zip(&theirs.arguments) {
                    match (&x.binding, &y.binding) {
                        (Some(Binding::Value(x)), Some(Binding::Value(y))) => {
                            let a = read_value(x, pkg.weights.as_ref()).unwrap();
                            let b = read_value(y, src.weights.as_ref()).unwrap();
                            assert!(bytes_of(&a) == bytes_of(&b), "{what}: {name}.{param}");
                        }
                        (x, y) => assert_eq!(x, y, "{what}: {name}.{param}"),
                    }
                }
            }
        }
    }
    let read: HashSet<&str> = sb
        .operations
        .iter()
        .flat_map(sdrs_coreml::program::input_var_names)
        .chain(sb.outputs.iter().map(|s| s.as_str()))
        .collect();
    for op in sb
        .operations
        .iter()
        .filter(|o| !o.r#type.starts_with("const"))
    {
        for o in &op.outputs {
            if read.contains(o.name.as_str()) {
                let renamed = (1..4).any(|i| made.contains(&format!("{}_{i}", o.name)));
                assert!(
                    made.contains(&o.name) || renamed,
                    "op output {} is in no chunk",
                    o.name
                );
            }
        }
    }
}

#[test]
fn compressed_models_chunk_with_their_constexpr_ops() {
    let Some(dir) = fixture_dir("coreml/compressed") else {
        return;
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "mlpackage"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for src in names {
        let pkg = MlPackage::open(&src).unwrap();
        let out = tempfile::tempdir().unwrap();
        let report = chunk_package(&src, out.path(), &ChunkOptions::default()).unwrap();
        assert_eq!(report.chunks.len(), 2);
        let (_, _, b) = main_block(pkg.program().unwrap()).unwrap();
        // pymil loads every constexpr attribute and literal argument as a const op of its own.
        let extra: usize = b
            .operations
            .iter()
            .filter(|op| op.r#type.starts_with("constexpr_"))
            .map(|op| {
                op.attributes.keys().filter(|k| *k != "name").count()
                    + op.inputs
                        .values()
                        .flat_map(|a| a.arguments.iter())
                        .filter(|a| matches!(a.binding, Some(Binding::Value(_))))
                        .count()
            })
            .sum();
        assert_eq!(report.incisions[0].n_ops, b.operations.len() + extra);
        assert_chain(&pkg, &report);
    }
}

#[test]
fn three_chunks_chain_and_max_chunk_bytes_picks_the_count() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    for (_, j) in chunked_folders(&coreml) {
        let src = coreml.join(j["source"].as_str().unwrap());
        let src_pkg = MlPackage::open(&src).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = ChunkOptions {
            chunks: Some(3),
            ..Default::default()
        };
        let report = chunk_package(&src, out.path(), &opts).unwrap();
        assert_eq!(report.incisions.len(), 2);
        assert!(report.incisions[0].index < report.incisions[1].index);
        assert_eq!(report.chunks.len(), 3);
        assert_chain(&src_pkg, &report);
        // One cast out of and one back into fp16 per fp16 tensor crossing into a later chunk.
        let (_, _, sb) = main_block(src_pkg.program().unwrap()).unwrap();
        let casts = |b: &Block| histogram(b).get("cast").copied().unwrap_or(0);
        let fp16: HashSet<&str> = report
            .cut_tensors
            .iter()
            .flatten()
            .filter(|c| c.1 == "fp16")
            .map(|c| c.0.as_str())
            .collect();
        let mut chunk_casts = 0;
        let mut expected = casts(sb);
        let last = report.chunks.len() - 1;
        for (k, c) in report.chunks.iter().enumerate() {
            let pkg = MlPackage::open(&c.path).unwrap();
            chunk_casts += casts(main_block(pkg.program().unwrap()).unwrap().2);
            if k < last {
                expected += c
                    .outputs
                    .iter()
                    .filter(|o| fp16.contains(o.as_str()))
                    .count() as u64;
            }
            if k > 0 {
                expected += c
                    .inputs
                    .iter()
                    .filter(|i| fp16.contains(i.as_str()))
                    .count() as u64;
            }
        }
        assert!(expected > casts(sb));
        assert_eq!(chunk_casts, expected);

        let worst = report.chunks.iter().map(|c| c.const_bytes).max().unwrap();
        let by_bytes = ChunkOptions {
            max_chunk_bytes: Some(worst),
            ..Default::default()
        };
        let picked = chunk_model(&src_pkg.model, &by_bytes).unwrap();
        let n = picked.models.len();
        assert!((2..=3).contains(&n), "{n} chunks for {worst} bytes");
        assert!(picked.const_bytes.iter().all(|&b| b <= worst));
        let fewer = ChunkOptions {
            chunks: Some(n - 1),
            ..Default::default()
        };
        let fewer = chunk_model(&src_pkg.model, &fewer).unwrap();
        assert!(fewer.const_bytes.iter().any(|&b| b > worst));
        // The whole program fits: one chunk, the program itself.
        let total = const_bytes(sb);
        let one = ChunkOptions {
            max_chunk_bytes: Some(total),
            ..Default::default()
        };
        let one = chunk_model(&src_pkg.model, &one).unwrap();
        assert_eq!(one.models.len(), 1);
        assert_eq!(one.const_bytes, vec![total]);
    }
}

#[test]
fn bad_requests_are_errors() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    let (_, j) = chunked_folders(&coreml).into_iter().next().unwrap();
    let src = coreml.join(j["source"].as_str().unwrap());
    let pkg = MlPackage::open(&src).unwrap();
    let out = tempfile::tempdir().unwrap();

    let zero = ChunkOptions {
        chunks: Some(0),
        ..Default::default()
    };
    let e = chunk_package(&src, out.path(), &zero)
        .unwrap_err()
        .to_string();
    assert!(e.contains("chunks = 0"), "{e}");

    let (_, _, block) = main_block(pkg.program().unwrap()).unwrap();
    let largest = block
        .operations
        .iter()
        .filter(|op| op.r#type == "const")
        .map(|op| {
            let mut b = Block::default();
            b.operations.push(op.clone());
            const_bytes(&b)
        })
        .max()
        .unwrap();
    let tiny = ChunkOptions {
        max_chunk_bytes: Some(largest - 1),
        ..Default::default()
    };
    let e = chunk_package(&src, out.path(), &tiny)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("max_chunk_bytes = {}", largest - 1)),
        "{e}"
    );
    assert!(e.contains(&largest.to_string()), "{e}");

    let too_many = ChunkOptions {
        chunks: Some(block.operations.len()),
        ..Default::default()
    };
    assert!(chunk_model(&pkg.model, &too_many).is_err());

    let bad_prefix = ChunkOptions {
        prefix: "a/b".into(),
        ..Default::default()
    };
    assert!(chunk_package(&src, out.path(), &bad_prefix).is_err());

    // Nothing was written by the failed runs.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);

    // An output "folder" that is a file.
    let file = out.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(chunk_package(&src, &file, &ChunkOptions::default()).is_err());

    // Not an ML program; a program with nothing to cut.
    let e = chunk_model(&Model::default(), &ChunkOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ML program"), "{e}");
    let consts_only = Block {
        operations: block
            .operations
            .iter()
            .filter(|op| op.r#type == "const")
            .take(5)
            .cloned()
            .collect(),
        ..Default::default()
    };
    assert!(bisect_point(&consts_only).is_err());
}
