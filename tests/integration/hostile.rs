//! Hostile input and interrupted runs (issue 20): each case gives a clear error and a non-zero
//! exit, with no panic, no hang and no file left behind.

#[cfg(unix)]
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
#[cfg(unix)]
use std::process::Stdio;

#[cfg(unix)]
use crate::util::files_in;
use crate::util::{copy_model, fixtures, generate_fails, sdrs, stderr, write_png};

fn tiny() -> std::path::PathBuf {
    fixtures().join("tiny-sd15")
}

#[cfg(unix)]
#[test]
fn output_dev_null_is_refused_not_replaced_by_a_png() {
    use std::os::unix::fs::FileTypeExt;
    let message = generate_fails(&tiny(), &["-o", "/dev/null"]);
    assert!(
        message.contains("/dev/null") && message.contains("not a regular file"),
        "{message}"
    );
    let kind = std::fs::metadata("/dev/null").unwrap().file_type();
    assert!(kind.is_char_device(), "/dev/null is still a device");
}

#[test]
fn output_to_a_missing_folder_with_a_slash_fails_before_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let target = format!("{}/newdir/", dir.path().display());
    let message = generate_fails(&tiny(), &["-o", &target]);
    assert!(message.contains("is a folder"), "{message}");
    // Refused before loading: no seed line, no progress.
    assert!(!message.contains("seed "), "{message}");
}

/// Starts a long generation, waits until it samples, sends `signal`, and checks that it stopped
/// with a message, a non-zero status and no file in the output folder.
#[cfg(unix)]
fn interrupted_by(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "generate",
            "-m",
            tiny().to_str().unwrap(),
            "-p",
            "a cat",
            "-s",
            "1",
            "--steps",
            "1000",
            "--device",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap() == 0 {
            panic!("sdrs ended before sampling: {seen}");
        }
        seen.push_str(&line);
        if line.starts_with("seed ") {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{signal}: {rest}");
    assert!(rest.contains("interrupted"), "{signal}: {rest}");
    assert!(
        files_in(dir.path()).is_empty(),
        "{signal} left files behind: {:?}",
        files_in(dir.path())
    );
}

/// A signal while sampling stops the run through the pipeline's cancel flag, at the end of the
/// step, with 130 and no image; the preview written at every step shows it was sampling.
#[cfg(unix)]
#[test]
fn a_signal_while_sampling_stops_cleanly_at_the_end_of_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let previews = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let preview = previews.path().join("preview.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "generate",
            "-m",
            tiny().to_str().unwrap(),
            "-p",
            "a cat",
            "-s",
            "1",
        ])
        .args([
            "--steps",
            "1000",
            "--device",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ])
        .args([
            "--preview",
            preview.to_str().unwrap(),
            "--preview-every",
            "1",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on a thread, so that the child never blocks on a full pipe.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !preview.exists() {
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("no preview written: {}", reader.join().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        text.contains("stopping at the end of this step")
            && text.contains("stopped at the end of a step, no image written"),
        "{text}"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

#[cfg(unix)]
#[test]
fn sigterm_and_ctrl_c_leave_no_temporary_png_and_exit_non_zero() {
    interrupted_by("-TERM");
    interrupted_by("-INT");
    interrupted_by("-HUP");
}

#[test]
fn width_one_million_is_refused_before_allocating() {
    let message = generate_fails(&tiny(), &["-W", "1000000", "-H", "1000000"]);
    assert!(
        message.contains("1000000") && message.contains("16384"),
        "{message}"
    );
}

#[test]
fn width_and_height_16384_are_refused_by_the_memory_estimate_before_allocating() {
    // A limit below what any machine reports keeps the test independent of this one's memory.
    let message = generate_fails(
        &tiny(),
        &["-W", "16384", "-H", "16384", "--memory-limit", "1GB"],
    );
    for part in [
        "not enough memory for a 16384x16384 image",
        "1.0 GB is available",
        "would fit",
        "--no-memory-check",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
}

#[test]
fn init_image_4096_without_w_h_is_refused_by_the_memory_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.png");
    write_png(&init, 4096, 4096);
    let message = generate_fails(
        &tiny(),
        &["-i", init.to_str().unwrap(), "--memory-limit", "500MB"],
    );
    assert!(
        message.contains("not enough memory for a 4096x4096 image"),
        "{message}"
    );
}

#[test]
fn threads_one_million_is_refused_instead_of_hanging() {
    let message = generate_fails(&tiny(), &["--threads", "1000000"]);
    assert!(
        message.contains("--threads") && message.contains("1000000"),
        "{message}"
    );
}

#[test]
fn cfg_scale_1e308_is_refused_like_nan() {
    let message = generate_fails(&tiny(), &["--cfg-scale", "1e308"]);
    assert!(message.contains("--cfg-scale"), "{message}");
}

#[test]
fn aesthetic_score_nan_is_refused() {
    let message = generate_fails(&tiny(), &["--aesthetic-score", "NaN"]);
    assert!(
        message.contains("aesthetic") && message.contains("NaN"),
        "{message}"
    );
}

#[test]
fn seed_minus_two_is_refused() {
    let message = generate_fails(&tiny(), &["-s", "-2"]);
    assert!(message.contains("-2"), "{message}");
}

#[test]
fn strength_without_init_image_is_refused() {
    let message = generate_fails(&tiny(), &["--strength", "0.5"]);
    assert!(message.contains("--strength"), "{message}");
}

/// Fills every tensor of a safetensors file with `0xFF` bytes: NaN in f32, f16 and bf16.
fn poison(weights: &Path) {
    let mut bytes = std::fs::read(weights).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for byte in &mut bytes[8 + header..] {
        *byte = 0xFF;
    }
    std::fs::write(weights, bytes).unwrap();
}

#[test]
fn nan_weights_give_an_error_not_a_blank_png() {
    for component in ["unet", "vae"] {
        let dir = tempfile::tempdir().unwrap();
        let model = copy_model("tiny-sd15", dir.path());
        poison(
            &model
                .join(component)
                .join("diffusion_pytorch_model.safetensors"),
        );
        let message = generate_fails(&model, &[]);
        assert!(
            message.contains("NaN or infinite") && message.contains("no image"),
            "{component}: {message}"
        );
    }
}

#[test]
fn vae_scaling_factor_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    let path = model.join("vae/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["scaling_factor"] = serde_json::json!(0.0);
    std::fs::write(&path, config.to_string()).unwrap();
    let message = generate_fails(&model, &[]);
    assert!(message.contains("scaling_factor"), "{message}");
}

/// A copy of the tiny model whose `component/config.json` is `edit`ed.
fn with_config(
    dir: &Path,
    component: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let model = copy_model("tiny-sd15", dir);
    let path = model.join(component).join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    model
}

#[test]
fn unet_layers_per_block_one_billion_is_refused_before_allocating() {
    for layers in [1_000_000_000u64, u64::MAX] {
        let dir = tempfile::tempdir().unwrap();
        let model = with_config(dir.path(), "unet", |c| {
            c["layers_per_block"] = serde_json::json!(layers)
        });
        let message = generate_fails(&model, &[]);
        assert!(
            message.contains("layers_per_block") && message.contains(&layers.to_string()),
            "{message}"
        );
    }
}

#[test]
fn scheduler_num_train_timesteps_one_trillion_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_config(dir.path(), "unet", |_| {});
    let path = model.join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_train_timesteps"] = serde_json::json!(1_000_000_000_000u64);
    std::fs::write(&path, config.to_string()).unwrap();
    let message = generate_fails(&model, &[]);
    assert!(message.contains("num_train_timesteps"), "{message}");
}

#[test]
fn unet_config_that_is_a_json_array_says_not_a_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    std::fs::write(model.join("unet/config.json"), "[4, 4, 32]").unwrap();
    let message = generate_fails(&model, &[]);
    assert!(
        message.contains("not a JSON object") && message.contains("unet/config.json"),
        "{message}"
    );
}

#[test]
fn hf_hub_cache_pointing_at_a_file_is_an_error_not_an_empty_cache() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cache");
    std::fs::write(&file, "x").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .arg("models")
        .env("HF_HUB_CACHE", &file)
        .output()
        .unwrap();
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains("not a folder") && !message.contains("does not exist yet"),
        "{message}"
    );
}

#[test]
fn roundtrip_calls_its_input_the_input_image_not_the_init_image() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not an image").unwrap();
    let output = sdrs(&[
        "roundtrip",
        "-m",
        fixtures().join("taesd").to_str().unwrap(),
        broken.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains("the input image") && !message.contains("init image"),
        "{message}"
    );
}

#[test]
fn sample_size_zero_without_w_h_does_not_blame_an_init_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_config(dir.path(), "unet", |c| {
        c["sample_size"] = serde_json::json!(0)
    });
    let message = generate_fails(&model, &[]);
    assert!(
        message.contains("sample_size 0") && !message.contains("init image"),
        "{message}"
    );
}

#[cfg(unix)]
#[test]
fn weights_path_that_is_a_folder_or_a_symlink_loop_is_named_not_no_weights() {
    for make in ["folder", "loop"] {
        let dir = tempfile::tempdir().unwrap();
        let model = copy_model("tiny-sd15", dir.path());
        let weights = model.join("vae/diffusion_pytorch_model.safetensors");
        std::fs::remove_file(&weights).unwrap();
        if make == "folder" {
            std::fs::create_dir(&weights).unwrap();
        } else {
            std::os::unix::fs::symlink(&weights, &weights).unwrap();
        }
        let message = generate_fails(&model, &[]);
        assert!(
            message.contains("vae/diffusion_pytorch_model.safetensors")
                && !message.contains("no weights in"),
            "{make}: {message}"
        );
    }
}

#[test]
fn safetensors_with_trailing_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&weights, bytes).unwrap();
    let message = generate_fails(&model, &[]);
    assert!(message.contains("trailing bytes"), "{message}");
}

#[test]
fn prompts_over_77_tokens_warn_with_the_plain_syntax_only() {
    let long = "a red cat on a blue mat ".repeat(20);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let run = |syntax: &str| {
        sdrs(&[
            "generate",
            "-m",
            tiny().to_str().unwrap(),
            "-p",
            &long,
            "--steps",
            "1",
            "-s",
            "1",
            "--device",
            "cpu",
            "--prompt-syntax",
            syntax,
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let output = run("plain");
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(
        message.contains("warning: the prompt is") && message.contains("cut off"),
        "{message}"
    );
    let output = run("a1111");
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(!message.contains("warning: the prompt"), "{message}");
}

#[test]
fn shape_mismatch_names_the_file_of_the_component() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_config(dir.path(), "unet", |c| {
        let channels = c["block_out_channels"].as_array().unwrap().clone();
        let doubled: Vec<u64> = channels.iter().map(|v| v.as_u64().unwrap() * 2).collect();
        c["block_out_channels"] = serde_json::json!(doubled);
    });
    let message = generate_fails(&model, &[]);
    assert!(
        message.contains("shape mismatch")
            && message.contains("unet/diffusion_pytorch_model.safetensors"),
        "{message}"
    );
}
