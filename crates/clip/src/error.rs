//! The clip crate's error type: every variant names the file, token, option or value at fault.

use std::path::PathBuf;

/// Errors from loading or running the CLIP tokenizer and text encoder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tokenizer folder has neither `tokenizer.json` nor the `vocab.json` + `merges.txt` pair.
    #[error("no tokenizer in {dir}: looked for {looked_for}")]
    MissingTokenizerFiles { dir: PathBuf, looked_for: String },

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config, vocabulary, tokenizer) could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A line of a BPE merges file that is not two symbols separated by a space.
    #[error(
        "{origin}, line {line}: {content:?} is not a merge (two symbols separated by a space)"
    )]
    BadMerge {
        origin: String,
        line: usize,
        content: String,
    },

    /// The `tokenizers` library refused the vocabulary, the merges or the tokenizer file.
    #[error("cannot build the tokenizer from {origin}: {source}")]
    Tokenizer {
        origin: String,
        #[source]
        source: tokenizers::Error,
    },

    /// A special token named by the tokenizer's config is not in its vocabulary.
    #[error("the {role} {token:?} of {origin} is not in the vocabulary")]
    UnknownSpecialToken {
        role: &'static str,
        token: String,
        origin: String,
    },

    /// The tokenizer's maximum length cannot hold the begin and end tokens.
    #[error(
        "model_max_length {found} of {origin} is too small: it must be at least 2 (bos and eos)"
    )]
    InvalidMaxLength { found: usize, origin: String },

    /// A textual-inversion token name the tokenizer cannot add.
    #[error("cannot add the token {token:?}: expected {expected}")]
    InvalidAddedToken { token: String, expected: String },

    /// A textual-inversion token name that the tokenizer already has.
    #[error("the token {token:?} is already {what} (id {id}); give the embedding another name")]
    AddedTokenExists {
        token: String,
        id: u32,
        what: &'static str,
    },

    /// Extra token-embedding rows that do not fit the text encoder.
    #[error("invalid token embeddings of shape {shape:?}: expected {expected}")]
    InvalidTokenEmbeddings { shape: Vec<usize>, expected: String },

    /// Tokenizing a prompt failed.
    #[error("cannot tokenize {prompt:?}: {source}")]
    Encode {
        prompt: String,
        #[source]
        source: tokenizers::Error,
    },

    /// The text encoder's `hidden_act` is not one we implement.
    #[error("unsupported hidden_act {found:?}; supported: {accepted}")]
    UnsupportedActivation { found: String, accepted: String },

    /// A text-encoder config value that cannot describe a working model.
    #[error("invalid text encoder config: {name} = {value}: {expected}")]
    InvalidConfig {
        name: &'static str,
        value: String,
        expected: String,
    },

    /// `input_ids` that the text encoder cannot take.
    #[error("invalid input_ids of shape {shape:?}: {expected}")]
    InvalidInputIds { shape: Vec<usize>, expected: String },

    /// A layer index or clip skip beyond the encoder's depth.
    #[error(
        "{what} {value} is out of range for a text encoder with {num_layers} layers: {expected}"
    )]
    LayerOutOfRange {
        what: &'static str,
        value: usize,
        num_layers: usize,
        expected: String,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
