//! `sdrs generate --prompt-syntax`: AUTOMATIC1111's weights and long prompts by default, diffusers'
//! plain text (cut at 77 tokens) with `plain`, on the tiny SD1.5 fixture.

use crate::util::{fixtures, read_png, sdrs, stderr};

/// More than one 75-token chunk of prompt (about 90 tokens), with weights and a `BREAK`.
fn long_prompt(weighted: &str) -> String {
    let phrase = "a red fox in the snow, ";
    format!("{}{weighted} BREAK northern lights", phrase.repeat(15))
}

/// A weighted negative prompt, in one chunk.
const NEGATIVE: &str = "(blurry:1.3), [lowres]";

/// The pixels and the `parameters` text of `prompt` and `negative` generated with `extra` flags.
fn generate(
    dir: &std::path::Path,
    name: &str,
    [prompt, negative]: [&str; 2],
    extra: &[&str],
) -> (Vec<u8>, String) {
    let out = dir.join(name);
    let model = fixtures().join("tiny-sd15");
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        negative,
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "-s",
        "7",
        "--sampling-method",
        "euler",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = sdrs(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let (_, _, pixels, text) = read_png(&out);
    (pixels, text)
}

#[test]
fn a_weight_in_a_long_prompt_changes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let weighted = long_prompt("(castle:1.5)");
    let (weighted, text) = generate(dir.path(), "w.png", [&weighted, NEGATIVE], &[]);
    let unweighted = long_prompt("castle");
    let (unweighted, _) = generate(dir.path(), "u.png", [&unweighted, NEGATIVE], &[]);
    assert_ne!(weighted, unweighted, "(castle:1.5) must change the image");
    // The prompt is stored as written, and the default syntax is not recorded.
    assert!(text.starts_with(&long_prompt("(castle:1.5)")), "{text}");
    assert!(!text.contains("Prompt syntax"), "{text}");
}

#[test]
fn a1111_reads_past_77_tokens_and_plain_cuts_there() {
    let dir = tempfile::tempdir().unwrap();
    let plain = ["--prompt-syntax", "plain"];
    // The prompts differ only after the first 77 tokens.
    let (castle, tower) = (long_prompt("castle"), long_prompt("tower"));
    let (plain_castle, text) = generate(dir.path(), "pc.png", [&castle, NEGATIVE], &plain);
    let (plain_tower, _) = generate(dir.path(), "pt.png", [&tower, NEGATIVE], &plain);
    assert_eq!(
        plain_castle, plain_tower,
        "plain cuts the prompt at 77 tokens"
    );
    assert!(text.contains("Prompt syntax: plain"), "{text}");
    let (castle, _) = generate(dir.path(), "ac.png", [&castle, NEGATIVE], &[]);
    let (tower, _) = generate(dir.path(), "at.png", [&tower, NEGATIVE], &[]);
    assert_ne!(castle, tower, "a1111 reads the whole prompt");
}

#[test]
fn a_plain_short_prompt_gives_the_same_image_in_both_syntaxes() {
    let dir = tempfile::tempdir().unwrap();
    let plain = ["--prompt-syntax", "plain"];
    let prompts = ["a lighthouse on a cliff at dusk", "blurry, low quality"];
    let (a1111_image, _) = generate(dir.path(), "a.png", prompts, &[]);
    let (plain_image, _) = generate(dir.path(), "p.png", prompts, &plain);
    assert_eq!(a1111_image, plain_image);
    // Brackets are plain text there: the weighted prompt gives another image.
    let prompts = [
        "a lighthouse on a (cliff:1.4) at dusk",
        "blurry, low quality",
    ];
    let (a1111_image, _) = generate(dir.path(), "wa.png", prompts, &[]);
    let (plain_image, _) = generate(dir.path(), "wp.png", prompts, &plain);
    assert_ne!(a1111_image, plain_image);
}

#[test]
fn an_unknown_prompt_syntax_is_refused_with_the_choices() {
    let output = sdrs(&["generate", "-p", "a fox", "--prompt-syntax", "compel"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("compel") && message.contains("a1111 or plain"),
        "{message}"
    );
}
