//! `sdrs generate` end to end on the tiny SD1.5 fixture: a PNG with AUTOMATIC1111 parameters,
//! reproducible from its seed.

use crate::util::{files_in, fixtures, read_png, sdrs, stderr, write_png};

#[test]
fn generate_writes_a_png_with_parameters_and_the_same_seed_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd15");
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let output = sdrs(&[
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "a red fox in the snow",
            "-n",
            "blurry",
            "--steps",
            "3",
            "-W",
            "64",
            "-H",
            "48",
            "-s",
            seed,
            "--sampling-method",
            "euler",
            "--device",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        read_png(&out)
    };
    let (w, h, pixels, text) = run("a.png", "42");
    assert_eq!((w, h), (64, 48));
    assert_eq!(
        text,
        "a red fox in the snow\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7.5, \
         Seed: 42, Size: 64x48, Model: tiny-sd15, Version: sdrs 0.1.0"
    );
    let (_, _, same, _) = run("b.png", "42");
    assert_eq!(pixels, same, "the same seed must give the same image");
    let (_, _, other, _) = run("c.png", "43");
    assert_ne!(pixels, other, "another seed must give another image");
    assert_eq!(files_in(dir.path()), ["a.png", "b.png", "c.png"]);
}

#[test]
fn without_a_seed_a_random_one_is_printed_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a boat",
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    let seed = log
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .expect("the seed is printed")
        .trim()
        .to_string();
    let (_, _, _, text) = read_png(&out);
    assert!(text.contains(&format!("Seed: {seed},")), "{text}");
    assert!(
        text.contains("Sampler: DPM++ 2M, Schedule type: Karras"),
        "{text}"
    );
}

#[test]
fn img2img_resizes_the_init_image_and_records_the_strength() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.png");
    write_png(&init, 70, 50);
    let out = dir.path().join("out.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a harbour",
        "-i",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "-s",
        "3",
        "--sampling-method",
        "ddim",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains("resizing the init image from 70x50 to 64x48"),
        "{log}"
    );
    let (w, h, _, text) = read_png(&out);
    assert_eq!((w, h), (64, 48));
    assert!(text.contains("Sampler: DDIM,"), "{text}");
    assert!(text.contains("Denoising strength: 0.5"), "{text}");
}

#[test]
fn sdxl_base_with_refiner_runs_and_records_the_refiner() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("xl.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sdxl").to_str().unwrap(),
        "--refiner",
        fixtures().join("tiny-sdxl-refiner").to_str().unwrap(),
        "-p",
        "a castle",
        "--steps",
        "5",
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        "9",
        "--sampling-method",
        "euler",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (w, h, _, text) = read_png(&out);
    assert_eq!((w, h), (64, 64));
    // SDXL's default guidance is 5, and the refiner is recorded as AUTOMATIC1111 does.
    assert!(text.contains("CFG scale: 5,"), "{text}");
    assert!(
        text.contains("Refiner: tiny-sdxl-refiner, Refiner switch at: 0.8"),
        "{text}"
    );
}

#[test]
fn single_file_checkpoint_generates_with_the_configs_of_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("single.png");
    let checkpoint = fixtures().join("tiny-sd15-single-file.safetensors");
    let args = |config: Option<&str>| {
        let mut args = vec![
            "generate".to_string(),
            "-m".into(),
            checkpoint.to_str().unwrap().into(),
            "-p".into(),
            "a tree".into(),
            "--steps".into(),
            "2".into(),
            "-W".into(),
            "32".into(),
            "-H".into(),
            "32".into(),
            "-s".into(),
            "1".into(),
            "--device".into(),
            "cpu".into(),
            "-o".into(),
            out.to_str().unwrap().into(),
        ];
        if let Some(config) = config {
            args.push("--config".into());
            args.push(config.into());
        }
        args
    };
    let without = args(None);
    let output = sdrs(&without.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--config"), "{}", stderr(&output));
    assert!(!out.exists());

    let folder = fixtures().join("tiny-sd15");
    let with = args(Some(folder.to_str().unwrap()));
    let output = sdrs(&with.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let (_, _, _, text) = read_png(&out);
    assert!(text.contains("Model: tiny-sd15-single-file,"), "{text}");
}

#[test]
fn tiny_autoencoder_decodes_and_previews_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tae.png");
    let preview = dir.path().join("preview.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "--vae",
        fixtures().join("taesd").to_str().unwrap(),
        "--preview",
        preview.to_str().unwrap(),
        "--preview-every",
        "2",
        "-p",
        "a lake",
        "--steps",
        "3",
        "-W",
        "32",
        "-H",
        "32",
        "-s",
        "4",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (w, h, _, _) = read_png(&out);
    assert_eq!((w, h), (32, 32));
    // The tiny autoencoder decodes previews at full size.
    let (pw, ph, _, _) = read_png(&preview);
    assert_eq!((pw, ph), (32, 32));
    assert_eq!(files_in(dir.path()), ["preview.png", "tae.png"]);

    // Without a tiny autoencoder the preview is the linear projection, at latent size.
    let linear = dir.path().join("linear.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "--preview",
        linear.to_str().unwrap(),
        "-p",
        "a lake",
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "-s",
        "4",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (lw, lh, _, _) = read_png(&linear);
    assert_eq!((lw, lh), (4, 4));
}

#[test]
fn tiny_autoencoder_of_another_latent_width_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "--vae",
        fixtures().join("taef1").to_str().unwrap(),
        "-p",
        "a lake",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("16 latent channels"), "{message}");
    assert!(files_in(dir.path()).is_empty());
}

/// `--device auto` (the default) on a machine or build without a usable GPU runs on the CPU and
/// says why; a GPU asked for by name that cannot be used is an error naming the cause, and no
/// image is left behind.
#[test]
fn auto_falls_back_to_the_cpu_with_a_reason_and_a_named_gpu_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd15");
    let run = |device: Option<&str>, name: &str| {
        let out = dir.path().join(name);
        let mut args = vec![
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "a boat",
            "--steps",
            "1",
            "-W",
            "32",
            "-H",
            "32",
            "-s",
            "1",
            "-o",
            out.to_str().unwrap(),
        ];
        if let Some(device) = device {
            args.extend(["--device", device]);
        }
        sdrs(&args)
    };
    let output = run(None, "auto.png");
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("device: "))
        .expect("the device is printed");
    if line.starts_with("device: cpu") {
        assert!(line.contains("no GPU used: "), "{line}");
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(line.contains("built without GPU support"), "{line}");
        }
    }
    let builds = [
        ("cuda:0", "cuda", cfg!(feature = "cuda")),
        ("metal", "metal", cfg!(feature = "metal")),
    ];
    for (device, feature, built) in builds {
        if built {
            continue;
        }
        let output = run(Some(device), "named.png");
        let log = stderr(&output);
        assert!(!output.status.success(), "{log}");
        assert!(
            log.contains(device) && log.contains(&format!("--features {feature}")),
            "{log}"
        );
    }
    assert_eq!(files_in(dir.path()), ["auto.png"]);
}

/// `sdrs selfcheck` checks the CUDA kernels; a build without CUDA says so and fails.
#[cfg(not(feature = "cuda"))]
#[test]
fn selfcheck_without_cuda_names_the_feature() {
    let output = sdrs(&["selfcheck"]);
    let log = stderr(&output);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("--features cuda"), "{log}");
}
