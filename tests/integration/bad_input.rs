//! Bad input gets a clear error that names the bad value, a non-zero exit code and no PNG.

use std::path::Path;

use crate::util::{copy_model, fixtures, generate_fails, sdrs, stderr};

#[test]
fn width_not_a_multiple_of_8_is_rejected() {
    let message = generate_fails(&fixtures().join("tiny-sd15"), &["-W", "100"]);
    assert!(
        message.contains("--width") && message.contains("100") && message.contains("8"),
        "{message}"
    );
}

#[test]
fn unknown_sampler_lists_the_accepted_names() {
    let message = generate_fails(
        &fixtures().join("tiny-sd15"),
        &["--sampling-method", "warp_drive"],
    );
    assert!(message.contains("warp_drive"), "{message}");
    assert!(
        message.contains("euler") && message.contains("dpm++2m"),
        "{message}"
    );
}

#[test]
fn unknown_schedule_is_rejected() {
    let message = generate_fails(&fixtures().join("tiny-sd15"), &["--scheduler", "cosine"]);
    assert!(
        message.contains("cosine") && message.contains("karras"),
        "{message}"
    );
}

#[test]
fn missing_model_folder_is_named() {
    let message = generate_fails(Path::new("/no/such/model"), &[]);
    assert!(message.contains("/no/such/model"), "{message}");
}

#[test]
fn missing_weights_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    std::fs::remove_file(model.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let message = generate_fails(&model, &[]);
    assert!(
        message.contains("vae") && message.contains("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let message = generate_fails(&model, &[]);
    assert!(
        message.contains("unet/diffusion_pytorch_model.safetensors"),
        "{message}"
    );
}

#[test]
fn config_that_does_not_match_the_weights_names_the_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    let config_path = model.join("unet/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let cross = config["cross_attention_dim"].as_u64().unwrap();
    config["cross_attention_dim"] = serde_json::json!(cross * 2);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let message = generate_fails(&model, &[]);
    assert!(message.contains("attn2.to_k.weight"), "{message}");
    assert!(
        message.contains(&format!("{}", cross * 2)) && message.contains(&format!("{cross}")),
        "{message}"
    );
}

#[test]
fn unwritable_output_path_fails_before_loading() {
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a cat",
        "-o",
        "/no/such/folder/out.png",
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("/no/such/folder"), "{message}");
}

#[test]
fn zero_steps_is_rejected() {
    let message = generate_fails(&fixtures().join("tiny-sd15"), &["--steps", "0"]);
    assert!(
        message.contains("--steps") && message.contains('0'),
        "{message}"
    );
}

#[test]
fn refiner_needs_an_sdxl_base() {
    let refiner = fixtures().join("tiny-sdxl-refiner");
    let message = generate_fails(
        &fixtures().join("tiny-sd15"),
        &["--refiner", refiner.to_str().unwrap()],
    );
    assert!(
        message.contains("--refiner") && message.contains("SDXL"),
        "{message}"
    );
}

#[test]
fn a_refiner_that_is_not_one_is_refused_and_leaves_no_image() {
    let not_a_refiner = fixtures().join("tiny-sd15");
    let message = generate_fails(
        &fixtures().join("tiny-sdxl"),
        &["--refiner", not_a_refiner.to_str().unwrap()],
    );
    assert!(message.contains("not an SDXL refiner"), "{message}");
}

#[test]
fn strength_out_of_range_is_rejected() {
    let message = generate_fails(&fixtures().join("tiny-sd15"), &["--strength", "1.5"]);
    assert!(
        message.contains("--strength") && message.contains("1.5"),
        "{message}"
    );
}

#[test]
fn unreadable_init_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let message = generate_fails(
        &fixtures().join("tiny-sd15"),
        &["-i", broken.to_str().unwrap()],
    );
    assert!(message.contains("broken.png"), "{message}");
}
