//! The routes: AUTOMATIC1111's `/sdapi/v1/*`, the app's `/api/generate`, `/api/queue`,
//! `/health` and the web page, behind one layer that checks HTTP Basic authentication, adds CORS
//! headers when configured and logs one line per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::a1111::{self, GenerationParams, Plan};
use crate::jobs::{ModelInfo, Output, Queue};
use crate::{png, Error, Limits, RequestLog, Result, ServerConfig};

const PAGE: &str = include_str!("page.html");

struct Inner {
    queue: Arc<Queue>,
    models: Vec<ModelInfo>,
    /// `sd_model_checkpoint`: the model requests without one use.
    current: Mutex<String>,
    /// `CLIP_stop_at_last_layers`, when set through the options.
    clip_skip: Mutex<Option<usize>>,
    limits: Limits,
    /// The whole `Authorization` header value that is accepted.
    authorization: Option<String>,
    cors: Option<String>,
    log: Arc<dyn Fn(&RequestLog) + Send + Sync>,
    requests: AtomicU64,
    lora_dir: Option<std::path::PathBuf>,
}

type App = Arc<Inner>;

/// The size and steps of a generation, for the request's log line.
#[derive(Clone)]
struct Summary {
    size: String,
    steps: usize,
}

/// The server's routes over `config`'s models; their workers start now.
pub fn router(config: ServerConfig) -> Router {
    let current = config
        .models
        .first()
        .map(|m| m.alias.clone())
        .unwrap_or_default();
    let (queue, models) = Queue::start(config.models, config.queue);
    let authorization = config.auth.map(|(user, password)| {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {token}")
    });
    let body_bytes = config.limits.body_bytes;
    let app: App = Arc::new(Inner {
        queue,
        models,
        current: Mutex::new(current),
        clip_skip: Mutex::new(None),
        limits: config.limits,
        authorization,
        cors: config.cors_allow_origin,
        log: config.log,
        requests: AtomicU64::new(0),
        lora_dir: config.lora_dir,
    });
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/options", get(options).post(set_options))
        .route("/sdapi/v1/scripts", get(scripts))
        .route("/api/generate", post(api_generate))
        .route("/api/queue", get(queue_view))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let kind = status.canonical_reason().unwrap_or("error");
        let mut response = (
            status,
            Json(json!({"error": kind, "detail": self.to_string()})),
        )
            .into_response();
        if let Error::QueueFull { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        response
    }
}

/// Logs the request when dropped: also when the client went away before the answer (499, as
/// nginx says it).
struct LogLine {
    app: App,
    line: RequestLog,
    started: Instant,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        self.line.seconds = self.started.elapsed().as_secs_f64();
        (self.app.log)(&self.line);
    }
}

async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let mut log = LogLine {
        line: RequestLog {
            id: app.requests.fetch_add(1, Ordering::Relaxed) + 1,
            method: request.method().to_string(),
            endpoint: request.uri().path().to_string(),
            status: 499,
            seconds: 0.0,
            size: None,
            steps: None,
        },
        app: app.clone(),
        started: Instant::now(),
    };
    let origin = request.headers().get(header::ORIGIN).cloned();
    let preflight = request.method() == Method::OPTIONS && app.cors.is_some();
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else if !authorized(&app, request.uri().path(), request.headers()) {
        let mut response = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Unauthorized", "detail": "HTTP Basic credentials required"})),
        )
            .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"sdrs\""),
        );
        response
    } else {
        next.run(request).await
    };
    if let (Some(allowed), Some(origin)) = (&app.cors, origin) {
        if allowed == "*" || origin.as_bytes() == allowed.as_bytes() {
            let headers = response.headers_mut();
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type"),
            );
            headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    if let Some(summary) = response.extensions().get::<Summary>() {
        log.line.size = Some(summary.size.clone());
        log.line.steps = Some(summary.steps);
    }
    log.line.status = response.status().as_u16();
    response
}

fn authorized(app: &Inner, path: &str, headers: &HeaderMap) -> bool {
    let Some(expected) = &app.authorization else {
        return true;
    };
    path == "/health"
        || headers
            .get(header::AUTHORIZATION)
            .is_some_and(|value| value.as_bytes() == expected.as_bytes())
}

fn body(body: std::result::Result<Bytes, BytesRejection>, limits: &Limits) -> Result<Bytes> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::OverLimit {
                what: "the body (bytes)",
                value: limits.body_bytes + 1,
                limit: limits.body_bytes,
                flag: "--max-body-mb",
            }
        } else {
            Error::BadJson(rejection.body_text())
        }
    })
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "Not Found", "detail": "no such endpoint"})),
    )
        .into_response()
}

async fn health(State(app): State<App>) -> Json<Value> {
    let snapshot = app.queue.snapshot();
    let models: Vec<&str> = app.models.iter().map(|m| m.alias.as_str()).collect();
    Json(json!({
        "status": "ok",
        "models": models,
        "queue": {"waiting": snapshot.waiting.len(), "running": snapshot.running.len(),
                  "limit": snapshot.limit},
    }))
}

impl Inner {
    fn model(&self, name: Option<&str>) -> Result<&ModelInfo> {
        let current = self.current.lock().map(|c| c.clone()).unwrap_or_default();
        let name = name.unwrap_or(&current);
        self.models
            .iter()
            .find(|m| m.alias == name)
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                loaded: self.aliases(),
            })
    }

    fn aliases(&self) -> String {
        let names: Vec<&str> = self.models.iter().map(|m| m.alias.as_str()).collect();
        names.join(", ")
    }

    /// Queues `plan` and waits for it, within the timeout.
    async fn run(&self, plan: Plan, init: Option<Tensor>) -> Result<Output> {
        let mut ticket = self.queue.submit(plan, init)?;
        match tokio::time::timeout(self.limits.timeout, &mut ticket.reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::WorkerGone(String::new())),
            Err(_) => Err(Error::Timeout(self.limits.timeout.as_secs())),
        }
    }

    /// An AUTOMATIC1111 request resolved for the model it names.
    fn plan(
        &self,
        params: &GenerationParams,
        mut unsupported: Vec<String>,
        img2img: bool,
    ) -> Result<(Plan, Option<Tensor>)> {
        let dir = self.lora_dir.as_deref();
        let mut loras = Vec::new();
        let prompt = a1111::take_loras(&params.prompt, dir, &mut unsupported, &mut loras)?;
        let negative_prompt =
            a1111::take_loras(&params.negative_prompt, dir, &mut unsupported, &mut loras)?;
        let overrides = &params.override_settings;
        let checkpoint = match overrides.get("sd_model_checkpoint") {
            None => None,
            Some(Value::String(name)) => Some(name.as_str()),
            Some(other) => return Err(invalid("sd_model_checkpoint", other, "a model title")),
        };
        let model = self.model(checkpoint)?;
        let clip_skip = match (params.clip_skip, overrides.get("CLIP_stop_at_last_layers")) {
            (Some(skip), _) => Some(skip),
            (None, Some(value)) => Some(clip_skip(value)?),
            (None, None) => self.clip_skip.lock().ok().and_then(|c| *c),
        };
        let sampler_name = params
            .sampler_name
            .as_deref()
            .or(params.sampler_index.as_deref());
        let (sampler, schedule) = a1111::sampler(sampler_name, params.scheduler.as_deref())?;
        let images = params.batch_size.saturating_mul(params.n_iter);
        a1111::check_limits(
            params.width,
            params.height,
            params.steps,
            images,
            model.vae_factor,
            &self.limits,
        )?;
        let (strength, init) = if img2img {
            let strength = params.denoising_strength.unwrap_or(0.75);
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(invalid("denoising_strength", &json!(strength), "in (0, 1]"));
            }
            let Some(first) = params.init_images.first() else {
                return Err(Error::InvalidField {
                    name: "init_images",
                    value: "[]".to_string(),
                    expected: "at least one base64-encoded image".to_string(),
                });
            };
            let device = candle_core::Device::Cpu;
            let init = png::decode_init_image(first, params.width, params.height, &device)?;
            (Some(strength), Some(init))
        } else {
            (None, None)
        };
        let seed = u64::try_from(params.seed).unwrap_or_else(|_| a1111::random_seed());
        let plan = Plan {
            model: model.alias.clone(),
            prompt,
            negative_prompt,
            steps: params.steps,
            cfg_scale: params.cfg_scale,
            sampler,
            schedule,
            seed,
            width: params.width,
            height: params.height,
            batch_size: params.batch_size,
            n_iter: params.n_iter,
            strength,
            clip_skip,
            unsupported,
            loras,
        };
        Ok((plan, init))
    }
}

fn invalid(name: &'static str, value: &Value, expected: &str) -> Error {
    Error::InvalidField {
        name,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn clip_skip(value: &Value) -> Result<usize> {
    value
        .as_u64()
        .filter(|&n| (1..=12).contains(&n))
        .map(|n| n as usize)
        .ok_or_else(|| invalid("CLIP_stop_at_last_layers", value, "an integer from 1 to 12"))
}

fn with_summary(mut response: Response, plan: &Plan) -> Response {
    response.extensions_mut().insert(Summary {
        size: format!("{}x{}", plan.width, plan.height),
        steps: plan.steps,
    });
    response
}

async fn generate_a1111(
    app: App,
    raw: std::result::Result<Bytes, BytesRejection>,
    img2img: bool,
) -> Result<Response> {
    let raw = body(raw, &app.limits)?;
    let (params, unsupported) = a1111::parse_params(&raw)?;
    let (plan, init) = app.plan(&params, unsupported, img2img)?;
    let output = app.run(plan.clone(), init).await?;
    let images: Vec<String> = if params.send_images {
        output
            .images
            .iter()
            .map(|png| png::to_base64(png))
            .collect()
    } else {
        Vec::new()
    };
    let response = Json(json!({
        "images": images,
        "parameters": plan.parameters(&params),
        "info": plan.info(&output.seeds, &output.infotexts, output.interrupted),
    }))
    .into_response();
    Ok(with_summary(response, &plan))
}

async fn txt2img(
    State(app): State<App>,
    raw: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    generate_a1111(app, raw, false).await
}

async fn img2img(
    State(app): State<App>,
    raw: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    generate_a1111(app, raw, true).await
}

#[derive(Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(
    State(app): State<App>,
    query: std::result::Result<Query<ProgressQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>> {
    let Query(query) = query.map_err(|e| Error::BadJson(e.body_text()))?;
    if !query.skip_current_image {
        app.queue.preview_wanted.store(true, Ordering::Relaxed);
    }
    let snapshot = app.queue.snapshot();
    let running = snapshot.running.first();
    let (progress, eta, step, steps, image, job) = match running {
        Some(r) => {
            let done = r.step as f64 / r.steps.max(1) as f64;
            let elapsed = r.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let eta = if done > 0.0 {
                elapsed / done - elapsed
            } else {
                0.0
            };
            let image = r.preview.clone().filter(|_| !query.skip_current_image);
            (done, eta, r.step, r.steps, image, format!("job {}", r.id))
        }
        None => (0.0, 0.0, 0, 0, None, String::new()),
    };
    Ok(Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": false,
            "job": job,
            "job_count": snapshot.running.len() + snapshot.waiting.len(),
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": image,
        "textinfo": null,
    })))
}

async fn interrupt(State(app): State<App>) -> Json<Value> {
    app.queue.interrupt();
    Json(json!({}))
}

async fn sd_models(State(app): State<App>) -> Json<Value> {
    let models: Vec<Value> = app
        .models
        .iter()
        .map(|m| {
            json!({"title": m.alias, "model_name": m.alias, "hash": null, "sha256": null,
                   "filename": m.path, "config": null})
        })
        .collect();
    Json(Value::Array(models))
}

async fn samplers() -> Json<Value> {
    Json(a1111::samplers())
}

async fn schedulers() -> Json<Value> {
    Json(a1111::schedulers())
}

/// No AUTOMATIC1111 scripts: webuiapi asks for the list when it connects.
async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

async fn options(State(app): State<App>) -> Json<Value> {
    let current = app.current.lock().map(|c| c.clone()).unwrap_or_default();
    let clip_skip = app.clip_skip.lock().ok().and_then(|c| *c).unwrap_or(1);
    Json(json!({
        "sd_model_checkpoint": current,
        "CLIP_stop_at_last_layers": clip_skip,
        "samples_format": "png",
    }))
}

async fn set_options(
    State(app): State<App>,
    raw: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
    let raw = body(raw, &app.limits)?;
    let map: Map<String, Value> =
        serde_json::from_slice(&raw).map_err(|e| Error::BadJson(e.to_string()))?;
    // Checked whole before anything changes.
    let mut model = None;
    let mut skip = None;
    for (key, value) in &map {
        match key.as_str() {
            "sd_model_checkpoint" => {
                let name = value
                    .as_str()
                    .ok_or_else(|| invalid("sd_model_checkpoint", value, "a model title"))?;
                model = Some(app.model(Some(name))?.alias.clone());
            }
            "CLIP_stop_at_last_layers" => skip = Some(clip_skip(value)?),
            _ => {
                return Err(Error::InvalidField {
                    name: "option",
                    value: key.clone(),
                    expected: format!("one of {}", a1111::OVERRIDES.join(", ")),
                })
            }
        }
    }
    if let (Some(model), Ok(mut current)) = (model, app.current.lock()) {
        *current = model;
    }
    if let (Some(skip), Ok(mut current)) = (skip, app.clip_skip.lock()) {
        *current = Some(skip);
    }
    Ok(Json(Value::Null))
}

/// The app's request body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppRequest {
    prompt: String,
    #[serde(default, rename = "negative_prompt")]
    negative_prompt: Option<String>,
    steps: Option<usize>,
    seed: Option<i64>,
    width: Option<usize>,
    height: Option<usize>,
    model_type: Option<String>,
}

async fn api_generate(
    State(app): State<App>,
    raw: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let started = Instant::now();
    let raw = body(raw, &app.limits)?;
    let request: AppRequest = serde_json::from_slice(&raw).map_err(|e| {
        if e.is_data() {
            Error::BadField {
                field: "body".to_string(),
                reason: e.to_string(),
            }
        } else {
            Error::BadJson(e.to_string())
        }
    })?;
    let model = app.model(request.model_type.as_deref())?;
    let (sampler, schedule) = a1111::sampler(Some("dpm++2m"), None)?;
    let width = request.width.unwrap_or(model.default_size);
    let height = request.height.unwrap_or(model.default_size);
    let steps = request.steps.unwrap_or(25);
    a1111::check_limits(width, height, steps, 1, model.vae_factor, &app.limits)?;
    // The app's answer has no `info`: a LoRA tag it cannot honour is refused, not dropped.
    let dir = app.lora_dir.as_deref();
    let (mut unhonoured, mut loras) = (Vec::new(), Vec::new());
    let prompt = a1111::take_loras(&request.prompt, dir, &mut unhonoured, &mut loras)?;
    let negative = request.negative_prompt.unwrap_or_default();
    let negative_prompt = a1111::take_loras(&negative, dir, &mut unhonoured, &mut loras)?;
    if let Some(lora) = unhonoured.first() {
        return Err(Error::InvalidField {
            name: "prompt",
            value: lora.clone(),
            expected: "LoRA tags naming files of the server's --lora-dir".to_string(),
        });
    }
    let plan = Plan {
        model: model.alias.clone(),
        prompt,
        negative_prompt,
        steps,
        cfg_scale: model.default_cfg,
        sampler,
        schedule,
        seed: request
            .seed
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or_else(a1111::random_seed),
        width,
        height,
        batch_size: 1,
        n_iter: 1,
        strength: None,
        clip_skip: None,
        unsupported: Vec::new(),
        loras,
    };
    let output = app.run(plan.clone(), None).await?;
    let image = output.images.first().map(|png| png::to_base64(png));
    let response = Json(json!({
        "image": image,
        "seed": plan.seed,
        "timings": {
            "queued_s": output.queued_s,
            "generation_s": output.generation_s,
            "total_s": started.elapsed().as_secs_f64(),
        },
    }))
    .into_response();
    Ok(with_summary(response, &plan))
}

async fn queue_view(State(app): State<App>) -> Json<Value> {
    let snapshot = app.queue.snapshot();
    Json(json!({
        "running": snapshot.running,
        "waiting": snapshot.waiting,
        "limit": snapshot.limit,
        "finished": snapshot.finished,
    }))
}
