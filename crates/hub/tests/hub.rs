//! Downloads against a local server that answers like the Hub (`fake_hub`): a first download
//! takes only what the pipeline reads, a second resolve is answered by the cache with no request,
//! offline mode uses the cache only, and a 404, a gated repo and a body cut off halfway give the
//! errors (and the cache state) the user needs.

mod fake_hub;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fake_hub::FakeHub;
use sdrs_hub::{Error, Hub, HubSettings, NoProgress, RepoRef};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The tiny SD1.5 folder plus what a published repo also carries: pickles, flax, ONNX, a
/// safety checker the pipeline does not run, and fp16 variants.
fn sd15_repo_files() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let root = fixture("tiny-sd15");
    for (name, data) in read_folder(&root) {
        files.insert(name, data);
    }
    let unet = files["unet/diffusion_pytorch_model.safetensors"].clone();
    for extra in [
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
        "vae/diffusion_pytorch_model.onnx",
        "v1-5-pruned.ckpt",
        "v1-5-pruned-emaonly.safetensors",
        "safety_checker/model.safetensors",
        "README.md",
    ] {
        files.insert(extra.to_string(), unet[..1000].to_vec());
    }
    files.insert(
        "unet/diffusion_pytorch_model.fp16.safetensors".to_string(),
        unet.clone(),
    );
    files
}

fn read_folder(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.path().is_dir() {
                stack.push((entry.path(), format!("{name}/")));
            } else {
                out.push((name, std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    out
}

fn hub(server: &FakeHub, cache: &Path, token: Option<&str>, offline: bool) -> Hub {
    Hub::new(HubSettings {
        cache_dir: cache.to_path_buf(),
        endpoint: server.endpoint(),
        token: token.map(str::to_string),
        offline,
    })
}

fn repo(text: &str) -> RepoRef {
    RepoRef::parse(text).unwrap()
}

#[test]
fn first_download_takes_what_the_pipeline_reads_and_the_second_run_makes_no_request() {
    let server = FakeHub::start();
    let files = sd15_repo_files();
    server.add_files("org/tiny-sd15", COMMIT, files.clone(), None);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, false);

    let snapshot = hub
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    assert!(!snapshot.from_cache);
    assert_eq!(snapshot.commit, COMMIT);
    assert_eq!(
        snapshot.path,
        cache
            .path()
            .join("models--org--tiny-sd15/snapshots")
            .join(COMMIT)
    );
    let mut downloaded = snapshot.downloaded.clone();
    downloaded.sort();
    let mut expected: Vec<String> = read_folder(&fixture("tiny-sd15"))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    expected.sort();
    assert_eq!(
        downloaded, expected,
        "exactly the files of a diffusers folder"
    );
    for name in &expected {
        let local = std::fs::read(snapshot.path.join(name)).unwrap();
        assert!(local == files[name], "{name} differs from the served file");
    }
    assert_eq!(
        std::fs::read_to_string(cache.path().join("models--org--tiny-sd15/refs/main")).unwrap(),
        COMMIT
    );

    let before = server.requests().len();
    let again = hub
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    assert!(again.from_cache && again.downloaded.is_empty());
    assert_eq!(again.path, snapshot.path);
    assert_eq!(
        server.requests().len(),
        before,
        "the cache answered with no request"
    );

    // Offline, the same snapshot comes from the cache, again with no request.
    let offline = self::hub(&server, cache.path(), None, true);
    let cached = offline
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    assert_eq!(cached.path, snapshot.path);
    assert_eq!(server.requests().len(), before);

    // `pull` asks the Hub for the current commit but downloads nothing more.
    let pulled = hub
        .pull(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    assert!(pulled.downloaded.is_empty());
    assert!(server.requests().len() > before);
}

#[test]
fn the_fp16_variant_is_taken_when_asked_and_plain_files_fill_the_gaps() {
    let server = FakeHub::start();
    server.add_files("org/tiny-sd15", COMMIT, sd15_repo_files(), None);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, false);
    let snapshot = hub
        .resolve(&repo("org/tiny-sd15"), Some("fp16"), &mut NoProgress)
        .unwrap();
    let weights: Vec<&String> = snapshot
        .downloaded
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert_eq!(
        weights,
        [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    );
}

#[test]
fn offline_with_an_empty_or_incomplete_cache_names_what_is_missing() {
    let server = FakeHub::start();
    server.add_files("org/tiny-sd15", COMMIT, sd15_repo_files(), None);
    let cache = tempfile::tempdir().unwrap();
    let offline = hub(&server, cache.path(), None, true);
    let err = offline
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, Error::NotCached { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("HF_HUB_OFFLINE") && message.contains("org/tiny-sd15"),
        "{message}"
    );
    assert!(server.requests().is_empty(), "offline makes no request");

    let online = hub(&server, cache.path(), None, false);
    let snapshot = online
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    std::fs::remove_file(
        snapshot
            .path
            .join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let requests = server.requests().len();
    let message = offline
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("vae/diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    assert_eq!(server.requests().len(), requests);
    // Online, the missing file is fetched again.
    let fixed = online
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    assert_eq!(
        fixed.downloaded,
        ["vae/diffusion_pytorch_model.safetensors"]
    );
}

#[test]
fn an_unknown_repo_or_revision_is_a_clear_error() {
    let server = FakeHub::start();
    server.add_files("org/tiny-sd15", COMMIT, sd15_repo_files(), None);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, false);
    let err = hub
        .resolve(&repo("org/missing"), None, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, Error::RepoNotFound { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("org/missing") && message.contains("not found"),
        "{message}"
    );
    assert!(
        message.contains("HF_TOKEN"),
        "hints at private repos: {message}"
    );
    let err = hub
        .resolve(&repo("org/tiny-sd15@v9"), None, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, Error::RevisionNotFound { .. }), "{err}");
    assert!(err.to_string().contains("v9"), "{err}");
    assert!(!cache.path().join("models--org--missing/snapshots").exists());
}

#[test]
fn a_gated_repo_without_a_token_says_how_to_set_one() {
    let server = FakeHub::start();
    server.add_files("org/gated", COMMIT, sd15_repo_files(), Some("hf_secret"));
    let cache = tempfile::tempdir().unwrap();
    let err = hub(&server, cache.path(), None, false)
        .resolve(&repo("org/gated"), None, &mut NoProgress)
        .unwrap_err();
    assert!(
        matches!(err, Error::Unauthorized { status: 401, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("HF_TOKEN") && message.contains("org/gated"),
        "{message}"
    );
    let err = hub(&server, cache.path(), Some("hf_wrong"), false)
        .resolve(&repo("org/gated"), None, &mut NoProgress)
        .unwrap_err();
    assert!(err.to_string().contains("token was refused"), "{err}");
    let snapshot = hub(&server, cache.path(), Some("hf_secret"), false)
        .resolve(&repo("org/gated"), None, &mut NoProgress)
        .unwrap();
    assert!(snapshot.path.join("unet/config.json").is_file());
    let sent = server.requests();
    assert!(sent
        .iter()
        .any(|r| r.authorization.as_deref() == Some("Bearer hf_secret")));
}

#[test]
fn a_download_cut_off_halfway_leaves_no_file_and_the_next_run_resumes_it() {
    let server = FakeHub::start();
    let files = sd15_repo_files();
    server.add_files("org/tiny-sd15", COMMIT, files.clone(), None);
    let unet = "unet/diffusion_pytorch_model.safetensors";
    server.cut_off(unet, 1);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, false);
    let err = hub
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(unet) && message.contains("resumes"),
        "{message}"
    );
    let snapshot = cache
        .path()
        .join("models--org--tiny-sd15/snapshots")
        .join(COMMIT);
    assert!(
        !snapshot.join(unet).exists(),
        "no half file where the loader looks"
    );
    let blobs = cache.path().join("models--org--tiny-sd15/blobs");
    let partial: Vec<u64> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    let size = files[unet].len() as u64;
    assert_eq!(
        partial,
        [size / 2],
        "the received half is kept to resume from"
    );

    let resumed = hub
        .resolve(&repo("org/tiny-sd15"), None, &mut NoProgress)
        .unwrap();
    assert!(resumed.downloaded.contains(&unet.to_string()));
    assert!(std::fs::read(resumed.path.join(unet)).unwrap() == files[unet]);
    let resume_range = format!("bytes={}-", size / 2);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.path.ends_with(unet) && r.range.as_deref() == Some(resume_range.as_str())),
        "the second run asked only for the missing bytes"
    );
}
