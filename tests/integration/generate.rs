//! `sdrs generate` end to end on the tiny SD1.5 fixture: a PNG with AUTOMATIC1111 parameters,
//! reproducible from its seed.

use crate::util::{files_in, fixtures, sdrs, stderr};

fn read_png(path: &std::path::Path) -> (u32, u32, Vec<u8>, String) {
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

#[test]
fn generate_writes_a_png_with_parameters_and_the_same_seed_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd15");
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let output = sdrs(&[
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "a red fox in the snow",
            "-n",
            "blurry",
            "--steps",
            "3",
            "-W",
            "64",
            "-H",
            "48",
            "-s",
            seed,
            "--sampling-method",
            "euler",
            "--device",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        read_png(&out)
    };
    let (w, h, pixels, text) = run("a.png", "42");
    assert_eq!((w, h), (64, 48));
    assert_eq!(
        text,
        "a red fox in the snow\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7.5, \
         Seed: 42, Size: 64x48, Model: tiny-sd15, Version: sdrs 0.1.0"
    );
    let (_, _, same, _) = run("b.png", "42");
    assert_eq!(pixels, same, "the same seed must give the same image");
    let (_, _, other, _) = run("c.png", "43");
    assert_ne!(pixels, other, "another seed must give another image");
    assert_eq!(files_in(dir.path()), ["a.png", "b.png", "c.png"]);
}

#[test]
fn without_a_seed_a_random_one_is_printed_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let output = sdrs(&[
        "generate",
        "-m",
        fixtures().join("tiny-sd15").to_str().unwrap(),
        "-p",
        "a boat",
        "--steps",
        "2",
        "-W",
        "32",
        "-H",
        "32",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    let seed = log
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .expect("the seed is printed")
        .trim()
        .to_string();
    let (_, _, _, text) = read_png(&out);
    assert!(text.contains(&format!("Seed: {seed},")), "{text}");
    assert!(
        text.contains("Sampler: DPM++ 2M, Schedule type: Karras"),
        "{text}"
    );
}
