//! Tokenizer parity: every case of `tests/fixtures/tokenizer_cases.json` (ids from transformers'
//! `CLIPTokenizer`) must come out identical.

use std::path::{Path, PathBuf};

use candle_core::DType;
use sdrs_clip::ClipTokenizer;
use sdrs_tooling::tolerances::{tolerance, CaseKind};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

struct Case {
    prompt: String,
    ids: Vec<u32>,
    ids_untruncated: Vec<u32>,
    ids_tokenizer_2: Vec<u32>,
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect()
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|case| Case {
            prompt: case["prompt"].as_str().unwrap().to_string(),
            ids: ids(&case["ids"]),
            ids_untruncated: ids(&case["ids_untruncated"]),
            ids_tokenizer_2: ids(&case["ids_tokenizer_2"]),
        })
        .collect()
}

fn tokenizer(folder: &str) -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join(folder)).unwrap()
}

/// The largest difference between two id lists (infinite when the lengths differ).
fn ids_diff(got: &[u32], expected: &[u32]) -> f64 {
    if got.len() != expected.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(expected)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
        .fold(0.0, f64::max)
}

// Tolerance: the table's tokenizer bound, 0: every id equal.
fn check(what: &str, prompt: &str, got: &[u32], expected: &[u32]) {
    let tol = tolerance(CaseKind::Tokenizer, DType::F32).unwrap();
    assert!(
        ids_diff(got, expected) <= tol,
        "{what} differs for prompt {prompt:?}\n  got      {got:?}\n  expected {expected:?}"
    );
}

#[test]
fn sd15_tokenizer_matches_transformers() {
    let tok = tokenizer("tiny-sd15/tokenizer");
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), tok.eos_id());
    for case in cases() {
        check(
            "ids",
            &case.prompt,
            &tok.encode(&case.prompt).unwrap(),
            &case.ids,
        );
        check(
            "ids_untruncated",
            &case.prompt,
            &tok.encode_untruncated(&case.prompt).unwrap(),
            &case.ids_untruncated,
        );
    }
}

#[test]
fn sdxl_tokenizer_2_pads_with_bang_and_matches_transformers() {
    let tok = tokenizer("tiny-sdxl/tokenizer_2");
    assert_eq!(Some(tok.pad_id()), tok.token_to_id("!"));
    for case in cases() {
        check(
            "ids_tokenizer_2",
            &case.prompt,
            &tok.encode(&case.prompt).unwrap(),
            &case.ids_tokenizer_2,
        );
    }
}

/// `tiny-sdxl/tokenizer` ships only a `tokenizer.json`; it holds the same CLIP-L vocabulary,
/// merges and pad token as the sd15 vocab.json + merges.txt, so it must give the same ids.
#[test]
fn tokenizer_json_gives_the_same_ids() {
    let tok = tokenizer("tiny-sdxl/tokenizer");
    let sd15 = tokenizer("tiny-sd15/tokenizer");
    assert_eq!(
        (tok.max_length(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (
            sd15.max_length(),
            sd15.bos_id(),
            sd15.eos_id(),
            sd15.pad_id()
        )
    );
    for case in cases() {
        check(
            "ids (tokenizer.json)",
            &case.prompt,
            &tok.encode(&case.prompt).unwrap(),
            &case.ids,
        );
        check(
            "ids_untruncated (tokenizer.json)",
            &case.prompt,
            &tok.encode_untruncated(&case.prompt).unwrap(),
            &case.ids_untruncated,
        );
    }
}

#[test]
fn in_memory_vocab_and_merges_match_the_folder() {
    let dir = fixtures().join("tiny-sdxl/tokenizer_2");
    let vocab = std::fs::read_to_string(dir.join("vocab.json")).unwrap();
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    let tok = ClipTokenizer::from_vocab_merges(&vocab, &merges, "!", 77).unwrap();
    for case in cases() {
        check(
            "ids_tokenizer_2 (in memory)",
            &case.prompt,
            &tok.encode(&case.prompt).unwrap(),
            &case.ids_tokenizer_2,
        );
    }
}
