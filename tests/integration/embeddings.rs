//! `sdrs generate --embedding-dir` on the tiny SD1.5 fixture with the textual-inversion files of
//! the extended fixtures (`features/embeddings/`): loaded by file stem, used in the prompt,
//! recorded as `TI hashes`, and found beside a local model without the flag.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::util::{copy_model, extended_fixtures, generate_small, read_png, stderr};

/// The SD1.5 embedding files of the extended set, or `None` when it is absent.
fn sd15_embeddings() -> Option<Vec<PathBuf>> {
    let dir = extended_fixtures("features/embeddings")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("sd15_"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no sd15_* embedding in the extended set");
    Some(files)
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_str().unwrap().to_string()
}

#[test]
fn embeddings_beside_the_model_are_used_by_file_stem_and_their_hashes_recorded() {
    let Some(files) = sd15_embeddings() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny-sd15", dir.path());
    let embeddings = dir.path().join("embeddings");
    std::fs::create_dir(&embeddings).unwrap();
    for file in &files {
        std::fs::copy(file, embeddings.join(file.file_name().unwrap())).unwrap();
    }
    let names: Vec<String> = files.iter().map(|f| stem(f)).collect();
    let prompt = format!("a photo of {} next to {}", names[0], names[names.len() - 1]);

    // Found beside the model without the flag.
    let with = dir.path().join("with.png");
    let output = generate_small(&model, &prompt, &with, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(
        log.contains(&format!(
            "textual inversion embeddings loaded ({})",
            files.len()
        )),
        "{log}"
    );
    let (_, _, pixels, text) = read_png(&with);
    let hashes: Vec<String> = [&files[0], &files[files.len() - 1]]
        .iter()
        .map(|f| {
            let digest = Sha256::digest(std::fs::read(f).unwrap());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("{}: {}", stem(f), &hex[..12])
        })
        .collect();
    let mut hashes = hashes;
    hashes.dedup();
    assert!(
        text.contains(&format!("TI hashes: \"{}\"", hashes.join(", "))),
        "{text}"
    );

    // An empty folder given with the flag: the names are plain words again.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let without = dir.path().join("without.png");
    let output = generate_small(
        &model,
        &prompt,
        &without,
        &["--embedding-dir", empty.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let (_, _, plain, text) = read_png(&without);
    assert!(!text.contains("TI hashes"), "{text}");
    assert_ne!(pixels, plain, "the embeddings must change the image");
}

#[test]
fn an_embedding_for_another_model_is_skipped_naming_the_file_and_why() {
    let Some(dir) = extended_fixtures("features/embeddings") else {
        return;
    };
    let sdxl: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("sdxl_")
        })
        .collect();
    assert!(!sdxl.is_empty(), "no sdxl_* embedding in the extended set");
    let tmp = tempfile::tempdir().unwrap();
    let embeddings = tmp.path().join("embeddings");
    std::fs::create_dir(&embeddings).unwrap();
    std::fs::copy(&sdxl[0], embeddings.join(sdxl[0].file_name().unwrap())).unwrap();
    let model = crate::util::fixtures().join("tiny-sd15");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let output = generate_small(&model, "a cat", &out, extra);
        assert!(output.status.success(), "{}", stderr(&output));
        (read_png(&out).2, stderr(&output))
    };
    // As AUTOMATIC1111 does, an SDXL embedding is skipped by an SD1.5 model, with the reason.
    let (pixels, log) = run(
        "with.png",
        &["--embedding-dir", embeddings.to_str().unwrap()],
    );
    assert!(
        log.contains("skipped the embedding")
            && log.contains("clip_l")
            && log.contains(&stem(&sdxl[0])),
        "{log}"
    );
    let (plain, _) = run("without.png", &[]);
    assert_eq!(pixels, plain, "a skipped embedding changes nothing");
}
