//! The pipeline crate's error type: every variant names the file, value or option at fault.

use std::path::PathBuf;

/// Errors from loading a model or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model folder must have is not there.
    #[error("missing file {path}: {what}")]
    MissingFile { path: PathBuf, what: String },

    /// A folder has none of the weight files we look for.
    #[error("no weights in {dir}: looked for {looked_for}")]
    MissingWeights { dir: PathBuf, looked_for: String },

    /// A model of a one-shot pipeline used after it was freed.
    #[error("{component} already freed by a one-shot run of this pipeline; load the model again")]
    Released { component: &'static str },

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Weights that do not load: a truncated or corrupt file, a missing tensor, or a
    /// tensor whose shape does not match the component's configuration.
    #[error("cannot load the {component} weights from {path}: {source}")]
    Weights {
        component: &'static str,
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    /// A single-file checkpoint whose keys do not fit the layout or the configuration.
    #[error("cannot map the checkpoint {path} onto the diffusers layout: {source}")]
    SingleFile {
        path: PathBuf,
        #[source]
        source: crate::single_file::SingleFileError,
    },

    /// A single checkpoint of a family without built-in configs.
    #[error("{path} is an {family} checkpoint, which has no built-in configs: load it with the configs of a diffusers folder of the same model (`--config <folder>` in the CLI)")]
    NoBuiltinConfig { path: PathBuf, family: &'static str },

    /// A single checkpoint that does not have the shapes of the published model whose built-in
    /// configs were used (a model of another size, or a pruned or extended one).
    #[error("{path} does not have the shapes of the published {model} model, whose built-in configs were used; load it with the configs of a diffusers folder of the same model (`--config <folder>` in the CLI): {source}")]
    NotPublishedShapes {
        path: PathBuf,
        model: &'static str,
        #[source]
        source: Box<Error>,
    },

    /// The model folder holds a pipeline this version does not run.
    #[error("unsupported pipeline {class} in {path}; supported: {supported}")]
    UnsupportedPipeline {
        class: String,
        path: PathBuf,
        supported: String,
    },

    /// A LoRA file sdrs cannot merge: a layout it does not know, DoRA, or modules that match no
    /// layer of the model.
    #[error("LoRA {path}: {message}")]
    Lora { path: PathBuf, message: String },

    /// A model of the wrong family for its role: a refiner that is not one, or a base model a
    /// refiner cannot finish.
    #[error("{role} {path} is {found}, not {expected}")]
    WrongFamily {
        role: &'static str,
        path: PathBuf,
        found: &'static str,
        expected: &'static str,
    },

    /// A generation parameter out of range.
    #[error("invalid {name} {value}: {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: String,
    },

    /// A textual-inversion embedding file that cannot be read or does not fit the model.
    #[error("cannot load the textual-inversion embedding {path}: {reason}")]
    Embedding { path: PathBuf, reason: String },

    /// An unknown or unavailable device.
    #[error("device {value:?}: {reason}")]
    Device { value: String, reason: String },

    /// The latents or the decoded image hold NaN or infinite values: saving them would give a
    /// blank single-colour picture.
    #[error(
        "the {stage} hold NaN or infinite values, so no image was written; likely causes: weights \
         with NaN/inf values (a damaged or badly converted checkpoint), a model overflowing in \
         f16 (try --dtype f32), or an extreme guidance scale or config value"
    )]
    NonFinite { stage: &'static str },

    /// A request whose estimated peak memory exceeds the memory available, refused before it
    /// allocates anything.
    #[error(
        "not enough memory for {what}: {stage} would need about {} and {} is available; {advice} \
         (`--no-memory-check` in the CLI skips this check)",
        gigabytes(*estimate_bytes),
        gigabytes(*available_bytes)
    )]
    OutOfMemory {
        what: String,
        stage: &'static str,
        estimate_bytes: u64,
        available_bytes: u64,
        advice: String,
    },

    /// The generation was cancelled by the progress callback.
    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Clip(#[from] sdrs_clip::Error),

    #[error(transparent)]
    Unet(#[from] sdrs_unet::Error),

    #[error(transparent)]
    Vae(#[from] sdrs_vae::Error),

    #[error(transparent)]
    Scheduler(#[from] sdrs_schedulers::Error),

    #[error(transparent)]
    Taesd(#[from] sdrs_taesd::Error),

    #[cfg(feature = "coreml")]
    #[error(transparent)]
    CoreMl(#[from] sdrs_coreml::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Bytes in GB with one decimal (`12.3 GB`).
fn gigabytes(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}
