//! The HTTP server of `sdrs serve`: AUTOMATIC1111's `/sdapi/v1` API, the app endpoint
//! `/api/generate` and a web page, over pipelines loaded once, with a bounded queue and limits.

pub mod a1111;
mod http;
pub mod jobs;
pub mod png;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use http::router;
pub use jobs::Model;

/// What the server can refuse or fail with; the HTTP status of each is in [`Error::status`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A body that is not JSON, or JSON of the wrong shape.
    #[error("invalid request body: {0}")]
    BadJson(String),
    /// A field out of range or not accepted.
    #[error("invalid {name} {value}: {expected}")]
    InvalidField {
        name: &'static str,
        value: String,
        expected: String,
    },
    /// A field of the wrong type.
    #[error("invalid field {field:?}: {reason}")]
    BadField { field: String, reason: String },
    /// A request over one of the server's limits (`--max-pixels`, `--max-steps`, ...).
    #[error("{what} {value} is over this server's limit of {limit} (raise it with {flag})")]
    OverLimit {
        what: &'static str,
        value: usize,
        limit: usize,
        flag: &'static str,
    },
    /// `sd_model_checkpoint` or `modelType` naming no loaded model.
    #[error("no loaded model is called {name:?}; loaded: {loaded}")]
    UnknownModel { name: String, loaded: String },
    /// The queue holds `--queue` jobs already.
    #[error("the queue is full ({limit} jobs waiting); retry in {retry_after} s")]
    QueueFull { limit: usize, retry_after: u64 },
    /// The job did not finish within `--timeout`.
    #[error("the generation did not finish within {0} s")]
    Timeout(u64),
    /// The model's worker failed the job by panicking, or is gone.
    #[error("the worker of model {0:?} failed (an internal error; the server carries on)")]
    WorkerGone(String),
    /// A listen address other than loopback without `--api-auth` or `--no-auth`.
    #[error(
        "refusing to listen on {0} without authentication: give --api-auth user:password, \
         or --no-auth to serve anyone who can reach it"
    )]
    UnprotectedBind(IpAddr),
    /// `--api-auth` not of the form `user:password`.
    #[error("invalid --api-auth {0:?}: expected user:password")]
    BadCredentials(String),
    /// The library refused or failed the generation (boxed: the library's error is large, and
    /// every handler returns this type).
    #[error(transparent)]
    Pipeline(Box<sdrs_pipeline::Error>),
    /// A sampler or schedule name the schedulers do not know.
    #[error(transparent)]
    Scheduler(#[from] sdrs_schedulers::Error),
    /// The listen socket or the runtime failed.
    #[error("cannot serve on {addr}: {reason}")]
    Io { addr: SocketAddr, reason: String },
    /// Encoding a PNG failed.
    #[error("cannot encode the PNG: {0}")]
    Encode(String),
}

impl From<sdrs_pipeline::Error> for Error {
    fn from(e: sdrs_pipeline::Error) -> Self {
        Error::Pipeline(Box::new(e))
    }
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadJson(_) => 400,
            Error::InvalidField { .. } | Error::BadField { .. } | Error::Scheduler(_) => 422,
            Error::Pipeline(e) if matches!(**e, sdrs_pipeline::Error::InvalidParameter { .. }) => {
                422
            }
            Error::OverLimit { .. } => 413,
            Error::UnknownModel { .. } => 404,
            Error::QueueFull { .. } => 503,
            Error::Timeout(_) => 504,
            _ => 500,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a request may ask for at most; `sdrs serve` flags raise them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request body size, bytes.
    pub body_bytes: usize,
    /// width x height of one image.
    pub pixels: usize,
    pub steps: usize,
    /// batch_size x n_iter of one request.
    pub images: usize,
    /// Waiting plus running time of one generation request.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 32 << 20,
            pixels: 2048 * 2048,
            steps: 150,
            images: 16,
            timeout: Duration::from_secs(600),
        }
    }
}

/// One line per request, for the binary to print.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestLog {
    pub id: u64,
    pub method: String,
    pub endpoint: String,
    pub status: u16,
    pub seconds: f64,
    /// `WxH` of a generation, else `None`.
    pub size: Option<String>,
    pub steps: Option<usize>,
}

/// Everything the server is started with.
pub struct ServerConfig {
    /// The loaded models, the first the default (`sd_model_checkpoint`).
    pub models: Vec<Model>,
    /// Most jobs waiting (not counting those running).
    pub queue: usize,
    pub limits: Limits,
    /// HTTP Basic `(user, password)` every route but `/health` requires.
    pub auth: Option<(String, String)>,
    /// The origin CORS answers allow; no CORS headers without it.
    pub cors_allow_origin: Option<String>,
    /// Called once per request when it is answered.
    pub log: Arc<dyn Fn(&RequestLog) + Send + Sync>,
    /// Where `<lora:name:weight>` tags find `name.safetensors`; tags are reported as unsupported
    /// without it.
    pub lora_dir: Option<std::path::PathBuf>,
}

/// Serves `config` on `addr` until the process ends; `on_listening` is told the bound address
/// (the port chosen when `addr`'s is 0) once requests are accepted.
pub fn serve(
    addr: SocketAddr,
    config: ServerConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        addr,
        reason: e.to_string(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
        on_listening(listener.local_addr().map_err(io)?);
        axum::serve(listener, router(config)).await.map_err(io)
    })
}

/// `user:password` split at the first colon (passwords may hold colons, names may not).
pub fn parse_credentials(text: &str) -> Result<(String, String)> {
    match text.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
            Ok((user.to_string(), password.to_string()))
        }
        _ => Err(Error::BadCredentials(text.to_string())),
    }
}

/// Refuses a non-loopback listen address unless authentication is on or `--no-auth` was given.
pub fn check_bind(host: IpAddr, auth: bool, no_auth: bool) -> Result<()> {
    if host.is_loopback() || auth || no_auth {
        Ok(())
    } else {
        Err(Error::UnprotectedBind(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_binds_freely_other_addresses_need_auth_or_no_auth() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert!(check_bind(local, false, false).is_ok());
        assert!(check_bind("::1".parse().unwrap(), false, false).is_ok());
        let error = check_bind(any, false, false).unwrap_err().to_string();
        assert!(error.contains("--api-auth"), "{error}");
        assert!(check_bind(any, true, false).is_ok());
        assert!(check_bind(any, false, true).is_ok());
    }

    #[test]
    fn credentials_split_at_the_first_colon() {
        assert_eq!(
            parse_credentials("me:pa:ss").unwrap(),
            ("me".to_string(), "pa:ss".to_string())
        );
        assert!(parse_credentials("nocolon").is_err());
        assert!(parse_credentials(":pw").is_err());
        assert!(parse_credentials("me:").is_err());
    }
}
