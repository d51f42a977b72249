//! Batches: `--batch-count` runs one batch after another and `--batch-size` denoises several
//! images in one UNet batch; image k of a run uses seed + k and is saved as out.png, out-1.png, ...

use std::path::Path;

use crate::util::{files_in, fixtures, read_png, sdrs, stderr};

fn generate(dir: &Path, name: &str, seed: &str, extra: &[&str]) {
    let model = fixtures().join("tiny-sd15");
    let out = dir.join(name);
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "a lighthouse at dusk",
        "--steps",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        seed,
        "--sampling-method",
        "euler_a",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = sdrs(&args);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// The largest difference between two images' 8-bit channels.
fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn each_image_of_a_batch_is_the_image_its_seed_gives_alone() {
    let dir = tempfile::tempdir().unwrap();
    // An ancestral sampler draws noise at every step: each image must draw from its own seed.
    generate(dir.path(), "alone-5.png", "5", &[]);
    generate(dir.path(), "alone-6.png", "6", &[]);
    generate(dir.path(), "alone-7.png", "7", &[]);
    generate(dir.path(), "count.png", "5", &["-b", "3"]);
    generate(dir.path(), "size.png", "5", &["--batch-size", "2"]);
    let mut names = files_in(dir.path());
    names.sort();
    assert_eq!(
        names,
        [
            "alone-5.png",
            "alone-6.png",
            "alone-7.png",
            "count-1.png",
            "count-2.png",
            "count.png",
            "size-1.png",
            "size.png"
        ]
    );
    let png = |name: &str| read_png(&dir.path().join(name));
    let (_, _, five, _) = png("alone-5.png");
    let (_, _, six, _) = png("alone-6.png");
    let (_, _, seven, _) = png("alone-7.png");
    assert_ne!(five, six);
    // Batch count: the same computation per image, so the same bytes.
    for (name, alone, seed) in [
        ("count.png", &five, 5),
        ("count-1.png", &six, 6),
        ("count-2.png", &seven, 7),
    ] {
        let (_, _, pixels, text) = png(name);
        assert_eq!(&pixels, alone, "{name}");
        assert!(text.contains(&format!("Seed: {seed},")), "{name}: {text}");
        assert!(!text.contains("Batch size"), "{text}");
    }
    // Batch size: one UNet batch; the numbers may round differently in a batch of two.
    for (position, (name, alone, seed)) in [("size.png", &five, 5), ("size-1.png", &six, 6)]
        .into_iter()
        .enumerate()
    {
        let (_, _, pixels, text) = png(name);
        assert!(max_pixel_diff(&pixels, alone) <= 1, "{name}");
        assert!(text.contains(&format!("Seed: {seed},")), "{name}: {text}");
        assert!(
            text.contains(&format!("Batch size: 2, Batch pos: {position}")),
            "{name}: {text}"
        );
    }
}

#[test]
fn a_batch_size_out_of_range_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [("--batch-size", "0"), ("--batch-size", "65"), ("-b", "0")] {
        let out = dir.path().join("x.png");
        let output = sdrs(&[
            "generate",
            "-m",
            fixtures().join("tiny-sd15").to_str().unwrap(),
            "-p",
            "x",
            flag,
            value,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert!(
            message.contains(value) && message.contains(flag.trim_start_matches('-')),
            "{message}"
        );
    }
    assert!(files_in(dir.path()).is_empty());
}
