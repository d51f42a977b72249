//! `sdrs generate -m org/name`, `sdrs pull` and `sdrs models` against a local server that answers
//! like the Hugging Face Hub (`HF_ENDPOINT`), with the cache in a temporary `HF_HUB_CACHE`: a
//! first run downloads, a second makes no request, offline runs use the cache only, and a 404
//! or a gated repo stops with a message that says what to do and leaves no image.

#[path = "../../crates/hub/tests/fake_hub/mod.rs"]
mod fake_hub;

use std::path::Path;
use std::process::{Command, Output};

use fake_hub::{folder_files, FakeHub};

use crate::util::{files_in, fixtures, stderr, stdout};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Runs `sdrs` with the Hub at `server` and its cache in `cache`; `env` adds variables.
fn sdrs_hub(server: &FakeHub, cache: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sdrs"));
    command
        .args(args)
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("the sdrs binary runs")
}

/// `sdrs generate -m model -o out` for a small seeded image, with the Hub and cache as in
/// [`sdrs_hub`].
fn generate(
    server: &FakeHub,
    cache: &Path,
    env: &[(&str, &str)],
    model: &str,
    out: &Path,
) -> Output {
    let out = out.to_str().unwrap();
    let args = [
        "generate",
        "-m",
        model,
        "-p",
        "a red fox",
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "-s",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "-o",
        out,
    ];
    sdrs_hub(server, cache, env, &args)
}

#[test]
fn generate_downloads_a_repo_once_then_runs_from_the_cache_and_offline() {
    let server = FakeHub::start();
    server.add_repo("org/tiny-sd15", COMMIT, &fixtures().join("tiny-sd15"), None);
    let cache = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let first = out_dir.path().join("first.png");
    let output = generate(&server, cache.path(), &[], "org/tiny-sd15", &first);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("downloaded 12 file(s) of org/tiny-sd15"),
        "{}",
        stderr(&output)
    );
    let requests = server.requests().len();
    assert!(requests > 0);

    let second = out_dir.path().join("second.png");
    let output = generate(&server, cache.path(), &[], "org/tiny-sd15", &second);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        server.requests().len(),
        requests,
        "the second run made no request"
    );

    let third = out_dir.path().join("third.png");
    let output = generate(
        &server,
        cache.path(),
        &[("HF_HUB_OFFLINE", "1")],
        "org/tiny-sd15",
        &third,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(server.requests().len(), requests);
    let first = std::fs::read(&first).unwrap();
    assert!(first == std::fs::read(&second).unwrap());
    assert!(first == std::fs::read(&third).unwrap());
    // The PNG names the repo as its model.
    let text = String::from_utf8_lossy(&first);
    assert!(
        text.contains("Model: tiny-sd15"),
        "the parameters name the repo"
    );
}

#[test]
fn pull_downloads_ahead_and_models_lists_the_cache_with_sizes() {
    let server = FakeHub::start();
    server.add_repo("org/tiny-sdxl", COMMIT, &fixtures().join("tiny-sdxl"), None);
    let cache = tempfile::tempdir().unwrap();
    let output = sdrs_hub(&server, cache.path(), &[], &["models"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("no models cached"),
        "{}",
        stdout(&output)
    );

    let output = sdrs_hub(&server, cache.path(), &[], &["pull", "org/tiny-sdxl"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let snapshot = stdout(&output).trim().to_string();
    assert!(
        Path::new(&snapshot).join("unet/config.json").is_file(),
        "{snapshot}"
    );
    assert!(Path::new(&snapshot)
        .join("tokenizer_2/vocab.json")
        .is_file());

    let output = sdrs_hub(&server, cache.path(), &[], &["pull", "org/tiny-sdxl"]);
    assert!(
        stderr(&output).contains("up to date"),
        "{}",
        stderr(&output)
    );

    let output = sdrs_hub(&server, cache.path(), &[], &["models"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let listing = stdout(&output);
    let row = listing
        .lines()
        .find(|l| l.starts_with("org/tiny-sdxl"))
        .unwrap_or_else(|| panic!("no row for the repo: {listing}"));
    assert!(row.contains("main (89abcde)"), "{row}");
    assert!(row.contains(" MB") || row.contains(" kB"), "{row}");
}

#[test]
fn a_missing_repo_stops_with_the_reason_and_no_image() {
    let server = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let output = generate(&server, cache.path(), &[], "org/nothing-here", &out);
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(
        message.contains("org/nothing-here") && message.contains("not found"),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    assert!(files_in(out_dir.path()).is_empty());
}

#[test]
fn a_gated_repo_asks_for_a_token_and_works_with_hf_token() {
    let server = FakeHub::start();
    server.add_repo(
        "org/gated",
        COMMIT,
        &fixtures().join("tiny-sd15"),
        Some("hf_abc"),
    );
    let cache = tempfile::tempdir().unwrap();
    let output = sdrs_hub(&server, cache.path(), &[], &["pull", "org/gated"]);
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(
        message.contains("gated") && message.contains("HF_TOKEN"),
        "{message}"
    );
    let output = sdrs_hub(
        &server,
        cache.path(),
        &[("HF_TOKEN", "hf_abc")],
        &["pull", "org/gated"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    // The token file written by `huggingface-cli login` (`HF_HOME/token`) works as well.
    let fresh = tempfile::tempdir().unwrap();
    let home = fresh.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "hf_abc\n").unwrap();
    let output = sdrs_hub(&server, fresh.path(), &[], &["pull", "org/gated"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn offline_and_not_cached_names_the_missing_file() {
    let server = FakeHub::start();
    server.add_repo("org/tiny-sd15", COMMIT, &fixtures().join("tiny-sd15"), None);
    let cache = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let output = generate(
        &server,
        cache.path(),
        &[("HF_HUB_OFFLINE", "1")],
        "org/tiny-sd15",
        &out,
    );
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(
        message.contains("offline") && message.contains("org/tiny-sd15"),
        "{message}"
    );
    assert!(server.requests().is_empty());
    assert!(files_in(out_dir.path()).is_empty());

    let output = sdrs_hub(&server, cache.path(), &[], &["pull", "org/tiny-sd15"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let snapshot = stdout(&output).trim().to_string();
    std::fs::remove_file(Path::new(&snapshot).join("unet/config.json")).unwrap();
    let output = generate(
        &server,
        cache.path(),
        &[("HF_HUB_OFFLINE", "1")],
        "org/tiny-sd15",
        &out,
    );
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("unet/config.json"), "{message}");
}

#[test]
fn half_precision_runs_read_the_fp16_files_they_downloaded() {
    // The plain weights are broken and the fp16 variant is the real model: a bf16 run must
    // download the fp16 files and load them, even with the plain files already cached.
    let mut files = folder_files(&fixtures().join("tiny-sd15"));
    let weights: Vec<String> = files
        .keys()
        .filter(|name| name.ends_with(".safetensors"))
        .cloned()
        .collect();
    for name in weights {
        let good = files[&name].clone();
        files.insert(
            name.replace(".safetensors", ".fp16.safetensors"),
            good.clone(),
        );
        files.insert(name, good[..64].to_vec());
    }
    let server = FakeHub::start();
    server.add_files("org/variants", COMMIT, files, None);
    let cache = tempfile::tempdir().unwrap();
    let output = sdrs_hub(&server, cache.path(), &[], &["pull", "org/variants"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let mut args = vec![
        "generate",
        "-m",
        "org/variants",
        "-p",
        "a red fox",
        "--steps",
        "2",
    ];
    args.extend([
        "-W", "32", "-H", "32", "-s", "3", "--device", "cpu", "--dtype", "bf16",
    ]);
    args.extend(["-o", out.to_str().unwrap()]);
    let output = sdrs_hub(&server, cache.path(), &[], &args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(out.is_file());
}
