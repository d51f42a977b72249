//! Numeric parity with diffusers: every case of `reference/schedulers.json` whose class is
//! implemented, and every tensor of `rng.safetensors`, with the scheduler and generator bounds of
//! the tolerance table (`sdrs_tooling::tolerances`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdrs_schedulers::{is_supported_class, parity, NoiseSource, TorchGenerator};
use sdrs_tooling::tolerances::{tolerance, CaseKind};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// The table's scheduler bound (schedulers compute in f32 whatever the models' dtype).
fn scheduler_tol() -> f64 {
    tolerance(CaseKind::Scheduler, DType::F32).unwrap()
}

/// The table's random-generator bound (noise is drawn in f32).
fn rng_tol() -> f64 {
    tolerance(CaseKind::Rng, DType::F32).unwrap()
}

fn load(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{FIXTURES}/{path}"), &Device::Cpu).unwrap()
}

#[test]
fn scheduler_cases_match_diffusers() {
    let text = std::fs::read_to_string(format!("{FIXTURES}/reference/schedulers.json")).unwrap();
    let cases = sdrs_schedulers::parse_config_json(&text).unwrap();
    let reference = load("reference/schedulers.safetensors");
    let mut failures = Vec::new();
    let mut checked = 0;
    for (key, case) in cases.as_object().unwrap() {
        let class = case["class"].as_str().unwrap();
        if !is_supported_class(class) {
            println!("skip {key}: {class} is not implemented");
            continue;
        }
        match parity::run_case(key, case, &reference) {
            Ok(report) => {
                println!(
                    "{key}: error after first step {:.3e}, final {:.3e} (max |diff| {:.3e} at max |x| {:.1}), timesteps max |diff| {:.1e}",
                    report.after_first_step, report.last, report.last_abs, report.scale, report.timesteps
                );
                // Tolerance: the table's scheduler bound, 1e-5 (fixture README), as
                // max |a - b| / max(1, |b|): absolute for O(1) values, relative for the larger
                // finals, whose float32 noise grows with them.
                if report.max().is_nan() || report.max() > scheduler_tol() {
                    failures.push(format!("{key}: error {:.3e}", report.max()));
                }
            }
            Err(e) => failures.push(format!("{key}: {e}")),
        }
        checked += 1;
    }
    assert!(checked > 0, "no scheduler case was checked");
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// `seed1234_1x4x8x8` -> (1234, [1, 4, 8, 8]).
fn parse_rng_key(key: &str) -> (u64, Vec<usize>) {
    let rest = key.strip_prefix("seed").unwrap();
    let (seed, shape) = rest.split_once('_').unwrap();
    let shape = shape.split('x').map(|d| d.parse().unwrap()).collect();
    (seed.parse().unwrap(), shape)
}

#[test]
fn rng_matches_torch() {
    let tensors = load("rng.safetensors");
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut failures = Vec::new();
    for key in keys {
        let (seed, shape) = parse_rng_key(key);
        let expected = &tensors[key];
        assert_eq!(expected.dims(), shape.as_slice(), "{key}");
        let mut generator = TorchGenerator::new(seed);
        let drawn = generator
            .randn(&shape.clone().into(), DType::F32, &Device::Cpu)
            .unwrap();
        let diff = parity::max_abs_diff(&drawn, expected).unwrap();
        let tol = rng_tol();
        println!("{key}: max |diff| {diff:.3e} (tol {tol:e})");
        // Tolerance: the table's generator bound, 1e-6 max abs diff.
        if diff.is_nan() || diff > tol {
            failures.push(format!("{key}: max |diff| {diff:.3e}"));
        }
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// torch's generator is one stream: a `[2, C, H, W]` draw equals two consecutive `[1, C, H, W]`
/// draws from the same generator (how diffusers' pipelines draw the latents and then each step's
/// noise). Checked against every `seed<S>_2x...` tensor of the fixture.
#[test]
fn consecutive_draws_continue_the_stream() {
    let tensors = load("rng.safetensors");
    let mut checked = 0;
    for (key, expected) in &tensors {
        let (seed, shape) = parse_rng_key(key);
        if shape.len() < 2 || shape[0] != 2 || shape[1..].iter().product::<usize>() < 16 {
            continue;
        }
        let mut half = shape.clone();
        half[0] = 1;
        let mut generator = TorchGenerator::new(seed);
        let first = generator
            .randn(&half.clone().into(), DType::F32, &Device::Cpu)
            .unwrap();
        let second = generator
            .randn(&half.into(), DType::F32, &Device::Cpu)
            .unwrap();
        let both = Tensor::cat(&[first, second], 0).unwrap();
        let diff = parity::max_abs_diff(&both, expected).unwrap();
        println!("{key} as two draws: max |diff| {diff:.3e}");
        // Tolerance: the table's generator bound, 1e-6 max abs diff (bit-exact in practice).
        assert!(diff <= rng_tol(), "{key}: max |diff| {diff:.3e}");
        checked += 1;
    }
    assert!(checked > 0, "no [2, ...] tensor in rng.safetensors");
}
