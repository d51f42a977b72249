//! The hub crate's error type: every variant names the repo, revision, file or path at fault.

use std::path::PathBuf;

/// Errors from parsing a model reference, talking to the Hub or reading the cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `-m`-style reference that is no path, short name or repo id.
    #[error("invalid model {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The environment does not say where the cache is.
    #[error("cannot find the Hugging Face cache: {reason}")]
    NoCacheDir { reason: String },

    /// The Hub does not know the repo (or hides it: private repos look missing without a token).
    #[error("repository {repo} (revision {revision}) not found on {endpoint}{hint}")]
    RepoNotFound {
        repo: String,
        revision: String,
        endpoint: String,
        hint: String,
    },

    /// The repo exists but not the branch, tag or commit.
    #[error("revision {revision} not found in {repo} on {endpoint}")]
    RevisionNotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },

    /// A gated or private repo asked for a token (HTTP 401/403).
    #[error(
        "{repo} (revision {revision}) is gated or private: HTTP {status} from {endpoint}; {hint}"
    )]
    Unauthorized {
        repo: String,
        revision: String,
        endpoint: String,
        status: u16,
        hint: String,
    },

    /// A file the model needs is not in the repo.
    #[error("{repo} (revision {revision}) has no {file}{detail}")]
    MissingInRepo {
        repo: String,
        revision: String,
        file: String,
        detail: String,
    },

    /// Offline (`HF_HUB_OFFLINE`) and the cache does not hold what the model needs.
    #[error("offline (HF_HUB_OFFLINE is set) and {repo} (revision {revision}) is not fully cached in {cache}: missing {missing}; run once with network access (or `sdrs pull`) to download it")]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: String,
    },

    /// Any other HTTP error status.
    #[error("{url}: HTTP {status} for {repo} (revision {revision}){message}")]
    Http {
        repo: String,
        revision: String,
        url: String,
        status: u16,
        message: String,
    },

    /// The Hub could not be reached.
    #[error("cannot reach {endpoint} for {repo} (revision {revision}): {reason}")]
    Network {
        repo: String,
        revision: String,
        endpoint: String,
        reason: String,
    },

    /// A download that did not complete; the partial data stays as a `.part` file to resume from.
    #[error("download of {file} from {repo} (revision {revision}) failed: {reason}")]
    Download {
        repo: String,
        revision: String,
        file: String,
        reason: String,
    },

    /// The Hub answered with something that is not what its API returns.
    #[error("unexpected answer from {url}: {reason}")]
    BadResponse { url: String, reason: String },

    /// A file or folder of the cache could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file of the model (a shard index, `model_index.json`) does not parse.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
