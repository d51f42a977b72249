//! Hugging Face Hub access for sdrs: model references (`org/name@revision`, short names, local
//! paths), downloads into the same cache as Python's `huggingface_hub` (through the `hf-hub` crate),
//! cache-first and offline resolution, and a listing of what is cached.
//!
//! Kept out of the pipeline crate so that HTTP and TLS are pulled in only by the binary.

pub mod cache;
pub mod download;
pub mod error;
pub mod reference;
pub mod select;
pub mod settings;

pub use cache::{scan_cache, CachedRepo};
pub use download::{DownloadProgress, Hub, NoProgress, Snapshot};
pub use error::{Error, Result};
pub use reference::{ModelRef, RepoRef};
pub use settings::HubSettings;
