//! `sdrs bench` on the tiny fixture models: every part runs and reports, in the table and as JSON.

use crate::util::{fixtures, sdrs, stderr, stdout};

#[test]
fn bench_times_every_part_of_a_model_folder_as_json() {
    let model = fixtures().join("tiny-sd15");
    let output = sdrs(&[
        "bench",
        "-m",
        model.to_str().unwrap(),
        "--runs",
        "2",
        "--steps",
        "2",
        "--threads",
        "1",
        "--json",
        "-",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(json["threads"], 1);
    // The CPU pipeline runs f32 activations around the weights of any dtype.
    assert_eq!(json["activation_dtype"], "f32");
    assert_eq!(
        json["size"], 128,
        "the tiny UNet's sample_size 16 times the VAE's factor 8"
    );
    let results = json["results"].as_array().unwrap();
    let parts: Vec<&str> = results
        .iter()
        .map(|r| r["part"].as_str().unwrap())
        .collect();
    assert_eq!(
        parts,
        [
            "whole generation (2 steps, 1 image)",
            "text encoder",
            "UNet step",
            "VAE decode",
            "TAESD decode",
        ]
    );
    for result in results {
        assert!(result["median_s"].as_f64().unwrap() > 0.0, "{result}");
    }
    assert_eq!(results[2]["runs"], 2);
    assert!(results[2]["gflop_per_s"].as_f64().unwrap() > 0.0);
    if cfg!(target_os = "linux") {
        assert!(results[0]["peak_rss_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn bench_prints_a_table_for_chosen_parts_and_size() {
    let model = fixtures().join("tiny-sd15");
    let output = sdrs(&[
        "bench",
        "-m",
        model.to_str().unwrap(),
        "--parts",
        "unet",
        "--size",
        "64",
        "--runs",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = stdout(&output);
    assert!(table.contains("64x64"), "{table}");
    assert!(table.contains("| UNet step |"), "{table}");
    assert!(!table.contains("VAE decode"), "{table}");
}

#[test]
fn bench_names_the_quantization_it_measures() {
    let model = fixtures().join("tiny-sd15");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "-m",
            model.to_str().unwrap(),
            "--parts",
            "unet",
            "--runs",
            "1",
            "--json",
            "-",
        ];
        args.extend_from_slice(extra);
        let output = sdrs(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_str::<serde_json::Value>(&stdout(&output)).unwrap()
    };
    assert_eq!(run(&[])["quantization"], "none");
    assert_eq!(
        run(&["--quantize", "kmeans4:grouped16"])["quantization"],
        "kmeans4:grouped16"
    );
    let output = sdrs(&[
        "bench",
        "-m",
        model.to_str().unwrap(),
        "--quantize",
        "kmeans7",
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("kmeans7"), "{}", stderr(&output));
}

#[test]
fn bench_rejects_unknown_parts_models_and_sizes() {
    let output = sdrs(&["bench", "--parts", "unet,vea"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("unknown part \"vea\""),
        "{}",
        stderr(&output)
    );

    let output = sdrs(&["bench", "-m", "sd14"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("sd15, sdxl, sdxl-refiner"),
        "{}",
        stderr(&output)
    );

    let model = fixtures().join("tiny-sd15");
    let output = sdrs(&["bench", "-m", model.to_str().unwrap(), "--size", "100"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--size 100"),
        "{}",
        stderr(&output)
    );
}
