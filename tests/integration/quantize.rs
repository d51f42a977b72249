//! `sdrs quantize` and `--quantize` end to end: a quantized folder loads like any model and gives
//! the image that quantizing at load gives; GGUF files come out as gguf-py writes them; the
//! sensitivity pass writes a recipe that loads; bad requests are refused with nothing written.

use std::path::Path;

use sdrs_quant::gguf::GgufFile;

use crate::util::{extended_fixtures, files_in, fixtures, read_png, sdrs, stderr};

fn generate(model: &Path, extra: &[&str], out: &Path) {
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "a red fox in the snow",
        "-s",
        "7",
        "--steps",
        "3",
        "-W",
        "64",
        "-H",
        "64",
        "--dtype",
        "f32",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = sdrs(&args);
    assert!(output.status.success(), "{}", stderr(&output));
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                folder_bytes(&path)
            } else {
                std::fs::metadata(&path).unwrap().len()
            }
        })
        .sum()
}

#[test]
fn a_quantized_folder_gives_the_image_of_quantizing_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-sd15");
    for spec in [
        "kmeans6",
        "kmeans4:grouped16",
        "int8",
        "int4:block32",
        "q8_0",
    ] {
        let folder = dir.path().join(spec.replace(':', "-"));
        let output = sdrs(&[
            "quantize",
            "-m",
            source.to_str().unwrap(),
            "-o",
            folder.to_str().unwrap(),
            "--quantize",
            spec,
        ]);
        assert!(output.status.success(), "{spec}: {}", stderr(&output));
        assert!(stderr(&output).contains("unet: "), "{}", stderr(&output));
        let from_folder = dir
            .path()
            .join(format!("{}-folder.png", spec.replace(':', "-")));
        let at_load = dir
            .path()
            .join(format!("{}-load.png", spec.replace(':', "-")));
        generate(&folder, &[], &from_folder);
        generate(&source, &["--quantize", spec], &at_load);
        let (_, _, folder_pixels, _) = read_png(&from_folder);
        let (_, _, load_pixels, text) = read_png(&at_load);
        assert_eq!(folder_pixels, load_pixels, "{spec}");
        assert!(text.contains(&format!("Quantization: {spec}")), "{text}");
    }
    // The fixture is f32; 6-bit indices and 8-bit values take a fraction of its bytes (the
    // VAE and the small tensors stay as they are).
    let dense = folder_bytes(&source);
    let palettized = folder_bytes(&dir.path().join("kmeans6"));
    assert!(palettized < dense, "{palettized} >= {dense}");
    let dense_image = dir.path().join("dense.png");
    generate(&source, &[], &dense_image);
    let quantized = dir.path().join("kmeans6-load.png");
    assert_ne!(
        read_png(&dense_image).2,
        read_png(&quantized).2,
        "quantization changed nothing"
    );
}

#[test]
fn gguf_files_are_written_as_gguf_py_writes_them() {
    let Some(gguf) = extended_fixtures("gguf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (source, kind, reference) in [
        (
            "tiny-sd15-single-file.safetensors",
            "q8_0",
            "tiny-sd15-q8_0.gguf",
        ),
        (
            "tiny-sd15-single-file.safetensors",
            "q5_1",
            "tiny-sd15-q5_1.gguf",
        ),
        (
            "tiny-sdxl-single-file.safetensors",
            "q4_0",
            "tiny-sdxl-q4_0.gguf",
        ),
    ] {
        let out = dir.path().join(reference);
        let output = sdrs(&[
            "quantize",
            "-m",
            fixtures().join(source).to_str().unwrap(),
            "--format",
            "gguf",
            "--type",
            kind,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let ours = GgufFile::open(&out).unwrap();
        let theirs = GgufFile::open(&gguf.join(reference)).unwrap();
        assert_eq!(ours.tensors().len(), theirs.tensors().len(), "{reference}");
        for info in theirs.tensors() {
            let mine = ours
                .tensor(&info.name)
                .unwrap_or_else(|| panic!("{}", info.name));
            assert_eq!(
                (mine.ggml_type, &mine.shape),
                (info.ggml_type, &info.shape),
                "{reference}: {}",
                info.name
            );
            assert!(
                ours.read_bytes(mine).unwrap() == theirs.read_bytes(info).unwrap(),
                "{reference}: {} has other bytes",
                info.name
            );
        }
    }
}

#[test]
fn a_gguf_checkpoint_loads_with_its_blocks_kept() {
    let Some(gguf) = extended_fixtures("gguf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.png");
    let file = gguf.join("tiny-sd15-q8_0.gguf");
    let output = sdrs(&[
        "generate",
        "-m",
        file.to_str().unwrap(),
        "--config",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a fox",
        "--steps",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(read_png(&out).0, 64);
}

#[test]
fn the_sensitivity_pass_writes_a_recipe_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-sd15");
    let recipe = dir.path().join("recipe.json");
    let output = sdrs(&[
        "quantize",
        "--analyze",
        "-m",
        source.to_str().unwrap(),
        "-o",
        recipe.to_str().unwrap(),
        "--target-bits",
        "5",
        "--analyze-bits",
        "2,8",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = std::fs::read_to_string(&recipe).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["method"], "kmeans6");
    let layers = json["layers"].as_object().unwrap();
    assert!(layers.len() > 10, "{text}");
    let average = json["average_bits"].as_f64().unwrap();
    assert!(average <= 5.0 + 1e-9 && average > 2.0, "{average}");
    let bits: std::collections::BTreeSet<u64> =
        layers.values().map(|b| b.as_u64().unwrap()).collect();
    assert!(
        bits.len() > 1,
        "a mixed recipe has several widths: {bits:?}"
    );
    // PSNR grows with the bits, for the whole UNet.
    let uniform = &json["uniform_psnr_db"];
    assert!(
        uniform["8"].as_f64().unwrap() > uniform["2"].as_f64().unwrap(),
        "{uniform}"
    );

    let image = dir.path().join("mixed.png");
    generate(&source, &["--recipe", recipe.to_str().unwrap()], &image);
    assert!(read_png(&image).3.contains("Quantization: kmeans6 recipe"));
    let folder = dir.path().join("mixed");
    let output = sdrs(&[
        "quantize",
        "-m",
        source.to_str().unwrap(),
        "-o",
        folder.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let from_folder = dir.path().join("mixed-folder.png");
    generate(&folder, &[], &from_folder);
    assert_eq!(read_png(&image).2, read_png(&from_folder).2);
}

#[test]
fn bad_quantize_requests_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-sd15");
    let out = dir.path().join("out");
    let cases: [(&[&str], &str); 5] = [
        (&["--quantize", "kmeans5"], "kmeans5"),
        (&["--bits", "5"], "bits = 5"),
        (
            &["--method", "linear", "--bits", "6"],
            "--bits 6 with --method linear",
        ),
        (
            &["--format", "gguf", "--type", "q8_0"],
            "not a diffusers folder",
        ),
        (&["--format", "gguf", "--type", "q9_k"], "q9_k"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "quantize",
            "-m",
            source.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let output = sdrs(&args);
        assert!(!output.status.success(), "{extra:?}");
        assert!(
            stderr(&output).contains(expected),
            "{extra:?}: {}",
            stderr(&output)
        );
        assert!(
            files_in(dir.path()).is_empty(),
            "{extra:?}: {:?}",
            files_in(dir.path())
        );
    }
    // An existing target is never overwritten.
    std::fs::create_dir(&out).unwrap();
    let output = sdrs(&[
        "quantize",
        "-m",
        source.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        stderr(&output).contains("already exists"),
        "{}",
        stderr(&output)
    );
    let output = sdrs(&[
        "generate",
        "-m",
        source.to_str().unwrap(),
        "-p",
        "x",
        "--quantize",
        "int16",
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("int16"), "{}", stderr(&output));
}
