//! The Core ML crate's errors: each names the package, op or value at fault and what is accepted.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file whose contents break its format's rules (Manifest.json, model.mlmodel, weight.bin).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// A program that uses something this crate does not handle (an op form, a dtype).
    #[error("{what}: not supported ({reason})")]
    Unsupported { what: String, reason: String },

    /// A parameter outside what the operation accepts.
    #[error("{name} = {value}: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: String,
    },

    /// An op of the program whose inputs or attributes do not fit its definition.
    #[error("op {op} ({op_type}): {reason}")]
    Op {
        op: String,
        op_type: String,
        reason: String,
    },

    /// A model of a resources folder that cannot run what it was given (a missing or mismatched
    /// input, a batch or size it was not compiled for, an error Core ML reported).
    #[error("{model}: {reason}")]
    Model { model: String, reason: String },

    /// A file or folder a resources folder must have and lacks.
    #[error("{}: not found ({what})", path.display())]
    Missing { path: PathBuf, what: String },

    #[error(transparent)]
    Quant(#[from] sdrs_quant::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.into(),
        reason: reason.into(),
    }
}

pub(crate) fn model(model: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Model {
        model: model.into(),
        reason: reason.into(),
    }
}
