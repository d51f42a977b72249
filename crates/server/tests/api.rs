//! The server over HTTP on the tiny SD1.5 fixture: every endpoint, the queue's limits, bad input
//! and authentication, through a plain HTTP/1.1 client on a socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use candle_core::{DType, Device};
use sdrs_pipeline::{LoadOptions, StableDiffusion};
use sdrs_server::{Limits, Model, ServerConfig};
use serde_json::{json, Value};

fn tiny() -> StableDiffusion {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd15");
    let options = LoadOptions::new(Device::Cpu, DType::F32, None).with_threads(Some(1));
    StableDiffusion::load(&path, &options).unwrap()
}

struct Setup {
    aliases: &'static [&'static str],
    queue: usize,
    limits: Limits,
    auth: Option<(String, String)>,
    cors: Option<String>,
    lora_dir: Option<std::path::PathBuf>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            aliases: &["tiny"],
            queue: 4,
            limits: Limits::default(),
            auth: None,
            cors: None,
            lora_dir: None,
        }
    }
}

/// Starts a server on a free port; it runs until the test process ends.
fn start(setup: Setup) -> SocketAddr {
    let models = setup
        .aliases
        .iter()
        .map(|alias| Model {
            alias: alias.to_string(),
            pipeline: tiny(),
        })
        .collect();
    let config = ServerConfig {
        models,
        queue: setup.queue,
        limits: setup.limits,
        auth: setup.auth,
        cors_allow_origin: setup.cors,
        log: Arc::new(|_| {}),
        lora_dir: setup.lora_dir,
    };
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        sdrs_server::serve("127.0.0.1:0".parse().unwrap(), config, |addr| {
            sender.send(addr).unwrap()
        })
        .unwrap()
    });
    receiver.recv_timeout(Duration::from_secs(60)).unwrap()
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, extra: &str, body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // A body over the limit may be refused before it is all read.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, "", b"")
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, "", body.to_string().as_bytes())
}

fn small(extra: Value) -> Value {
    let mut body = json!({"prompt": "a lighthouse at dusk", "steps": 2, "width": 64,
                          "height": 64, "seed": 42, "sampler_name": "DPM++ 2M",
                          "scheduler": "Karras", "cfg_scale": 7.5});
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

/// The PNG's pixels and its `parameters` text.
fn decode(b64: &str) -> (Vec<u8>, Option<String>) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut pixels).unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone());
    (pixels, text)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "waited too long for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn txt2img_answers_as_automatic1111_with_reproducible_pngs() {
    let addr = start(Setup::default());
    let reply = post(
        addr,
        "/sdapi/v1/txt2img",
        &small(json!({"restore_faces": true, "eta": 1, "negative_prompt": "<lora:blur:0.5>"})),
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let answer = reply.json();
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let (pixels, text) = decode(images[0].as_str().unwrap());
    assert_eq!(pixels.len(), 64 * 64 * 3);
    let text = text.unwrap();
    assert!(text.starts_with("a lighthouse at dusk\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny"), "{text}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 42);
    assert_eq!(info["all_seeds"], json!([42]));
    assert_eq!(info["infotexts"][0], text);
    assert_eq!(
        info["unsupported"],
        json!([
            "restore_faces",
            "<lora:blur> (no LoRA folder: sdrs serve --lora-dir)"
        ])
    );
    assert_eq!(info["negative_prompt"], "");
    assert_eq!(answer["parameters"]["seed"], 42);
    assert_eq!(answer["parameters"]["steps"], 2);

    let again = post(addr, "/sdapi/v1/txt2img", &small(json!({})));
    let again = decode(again.json()["images"][0].as_str().unwrap()).0;
    assert_eq!(again, pixels, "the same seed gives the same pixels");

    // A batch of 2 over 2 iterations: seeds 42..46, the first the image above.
    let reply = post(
        addr,
        "/sdapi/v1/txt2img",
        &small(json!({"batch_size": 2, "n_iter": 2})),
    );
    let answer = reply.json();
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([42, 43, 44, 45]));
    assert_eq!(answer["images"].as_array().unwrap().len(), 4);
    assert_eq!(decode(answer["images"][0].as_str().unwrap()).0, pixels);

    // seed -1: a random seed, reported.
    let answer = post(
        addr,
        "/sdapi/v1/txt2img",
        &small(json!({"seed": -1, "send_images": false})),
    )
    .json();
    assert_eq!(answer["images"], json!([]));
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert!(info["seed"].as_u64().unwrap() < 1 << 32);
}

#[test]
fn img2img_starts_from_the_init_image() {
    let addr = start(Setup::default());
    let first = post(addr, "/sdapi/v1/txt2img", &small(json!({}))).json();
    let init = first["images"][0].as_str().unwrap().to_string();
    let body = small(
        json!({"init_images": [format!("data:image/png;base64,{init}")],
                            "denoising_strength": 0.5}),
    );
    let reply = post(addr, "/sdapi/v1/img2img", &body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let (pixels, text) = decode(reply.json()["images"][0].as_str().unwrap());
    assert_eq!(pixels.len(), 64 * 64 * 3);
    assert!(text.unwrap().contains("Denoising strength: 0.5"));
    let reply = post(addr, "/sdapi/v1/img2img", &small(json!({})));
    assert_eq!(reply.status, 422);
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("init_images"));
    let reply = post(
        addr,
        "/sdapi/v1/img2img",
        &small(json!({"init_images": ["%%%"]})),
    );
    assert_eq!(reply.status, 422);
    assert!(reply.json()["detail"].as_str().unwrap().contains("base64"));
}

#[test]
fn listing_endpoints_and_the_page_answer() {
    let addr = start(Setup {
        aliases: &["fast", "quality"],
        ..Setup::default()
    });
    let health = get(addr, "/health").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["models"], json!(["fast", "quality"]));
    let models = get(addr, "/sdapi/v1/sd-models").json();
    assert_eq!(models[1]["title"], "quality");
    let samplers = get(addr, "/sdapi/v1/samplers").json();
    assert!(samplers
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "DPM++ 2M"));
    let schedulers = get(addr, "/sdapi/v1/schedulers").json();
    assert_eq!(schedulers[0]["label"], "Automatic");
    let scripts = get(addr, "/sdapi/v1/scripts").json();
    assert_eq!(scripts, json!({"txt2img": [], "img2img": []}));
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("/sdapi/v1/txt2img"));
    assert_eq!(get(addr, "/etc/passwd").status, 404);
    assert_eq!(get(addr, "/api/queue").json()["limit"], 4);
}

#[test]
fn options_switch_the_model_and_override_settings_pick_one() {
    let addr = start(Setup {
        aliases: &["fast", "quality"],
        ..Setup::default()
    });
    assert_eq!(
        get(addr, "/sdapi/v1/options").json()["sd_model_checkpoint"],
        "fast"
    );
    let model_of = |reply: Reply| -> Value {
        let info: Value = serde_json::from_str(reply.json()["info"].as_str().unwrap()).unwrap();
        info["sd_model_name"].clone()
    };
    assert_eq!(
        model_of(post(addr, "/sdapi/v1/txt2img", &small(json!({})))),
        "fast"
    );
    let reply = post(
        addr,
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "quality"}),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(
        get(addr, "/sdapi/v1/options").json()["sd_model_checkpoint"],
        "quality"
    );
    assert_eq!(
        model_of(post(addr, "/sdapi/v1/txt2img", &small(json!({})))),
        "quality"
    );
    let body = small(json!({"override_settings": {"sd_model_checkpoint": "fast"}}));
    assert_eq!(model_of(post(addr, "/sdapi/v1/txt2img", &body)), "fast");
    let reply = post(
        addr,
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "nope"}),
    );
    assert_eq!(reply.status, 404);
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("fast, quality"));
    let reply = post(addr, "/sdapi/v1/options", &json!({"sd_vae": "x"}));
    assert_eq!(reply.status, 422);
    assert_eq!(
        get(addr, "/sdapi/v1/options").json()["sd_model_checkpoint"],
        "quality"
    );
}

#[test]
fn api_generate_gives_the_image_of_its_seed() {
    let addr = start(Setup::default());
    let body = json!({"prompt": "a lighthouse at dusk", "steps": 2, "seed": 42,
                      "width": 64, "height": 64, "modelType": "tiny"});
    let reply = post(addr, "/api/generate", &body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let answer = reply.json();
    assert_eq!(answer["seed"], 42);
    assert!(answer["timings"]["generation_s"].as_f64().unwrap() > 0.0);
    let (pixels, _) = decode(answer["image"].as_str().unwrap());
    // Its defaults are `sdrs generate`'s: DPM++ 2M Karras and the model's guidance scale, 7.5.
    let a1111 = post(addr, "/sdapi/v1/txt2img", &small(json!({})));
    assert_eq!(
        decode(a1111.json()["images"][0].as_str().unwrap()).0,
        pixels
    );
    let reply = post(addr, "/api/generate", &json!({"prompt": "x <lora:style>"}));
    assert_eq!(reply.status, 422);
    assert!(reply.json()["detail"].as_str().unwrap().contains("LoRA"));
    let reply = post(
        addr,
        "/api/generate",
        &json!({"prompt": "x", "modelType": "other"}),
    );
    assert_eq!(reply.status, 404);
    assert_eq!(
        post(addr, "/api/generate", &json!({"steps": 2})).status,
        422
    );
}

#[test]
fn bad_input_is_refused_with_a_message_and_the_server_carries_on() {
    let addr = start(Setup {
        limits: Limits {
            body_bytes: 1 << 20,
            ..Limits::default()
        },
        ..Setup::default()
    });
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed",
            b"{\"prompt\": ".to_vec(),
            400,
            "invalid request body",
        ),
        ("not an object", b"[1, 2]".to_vec(), 400, "JSON object"),
        ("wrong type", br#"{"steps": "many"}"#.to_vec(), 422, "steps"),
        ("negative", br#"{"width": -64}"#.to_vec(), 422, "width"),
        ("huge body", vec![b' '; 2 << 20], 413, "--max-body-mb"),
        (
            "absurd size",
            small(json!({"width": 1 << 20, "height": 1 << 20}))
                .to_string()
                .into_bytes(),
            413,
            "--max-pixels",
        ),
        (
            "odd size",
            small(json!({"width": 63})).to_string().into_bytes(),
            422,
            "multiple of 8",
        ),
        (
            "many steps",
            small(json!({"steps": 100000})).to_string().into_bytes(),
            413,
            "--max-steps",
        ),
        (
            "many images",
            small(json!({"batch_size": 64, "n_iter": 64}))
                .to_string()
                .into_bytes(),
            413,
            "--max-images",
        ),
        (
            "sampler",
            small(json!({"sampler_name": "warp"}))
                .to_string()
                .into_bytes(),
            422,
            "warp",
        ),
        (
            "model",
            small(json!({"override_settings": {"sd_model_checkpoint": 3}}))
                .to_string()
                .into_bytes(),
            422,
            "sd_model_checkpoint",
        ),
    ];
    for (what, body, status, message) in cases {
        let reply = send(addr, "POST", "/sdapi/v1/txt2img", "", &body);
        assert_eq!(
            reply.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let detail = reply.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(message), "{what}: {detail}");
    }
    let reply = get(addr, "/sdapi/v1/progress?skip_current_image=maybe");
    assert_eq!(reply.status, 400);
    assert_eq!(get(addr, "/health").status, 200);
    assert_eq!(
        post(addr, "/sdapi/v1/txt2img", &small(json!({}))).status,
        200
    );
}

/// A job long enough to watch: 16 batches of 10 steps.
fn long_job() -> Value {
    small(json!({"steps": 10, "n_iter": 16}))
}

#[test]
fn progress_reports_steps_and_previews_and_interrupt_stops_the_job() {
    let addr = start(Setup::default());
    let job = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &long_job()));
    let mut seen = Value::Null;
    wait_for("a step with a preview", || {
        seen = get(addr, "/sdapi/v1/progress").json();
        seen["state"]["sampling_step"].as_u64().unwrap_or(0) > 0
            && seen["current_image"].is_string()
    });
    assert_eq!(seen["state"]["sampling_steps"], 160);
    assert_eq!(seen["state"]["job_count"], 1);
    let progress = seen["progress"].as_f64().unwrap();
    assert!(progress > 0.0 && progress < 1.0, "{progress}");
    let skipped = get(addr, "/sdapi/v1/progress?skip_current_image=true").json();
    assert!(skipped["current_image"].is_null());
    assert_eq!(
        post(addr, "/sdapi/v1/interrupt", &json!({})).json(),
        json!({})
    );
    let answer = job.join().unwrap().json();
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    let images = answer["images"].as_array().unwrap().len();
    // Stopped mid-image (the one being denoised is dropped) or between images.
    assert!(images < 16, "{images} images");
    assert_eq!(
        get(addr, "/sdapi/v1/progress").json()["state"]["job_count"],
        0
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let addr = start(Setup {
        queue: 1,
        ..Setup::default()
    });
    let running = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &long_job()));
    wait_for("the first job to run", || {
        get(addr, "/api/queue").json()["running"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    let waiting = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &small(json!({}))));
    wait_for("the second job to wait", || {
        get(addr, "/api/queue").json()["waiting"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    let refused = post(addr, "/sdapi/v1/txt2img", &small(json!({})));
    assert_eq!(refused.status, 503);
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(refused.json()["detail"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    post(addr, "/sdapi/v1/interrupt", &json!({}));
    assert_eq!(running.join().unwrap().status, 200);
    assert_eq!(waiting.join().unwrap().status, 200);
    assert_eq!(
        post(addr, "/sdapi/v1/txt2img", &small(json!({}))).status,
        200
    );
}

#[test]
fn a_client_that_disconnects_before_its_job_starts_removes_it() {
    let addr = start(Setup {
        queue: 1,
        ..Setup::default()
    });
    let running = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &long_job()));
    wait_for("the first job to run", || {
        get(addr, "/api/queue").json()["running"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    let body = small(json!({})).to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    wait_for("the second job to wait", || {
        get(addr, "/api/queue").json()["waiting"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    drop(stream);
    wait_for("the abandoned job to leave the queue", || {
        get(addr, "/api/queue").json()["waiting"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // The slot is free again while the first job still runs.
    let third = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &small(json!({}))));
    wait_for("the third job to wait", || {
        get(addr, "/api/queue").json()["waiting"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    post(addr, "/sdapi/v1/interrupt", &json!({}));
    assert_eq!(running.join().unwrap().status, 200);
    assert_eq!(third.join().unwrap().status, 200);
    // Only the two answered jobs ran.
    assert_eq!(get(addr, "/api/queue").json()["finished"], 2);
}

#[test]
fn basic_auth_guards_everything_but_health() {
    let addr = start(Setup {
        auth: Some(("me".to_string(), "secret".to_string())),
        ..Setup::default()
    });
    let refused = get(addr, "/sdapi/v1/sd-models");
    assert_eq!(refused.status, 401);
    assert!(refused
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic"));
    let wrong = base64::engine::general_purpose::STANDARD.encode("me:wrong");
    let reply = send(
        addr,
        "GET",
        "/sdapi/v1/sd-models",
        &format!("Authorization: Basic {wrong}\r\n"),
        b"",
    );
    assert_eq!(reply.status, 401);
    let right = base64::engine::general_purpose::STANDARD.encode("me:secret");
    let reply = send(
        addr,
        "GET",
        "/sdapi/v1/sd-models",
        &format!("Authorization: Basic {right}\r\n"),
        b"",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(get(addr, "/").status, 401);
    assert_eq!(get(addr, "/health").status, 200);
}

#[test]
fn cors_headers_only_with_an_allowed_origin() {
    let origin = "Origin: http://app.example\r\n";
    let closed = start(Setup::default());
    let reply = send(closed, "GET", "/health", origin, b"");
    assert!(reply.header("access-control-allow-origin").is_none());
    let open = start(Setup {
        cors: Some("http://app.example".to_string()),
        ..Setup::default()
    });
    let reply = send(open, "GET", "/health", origin, b"");
    assert_eq!(
        reply.header("access-control-allow-origin").unwrap(),
        "http://app.example"
    );
    let preflight = send(open, "OPTIONS", "/sdapi/v1/txt2img", origin, b"");
    assert_eq!(preflight.status, 204);
    let other = send(
        open,
        "GET",
        "/health",
        "Origin: http://evil.example\r\n",
        b"",
    );
    assert!(other.header("access-control-allow-origin").is_none());
}

/// `<lora:name:weight>` in a prompt merges `name.safetensors` of `--lora-dir` for that request
/// only: the image changes, the next request without the tag is the model's own again, a missing
/// LoRA is reported in `info`, and a name with a path is refused.
#[test]
fn prompt_lora_tags_use_the_lora_folder_for_that_request_only() {
    let Some(features) = sdrs_fixtures::extended("features/lora") else {
        return;
    };
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(
        features.join("sd15_kohya_attn_r8.safetensors"),
        folder.path().join("style.safetensors"),
    )
    .unwrap();
    let addr = start(Setup {
        lora_dir: Some(folder.path().to_path_buf()),
        ..Setup::default()
    });
    let image = |prompt: &str| {
        let answer = post(addr, "/sdapi/v1/txt2img", &small(json!({"prompt": prompt}))).json();
        let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
        (decode(answer["images"][0].as_str().unwrap()).0, info)
    };
    let (plain, _) = image("a lighthouse at dusk");
    let (styled, info) = image("a lighthouse at dusk <lora:style:1.5>");
    assert_ne!(plain, styled, "the LoRA changes the image");
    assert!(
        !info["unsupported"].to_string().contains("style"),
        "{}",
        info["unsupported"]
    );
    let (again, _) = image("a lighthouse at dusk");
    assert_eq!(
        plain, again,
        "without the tag the model's own weights are back"
    );
    let (_, info) = image("a lighthouse at dusk <lora:missing>");
    assert!(
        info["unsupported"].to_string().contains("<lora:missing>"),
        "{}",
        info["unsupported"]
    );
    let reply = post(
        addr,
        "/sdapi/v1/txt2img",
        &small(json!({"prompt": "x <lora:../style>"})),
    );
    assert_eq!(reply.status, 422);
}
