//! The unet crate's error type: every variant names the file, config key, input or value at fault.

use std::path::PathBuf;

/// Errors from reading a UNet config, building the model from weights, or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A config file is not valid JSON or a key has the wrong type.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config option is set to a value this implementation does not support.
    #[error("unsupported config value {key} = {value}; supported: {accepted}")]
    Unsupported {
        key: String,
        value: String,
        accepted: String,
    },

    /// A config value that cannot describe a working model (wrong list length, zero heads, ...).
    #[error("invalid config value {key} = {value}: {expected}")]
    InvalidConfig {
        key: String,
        value: String,
        expected: String,
    },

    /// The model needs an added condition (SDXL's `text_embeds` / `time_ids`) that was not given.
    #[error(
        "this UNet has addition_embed_type = {addition_embed_type:?} and needs {missing}, \
         which were not given"
    )]
    MissingAddedCondition {
        addition_embed_type: String,
        missing: &'static str,
    },

    /// An input tensor of the wrong shape.
    #[error("{input} has shape {found:?}, expected {expected}")]
    InputShape {
        input: &'static str,
        found: Vec<usize>,
        expected: String,
    },

    /// A tensor operation failed; for weights this names the tensor that is missing or has the
    /// wrong shape.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A shared block's error becomes the UNet's variant of the same name, so that callers match
/// one enum whichever crate built the block.
impl From<sdrs_blocks::Error> for Error {
    fn from(err: sdrs_blocks::Error) -> Self {
        match err {
            sdrs_blocks::Error::Unsupported {
                key,
                value,
                accepted,
            } => Self::Unsupported {
                key,
                value,
                accepted,
            },
            sdrs_blocks::Error::InvalidConfig {
                key,
                value,
                expected,
            } => Self::InvalidConfig {
                key,
                value,
                expected,
            },
            sdrs_blocks::Error::Candle(err) => Self::Candle(err),
        }
    }
}
