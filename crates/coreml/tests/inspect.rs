//! `inspect` on the Core ML fixtures: I/O and op counts as coremltools recorded them
//! (`packages.json`, `metadata/*.ops.json`), weight bytes that add up to the weight file, and the
//! pipeline kind of each resources folder.

use std::path::PathBuf;

use sdrs_coreml::inspect::{inspect, DEFAULT_ANE_BUDGET_BYTES};

fn fixture_dir(sub: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(sub)
}

#[test]
fn every_fixture_package_reports_the_io_and_ops_coremltools_recorded() {
    let Some(dir) = fixture_dir("coreml") else {
        return;
    };
    let packages: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("packages.json")).unwrap()).unwrap();
    let packages = packages.as_object().unwrap();
    assert!(!packages.is_empty());
    for (rel, want) in packages {
        let report = inspect(&dir.join(rel), DEFAULT_ANE_BUDGET_BYTES).unwrap();
        let m = &report.models[0];
        assert_eq!(
            m.specification_version,
            want["specificationVersion"].as_i64().unwrap(),
            "{rel}"
        );
        assert_eq!(m.opset.as_deref(), want["opset"].as_str(), "{rel}");
        for (ours, theirs) in [(&m.inputs, &want["inputs"]), (&m.outputs, &want["outputs"])] {
            let theirs = theirs.as_array().unwrap();
            assert_eq!(ours.len(), theirs.len(), "{rel}");
            for (o, t) in ours.iter().zip(theirs) {
                assert_eq!(o.name, t["name"].as_str().unwrap(), "{rel}");
                assert_eq!(o.dtype, t["dataType"].as_str().unwrap(), "{rel} {}", o.name);
                let shape: Vec<i64> = serde_json::from_value(t["shape"].clone()).unwrap();
                assert_eq!(o.shape, shape, "{rel} {}", o.name);
            }
        }
        assert_eq!(
            m.weight_file_bytes,
            want["weight_bin"]["bytes"].as_u64().unwrap(),
            "{rel}"
        );
        // Op counts as coremltools counted them (const included there).
        let ops_file = dir.join("metadata").join(format!(
            "{}.ops.json",
            rel.replace('/', "__").trim_end_matches(".mlpackage")
        ));
        let recorded: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ops_file).unwrap()).unwrap();
        for (op, n) in recorded["raw_mil_op_type_counts"].as_object().unwrap() {
            let n = n.as_u64().unwrap() as usize;
            let ours = if op == "const" {
                m.const_ops.unwrap()
            } else {
                m.ops.get(op).copied().unwrap_or(0)
            };
            assert_eq!(ours, n, "{rel}: {op}");
        }
        // Stored weight bytes cannot exceed the weight file (inline constants are small).
        assert!(m.stored_weight_bytes() > 0, "{rel}");
        assert!(
            m.stored_weight_bytes() <= m.weight_file_bytes + (1 << 16),
            "{rel}: {} stored vs {} in weight.bin",
            m.stored_weight_bytes(),
            m.weight_file_bytes
        );
        for (kind, w) in &m.weights {
            if kind.starts_with("constexpr_") {
                assert!(
                    w.stored < w.dense,
                    "{rel} {kind}: compressed weights are smaller"
                );
            } else {
                assert_eq!(w.stored, w.dense, "{rel} {kind}");
            }
        }
    }
}

#[test]
fn resources_folders_name_their_pipeline() {
    let Some(dir) = fixture_dir("coreml") else {
        return;
    };
    for (folder, pipeline, chunked) in [
        ("sd15", "SD1.5-like", false),
        ("sdxl", "SDXL", false),
        ("sd15-chunked", "unknown", true),
    ] {
        let r = inspect(&dir.join(folder), DEFAULT_ANE_BUDGET_BYTES).unwrap();
        let f = r.folder.unwrap();
        assert_eq!(f.pipeline, pipeline, "{folder}");
        assert_eq!(f.chunked, chunked, "{folder}");
        assert_eq!(f.attention, "SPLIT_EINSUM", "{folder}");
    }
    let r = inspect(&dir.join("sd15"), DEFAULT_ANE_BUDGET_BYTES).unwrap();
    assert!(r.folder.as_ref().unwrap().tokenizer);
    assert!(r.models.iter().all(|m| r.fits_ane(m)));
    let tiny = inspect(&dir.join("sd15"), 1000).unwrap();
    assert!(tiny.models.iter().all(|m| !tiny.fits_ane(m)));
}

#[test]
fn a_compiled_model_is_described_by_its_metadata() {
    let Some(dir) = fixture_dir("coreml/metadata") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mc = tmp.path().join("Unet.mlmodelc");
    std::fs::create_dir_all(&mc).unwrap();
    std::fs::copy(
        dir.join("sd15__Unet.metadata.json"),
        mc.join("metadata.json"),
    )
    .unwrap();
    let r = inspect(tmp.path(), DEFAULT_ANE_BUDGET_BYTES).unwrap();
    let m = &r.models[0];
    assert_eq!(m.format, "mlmodelc");
    assert_eq!(m.inputs.len(), 3);
    assert_eq!(m.inputs[2].name, "encoder_hidden_states");
    assert_eq!(m.inputs[2].shape.len(), 4);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sd15__Unet.metadata.json")).unwrap())
            .unwrap();
    let histogram = meta[0]["mlProgramOperationTypeHistogram"]
        .as_object()
        .unwrap();
    assert_eq!(m.ops.len(), histogram.len());
    assert_eq!(
        m.ops.get("Softmax").copied(),
        histogram["Softmax"].as_u64().map(|n| n as usize)
    );
    assert_eq!(r.folder.unwrap().attention, "SPLIT_EINSUM");
}

#[test]
fn a_path_that_is_no_model_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let e = inspect(tmp.path(), DEFAULT_ANE_BUDGET_BYTES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no Core ML models here"), "{e}");
    let e = inspect(&tmp.path().join("nope"), DEFAULT_ANE_BUDGET_BYTES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}
