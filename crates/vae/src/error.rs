//! The vae crate's error type: every variant names the file, config key, input or value at fault.

use std::path::PathBuf;

/// Errors from reading a VAE config, building the model from weights, or running it.
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

    /// A config value that cannot describe a working model (wrong list length, ...).
    #[error("invalid config value {key} = {value}: {expected}")]
    InvalidConfig {
        key: String,
        value: String,
        expected: String,
    },

    /// An input tensor of the wrong shape.
    #[error("{input} has shape {found:?}, expected {expected}")]
    InputShape {
        input: &'static str,
        found: Vec<usize>,
        expected: String,
    },

    /// A setting out of its range (tile sizes and overlap of a tiled pass).
    #[error("invalid {name} {value}: {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: String,
    },

    /// A tensor operation failed; for weights this names the tensor that is missing or has the
    /// wrong shape.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A shared block's error (resnets, attention, `act_fn`) becomes the VAE's variant of the same
/// name, so that callers match one enum.
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
