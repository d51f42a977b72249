//! `sdrs generate -i init.png --mask mask.png`: inpainting with a 9-channel inpainting UNet
//! (`features/tiny-sd15-inpaint`) and with a regular 4-channel one (`tiny-sd15`, latent
//! blending), masks of another size, and the errors that name the missing flag.

use std::path::{Path, PathBuf};

use crate::util::{extended_fixtures, files_in, fixtures, read_png, sdrs, stderr};

/// Writes a `width` x `height` 8-bit PNG of `color` type whose bytes `pixel(x, y)` gives.
fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    color: png::ColorType,
    pixel: impl Fn(u32, u32) -> Vec<u8>,
) {
    let mut data = Vec::new();
    for y in 0..height {
        for x in 0..width {
            data.extend(pixel(x, y));
        }
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(color);
    encoder
        .write_header()
        .unwrap()
        .write_image_data(&data)
        .unwrap();
}

/// An RGB gradient init picture.
fn init_png(dir: &Path, width: u32, height: u32) -> PathBuf {
    let path = dir.join("init.png");
    write_png(&path, width, height, png::ColorType::Rgb, |x, y| {
        vec![(x * 3) as u8, (y * 4) as u8, 128]
    });
    path
}

/// A grayscale mask: white (repaint) where `white(x, y)`.
fn mask_png(path: &Path, width: u32, height: u32, white: impl Fn(u32, u32) -> bool) -> PathBuf {
    write_png(path, width, height, png::ColorType::Grayscale, |x, y| {
        vec![if white(x, y) { 255 } else { 0 }]
    });
    path.to_path_buf()
}

/// Runs `sdrs generate` with `model`, `init`, `mask` (when given) and `extra` flags on the CPU.
fn inpaint(
    model: &Path,
    init: Option<&Path>,
    mask: Option<&Path>,
    prompt: &str,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "generate".to_string(),
        "-m".to_string(),
        model.display().to_string(),
        "-p".to_string(),
        prompt.to_string(),
        "--steps".to_string(),
        "4".to_string(),
        "-s".to_string(),
        "11".to_string(),
        "--sampling-method".to_string(),
        "euler_a".to_string(),
        "--device".to_string(),
        "cpu".to_string(),
        "-o".to_string(),
        out.display().to_string(),
    ];
    if let Some(init) = init {
        args.extend(["-i".to_string(), init.display().to_string()]);
    }
    if let Some(mask) = mask {
        args.extend(["--mask".to_string(), mask.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sdrs(&args)
}

#[test]
fn an_inpainting_unet_repaints_with_the_mask_and_records_the_strength() {
    let Some(features) = extended_fixtures("features") else {
        return;
    };
    let model = features.join("tiny-sd15-inpaint");
    let dir = tempfile::tempdir().unwrap();
    let init = init_png(dir.path(), 64, 48);
    let mask = mask_png(&dir.path().join("mask.png"), 64, 48, |x, _| x < 32);
    let out = dir.path().join("out.png");
    let output = inpaint(
        &model,
        Some(&init),
        Some(&mask),
        "a door",
        &out,
        &["--strength", "0.8"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let (w, h, pixels, text) = read_png(&out);
    assert_eq!((w, h), (64, 48));
    assert!(text.contains("Denoising strength: 0.8"), "{text}");
    // The mask is an input of every step: another mask gives another image.
    let other_mask = mask_png(&dir.path().join("other.png"), 64, 48, |_, y| y < 24);
    let other = dir.path().join("other-out.png");
    let output = inpaint(
        &model,
        Some(&init),
        Some(&other_mask),
        "a door",
        &other,
        &["--strength", "0.8"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_ne!(read_png(&other).2, pixels);
}

#[test]
fn an_inpainting_unet_without_a_mask_names_the_flag() {
    let Some(features) = extended_fixtures("features") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let init = init_png(dir.path(), 64, 48);
    let out = dir.path().join("out.png");
    let model = features.join("tiny-sd15-inpaint");
    for init in [None, Some(init.as_path())] {
        let output = inpaint(&model, init, None, "a door", &out, &[]);
        let log = stderr(&output);
        assert!(!output.status.success(), "{log}");
        assert!(
            log.contains("--mask") && log.contains("9 input channels"),
            "{log}"
        );
    }
    assert_eq!(files_in(dir.path()), ["init.png"]);
}

#[test]
fn a_regular_unet_keeps_the_unmasked_latents_and_resizes_a_mask_of_another_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd15");
    let init = init_png(dir.path(), 64, 48);
    // Latent blending ends on the image latents outside the mask: with nothing to repaint the
    // prompt cannot change the image.
    let keep_all = mask_png(&dir.path().join("black.png"), 64, 48, |_, _| false);
    let run = |mask: &Path, prompt: &str, name: &str| {
        let out = dir.path().join(name);
        let output = inpaint(
            &model,
            Some(&init),
            Some(mask),
            prompt,
            &out,
            &["--strength", "1"],
        );
        assert!(output.status.success(), "{}", stderr(&output));
        (read_png(&out).2, stderr(&output))
    };
    let (fox, _) = run(&keep_all, "a fox", "a.png");
    let (boat, _) = run(&keep_all, "a boat", "b.png");
    assert_eq!(fox, boat, "nothing is repainted under a black mask");
    // A mask of another size is resized to the output size; white is repainted.
    let half = mask_png(&dir.path().join("half.png"), 35, 25, |x, _| x < 17);
    let (fox_half, log) = run(&half, "a fox", "c.png");
    assert!(
        log.contains("resizing the mask from 35x25 to 64x48"),
        "{log}"
    );
    let (boat_half, _) = run(&half, "a boat", "d.png");
    assert_ne!(
        fox_half, boat_half,
        "the white half is repainted from the prompt"
    );
}

#[test]
fn a_mask_without_an_init_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mask = mask_png(&dir.path().join("mask.png"), 64, 48, |x, _| x < 32);
    let out = dir.path().join("out.png");
    let output = inpaint(
        &fixtures().join("tiny-sd15"),
        None,
        Some(&mask),
        "a fox",
        &out,
        &[],
    );
    let log = stderr(&output);
    assert!(!output.status.success(), "{log}");
    assert!(
        log.contains("--mask") && log.contains("--init-img"),
        "{log}"
    );
    assert_eq!(files_in(dir.path()), ["mask.png"]);
}
