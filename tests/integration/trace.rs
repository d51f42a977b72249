//! `--trace <file.json>` and `SDRS_TRACE`: a Chrome trace of the pipeline's spans, valid JSON.

use std::path::Path;
use std::process::Command;

use crate::util::{fixtures, sdrs, stderr};

/// The names of the spans a Chrome trace file records (its `B`egin events).
fn span_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("the trace is valid JSON");
    json.as_array()
        .expect("a Chrome trace is an array of events")
        .iter()
        .filter(|event| event["ph"] == "B")
        .filter_map(|event| event["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn generate_writes_a_chrome_trace_of_the_pipeline_spans() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("out.json");
    let out = dir.path().join("out.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a kite",
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "-s",
        "1",
        "--sampling-method",
        "euler",
        "--device",
        "cpu",
        "--trace",
        trace.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let names = span_names(&trace);
    for span in [
        "load_model",
        "encode_prompts",
        "denoising_step",
        "scheduler_step",
        "vae_decode",
    ] {
        assert!(names.iter().any(|n| n == span), "no {span} in {names:?}");
    }
    let steps = names.iter().filter(|n| *n == "denoising_step").count();
    assert_eq!(steps, 2, "one span per step");
    // The step spans carry their index and timestep.
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(text.contains("\"timestep\""), "{text}");
}

#[test]
fn sdrs_trace_names_the_file_when_the_flag_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args([
            "bench",
            "-m",
            fixtures().join("tiny-sd15").to_str().unwrap(),
            "--parts",
            "text",
            "--size",
            "32",
            "--runs",
            "1",
        ])
        .env("SDRS_TRACE", &trace)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let names = span_names(&trace);
    assert!(names.iter().any(|n| n == "encode_prompts"), "{names:?}");
}

#[test]
fn an_unwritable_trace_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a kite",
        "--trace",
        "/no/such/folder/trace.json",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("/no/such/folder/trace.json") && !message.contains("panicked"),
        "{message}"
    );
    assert!(!out.exists());
}
