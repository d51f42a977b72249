//! Loading a tiny autoencoder from either layout: diffusers (`config.json` +
//! `diffusion_pytorch_model.safetensors`) or the original bare files
//! (`<name>_encoder.safetensors` / `<name>_decoder.safetensors`, madebyollin/taesd).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::{KernelOptions, VarBuilder};

use crate::autoencoder_tiny::AutoencoderTiny;
use crate::config::AutoencoderTinyConfig;
use crate::convert::{bare_to_diffusers_key, config_from_structures, infer_half_structure};
use crate::error::{Error, Half, Result};

const DIFFUSERS_CONFIG: &str = "config.json";
/// Tried in this order; the fp16 variant is what some repos ship alone.
const DIFFUSERS_WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
const ENCODER_SUFFIX: &str = "_encoder.safetensors";
const DECODER_SUFFIX: &str = "_decoder.safetensors";

/// What a folder holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Diffusers {
        config: PathBuf,
        weights: PathBuf,
    },
    /// The original files; either half may be absent, not both.
    Bare {
        encoder: Option<PathBuf>,
        decoder: Option<PathBuf>,
    },
}

/// Finds the layout of `dir`. The diffusers layout wins when both are present; among bare
/// files, exactly one `<name>_` prefix may be present.
pub fn detect_layout(dir: &Path) -> Result<Layout> {
    let config = dir.join(DIFFUSERS_CONFIG);
    if config.is_file() {
        if let Some(weights) = DIFFUSERS_WEIGHTS
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
        {
            return Ok(Layout::Diffusers { config, weights });
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(prefix) = name.strip_suffix(ENCODER_SUFFIX) {
            found.entry(prefix.to_string()).or_default().0 = Some(path.clone());
        } else if let Some(prefix) = name.strip_suffix(DECODER_SUFFIX) {
            found.entry(prefix.to_string()).or_default().1 = Some(path.clone());
        }
    }
    let mut pairs = found.into_iter();
    match (pairs.next(), pairs.next()) {
        (Some((_, (encoder, decoder))), None) => Ok(Layout::Bare { encoder, decoder }),
        (None, _) => Err(Error::NoWeights {
            dir: dir.to_path_buf(),
        }),
        (Some((first, _)), Some((second, _))) => {
            let mut prefixes = vec![first, second];
            prefixes.extend(pairs.map(|(p, _)| p));
            Err(Error::AmbiguousDir {
                dir: dir.to_path_buf(),
                prefixes,
            })
        }
    }
}

fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| Error::Weights {
        path: path.to_path_buf(),
        source,
    })
}

/// Errors from building the model name the file the weights came from.
fn in_file(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |err| match err {
        Error::Candle(source) => Error::Weights {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    }
}

impl AutoencoderTiny {
    /// Loads whichever layout `dir` holds (see [`detect_layout`]).
    /// The layers compute with `options` (the pipeline's kernel options).
    pub fn from_dir(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        options: KernelOptions,
    ) -> Result<Self> {
        match detect_layout(dir.as_ref())? {
            Layout::Diffusers { config, weights } => {
                Self::from_diffusers(&config, &weights, dtype, device, options)
            }
            Layout::Bare { encoder, decoder } => Self::from_files(
                encoder.as_deref(),
                decoder.as_deref(),
                dtype,
                device,
                options,
            ),
        }
    }

    /// The diffusers layout. A weights file without any `encoder.*` (or `decoder.*`) key gives
    /// a model without that half.
    pub fn from_diffusers(
        config: &Path,
        weights: &Path,
        dtype: DType,
        device: &Device,
        options: KernelOptions,
    ) -> Result<Self> {
        let cfg = AutoencoderTinyConfig::from_file(config)?;
        let tensors = load_tensors(weights)?;
        let has = |half: Half| {
            let prefix = format!("{}.", half.module_name());
            tensors.keys().any(|k| k.starts_with(&prefix))
        };
        let (encoder, decoder) = (has(Half::Encoder), has(Half::Decoder));
        let vb = VarBuilder::new(
            candle_nn::VarBuilder::from_tensors(tensors, dtype, device),
            options,
        );
        Self::with_halves(vb, &cfg, encoder, decoder).map_err(in_file(weights))
    }

    /// The original bare files; either may be `None` (a decoder alone decodes, and asking it to
    /// encode is an error). The configuration is read from the keys and shapes.
    pub fn from_files(
        encoder: Option<&Path>,
        decoder: Option<&Path>,
        dtype: DType,
        device: &Device,
        options: KernelOptions,
    ) -> Result<Self> {
        let mut tensors = HashMap::new();
        let mut structures = [None, None];
        let halves = [(Half::Encoder, encoder), (Half::Decoder, decoder)];
        for (slot, (half, path)) in halves.into_iter().enumerate() {
            let Some(path) = path else { continue };
            let mut shapes = BTreeMap::new();
            for (key, tensor) in load_tensors(path)? {
                let renamed =
                    bare_to_diffusers_key(half, &key).map_err(|source| Error::BareKey {
                        path: path.to_path_buf(),
                        half,
                        key: key.clone(),
                        source,
                    })?;
                shapes.insert(renamed.clone(), tensor.dims().to_vec());
                tensors.insert(renamed, tensor);
            }
            structures[slot] = Some(infer_half_structure(half, path, &shapes)?);
        }
        let [enc, dec] = &structures;
        if enc.is_none() && dec.is_none() {
            return Err(Error::NoHalves);
        }
        let cfg = config_from_structures(enc.as_ref(), dec.as_ref())?;
        let vb = VarBuilder::new(
            candle_nn::VarBuilder::from_tensors(tensors, dtype, device),
            options,
        );
        let label = decoder.or(encoder).unwrap_or(Path::new(""));
        Self::with_halves(vb, &cfg, enc.is_some(), dec.is_some()).map_err(in_file(label))
    }
}
