//! `--vae-tiling`, `--vae-tile-size`, `--vae-tile-overlap` on the tiny SD1.5 fixture: a tiled
//! decode gives an image of the same size close to the untiled one, bad values are refused naming
//! the flag, and `roundtrip` takes the same flags.

use crate::util::{fixtures, read_png, sdrs, stderr, stdout};

fn generate(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let model = fixtures().join("tiny-sd15");
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "a lighthouse at dusk",
        "--steps",
        "2",
        "-W",
        "128",
        "-H",
        "96",
        "-s",
        "7",
        "--sampling-method",
        "euler",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sdrs(&args)
}

#[test]
fn a_tiled_decode_is_close_to_the_untiled_one() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, tiled) = (dir.path().join("whole.png"), dir.path().join("tiled.png"));
    let output = generate(&whole, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    // A small image is not tiled automatically.
    assert!(
        !stderr(&output).contains("tiled VAE"),
        "{}",
        stderr(&output)
    );
    // 64-pixel tiles (8 latents) over 16 x 12 latents: a 2 x 2 grid.
    let output = generate(&tiled, &["--vae-tiling", "--vae-tile-size", "64"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (w, h, a, _) = read_png(&whole);
    let (tw, th, b, _) = read_png(&tiled);
    assert_eq!((tw, th), (w, h));
    assert_ne!(a, b, "the tiles were not used");
    let mean = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.len() as f64;
    // Tolerance: the tiny VAE's random weights see only one tile's context, so the seams are
    // wide; measured mean |diff| 12.5 of 255.
    assert!(mean < 20.0, "mean |diff| {mean} of 255");
}

#[test]
fn bad_tile_settings_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = generate(&out, &["--vae-tiling", "--vae-tile-size", "60"]);
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(
        log.contains("--vae-tile-size") && log.contains("60"),
        "{log}"
    );
    assert!(log.contains("multiple of 8"), "{log}");
    let output = generate(&out, &["--vae-tile-overlap", "1.5"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("[0, 1)"), "{}", stderr(&output));
    assert!(!out.exists());
}

#[test]
fn roundtrip_takes_the_tiling_flags() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("gradient.png");
    let rgb = image::RgbImage::from_fn(96, 80, |x, y| image::Rgb([x as u8 * 2, y as u8 * 3, 90]));
    rgb.save(&image).unwrap();
    let run = |extra: &[&str]| {
        let model = fixtures().join("tiny-sd15");
        let mut args = vec![
            "roundtrip",
            "-m",
            model.to_str().unwrap(),
            image.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        sdrs(&args)
    };
    let whole = run(&[]);
    assert!(whole.status.success(), "{}", stderr(&whole));
    let tiled = run(&["--vae-tiling", "--vae-tile-size", "32"]);
    assert!(tiled.status.success(), "{}", stderr(&tiled));
    assert!(stdout(&tiled).contains("PSNR"), "{}", stdout(&tiled));
    assert_ne!(stdout(&whole), stdout(&tiled), "the tiles were not used");
    // The default tile (the config's 128 pixels) holds the whole image: one untiled pass.
    let one_tile = run(&["--vae-tiling"]);
    assert!(one_tile.status.success(), "{}", stderr(&one_tile));
    assert_eq!(stdout(&one_tile), stdout(&whole));
}
