//! `sdrs serve` end to end: the binary serves the tiny fixture, and a fixed seed gives the
//! pixels `sdrs generate` writes with the same settings.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use crate::util::{fixtures, read_png, sdrs, stderr};

/// A running `sdrs serve` and the address it listens on; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Server {
    let model = format!("tiny={}", fixtures().join("tiny-sd15").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(["serve", "-m", &model, "--port", "0", "--device", "cpu"])
        .args(["--dtype", "f32"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("sdrs serve says where it listens")
            .unwrap();
        if let Some(addr) = line.strip_prefix("listening on http://") {
            break addr.to_string();
        }
    };
    let (sender, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    Server { child, addr, log }
}

/// POSTs `body` and returns the status and the body of the answer.
fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_string(),
    )
}

#[test]
fn serve_txt2img_gives_the_pixels_of_sdrs_generate() {
    let server = serve(&[]);
    let body = r#"{"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64,
                   "seed": 7, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7.5}"#;
    let (status, answer) = post(&server.addr, "/sdapi/v1/txt2img", body);
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let png = base64_decode(answer["images"][0].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.png");
    std::fs::write(&served, png).unwrap();

    let generated = dir.path().join("generated.png");
    let model = fixtures().join("tiny-sd15");
    let output = sdrs(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "a lighthouse at dusk",
        "--steps",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        "7",
        "--cfg-scale",
        "7.5",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "-o",
        generated.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (w, h, served_pixels, served_text) = read_png(&served);
    let (_, _, generated_pixels, generated_text) = read_png(&generated);
    assert_eq!((w, h), (64, 64));
    assert!(
        served_pixels == generated_pixels,
        "the server's pixels differ from sdrs generate's"
    );
    // The same infotext but the model's name (the alias here, the folder's name there).
    let fields = |text: &str| text.split(", Model:").next().unwrap().to_string();
    assert_eq!(fields(&served_text), fields(&generated_text));

    let line = server
        .log
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    assert!(
        line.starts_with("#1 POST /sdapi/v1/txt2img 200 ") && line.ends_with(" 64x64 2 steps"),
        "{line}"
    );
}

#[test]
fn serve_json_log_writes_one_object_per_request() {
    let server = serve(&["--json-log"]);
    let (status, _) = post(&server.addr, "/sdapi/v1/txt2img", "{\"steps\": \"x\"}");
    assert_eq!(status, 422);
    let line = server
        .log
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["endpoint"], "/sdapi/v1/txt2img");
    assert_eq!(line["status"], 422);
}

#[test]
fn serve_refuses_a_public_address_without_auth() {
    let output = sdrs(&["serve", "--host", "0.0.0.0", "-m", "/nonexistent"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--api-auth"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn serve_embedding_dir_that_is_missing_is_an_error_naming_it() {
    let model = fixtures().join("tiny-sd15");
    let output = sdrs(&[
        "serve",
        "-m",
        model.to_str().unwrap(),
        "--port",
        "0",
        "--embedding-dir",
        "/nonexistent-embeddings",
    ]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("/nonexistent-embeddings"), "{err}");
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for byte in text.bytes().filter(|&b| b != b'=') {
        let value = ALPHABET.iter().position(|&a| a == byte).unwrap() as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}
