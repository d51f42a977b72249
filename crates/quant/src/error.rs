//! The quant crate's errors: each names the file, tensor or value at fault and what is accepted.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file whose contents break its format's rules.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// A parameter outside what the method accepts.
    #[error("{name} = {value}: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: String,
    },

    /// A tensor that does not fit the method (shape, dtype, size).
    #[error("tensor {tensor}: {reason}")]
    Tensor { tensor: String, reason: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
