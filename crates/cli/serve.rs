//! `sdrs serve`: loads models once and serves them over HTTP (AUTOMATIC1111's API, the app's
//! `/api/generate` and a web page; see the `sdrs-server` crate).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sdrs_kernels::attention::AttentionMode;
use sdrs_pipeline::{DeviceChoice, DtypeChoice, LoadOptions, StableDiffusion};
use sdrs_server::{Limits, Model, RequestLog, ServerConfig};

use crate::generate::{parse_attention, parse_device, parse_dtype};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A model to load, as `-m` of `sdrs generate` names it (sd15, sdxl, org/name, a folder or
    /// a .safetensors file), optionally `alias=model` (`-m fast=sd15 -m quality=sdxl`); repeat it
    /// for several. Requests pick one by its alias (`sd_model_checkpoint`, `modelType`); the
    /// first is the default. Without an alias, the folder's or file's name is the alias.
    #[arg(short = 'm', long = "model", default_value = "sd15", value_parser = parse_model)]
    pub models: Vec<(String, String)>,

    /// Address to listen on. Anything but loopback needs --api-auth or --no-auth.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0: any free port, printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,

    /// HTTP Basic credentials `user:password` every endpoint but /health requires.
    #[arg(long = "api-auth", value_parser = parse_auth)]
    pub api_auth: Option<(String, String)>,

    /// Serve without authentication on a non-loopback --host.
    #[arg(long = "no-auth", conflicts_with = "api_auth")]
    pub no_auth: bool,

    /// Send CORS headers allowing this origin (`*` for any); without it, no CORS headers.
    #[arg(long = "cors-allow-origin")]
    pub cors_allow_origin: Option<String>,

    /// The LoRA folder: a prompt's `<lora:name:weight>` uses `name.safetensors` from it (names
    /// only, no paths). Without it the tags are reported in `info` as not honoured.
    #[arg(long = "lora-dir")]
    pub lora_dir: Option<PathBuf>,

    /// A folder of textual-inversion embeddings loaded into every model at start (each usable by
    /// its file name in prompts, as AUTOMATIC1111's `embeddings` folder); files another model's
    /// encoders cannot take are skipped with the reason.
    #[arg(long = "embedding-dir")]
    pub embedding_dir: Option<PathBuf>,

    /// Most generation requests waiting (beyond those running); more are answered 503 with
    /// Retry-After.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub queue: u64,

    /// Largest request body, in MiB (init images are base64 in the body).
    #[arg(long = "max-body-mb", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_body_mb: u64,

    /// Most pixels (width x height) of one image.
    #[arg(long = "max-pixels", default_value_t = 2048 * 2048)]
    pub max_pixels: usize,

    /// Most denoising steps of one request.
    #[arg(long = "max-steps", default_value_t = 150)]
    pub max_steps: usize,

    /// Most images (batch_size x n_iter) of one request.
    #[arg(long = "max-images", default_value_t = 16)]
    pub max_images: usize,

    /// Seconds a generation request may wait and run before it is answered 504.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,

    /// Log one JSON object per request instead of a line of text.
    #[arg(long = "json-log")]
    pub json_log: bool,

    /// Device: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,

    /// Compute dtype: auto, f32, f16 or bf16 (as `sdrs generate --dtype`).
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: DtypeChoice,

    /// Attention kernel: auto, naive, sliced, sliced:N or flash.
    #[arg(long, default_value = "auto", value_parser = parse_attention)]
    pub attention: AttentionMode,

    /// Worker threads for the CPU kernels of each model (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `alias=model` or `model` (whose name is then the alias).
fn parse_model(text: &str) -> Result<(String, String), String> {
    if let Some((alias, model)) = text.split_once('=') {
        let ok = !alias.is_empty()
            && !model.is_empty()
            && alias
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(format!(
                "expected alias=model with an alias of letters, digits, -, _ or ., got {text:?}"
            ));
        }
        return Ok((alias.to_string(), model.to_string()));
    }
    if text.is_empty() {
        return Err("expected a model".to_string());
    }
    let path = std::path::Path::new(text);
    let is_file = path.extension().is_some_and(|e| e == "safetensors");
    let name = if is_file {
        path.file_stem()
    } else {
        path.file_name()
    };
    let alias = name
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| text.to_string());
    Ok((alias, text.to_string()))
}

fn parse_auth(text: &str) -> Result<(String, String), String> {
    sdrs_server::parse_credentials(text).map_err(|e| e.to_string())
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    sdrs_server::check_bind(args.host, args.api_auth.is_some(), args.no_auth)?;
    let mut seen = std::collections::HashSet::new();
    if let Some((alias, _)) = args.models.iter().find(|(a, _)| !seen.insert(a.clone())) {
        anyhow::bail!("-m: the alias {alias:?} is given twice");
    }
    let kernels = crate::system::kernel_options(args.attention)?;
    let selection = args.device.select()?;
    eprintln!("{}", selection.message());
    let device = selection.device.clone();
    let dtype = args.dtype.resolve(&device, &kernels);
    let options = LoadOptions::new(device, dtype, None)
        .with_kernels(kernels)
        .with_threads(args.threads);
    let mut models = Vec::new();
    for (alias, reference) in &args.models {
        let path = crate::hub::local_model(reference, None)?;
        let mut pipeline = StableDiffusion::open(&path, None, &options)
            .with_context(|| format!("cannot load the model {alias}={}", path.display()))?;
        eprintln!("loaded {alias} from {}", path.display());
        if let Some(dir) = &args.embedding_dir {
            let report = pipeline
                .load_embedding_dir(dir)
                .with_context(|| format!("--embedding-dir {}", dir.display()))?;
            let names: Vec<&str> = report.loaded.iter().map(|e| e.token.as_str()).collect();
            eprintln!("{alias}: embeddings {}", names.join(", "));
            for (file, reason) in &report.skipped {
                eprintln!("{alias}: skipped {}: {reason}", file.display());
            }
        }
        models.push(Model {
            alias: alias.clone(),
            pipeline,
        });
    }
    let json_log = args.json_log;
    let config = ServerConfig {
        models,
        queue: args.queue as usize,
        limits: Limits {
            body_bytes: (args.max_body_mb as usize) << 20,
            pixels: args.max_pixels,
            steps: args.max_steps,
            images: args.max_images,
            timeout: Duration::from_secs(args.timeout),
        },
        auth: args.api_auth.clone(),
        cors_allow_origin: args.cors_allow_origin.clone(),
        lora_dir: args.lora_dir.clone(),
        log: Arc::new(move |line: &RequestLog| eprintln!("{}", log_line(line, json_log))),
    };
    let addr = SocketAddr::new(args.host, args.port);
    sdrs_server::serve(addr, config, |bound| {
        eprintln!("listening on http://{bound}")
    })?;
    Ok(ExitCode::SUCCESS)
}

/// One request's log line: JSON, or `#id METHOD /path status seconds [WxH steps]`.
fn log_line(line: &RequestLog, json: bool) -> String {
    if json {
        return serde_json::to_string(line).unwrap_or_default();
    }
    let mut text = format!(
        "#{} {} {} {} {:.2}s",
        line.id, line.method, line.endpoint, line.status, line.seconds
    );
    if let (Some(size), Some(steps)) = (&line.size, line.steps) {
        text.push_str(&format!(" {size} {steps} steps"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("serve").chain(extra.iter().copied())).map(|c| c.serve)
    }

    #[test]
    fn defaults_are_local_port_7860_queue_16_and_sd15() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.host.to_string(), "127.0.0.1");
        assert_eq!((args.port, args.queue), (7860, 16));
        assert_eq!(args.models, [("sd15".to_string(), "sd15".to_string())]);
        assert_eq!(
            (args.max_steps, args.max_images, args.timeout),
            (150, 16, 600)
        );
        assert!(!args.json_log && !args.no_auth && args.api_auth.is_none());
    }

    #[test]
    fn lora_and_embedding_folders_are_optional_paths() {
        let args = parse(&[]).unwrap();
        assert!(args.lora_dir.is_none() && args.embedding_dir.is_none());
        let args = parse(&["--lora-dir", "loras", "--embedding-dir", "emb"]).unwrap();
        assert_eq!(args.lora_dir, Some(PathBuf::from("loras")));
        assert_eq!(args.embedding_dir, Some(PathBuf::from("emb")));
    }

    #[test]
    fn models_take_aliases_or_their_names() {
        let args = parse(&[
            "-m",
            "fast=sd15",
            "-m",
            "models/tiny.safetensors",
            "-m",
            "a/b",
        ])
        .unwrap();
        let aliases: Vec<&str> = args.models.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(aliases, ["fast", "tiny", "b"]);
        assert!(parse(&["-m", "=sd15"]).is_err());
        assert!(parse(&["-m", "a b=sd15"]).is_err());
    }

    #[test]
    fn auth_flags_parse_and_exclude_each_other() {
        let args = parse(&["--api-auth", "me:secret", "--host", "0.0.0.0"]).unwrap();
        assert_eq!(
            args.api_auth,
            Some(("me".to_string(), "secret".to_string()))
        );
        assert!(parse(&["--api-auth", "nopassword"]).is_err());
        assert!(parse(&["--api-auth", "a:b", "--no-auth"]).is_err());
        assert!(parse(&["--queue", "0"]).is_err());
        let args = parse(&["--no-auth", "--cors-allow-origin", "*", "--json-log"]).unwrap();
        assert!(args.no_auth && args.json_log);
        assert_eq!(args.cors_allow_origin.as_deref(), Some("*"));
    }

    #[test]
    fn a_public_host_without_auth_is_refused_before_loading() {
        let args = parse(&["--host", "0.0.0.0", "-m", "/nonexistent"]).unwrap();
        let error = run(args).unwrap_err().to_string();
        assert!(error.contains("--api-auth"), "{error}");
    }

    #[test]
    fn log_lines_name_the_request() {
        let line = RequestLog {
            id: 3,
            method: "POST".into(),
            endpoint: "/sdapi/v1/txt2img".into(),
            status: 200,
            seconds: 1.234,
            size: Some("64x64".into()),
            steps: Some(2),
        };
        assert_eq!(
            log_line(&line, false),
            "#3 POST /sdapi/v1/txt2img 200 1.23s 64x64 2 steps"
        );
        let json: serde_json::Value = serde_json::from_str(&log_line(&line, true)).unwrap();
        assert_eq!(json["status"], 200);
    }
}
