//! The blocks crate's error type: every variant names the config key or value at fault. The
//! model crates turn each variant into their own variant of the same name and fields.

/// Errors from parsing a block option or building a block from weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config option is set to a value no block implements (an unknown `act_fn`, ...).
    #[error("unsupported config value {key} = {value}; supported: {accepted}")]
    Unsupported {
        key: String,
        value: String,
        accepted: String,
    },

    /// A config value that cannot describe a working block (zero attention heads, ...).
    #[error("invalid config value {key} = {value}: {expected}")]
    InvalidConfig {
        key: String,
        value: String,
        expected: String,
    },

    /// A tensor operation failed; for weights this names the tensor that is missing or has the
    /// wrong shape.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
