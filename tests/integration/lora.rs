//! `--lora`, `<lora:name:weight>` and `--lora-model-dir` on the tiny SD1.5 fixture with the
//! feature fixtures' kohya LoRA (skipped when the extended set is absent): the prompt tag and the
//! flag merge the same file, the PNG records `Lora hashes` as AUTOMATIC1111 does, weight 0 is
//! the base image, and unknown names and mismatched LoRAs are refused by name.

use crate::util::{copy_model, extended_fixtures, generate_small, read_png, stderr};

#[test]
fn prompt_tags_and_the_flag_merge_loras_and_record_their_hashes() {
    let Some(features) = extended_fixtures("features") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    // The default folder: `loras` beside the model.
    let loras = dir.path().join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    let style = loras.join("style.safetensors");
    std::fs::copy(
        features.join("lora/sd15_kohya_locon_r4.safetensors"),
        &style,
    )
    .unwrap();

    let run = |name: &str, prompt: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let output = generate_small(&model, prompt, &out, extra);
        assert!(output.status.success(), "{}", stderr(&output));
        read_png(&out)
    };
    let (_, _, base, base_text) = run("base.png", "a red fox", &[]);
    assert!(!base_text.contains("Lora hashes"), "{base_text}");
    let (_, _, tagged, text) = run("tag.png", "a red fox <lora:style:0.8>", &[]);
    assert_ne!(base, tagged, "the LoRA changed nothing");
    let hash = sdrs_pipeline::addnet_hash(&style).unwrap();
    assert!(text.starts_with("a red fox <lora:style:0.8>\n"), "{text}");
    assert!(
        text.contains(&format!("Lora hashes: \"style: {}\"", &hash[..12])),
        "{text}"
    );
    let flag = format!("{}:0.8", style.display());
    let (_, _, flagged, _) = run("flag.png", "a red fox", &["--lora", &flag]);
    assert_eq!(tagged, flagged, "the tag and the flag must merge the same");
    let (_, _, zero, _) = run("zero.png", "a red fox <lora:style:0>", &[]);
    assert_eq!(base, zero, "weight 0 must give the base image");

    // A name not in the folder, and an SDXL LoRA on an SD1.5 model, are refused by name.
    let out = dir.path().join("bad.png");
    let output = generate_small(&model, "a fox <lora:missing>", &out, &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("missing.safetensors"),
        "{}",
        stderr(&output)
    );
    let sdxl = features.join("lora/sdxl_kohya_attn_r8.safetensors");
    let output = generate_small(&model, "a fox", &out, &["--lora", sdxl.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("sdxl_kohya_attn_r8"),
        "{}",
        stderr(&output)
    );
}
