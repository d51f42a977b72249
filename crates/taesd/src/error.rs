//! Errors of the `sdrs-taesd` crate: every variant carries the values that went wrong.

use std::fmt;
use std::path::PathBuf;

/// Which half of a tiny autoencoder a file, key or request concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Half {
    Encoder,
    Decoder,
}

impl Half {
    /// The diffusers module name of this half (`encoder` / `decoder`).
    pub fn module_name(self) -> &'static str {
        match self {
            Half::Encoder => "encoder",
            Half::Decoder => "decoder",
        }
    }
}

impl fmt::Display for Half {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module_name())
    }
}

/// Why a key of an original (bare `nn.Sequential`) TAESD file has no diffusers counterpart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BareKeyError {
    #[error("the key does not start with an nn.Sequential layer index")]
    NotALayerIndex,
    #[error("decoder layer 0 is the parameter-free clamp tanh(x/3)*3, it cannot hold weights")]
    ClampHasNoWeights,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot parse the AutoencoderTiny config {path}: {source}")]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid AutoencoderTiny config: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("unsupported act_fn {act_fn:?}; supported: {accepted}")]
    UnsupportedActivation {
        act_fn: String,
        accepted: &'static str,
    },

    #[error("unsupported upsample_fn {upsample_fn:?}; supported: {accepted}")]
    UnsupportedUpsample {
        upsample_fn: String,
        accepted: &'static str,
    },

    #[error("cannot load the weights {path}: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    #[error("weight {key}: expected {expected}, found shape {found:?}")]
    WeightShape {
        key: String,
        expected: String,
        found: Vec<usize>,
    },

    #[error(
        "no tiny-autoencoder weights in {dir}: expected config.json + \
         diffusion_pytorch_model.safetensors (diffusers layout) or \
         <name>_encoder.safetensors / <name>_decoder.safetensors (original layout)"
    )]
    NoWeights { dir: PathBuf },

    #[error("{dir} holds several original-layout tiny autoencoders ({prefixes:?}); name the files explicitly")]
    AmbiguousDir { dir: PathBuf, prefixes: Vec<String> },

    #[error("key {key:?} of the {half} file {path}: {source}")]
    BareKey {
        path: PathBuf,
        half: Half,
        key: String,
        #[source]
        source: BareKeyError,
    },

    #[error(
        "cannot recognise the tiny-autoencoder variant of the {half} in {path}: {reason}; tensors seen: {}",
        format_shapes(shapes)
    )]
    UnknownVariant {
        half: Half,
        path: PathBuf,
        reason: String,
        shapes: Vec<(String, Vec<usize>)>,
    },

    #[error("the encoder gives {encoder} latent channels but the decoder takes {decoder}")]
    LatentChannelsMismatch { encoder: usize, decoder: usize },

    #[error("a tiny autoencoder needs its encoder, its decoder or both")]
    NoHalves,

    #[error("this tiny autoencoder was loaded without its {half} weights, so it cannot {action}")]
    MissingHalf { half: Half, action: &'static str },

    #[error("{what}: expected {expected}, found shape {found:?}")]
    InputShape {
        what: &'static str,
        expected: String,
        found: Vec<usize>,
    },

    #[error("cannot compare images of shapes {a:?} and {b:?}")]
    ShapeMismatch { a: Vec<usize>, b: Vec<usize> },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn format_shapes(shapes: &[(String, Vec<usize>)]) -> String {
    let parts: Vec<String> = shapes
        .iter()
        .map(|(name, shape)| format!("{name} {shape:?}"))
        .collect();
    parts.join(", ")
}
