//! Helpers shared by the integration tests: running the binary and copying fixture models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs `sdrs` with `args` and returns its output.
pub fn sdrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(args)
        .output()
        .expect("the sdrs binary runs")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A writable copy of a fixture model folder, to break on purpose.
pub fn copy_model(name: &str, into: &Path) -> PathBuf {
    let target = into.join(name);
    copy_dir(&fixtures().join(name), &target);
    target
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
            let mut perms = std::fs::metadata(to.join(entry.file_name()))
                .unwrap()
                .permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(to.join(entry.file_name()), perms).unwrap();
        }
    }
}

/// The files in `dir` (to check that a failed run left nothing behind).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The extended fixture set `name` (`SDRS_FIXTURES`, default `../shared/fixtures`), or `None`
/// after printing `skipped: <path> not found`; under `CI=true` a missing set fails the test.
pub fn extended_fixtures(name: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(name)
}

/// A PNG's width, height, pixels and `parameters` text chunk.
pub fn read_png(path: &Path) -> (u32, u32, Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap_or_default();
    (info.width, info.height, buf, text)
}

/// `sdrs generate` of a 64x64 image in 2 steps, seed 7, on the CPU, with `extra` flags.
pub fn generate_small(model: &Path, prompt: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "--steps",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        "7",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sdrs(&args)
}

/// Runs `generate` on `model` with `extra` flags into an empty folder, expects failure, and
/// returns the error text after checking that it did not panic and left nothing behind. `-s 1`,
/// `--steps 2` and `-o <folder>/out.png` are given unless `extra` gives its own.
pub fn generate_fails(model: &Path, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "a cat",
        "--device",
        "cpu",
    ];
    for (flag, value) in [("-s", "1"), ("--steps", "2"), ("-o", out.to_str().unwrap())] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let output = sdrs(&args);
    let message = stderr(&output);
    assert!(!output.status.success(), "expected failure: {message}");
    assert!(!message.contains("panicked"), "{message}");
    assert!(
        files_in(dir.path()).is_empty(),
        "left files behind: {:?}",
        files_in(dir.path())
    );
    message
}

/// Writes a `width` x `height` RGB gradient PNG.
pub fn write_png(path: &std::path::Path, width: u32, height: u32) {
    let mut data = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            data.extend_from_slice(&[(x * 3) as u8, (y * 4) as u8, 128]);
        }
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder
        .write_header()
        .unwrap()
        .write_image_data(&data)
        .unwrap();
}
