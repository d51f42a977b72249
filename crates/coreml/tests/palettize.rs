//! `palettize::compress_program` / `compress_package` against coremltools 9.0's own output: every
//! package of `../shared/fixtures/coreml/compressed/` is rebuilt from its base package with the
//! settings `compressed.json` records, and must compress the same weights into the same op forms,
//! with bit-identical tables, indices, quantized data and scales where coremltools' computation is
//! deterministic (k-means on fp16 groups of >= 10,000 elements; linear quantization always), and no
//! larger squared error where it used scikit-learn's k-means. `kmeans/` checks every bit width.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use coreml_proto::proto::mil_spec::argument::{binding::Binding, Binding as ArgBinding};
use coreml_proto::proto::mil_spec::{
    value, Argument, Block, DataType, Function, NamedValueType, Operation, Program, Value,
};
use coreml_proto::proto::{model, Model};
use half::f16;
use sdrs_coreml::blob::BlobFile;
use sdrs_coreml::palettize::{
    compress_package, compress_program, CompressOptions, CompressReport, Granularity, LinearDtype,
    Mode, Recipe,
};
use sdrs_coreml::program::{const_producers, const_val, input_var_names, main_block, op_name, Arg};
use sdrs_coreml::value::{make_tensor_type, read_value, unpack_bits, TensorData, Values};
use sdrs_coreml::{decode, MlPackage};

fn fixture_dir(sub: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(sub)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The number after `key=` in a description such as "... nbits=6 per_tensor".
fn number_after(text: &str, key: &str) -> Option<usize> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The options a fixture model was made with, read from its `compressed.json` entry.
fn options_of(entry: &serde_json::Value, dir: &Path) -> CompressOptions {
    let how = entry["description"].as_str().unwrap();
    let mode = if let Some(recipe) = entry.get("recipe_nbits_by_const_name") {
        let path = dir.join("recipe.json");
        std::fs::write(&path, serde_json::to_string(recipe).unwrap()).unwrap();
        Mode::Recipe(Recipe::from_json_file(&path).unwrap())
    } else if how.contains("palettize_weights") {
        let nbits = number_after(how, "nbits=").unwrap() as u32;
        let granularity = if how.contains("per_grouped_channel") {
            Granularity::PerGroupedChannel {
                group_size: number_after(how, "group_size=").unwrap(),
            }
        } else {
            assert!(how.contains("per_tensor"), "{how}");
            Granularity::PerTensor
        };
        Mode::Palettize { nbits, granularity }
    } else {
        assert!(how.contains("linear_quantize_weights"), "{how}");
        assert!(how.contains("linear_symmetric"), "{how}");
        let dtype = if how.contains("int4") {
            LinearDtype::Int4
        } else {
            assert!(how.contains("int8"), "{how}");
            LinearDtype::Int8
        };
        let block_size = how
            .contains("per_block")
            .then(|| number_after(how, "block_size=").unwrap());
        Mode::Linear { dtype, block_size }
    };
    CompressOptions {
        mode,
        weight_threshold: 2048,
    }
}

fn block_of(model: &Model) -> &Block {
    let program = sdrs_coreml::package::program_of(model).unwrap();
    main_block(program).unwrap().2
}

/// Names of the ops reading each var (op names, as `compressed.json` lists consumers).
fn consumers(block: &Block) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for op in &block.operations {
        for v in input_var_names(op) {
            m.entry(v.to_string())
                .or_default()
                .push(op_name(op).to_string());
        }
    }
    for v in m.values_mut() {
        v.sort();
    }
    m
}

/// Every operand of a constexpr op by parameter (attributes but `name`, and inputs).
fn operands(op: &Operation, blobs: Option<&BlobFile>) -> BTreeMap<String, TensorData> {
    let mut m = BTreeMap::new();
    for (k, v) in &op.attributes {
        if k != "name" {
            m.insert(k.clone(), read_value(v, blobs).unwrap());
        }
    }
    for k in op.inputs.keys() {
        if let Some(Arg::Value(v)) = sdrs_coreml::program::input_arg(op, k) {
            m.insert(k.clone(), read_value(v, blobs).unwrap());
        }
    }
    m
}

fn f32s(t: &TensorData) -> Vec<f32> {
    t.values.to_f32().unwrap()
}

fn sse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum()
}

fn bits16(t: &TensorData) -> Vec<u16> {
    match &t.values {
        Values::F16(v) => v.iter().map(|x| x.to_bits()).collect(),
        other => panic!("not fp16: {other:?}"),
    }
}

struct Checked {
    ops: usize,
    exact: usize,
    bounded: usize,
}

/// Compares our compressed model with coremltools' package op by op.
fn compare(
    stem: &str,
    entry: &serde_json::Value,
    base: &MlPackage,
    ours: &Model,
    theirs: &MlPackage,
) -> Checked {
    let (ob, tb) = (block_of(ours), block_of(&theirs.model));
    let ours_w = base.weights.as_ref();
    let theirs_w = theirs.weights.as_ref();
    let base_block = block_of(&base.model);
    let base_consts: HashMap<&str, &Operation> = base_block
        .operations
        .iter()
        .filter(|op| op.r#type == "const")
        .map(|op| (op_name(op), op))
        .collect();
    let (oc, tc) = (const_producers(ob), const_producers(tb));
    let (ocons, tcons) = (consumers(ob), consumers(tb));
    let ours_ops: HashMap<&str, &Operation> = ob
        .operations
        .iter()
        .filter(|op| decode::is_constexpr(op))
        .map(|op| (op.outputs[0].name.as_str(), op))
        .collect();
    let theirs_ops: Vec<&Operation> = tb
        .operations
        .iter()
        .filter(|op| decode::is_constexpr(op))
        .collect();
    let listed = entry["constexpr_ops"].as_object().unwrap();
    assert_eq!(theirs_ops.len(), listed.len(), "{stem}: compressed.json");
    assert_eq!(
        ours_ops.len(),
        theirs_ops.len(),
        "{stem}: number of compressed weights"
    );
    assert_eq!(ob.operations.len(), tb.operations.len(), "{stem}: op count");
    let mut checked = Checked {
        ops: 0,
        exact: 0,
        bounded: 0,
    };
    for t in theirs_ops {
        let name = t.outputs[0].name.as_str();
        let o = ours_ops
            .get(name)
            .unwrap_or_else(|| panic!("{stem}: {name} not compressed by us"));
        assert_eq!(o.r#type, t.r#type, "{stem} {name}");
        assert_eq!(op_name(o), op_name(t), "{stem} {name}");
        assert_eq!(o.outputs, t.outputs, "{stem} {name}: output type");
        let want_consumers: Vec<String> = {
            let mut v: Vec<String> = listed[name]["consumers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ocons.get(name), tcons.get(name), "{stem} {name}: consumers");
        assert_eq!(ocons.get(name), Some(&want_consumers), "{stem} {name}");

        let (oo, to) = (operands(o, ours_w), operands(t, theirs_w));
        assert_eq!(
            oo.keys().collect::<Vec<_>>(),
            to.keys().collect::<Vec<_>>(),
            "{stem} {name}: operands"
        );
        for (k, tv) in &to {
            let ov = &oo[k];
            assert_eq!(
                (ov.dtype, &ov.shape),
                (tv.dtype, &tv.shape),
                "{stem} {name}: operand {k}"
            );
        }

        let dense_name = op_name(t)
            .strip_suffix("_palettized")
            .or_else(|| op_name(t).strip_suffix("_quantized"))
            .unwrap();
        let original = read_value(const_val(base_consts[dense_name]).unwrap(), ours_w).unwrap();
        let om = decode::materialize(o, &oc, ours_w).unwrap();
        let tm = decode::materialize(t, &tc, theirs_w).unwrap();
        assert_eq!(
            (om.dtype, &om.shape),
            (tm.dtype, &tm.shape),
            "{stem} {name}"
        );

        let exact = if t.r#type == "constexpr_lut_to_dense" {
            // One table per group: the leading axes of an iOS18 lut, one table for iOS16.
            let lut = &to["lut"];
            let groups: usize = if lut.shape.len() > 2 {
                lut.shape[..lut.shape.len() - 2].iter().product()
            } else {
                1
            };
            original.dtype == DataType::Float16 && original.numel() / groups >= 10_000
        } else {
            true
        };
        if exact {
            assert_eq!(
                bits16(&om),
                bits16(&tm),
                "{stem} {name}: materialised values"
            );
            assert_eq!(oo, to, "{stem} {name}: raw operands");
            checked.exact += 1;
        } else {
            let w = f32s(&original);
            let (e_ours, e_theirs) = (sse(&f32s(&om), &w), sse(&f32s(&tm), &w));
            assert!(
                e_ours <= e_theirs,
                "{stem} {name}: squared error {e_ours} above coremltools' {e_theirs}"
            );
            checked.bounded += 1;
        }
        checked.ops += 1;
    }
    checked
}

fn in_weight_file(v: &Value) -> bool {
    matches!(v.value, Some(value::Value::BlobFileValue(_)))
}

/// Where each operand of a constexpr op is stored: true for weight.bin.
fn placement(op: &Operation) -> BTreeMap<String, bool> {
    let mut m: BTreeMap<String, bool> = op
        .attributes
        .iter()
        .filter(|(k, _)| k.as_str() != "name")
        .map(|(k, v)| (k.clone(), in_weight_file(v)))
        .collect();
    for k in op.inputs.keys() {
        if let Some(Arg::Value(v)) = sdrs_coreml::program::input_arg(op, k) {
            m.insert(k.clone(), in_weight_file(v));
        }
    }
    m
}

/// Writes `model`, opens it again and checks that every constexpr op materialises to the same
/// values, every other op is unchanged, and constants sit inline or in weight.bin as in
/// coremltools' package `theirs`.
fn round_trip(
    stem: &str,
    entry: &serde_json::Value,
    model: &Model,
    weights: Option<&BlobFile>,
    theirs: &MlPackage,
) {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join(format!("{stem}.mlpackage"));
    let mut copy = model.clone();
    sdrs_coreml::package::write_package(&mut copy, weights, &dest).unwrap();
    let back = MlPackage::open(&dest).unwrap();
    let (a, b) = (block_of(model), block_of(&back.model));
    assert_eq!(a.operations.len(), b.operations.len());
    let (ca, cb) = (const_producers(a), const_producers(b));
    for (x, y) in a.operations.iter().zip(&b.operations) {
        assert_eq!(x.r#type, y.r#type, "{stem}");
        assert_eq!(x.outputs, y.outputs, "{stem}");
        if decode::is_constexpr(x) {
            let vx = decode::materialize(x, &ca, weights).unwrap();
            let vy = decode::materialize(y, &cb, back.weights.as_ref()).unwrap();
            assert_eq!(vx, vy, "{stem} {}", op_name(x));
        }
    }
    let t = block_of(&theirs.model);
    for (y, z) in b.operations.iter().zip(&t.operations) {
        assert_eq!(y.outputs, z.outputs, "{stem}: op order");
        if decode::is_constexpr(y) {
            assert_eq!(placement(y), placement(z), "{stem} {}", op_name(y));
        }
    }
    let blob_consts = b
        .operations
        .iter()
        .filter(|op| const_val(op).is_some_and(in_weight_file))
        .count();
    assert_eq!(
        blob_consts as u64,
        entry["n_const_in_weight_bin"].as_u64().unwrap(),
        "{stem}: consts in weight.bin"
    );
}

#[test]
fn compressed_fixtures_are_reproduced_from_their_base_packages() {
    let Some(dir) = fixture_dir("coreml/compressed") else {
        return;
    };
    let coreml = dir.parent().unwrap();
    let json = read_json(&dir.join("compressed.json"));
    assert_eq!(json["weight_threshold"].as_u64(), Some(2048));
    let models = json["models"].as_object().unwrap();
    assert!(!models.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let mut bases: HashMap<String, MlPackage> = HashMap::new();
    for (stem, entry) in models {
        let base_rel = entry["base"].as_str().unwrap().to_string();
        let base = bases
            .entry(base_rel.clone())
            .or_insert_with(|| MlPackage::open(&coreml.join(&base_rel)).unwrap());
        let theirs = MlPackage::open(&dir.join(format!("{stem}.mlpackage"))).unwrap();
        assert_eq!(
            theirs.model.specification_version as i64,
            entry["specificationVersion"].as_i64().unwrap()
        );
        let mut opts = options_of(entry, tmp.path());
        opts.weight_threshold = json["weight_threshold"].as_u64().unwrap() as usize;
        let mut ours = base.model.clone();
        let report: CompressReport =
            compress_program(&mut ours, base.weights.as_ref(), &opts).unwrap();
        assert_eq!(
            report.compressed,
            entry["constexpr_ops"].as_object().unwrap().len(),
            "{stem}: {report:?}"
        );
        assert!(
            report.weight_bytes_after < report.weight_bytes_before,
            "{stem}"
        );
        let c = compare(stem, entry, base, &ours, &theirs);
        assert_eq!(c.ops, report.compressed);
        if matches!(opts.mode, Mode::Linear { .. }) {
            assert_eq!(report.exact_kmeans, 0);
        } else {
            assert_eq!(report.exact_kmeans, c.exact, "{stem}");
        }
        println!(
            "{stem}: {} weights compressed ({} bit for bit, {} by squared error), {} kept, \
             {} -> {} bytes",
            c.ops,
            c.exact,
            c.bounded,
            report.kept,
            report.weight_bytes_before,
            report.weight_bytes_after
        );
        round_trip(stem, entry, &ours, base.weights.as_ref(), &theirs);
    }
}

#[test]
fn kmeans_tensors_palettize_at_every_width_as_coremltools() {
    let Some(dir) = fixture_dir("coreml/kmeans") else {
        return;
    };
    let Some(sd15) = fixture_dir("coreml/sd15") else {
        return;
    };
    let base = MlPackage::open(&sd15.join("Unet.mlpackage")).unwrap();
    let json = read_json(&dir.join("kmeans.json"));
    let tensors = json["tensors"].as_object().unwrap();
    let widths: Vec<u32> = {
        let first = tensors.values().next().unwrap();
        let mut w: Vec<u32> = first["nbits"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            .collect();
        w.sort();
        w
    };
    let mut exact = 0;
    for nbits in widths {
        let recipe = Recipe {
            bits: tensors
                .values()
                .map(|t| (t["const_name"].as_str().unwrap().to_string(), nbits))
                .collect(),
        };
        let opts = CompressOptions {
            mode: Mode::Recipe(recipe),
            weight_threshold: 0,
        };
        let mut model = base.model.clone();
        let report = compress_program(&mut model, base.weights.as_ref(), &opts).unwrap();
        assert_eq!(report.compressed, tensors.len());
        let block = block_of(&model);
        for t in tensors.values() {
            let name = format!("{}_palettized", t["const_name"].as_str().unwrap());
            let op = block
                .operations
                .iter()
                .find(|op| op.outputs[0].name == name)
                .unwrap();
            let bytes = std::fs::read(dir.join(t["file"].as_str().unwrap())).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let lut = read_value(&op.attributes["lut"], None).unwrap();
            let numel = t["numel"].as_u64().unwrap() as usize;
            let packed: Vec<u8> = match read_value(&op.attributes["indices"], None).unwrap().values
            {
                Values::Int(v) => v.iter().map(|&b| b as u8).collect(),
                other => panic!("{other:?}"),
            };
            let idx = unpack_bits(&packed, nbits, numel, false).unwrap();
            let want_lut: Vec<u16> = st
                .tensor(&format!("lut{nbits}"))
                .unwrap()
                .data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let want_idx: Vec<i64> = st
                .tensor(&format!("indices{nbits}"))
                .unwrap()
                .data()
                .iter()
                .map(|&b| b as i64)
                .collect();
            if numel >= 10_000 {
                assert_eq!(bits16(&lut), want_lut, "{name} lut{nbits}");
                assert_eq!(idx, want_idx, "{name} indices{nbits}");
                exact += 1;
            } else {
                let w: Vec<f32> = st
                    .tensor("weight")
                    .unwrap()
                    .data()
                    .chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect();
                let l = f32s(&lut);
                let ours: Vec<f32> = idx.iter().map(|&i| l[i as usize]).collect();
                let wl: Vec<f32> = want_lut
                    .iter()
                    .map(|&b| f16::from_bits(b).to_f32())
                    .collect();
                let theirs: Vec<f32> = want_idx.iter().map(|&i| wl[i as usize]).collect();
                assert!(sse(&ours, &w) <= sse(&theirs, &w), "{name} {nbits} bits");
            }
        }
    }
    assert!(exact > 0);
}

#[test]
fn compress_package_writes_a_package_that_reopens() {
    let Some(sd15) = fixture_dir("coreml/sd15") else {
        return;
    };
    let src = sd15.join("Unet.mlpackage");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("Unet_pal4.mlpackage");
    let opts = CompressOptions::new(Mode::Palettize {
        nbits: 4,
        granularity: Granularity::PerTensor,
    });
    let report = compress_package(&src, &dest, &opts).unwrap();
    assert!(report.compressed > 0);
    let back = MlPackage::open(&dest).unwrap();
    let block = block_of(&back.model);
    let consts = const_producers(block);
    let n = block
        .operations
        .iter()
        .filter(|op| decode::is_constexpr(op))
        .inspect(|op| {
            decode::materialize(op, &consts, back.weights.as_ref()).unwrap();
        })
        .count();
    assert_eq!(n, report.compressed);
    assert!(back.size_on_disk() < MlPackage::open(&src).unwrap().size_on_disk());

    let e = compress_package(&src, &src, &opts).unwrap_err().to_string();
    assert!(e.contains("dest"), "{e}");
    let e = compress_package(&src, &src.join("Inner.mlpackage"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dest"), "{e}");
    assert!(!src.join("Inner.mlpackage").exists());
    let e = compress_package(&dest, &out.path().join("Again.mlpackage"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already compressed"), "{e}");
}

#[test]
fn bad_options_and_models_are_refused_by_name() {
    let Some(sd15) = fixture_dir("coreml/sd15") else {
        return;
    };
    let Some(compressed) = fixture_dir("coreml/compressed") else {
        return;
    };
    let ios16 = MlPackage::open(&sd15.join("Unet.mlpackage")).unwrap();
    let ios18 = MlPackage::open(&compressed.join("Unet_ios18_fp16.mlpackage")).unwrap();
    let run = |pkg: &MlPackage, mode: Mode| {
        let mut m = pkg.model.clone();
        let r = compress_program(&mut m, pkg.weights.as_ref(), &CompressOptions::new(mode));
        if r.is_err() {
            assert_eq!(m, pkg.model, "a refused model is left as it was");
        }
        r
    };
    let pal = |nbits, granularity| Mode::Palettize { nbits, granularity };

    let e = run(&ios16, pal(5, Granularity::PerTensor))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nbits") && e.contains("1, 2, 3, 4, 6, 8"), "{e}");
    let e = run(
        &ios18,
        pal(4, Granularity::PerGroupedChannel { group_size: 0 }),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("group_size"), "{e}");
    let e = run(
        &ios16,
        pal(4, Granularity::PerGroupedChannel { group_size: 16 }),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("per_grouped_channel") && e.contains("iOS18"),
        "{e}"
    );
    let e = run(
        &ios16,
        Mode::Linear {
            dtype: LinearDtype::Int4,
            block_size: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("4-bit") && e.contains("iOS18"), "{e}");
    let e = run(
        &ios16,
        Mode::Linear {
            dtype: LinearDtype::Int8,
            block_size: Some(32),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("per_block"), "{e}");

    // A group size that divides no channel count leaves every weight dense, each one named with
    // the reason, as coremltools skips it.
    let r = run(
        &ios18,
        pal(4, Granularity::PerGroupedChannel { group_size: 7 }),
    )
    .unwrap();
    assert_eq!(r.compressed, 0);
    assert!(!r.skipped.is_empty());
    for s in &r.skipped {
        assert!(s.reason.contains("group size 7"), "{s:?}");
        assert!(s.weight.ends_with("weight_to_fp16"), "{s:?}");
    }

    let mut bits = BTreeMap::new();
    bits.insert("no_such_weight".to_string(), 4);
    let e = run(&ios16, Mode::Recipe(Recipe { bits }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_weight"), "{e}");

    let pal6 = MlPackage::open(&compressed.join("Unet_pal6_pertensor_ios16.mlpackage")).unwrap();
    let e = run(&pal6, pal(4, Granularity::PerTensor))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already compressed") && e.contains("constexpr_lut_to_dense"),
        "{e}"
    );

    let mut not_program = Model::default();
    let e = compress_program(
        &mut not_program,
        None,
        &CompressOptions::new(pal(4, Granularity::PerTensor)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not an ML program"), "{e}");
}

#[test]
fn recipes_are_read_from_a_json_object_of_bits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.json");
    std::fs::write(&path, r#"{"a_weight": 4, "b_weight": 16}"#).unwrap();
    let r = Recipe::from_json_file(&path).unwrap();
    assert_eq!(r.bits.get("a_weight"), Some(&4));
    assert_eq!(r.bits.get("b_weight"), Some(&16));
    std::fs::write(&path, r#"{"a_weight": 5}"#).unwrap();
    let e = Recipe::from_json_file(&path).unwrap_err().to_string();
    assert!(e.contains("a_weight") && e.contains("16"), "{e}");
    std::fs::write(&path, r#"[4, 6]"#).unwrap();
    let e = Recipe::from_json_file(&path).unwrap_err().to_string();
    assert!(e.contains("object"), "{e}");
    let e = Recipe::from_json_file(&dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
}

// Small programs built here, for the cases the fixture models do not have: fp32 weights, tables
// padded with zeros, conv_transpose and matmul channel axes, weights whose consumers disagree.

fn name_attr(name: &str) -> Value {
    sdrs_coreml::value::immediate_value(&TensorData {
        dtype: DataType::String,
        shape: vec![],
        values: Values::Str(vec![name.into()]),
    })
    .unwrap()
}

fn var(name: &str) -> Argument {
    Argument {
        arguments: vec![ArgBinding {
            binding: Some(Binding::Name(name.into())),
        }],
    }
}

fn literal_bool(b: bool) -> Argument {
    let v = sdrs_coreml::value::immediate_value(&TensorData {
        dtype: DataType::Bool,
        shape: vec![],
        values: Values::Bool(vec![b]),
    })
    .unwrap();
    Argument {
        arguments: vec![ArgBinding {
            binding: Some(Binding::Value(v)),
        }],
    }
}

/// A `main` of one const weight `w` read (as `weight`, or `y` for matmul) by each consumer.
fn tiny_model(spec: i32, opset: &str, w: &TensorData, consumers: &[&str]) -> Model {
    let mut ops = vec![Operation {
        r#type: "const".into(),
        outputs: vec![NamedValueType {
            name: "w".into(),
            r#type: Some(make_tensor_type(w.dtype, &w.shape)),
        }],
        attributes: [
            ("name".to_string(), name_attr("w")),
            (
                "val".to_string(),
                sdrs_coreml::value::immediate_value(w).unwrap(),
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    }];
    let mut outputs = vec![];
    for (i, ty) in consumers.iter().enumerate() {
        let out = format!("y{i}");
        let mut inputs: HashMap<String, Argument> = HashMap::new();
        inputs.insert("x".into(), var("x"));
        if *ty == "matmul" {
            inputs.insert("y".into(), var("w"));
            inputs.insert("transpose_x".into(), literal_bool(false));
            inputs.insert("transpose_y".into(), literal_bool(false));
        } else {
            inputs.insert("weight".into(), var("w"));
        }
        ops.push(Operation {
            r#type: ty.to_string(),
            inputs,
            outputs: vec![NamedValueType {
                name: out.clone(),
                r#type: Some(make_tensor_type(w.dtype, &[1])),
            }],
            attributes: [("name".to_string(), name_attr(&out))]
                .into_iter()
                .collect(),
            ..Default::default()
        });
        outputs.push(out);
    }
    let block = Block {
        outputs,
        operations: ops,
        ..Default::default()
    };
    let function = Function {
        inputs: vec![NamedValueType {
            name: "x".into(),
            r#type: Some(make_tensor_type(w.dtype, &[1])),
        }],
        opset: opset.into(),
        block_specializations: [(opset.to_string(), block)].into_iter().collect(),
        ..Default::default()
    };
    Model {
        specification_version: spec,
        r#type: Some(model::Type::MlProgram(Program {
            version: 1,
            functions: [("main".to_string(), function)].into_iter().collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn fp16(shape: &[usize], v: &[f32]) -> TensorData {
    TensorData {
        dtype: DataType::Float16,
        shape: shape.to_vec(),
        values: Values::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
    }
}

fn compressed_op(model: &Model) -> (&Operation, TensorData) {
    let block = block_of(model);
    let op = block
        .operations
        .iter()
        .find(|op| decode::is_constexpr(op))
        .expect("a compressed weight");
    let dense = decode::materialize(op, &const_producers(block), None).unwrap();
    (op, dense)
}

fn opts(mode: Mode) -> CompressOptions {
    CompressOptions::new(mode)
}

#[test]
fn a_weight_with_few_values_gets_a_zero_padded_table_and_stays_exact() {
    let levels = [-0.5f32, 0.25, 1.0];
    let v: Vec<f32> = (0..4096).map(|i| levels[(i * 7 + i / 5) % 3]).collect();
    let w = fp16(&[64, 64, 1, 1], &v);
    let mut m = tiny_model(7, "CoreML6", &w, &["conv"]);
    let mode = Mode::Palettize {
        nbits: 4,
        granularity: Granularity::PerTensor,
    };
    let r = compress_program(&mut m, None, &opts(mode)).unwrap();
    assert_eq!((r.compressed, r.exact_kmeans), (1, 0));
    let (op, dense) = compressed_op(&m);
    assert_eq!(op.outputs[0].name, "w_palettized");
    let lut = read_value(&op.attributes["lut"], None).unwrap();
    let want: Vec<f32> = levels.iter().copied().chain([0.0; 13]).collect();
    assert_eq!(f32s(&lut), want);
    assert_eq!(dense, w);
    // The consumer reads the new var.
    assert_eq!(
        input_var_names(&block_of(&m).operations[1]),
        vec!["w_palettized", "x"]
    );
}

#[test]
fn fp32_weights_palettize_per_group_and_quantize_per_block() {
    let v = noise(32 * 128, 1);
    let w = TensorData {
        dtype: DataType::Float32,
        shape: vec![32, 128],
        values: Values::F32(v.clone()),
    };
    let mut m = tiny_model(9, "CoreML8", &w, &["linear"]);
    let mode = Mode::Palettize {
        nbits: 2,
        granularity: Granularity::PerGroupedChannel { group_size: 8 },
    };
    compress_program(&mut m, None, &opts(mode)).unwrap();
    let (op, dense) = compressed_op(&m);
    let ops = operands(op, None);
    assert_eq!(ops["lut"].shape, vec![4, 1, 4, 1]);
    assert_eq!(ops["lut"].dtype, DataType::Float32);
    assert_eq!(ops["indices"].dtype, DataType::Uint2);
    assert_eq!(dense.dtype, DataType::Float32);
    let lut = f32s(&ops["lut"]);
    let got = f32s(&dense);
    for (k, x) in got.iter().enumerate() {
        let g = k / (8 * 128);
        assert!(lut[g * 4..g * 4 + 4].contains(x), "element {k}");
    }
    // Two-bit tables of uniform noise: well under the spread of the values.
    assert!(sse(&got, &v) / (v.len() as f64) < 0.03);

    let mut m = tiny_model(9, "CoreML8", &w, &["linear"]);
    let mode = Mode::Linear {
        dtype: LinearDtype::Int4,
        block_size: Some(32),
    };
    compress_program(&mut m, None, &opts(mode)).unwrap();
    let (op, dense) = compressed_op(&m);
    let ops = operands(op, None);
    assert_eq!(op.r#type, "constexpr_blockwise_shift_scale");
    assert_eq!(ops["scale"].shape, vec![32, 4]);
    assert_eq!(ops["data"].dtype, DataType::Int4);
    let scale = f32s(&ops["scale"]);
    for (k, (x, y)) in f32s(&dense).iter().zip(&v).enumerate() {
        let s = scale[(k / 128) * 4 + (k % 128) / 32];
        assert!((x - y).abs() <= s / 2.0 + 1e-6, "element {k}: {x} vs {y}");
    }
}

#[test]
fn conv_transpose_and_matmul_weights_use_their_own_channel_axes() {
    // conv_transpose weights are [Cin, Cout, kh, kw]: groups and scales run along axis 1.
    let v = noise(16 * 32 * 9, 2);
    let w = fp16(&[16, 32, 3, 3], &v);
    let mut m = tiny_model(9, "CoreML8", &w, &["conv_transpose"]);
    let mode = Mode::Palettize {
        nbits: 4,
        granularity: Granularity::PerGroupedChannel { group_size: 8 },
    };
    compress_program(&mut m, None, &opts(mode)).unwrap();
    let (op, dense) = compressed_op(&m);
    let ops = operands(op, None);
    assert_eq!(ops["lut"].shape, vec![1, 4, 1, 1, 16, 1]);
    let Values::F16(wv) = &w.values else {
        unreachable!()
    };
    let lut = bits16(&ops["lut"]);
    for g in 0..4 {
        // k-means depends on the multiset of a group's values only.
        let members: Vec<usize> = (0..wv.len()).filter(|k| (k / 9) % 32 / 8 == g).collect();
        let group: Vec<f16> = members.iter().map(|&k| wv[k]).collect();
        let (want, idx) = sdrs_quant::kmeans::palettize_f16(&group, 4).unwrap();
        let want: Vec<u16> = want.iter().map(|x| x.to_bits()).collect();
        assert_eq!(&lut[g * 16..g * 16 + 16], &want[..], "group {g}");
        let dense = bits16(&dense);
        for (j, &k) in members.iter().enumerate() {
            assert_eq!(dense[k], want[idx[j] as usize], "element {k}");
        }
    }

    let mut m = tiny_model(7, "CoreML6", &w, &["conv_transpose"]);
    let mode = Mode::Linear {
        dtype: LinearDtype::Int8,
        block_size: None,
    };
    compress_program(&mut m, None, &opts(mode.clone())).unwrap();
    let (op, _) = compressed_op(&m);
    let ops = operands(op, None);
    assert_eq!(ops["scale"].shape, vec![32]);
    assert_eq!(ops["zero_point"].shape, vec![32]);
    assert_eq!(ops["axis"].values, Values::Int(vec![1]));

    // matmul's y without transpose is [K, N]: output channels on the last axis.
    let w = fp16(&[64, 96], &noise(64 * 96, 3));
    let mut m = tiny_model(7, "CoreML6", &w, &["matmul"]);
    compress_program(&mut m, None, &opts(mode.clone())).unwrap();
    let (op, _) = compressed_op(&m);
    let ops = operands(op, None);
    assert_eq!(ops["scale"].shape, vec![96]);
    assert_eq!(ops["axis"].values, Values::Int(vec![1]));

    // Consumers that disagree on the axes leave the weight dense, named in the report.
    let w = fp16(&[64, 64, 1, 1], &noise(4096, 4));
    let mut m = tiny_model(7, "CoreML6", &w, &["conv", "conv_transpose"]);
    let r = compress_program(&mut m, None, &opts(mode)).unwrap();
    assert_eq!(r.compressed, 0);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].weight, "w");
    assert!(r.skipped[0].reason.contains("axes"), "{:?}", r.skipped);
}

#[test]
fn the_weight_threshold_is_exclusive() {
    let w = fp16(&[64, 64], &noise(4096, 5));
    let mode = Mode::Palettize {
        nbits: 6,
        granularity: Granularity::PerTensor,
    };
    for (threshold, compressed) in [(4096, 0), (4095, 1)] {
        let mut m = tiny_model(7, "CoreML6", &w, &["linear"]);
        let o = CompressOptions {
            mode: mode.clone(),
            weight_threshold: threshold,
        };
        let r = compress_program(&mut m, None, &o).unwrap();
        assert_eq!((r.compressed, r.kept), (compressed, 1 - compressed));
    }
}
