//! Every compressed constant of `../shared/fixtures/coreml/compressed/` materialises to the values
//! coremltools 9.0 materialised (`X.decoded.safetensors`), bit for bit.

use std::path::PathBuf;

use sdrs_coreml::program::{const_producers, main_block, op_name};
use sdrs_coreml::value::Values;
use sdrs_coreml::{decode, MlPackage};

fn fixture_dir(sub: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(sub)
}

#[test]
fn compressed_constants_decode_as_coremltools_materialises_them() {
    let Some(dir) = fixture_dir("coreml/compressed") else {
        return;
    };
    let mut checked = 0;
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".decoded.safetensors"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        let stem = name.trim_end_matches(".decoded.safetensors");
        let pkg = MlPackage::open(&dir.join(format!("{stem}.mlpackage"))).unwrap();
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let want = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, _, block) = main_block(pkg.program().unwrap()).unwrap();
        let consts = const_producers(block);
        let mut found = 0;
        for op in &block.operations {
            if !decode::is_constexpr(op) {
                continue;
            }
            let out = &op.outputs[0].name;
            let Ok(t) = want.tensor(out) else { continue };
            let got = decode::materialize(op, &consts, pkg.weights.as_ref())
                .unwrap_or_else(|e| panic!("{stem} {}: {e}", op_name(op)));
            assert_eq!(got.shape, t.shape(), "{stem} {out}");
            let Values::F16(v) = &got.values else {
                panic!("{stem} {out}: not fp16")
            };
            let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
            let want_bits: Vec<u16> = t
                .data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let diff = bits.iter().zip(&want_bits).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff,
                0,
                "{stem} {out}: {diff} of {} values differ",
                bits.len()
            );
            found += 1;
        }
        assert_eq!(found, want.len(), "{stem}: every decoded entry has its op");
        checked += found;
    }
    println!("{checked} compressed constants decoded bit for bit");
}

/// A package written back by sdrs reads back with the same program and the same constants.
#[test]
fn a_package_written_back_keeps_its_program_and_weights() {
    let Some(dir) = fixture_dir("coreml/compressed") else {
        return;
    };
    let src = MlPackage::open(&dir.join("Unet_pal4_group16_ios18.mlpackage")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("Copy.mlpackage");
    let mut model = src.model.clone();
    sdrs_coreml::package::write_package(&mut model, src.weights.as_ref(), &dest).unwrap();
    let copy = MlPackage::open(&dest).unwrap();
    let (_, opset_a, a) = main_block(src.program().unwrap()).unwrap();
    let (_, opset_b, b) = main_block(copy.program().unwrap()).unwrap();
    assert_eq!(opset_a, opset_b);
    assert_eq!(a.operations.len(), b.operations.len());
    let (ca, cb) = (const_producers(a), const_producers(b));
    for (x, y) in a.operations.iter().zip(&b.operations) {
        assert_eq!(x.r#type, y.r#type);
        assert_eq!(x.outputs, y.outputs);
        if decode::is_constexpr(x) {
            let vx = decode::materialize(x, &ca, src.weights.as_ref()).unwrap();
            let vy = decode::materialize(y, &cb, copy.weights.as_ref()).unwrap();
            assert_eq!(vx, vy, "{}", op_name(x));
        }
    }
    assert_eq!(
        src.weights.as_ref().unwrap().len_bytes(),
        copy.weights.as_ref().unwrap().len_bytes()
    );
    // Nothing but the package is left in the folder.
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1);
}
