//! `sdrs parity --fixtures tests/fixtures` passes every case the project supports, and lists the rest.

use crate::util::{fixtures, sdrs, stdout};

/// The SD1.5 cases that must pass (not merely be skipped), beside every tokenizer and scheduler case
/// of the classes named here.
const MUST_PASS: &[&str] = &[
    "text_encoder_sd15",
    "unet_sd15",
    "vae_sd15_decode",
    "vae_sd15_encode",
    "sd15_pndm",
    "sd15_ddim",
    "sd15_euler",
    "sd15_dpmpp_2m",
    "sd15_dpmpp_2m_karras",
];

#[test]
fn parity_passes_every_supported_case() {
    let output = sdrs(&["parity", "--fixtures", fixtures().to_str().unwrap()]);
    let text = stdout(&output);
    assert!(output.status.success(), "parity failed:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.contains(" passed, 0 failed"), "last line: {last}");
    let verdict = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.to_string())
            .unwrap_or_else(|| panic!("no line for case {name}:\n{text}"))
    };
    for name in MUST_PASS {
        let line = verdict(name);
        assert!(line.ends_with("pass"), "{line}");
    }
    for line in &lines {
        let name = line.split_whitespace().next().unwrap_or_default();
        let required = name.starts_with("tokenizer:")
            || [
                "scheduler:ddim_",
                "scheduler:pndm_",
                "scheduler:euler_",
                "scheduler:dpmpp_2m_",
            ]
            .iter()
            .any(|p| name.starts_with(p));
        if required {
            assert!(line.ends_with("pass"), "{line}");
        }
    }
}

#[test]
fn parity_on_a_folder_without_references_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = sdrs(&["parity", "--fixtures", dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(crate::util::stderr(&output).contains("reference"));
}
