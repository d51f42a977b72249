//! LoRA and LyCORIS adapters merged into a model's weights as they load: a transform of the
//! weight source (seam 2), not of the models. A component's `VarBuilder` is wrapped so that a
//! request for `<module>.weight` of a module some adapter changes returns
//! `W + sum(m * scale * delta)`, computed in f32 and cast to the compute dtype; every other tensor
//! passes through untouched.
//!
//! File layouts: kohya/AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`/`lora_te2_*` with
//! `.lora_down.weight`/`.lora_up.weight`/`.alpha`, LoCon on convolutions, the sgm block names
//! kohya trains SDXL with), diffusers/PEFT (`unet.<module>.lora_A.weight`/`lora_B.weight`, alpha
//! from the `lora_adapter_metadata`), and LyCORIS LoHa (`hada_*`) and LoKr (`lokr_*`) following
//! `lycoris/functional/loha.py` and `lokr.py`. DoRA (`dora_scale`, `lora_magnitude_vector`) is
//! refused.
//!
//! Quantized layers: a source of quantized weights (a GGUF file's blocks, a quantized folder)
//! does not answer for a LoRA'd layer, so that layer gets the merged dense weight; quantization at
//! load (`--quantize`) reads the merged weight, so it quantizes after merging.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use sdrs_kernels::weight::QuantizedSource;
use sdrs_kernels::QuantizedMatrix;
use sdrs_unet::UNet2DConditionConfig;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tensor_files::TensorFiles;

/// One adapter file to merge, and the multiplier its deltas are scaled by (A1111's
/// `<lora:name:weight>`, diffusers' adapter weight / `lora_scale`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    pub path: PathBuf,
    pub multiplier: f64,
}

impl LoraFile {
    pub fn new(path: impl Into<PathBuf>, multiplier: f64) -> Self {
        Self {
            path: path.into(),
            multiplier,
        }
    }

    /// `file.safetensors` (multiplier 1) or `file.safetensors:0.8`. A colon followed by
    /// something that is not a number is part of the path (`C:\loras\x.safetensors`).
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some((path, weight)) = spec.rsplit_once(':') {
            if let Ok(multiplier) = weight.trim().parse::<f64>() {
                if !multiplier.is_finite() {
                    return Err(Error::InvalidParameter {
                        name: "LoRA weight",
                        value: spec.to_string(),
                        expected: "a finite number after the colon (file.safetensors:0.8)"
                            .to_string(),
                    });
                }
                if path.is_empty() {
                    return Err(Error::InvalidParameter {
                        name: "LoRA",
                        value: spec.to_string(),
                        expected: "a file, then optionally :weight (file.safetensors:0.8)"
                            .to_string(),
                    });
                }
                return Ok(Self::new(path, multiplier));
            }
        }
        if spec.is_empty() {
            return Err(Error::InvalidParameter {
                name: "LoRA",
                value: String::new(),
                expected: "a file, then optionally :weight (file.safetensors:0.8)".to_string(),
            });
        }
        Ok(Self::new(spec, 1.0))
    }
}

/// AUTOMATIC1111's "addnet" hash of a `.safetensors` file: the SHA-256 of everything after the
/// header (the tensor bytes), as hex. Its first 12 digits are what A1111 records in `Lora hashes`.
pub fn addnet_hash(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut header = [0u8; 8];
    file.read_exact(&mut header).map_err(io)?;
    let offset = u64::from_le_bytes(header)
        .checked_add(8)
        .ok_or_else(|| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "header length overflows"),
        })?;
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// One factor of a LoKr Kronecker product: stored whole, or as a low-rank product `a @ b`.
#[derive(Debug, Clone)]
enum Factor {
    Full(Tensor),
    LowRank(Tensor, Tensor),
}

/// How one module's delta is stored.
#[derive(Debug, Clone)]
enum Delta {
    /// `up @ down` (LoCon: `down` has the module's kernel; with `mid`, the Tucker form).
    Lora {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    /// LoHa: `(w1a @ w1b) * (w2a @ w2b)`, with `t1`/`t2` the Tucker form for convolutions.
    Loha {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
        t1: Option<Tensor>,
        t2: Option<Tensor>,
    },
    /// LoKr: `kron(w1, w2)`, `t2` the Tucker form of `w2`.
    Lokr {
        w1: Factor,
        w2: Factor,
        t2: Option<Tensor>,
    },
}

/// One module an adapter changes.
#[derive(Debug, Clone)]
struct Module {
    /// The key prefix in the file (`lora_unet_down_blocks_0_resnets_0_conv1`), for messages.
    file_prefix: String,
    component: &'static str,
    /// The module's diffusers path with `_` for `.`, without a leading `text_model_`.
    key: String,
    delta: Delta,
    /// `alpha / rank` (PEFT with rsLoRA: `alpha / sqrt(rank)`).
    scale: f64,
}

/// One opened adapter file.
#[derive(Debug)]
struct Adapter {
    path: PathBuf,
    multiplier: f64,
    modules: Vec<Module>,
}

/// The adapters of one load, with the modules the components asked for so far. The pipeline
/// builds one per load; [`Self::wrap`] is public for tools that merge single tensors (parity).
pub struct LoraSet {
    adapters: Vec<Adapter>,
    /// `(component, key)` -> the `(adapter, module)` indexes changing it.
    index: HashMap<(&'static str, String), Vec<(usize, usize)>>,
    asked: Mutex<HashSet<(&'static str, String)>>,
    ignore_unmatched: bool,
}

/// The components a LoRA can change.
const COMPONENTS: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

/// The parameter suffixes of every supported layout, longest first where one ends another.
const SUFFIXES: [&str; 20] = [
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_mid.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_magnitude_vector",
    ".dora_scale",
    ".alpha",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    ".lokr_w1",
];

/// `.lokr_w2` ends no other suffix and is matched last.
const LOKR_W2: &str = ".lokr_w2";

/// How many names an error lists.
const LISTED: usize = 8;

fn lora_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn listed(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LISTED {
        text.push_str(&format!(", ... ({} in all)", names.len()));
    }
    text
}

/// Splits a tensor name into its module prefix and parameter suffix.
fn split_suffix(name: &str) -> Option<(&str, &'static str)> {
    SUFFIXES
        .iter()
        .chain(std::iter::once(&LOKR_W2))
        .find_map(|suffix| name.strip_suffix(suffix).map(|prefix| (prefix, *suffix)))
}

/// The component and module key (`_` for `.`) of a file's module prefix: kohya's `lora_unet_`,
/// `lora_te_`, `lora_te1_`, `lora_te2_`, or PEFT's `unet.`, `text_encoder.`, `text_encoder_2.`.
/// UNet keys in sgm names are translated with `unet` (see [`sgm_to_diffusers`]).
fn module_key(prefix: &str, unet: &UnetBlocks) -> Option<(&'static str, String)> {
    let kohya: [(&str, &'static str); 4] = [
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ];
    let peft: [(&str, &'static str); 3] = [
        ("unet.", "unet"),
        ("text_encoder_2.", "text_encoder_2"),
        ("text_encoder.", "text_encoder"),
    ];
    let (component, rest) = kohya
        .iter()
        .chain(peft.iter())
        .find_map(|(start, component)| prefix.strip_prefix(start).map(|rest| (*component, rest)))?;
    let key = rest.replace('.', "_");
    Some(if component == "unet" {
        (component, sgm_to_diffusers(&key, unet).unwrap_or(key))
    } else {
        (component, text_key(&key))
    })
}

/// A text encoder key without the `text_model_` transformers 5 no longer has on `CLIPTextModel`
/// (files still spell it), so both spellings meet.
fn text_key(key: &str) -> String {
    key.strip_prefix("text_model_").unwrap_or(key).to_string()
}

/// The key a model's request for `name` (`down_blocks.0.resnets.0.conv1.weight`) is looked up
/// under, when it asks for a layer weight.
fn request_key(component: &str, name: &str) -> Option<String> {
    let module = name.strip_suffix(".weight")?.replace('.', "_");
    Some(if component == "unet" {
        module
    } else {
        text_key(&module)
    })
}

/// The block layout of a UNet that sgm's flat `input_blocks.k` / `output_blocks.k` numbering
/// depends on: the layers of each down block (the up blocks have one more, in reverse order).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnetBlocks {
    layers_per_block: Vec<usize>,
}

impl UnetBlocks {
    pub fn of(config: &UNet2DConditionConfig) -> Result<Self> {
        let blocks = config.down_block_types.len();
        Ok(Self {
            layers_per_block: config.layers_per_block.expand("layers_per_block", blocks)?,
        })
    }
}

/// An sgm (original Stable Diffusion) UNet module key in kohya's spelling
/// (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) as the diffusers one
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); `None` for a key that is not in
/// sgm names. `input_blocks.k` (k >= 1) counts each down block's layers then its downsampler;
/// `output_blocks.k` each up block's layers; `.0` is a layer's resnet, `.1` its attention, the
/// last `conv` the up block's upsampler.
fn sgm_to_diffusers(key: &str, unet: &UnetBlocks) -> Option<String> {
    let join = |head: String, rest: &str| {
        if rest.is_empty() {
            head
        } else {
            format!("{head}_{rest}")
        }
    };
    let blocks = unet.layers_per_block.len();
    if let Some(rest) = key.strip_prefix("input_blocks_") {
        let (k, j, rest) = two_indexes(rest)?;
        if k == 0 {
            return (j == 0).then(|| join("conv_in".to_string(), rest));
        }
        let mut index = 1;
        for (block, &layers) in unet.layers_per_block.iter().enumerate() {
            if k < index + layers {
                let slot = k - index;
                return match j {
                    0 => Some(join(
                        format!("down_blocks_{block}_resnets_{slot}"),
                        &resnet_rest(rest),
                    )),
                    1 => Some(join(format!("down_blocks_{block}_attentions_{slot}"), rest)),
                    _ => None,
                };
            }
            index += layers;
            if block + 1 < blocks {
                if k == index {
                    return (j == 0 && rest == "op")
                        .then(|| format!("down_blocks_{block}_downsamplers_0_conv"));
                }
                index += 1;
            }
        }
        return None;
    }
    if let Some(rest) = key.strip_prefix("middle_block_") {
        let (k, rest) = one_index(rest)?;
        return match k {
            0 => Some(join("mid_block_resnets_0".to_string(), &resnet_rest(rest))),
            1 => Some(join("mid_block_attentions_0".to_string(), rest)),
            2 => Some(join("mid_block_resnets_1".to_string(), &resnet_rest(rest))),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("output_blocks_") {
        let (k, j, rest) = two_indexes(rest)?;
        let mut index = 0;
        for (block, &layers) in unet.layers_per_block.iter().rev().enumerate() {
            let layers = layers + 1;
            if k < index + layers {
                let slot = k - index;
                let last = slot + 1 == layers && block + 1 < blocks;
                return match (j, rest) {
                    (0, _) => Some(join(
                        format!("up_blocks_{block}_resnets_{slot}"),
                        &resnet_rest(rest),
                    )),
                    (1 | 2, "conv") if last => Some(format!("up_blocks_{block}_upsamplers_0_conv")),
                    (1, _) => Some(join(format!("up_blocks_{block}_attentions_{slot}"), rest)),
                    _ => None,
                };
            }
            index += layers;
        }
        return None;
    }
    let simple = [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_0", "conv_norm_out"),
        ("out_2", "conv_out"),
    ];
    simple
        .iter()
        .find(|(sgm, _)| *sgm == key)
        .map(|(_, diffusers)| diffusers.to_string())
}

/// A resnet's sgm sub-module names as diffusers': `in_layers_2` = conv1, `out_layers_3` = conv2,
/// `skip_connection` = conv_shortcut, `emb_layers_1` = time_emb_proj (and the norms).
fn resnet_rest(rest: &str) -> String {
    let names = [
        ("in_layers_0", "norm1"),
        ("in_layers_2", "conv1"),
        ("out_layers_0", "norm2"),
        ("out_layers_3", "conv2"),
        ("emb_layers_1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ];
    names
        .iter()
        .find(|(sgm, _)| *sgm == rest)
        .map_or_else(|| rest.to_string(), |(_, diffusers)| diffusers.to_string())
}

/// `"4_1_rest"` -> `(4, 1, "rest")`.
fn two_indexes(text: &str) -> Option<(usize, usize, &str)> {
    let (k, rest) = one_index(text)?;
    let (j, rest) = one_index(rest)?;
    Some((k, j, rest))
}

/// `"4_rest"` -> `(4, "rest")`, `"4"` -> `(4, "")`.
fn one_index(text: &str) -> Option<(usize, &str)> {
    let (digits, rest) = match text.split_once('_') {
        Some((digits, rest)) => (digits, rest),
        None => (text, ""),
    };
    Some((digits.parse().ok()?, rest))
}

/// What PEFT's `lora_adapter_metadata` says about one component.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PeftConfig {
    alpha: Option<f64>,
    rslora: bool,
}

/// Reads the per-component `lora_alpha` and `use_rslora` of PEFT's metadata, refusing what it
/// cannot reproduce (DoRA, per-module alpha patterns).
fn peft_configs(
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<HashMap<String, PeftConfig>> {
    let mut configs = HashMap::new();
    let Some(text) = metadata.get("lora_adapter_metadata") else {
        return Ok(configs);
    };
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| lora_error(path, format!("its lora_adapter_metadata is not JSON: {e}")))?;
    let Some(object) = json.as_object() else {
        return Err(lora_error(
            path,
            "its lora_adapter_metadata is not a JSON object",
        ));
    };
    for component in COMPONENTS {
        let field = |name: &str| object.get(&format!("{component}.{name}"));
        if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(lora_error(
                path,
                format!("{component} is a DoRA adapter (use_dora), which sdrs does not merge"),
            ));
        }
        if let Some(pattern) = field("alpha_pattern").and_then(|v| v.as_object()) {
            if !pattern.is_empty() {
                return Err(lora_error(
                    path,
                    format!(
                        "{component}.alpha_pattern gives some modules their own alpha, which \
                         sdrs does not apply; only one lora_alpha per component is supported"
                    ),
                ));
            }
        }
        let alpha = field("lora_alpha").and_then(|v| v.as_f64());
        let rslora = field("use_rslora").and_then(|v| v.as_bool()) == Some(true);
        if alpha.is_some() || rslora {
            configs.insert(component.to_string(), PeftConfig { alpha, rslora });
        }
    }
    Ok(configs)
}

impl Adapter {
    /// Opens `file` and groups its tensors by module.
    fn open(file: &LoraFile, unet: &UnetBlocks) -> Result<Self> {
        let path = &file.path;
        if !file.multiplier.is_finite() {
            return Err(Error::InvalidParameter {
                name: "LoRA weight",
                value: format!("{}:{}", path.display(), file.multiplier),
                expected: "a finite number".to_string(),
            });
        }
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.clone(),
                what: "a LoRA (.safetensors)".to_string(),
            });
        }
        let tensors =
            TensorFiles::open(std::slice::from_ref(path)).map_err(|source| Error::Weights {
                component: "LoRA",
                path: path.clone(),
                source,
            })?;
        let peft = peft_configs(path, tensors.metadata())?;
        let mut groups: BTreeMap<String, HashMap<&'static str, Tensor>> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut names: Vec<String> = tensors.shapes().into_iter().map(|(n, _)| n).collect();
        names.sort();
        for name in names {
            let Some((prefix, suffix)) = split_suffix(&name) else {
                unknown.push(name);
                continue;
            };
            let tensor = tensors
                .load(&name)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|source| Error::Weights {
                    component: "LoRA",
                    path: path.clone(),
                    source,
                })?;
            groups
                .entry(prefix.to_string())
                .or_default()
                .insert(suffix, tensor);
        }
        if !unknown.is_empty() {
            return Err(lora_error(
                path,
                format!(
                    "tensors of no supported layout (kohya lora_down/lora_up/alpha, PEFT \
                     lora_A/lora_B, LyCORIS hada_*/lokr_*): {}",
                    listed(&unknown)
                ),
            ));
        }
        let mut modules = Vec::new();
        let mut unplaced = Vec::new();
        for (prefix, parts) in groups {
            let Some((component, key)) = module_key(&prefix, unet) else {
                unplaced.push(prefix);
                continue;
            };
            let peft = peft.get(component).copied();
            let (delta, scale) = module_delta(path, &prefix, parts, peft)?;
            modules.push(Module {
                file_prefix: prefix,
                component,
                key,
                delta,
                scale,
            });
        }
        if !unplaced.is_empty() {
            return Err(lora_error(
                path,
                format!(
                    "modules of no known model part (lora_unet_, lora_te_, lora_te1_, \
                     lora_te2_, unet., text_encoder., text_encoder_2.): {}",
                    listed(&unplaced)
                ),
            ));
        }
        if modules.is_empty() {
            return Err(lora_error(path, "it holds no tensors"));
        }
        Ok(Self {
            path: path.clone(),
            multiplier: file.multiplier,
            modules,
        })
    }
}

/// One module's parts as a [`Delta`] and its scale. Every part must be used: a set of parts of
/// no known form is an error naming them.
fn module_delta(
    path: &Path,
    prefix: &str,
    mut parts: HashMap<&'static str, Tensor>,
    peft: Option<PeftConfig>,
) -> Result<(Delta, f64)> {
    let found = |parts: &HashMap<&'static str, Tensor>| {
        let mut names: Vec<&str> = parts.keys().copied().collect();
        names.sort();
        names.join(", ")
    };
    if parts.contains_key(".dora_scale") || parts.contains_key(".lora_magnitude_vector") {
        return Err(lora_error(
            path,
            format!(
                "{prefix} is DoRA (weight-decomposed, dora_scale / lora_magnitude_vector), \
                 which sdrs does not merge; use a plain LoRA"
            ),
        ));
    }
    let alpha = match parts.remove(".alpha") {
        Some(alpha) => Some(scalar(path, prefix, &alpha)?),
        None => None,
    };
    let rank_of = |t: &Tensor| t.dims().first().copied().unwrap_or(0);
    let (delta, rank) = if let (Some(down), Some(up)) = (
        parts.remove(".lora_down.weight"),
        parts.remove(".lora_up.weight"),
    ) {
        let rank = rank_of(&down);
        let mid = parts.remove(".lora_mid.weight");
        (Delta::Lora { down, up, mid }, Some(rank))
    } else if let (Some(down), Some(up)) = (
        parts.remove(".lora_A.weight"),
        parts.remove(".lora_B.weight"),
    ) {
        let rank = rank_of(&down);
        if alpha.is_some() {
            return Err(lora_error(
                path,
                format!("{prefix} mixes PEFT lora_A/lora_B with a kohya .alpha"),
            ));
        }
        let config = peft.unwrap_or(PeftConfig {
            alpha: None,
            rslora: false,
        });
        let alpha = config.alpha.unwrap_or(rank as f64);
        let denominator = if config.rslora {
            (rank as f64).sqrt()
        } else {
            rank as f64
        };
        check_rank(path, prefix, rank)?;
        if !parts.is_empty() {
            return Err(unused(path, prefix, &found(&parts)));
        }
        return Ok((
            Delta::Lora {
                down,
                up,
                mid: None,
            },
            alpha / denominator,
        ));
    } else if let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
        parts.remove(".hada_w1_a"),
        parts.remove(".hada_w1_b"),
        parts.remove(".hada_w2_a"),
        parts.remove(".hada_w2_b"),
    ) {
        let rank = rank_of(&w1b);
        let (t1, t2) = (parts.remove(".hada_t1"), parts.remove(".hada_t2"));
        if t1.is_some() != t2.is_some() {
            return Err(lora_error(
                path,
                format!("{prefix} has one of hada_t1/hada_t2 without the other"),
            ));
        }
        (
            Delta::Loha {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            },
            Some(rank),
        )
    } else if parts.keys().any(|k| k.starts_with(".lokr_")) {
        let mut rank = None;
        // Each Kronecker factor is whole (`lokr_wN`) or low-rank (`lokr_wN_a @ lokr_wN_b`).
        let mut factor = |n: u32, [whole, a, b]: [&'static str; 3]| -> Result<Factor> {
            match (parts.remove(whole), parts.remove(a), parts.remove(b)) {
                (Some(w), None, None) => Ok(Factor::Full(w)),
                (None, Some(a), Some(b)) => {
                    rank = Some(rank_of(&b));
                    Ok(Factor::LowRank(a, b))
                }
                _ => Err(lora_error(
                    path,
                    format!("{prefix}: LoKr needs lokr_w{n}, or lokr_w{n}_a and lokr_w{n}_b"),
                )),
            }
        };
        let w1 = factor(1, [".lokr_w1", ".lokr_w1_a", ".lokr_w1_b"])?;
        let w2 = factor(2, [".lokr_w2", ".lokr_w2_a", ".lokr_w2_b"])?;
        let t2 = parts.remove(".lokr_t2");
        if t2.is_some() && !matches!(w2, Factor::LowRank(..)) {
            return Err(lora_error(
                path,
                format!("{prefix}: lokr_t2 without lokr_w2_a and lokr_w2_b"),
            ));
        }
        // LyCORIS scales by alpha / rank only when a factor is low-rank; full factors: 1.
        (Delta::Lokr { w1, w2, t2 }, rank)
    } else {
        return Err(lora_error(
            path,
            format!(
                "{prefix} has parts of no known form ({}): LoRA needs lora_down and lora_up \
                 (or lora_A and lora_B), LoHa hada_w1_a/b and hada_w2_a/b, LoKr lokr_w1* and \
                 lokr_w2*",
                found(&parts)
            ),
        ));
    };
    if !parts.is_empty() {
        return Err(unused(path, prefix, &found(&parts)));
    }
    let scale = match rank {
        Some(rank) => {
            check_rank(path, prefix, rank)?;
            alpha.unwrap_or(rank as f64) / rank as f64
        }
        None => 1.0,
    };
    Ok((delta, scale))
}

fn unused(path: &Path, prefix: &str, parts: &str) -> Error {
    lora_error(
        path,
        format!("{prefix} has parts its form does not use: {parts}"),
    )
}

fn check_rank(path: &Path, prefix: &str, rank: usize) -> Result<()> {
    if rank == 0 {
        return Err(lora_error(path, format!("{prefix} has rank 0")));
    }
    Ok(())
}

/// A 0-dim (or one-element) tensor's value.
fn scalar(path: &Path, prefix: &str, tensor: &Tensor) -> Result<f64> {
    if tensor.elem_count() != 1 {
        return Err(lora_error(
            path,
            format!(
                "{prefix}.alpha has shape {:?}; expected one number",
                tensor.dims()
            ),
        ));
    }
    let value = tensor.flatten_all()?.to_vec1::<f32>()?[0] as f64;
    if !value.is_finite() {
        return Err(lora_error(path, format!("{prefix}.alpha is {value}")));
    }
    Ok(value)
}

/// LyCORIS's Tucker rebuild, `einsum("i j k l, j r, i p -> p r k l", t, b, a)`: `t` `[I, J, kh,
/// kw]`, `a` `[I, out]`, `b` `[J, in]` -> `[out, in, kh, kw]`.
fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (i, j, kh, kw) = t.dims4()?;
    let out = a.dim(1)?;
    let inp = b.dim(1)?;
    // x[p, j, kl] = sum_i a[i, p] t[i, j, kl]
    let x = a.t()?.matmul(&t.reshape((i, j * kh * kw))?)?;
    // y[p, kl, r] = sum_j x[p, j, kl] b[j, r]
    let x = x
        .reshape((out, j, kh * kw))?
        .transpose(1, 2)?
        .reshape((out * kh * kw, j))?;
    let y = x.matmul(b)?;
    y.reshape((out, kh * kw, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp, kh, kw))
}

/// `kron(a, b)` of two matrices.
fn kron(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (m, n) = a.dims2()?;
    let (p, q) = b.dims2()?;
    a.reshape((m, 1, n, 1))?
        .broadcast_mul(&b.reshape((1, p, 1, q))?)?
        .reshape((m * p, n * q))
}

/// A tensor as a matrix of its first dimension by the rest.
fn rows(t: &Tensor) -> candle_core::Result<Tensor> {
    t.flatten_from(1)
}

impl Delta {
    /// The unscaled delta as a `[out, in * kh * kw]` f32 matrix on `device`.
    fn matrix(&self, device: &Device) -> candle_core::Result<Tensor> {
        let on = |t: &Tensor| t.to_device(device);
        match self {
            Delta::Lora { down, up, mid } => {
                let (down, up) = (rows(&on(down)?)?, rows(&on(up)?)?);
                match mid {
                    None => up.matmul(&down),
                    Some(mid) => rows(&tucker(&on(mid)?, &up.t()?, &down)?),
                }
            }
            Delta::Loha {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => {
                let (w1a, w1b, w2a, w2b) = (on(w1a)?, on(w1b)?, on(w2a)?, on(w2b)?);
                let (one, two) = match (t1, t2) {
                    (Some(t1), Some(t2)) => (
                        rows(&tucker(&on(t1)?, &w1a, &rows(&w1b)?)?)?,
                        rows(&tucker(&on(t2)?, &w2a, &rows(&w2b)?)?)?,
                    ),
                    _ => (
                        rows(&w1a)?.matmul(&rows(&w1b)?)?,
                        rows(&w2a)?.matmul(&rows(&w2b)?)?,
                    ),
                };
                one.mul(&two)
            }
            Delta::Lokr { w1, w2, t2 } => {
                let w1 = match w1 {
                    Factor::Full(w) => rows(&on(w)?)?,
                    Factor::LowRank(a, b) => rows(&on(a)?)?.matmul(&rows(&on(b)?)?)?,
                };
                let w2 = match (w2, t2) {
                    (Factor::LowRank(a, b), Some(t2)) => {
                        rows(&tucker(&on(t2)?, &on(a)?, &rows(&on(b)?)?)?)?
                    }
                    (Factor::Full(w), _) => rows(&on(w)?)?,
                    (Factor::LowRank(a, b), None) => rows(&on(a)?)?.matmul(&rows(&on(b)?)?)?,
                };
                kron(&w1, &w2)
            }
        }
    }
}

impl LoraSet {
    /// Opens `files` for a model whose UNet has `unet`'s block layout; `None` when there are none.
    pub fn open(
        files: &[LoraFile],
        unet: &UNet2DConditionConfig,
        ignore_unmatched: bool,
    ) -> Result<Option<Arc<Self>>> {
        if files.is_empty() {
            return Ok(None);
        }
        let blocks = UnetBlocks::of(unet)?;
        let adapters = files
            .iter()
            .map(|file| Adapter::open(file, &blocks))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Arc::new(Self::from_adapters(
            adapters,
            ignore_unmatched,
        ))))
    }

    fn from_adapters(adapters: Vec<Adapter>, ignore_unmatched: bool) -> Self {
        let mut index: HashMap<(&'static str, String), Vec<(usize, usize)>> = HashMap::new();
        for (a, adapter) in adapters.iter().enumerate() {
            for (m, module) in adapter.modules.iter().enumerate() {
                index
                    .entry((module.component, module.key.clone()))
                    .or_default()
                    .push((a, m));
            }
        }
        Self {
            adapters,
            index,
            asked: Mutex::new(HashSet::new()),
            ignore_unmatched,
        }
    }

    /// Whether any adapter changes `component`.
    pub fn touches(&self, component: &str) -> bool {
        self.index.keys().any(|(c, _)| *c == component)
    }

    /// The adapters' deltas for the tensor `name` of `component`, when it is a layer weight some
    /// adapter changes.
    fn entries(&self, component: &str, name: &str) -> Option<&[(usize, usize)]> {
        let key = request_key(component, name)?;
        let component = COMPONENTS.iter().find(|c| **c == component)?;
        self.index.get(&(*component, key)).map(Vec::as_slice)
    }

    /// `component`'s builder `inner` with the deltas merged into the weights they change.
    pub fn wrap(
        self: &Arc<Self>,
        component: &'static str,
        inner: candle_nn::VarBuilder<'static>,
    ) -> candle_nn::VarBuilder<'static> {
        let (dtype, device) = (inner.dtype(), inner.device().clone());
        let backend = MergingBackend {
            set: self.clone(),
            component,
            inner,
        };
        candle_nn::VarBuilder::from_backend(Box::new(backend), dtype, device)
    }

    /// `source` without the layers an adapter changes (they load dense and merged).
    pub fn without_merged(
        self: &Arc<Self>,
        component: &'static str,
        source: Arc<dyn QuantizedSource>,
    ) -> Arc<dyn QuantizedSource> {
        Arc::new(WithoutMerged {
            set: self.clone(),
            component,
            source,
        })
    }

    /// `weight` (`[out, ...]`) plus every adapter's scaled delta for it, in f32.
    fn merge(
        &self,
        name: &str,
        weight: Tensor,
        entries: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let mut merged = weight;
        let shape = merged.shape().clone();
        let rows = shape.dims().first().copied().unwrap_or(0);
        let cols = shape.elem_count() / rows.max(1);
        for &(a, m) in entries {
            let adapter = &self.adapters[a];
            let module = &adapter.modules[m];
            let factor = adapter.multiplier * module.scale;
            if factor == 0.0 {
                continue;
            }
            let delta = module.delta.matrix(merged.device())?;
            if delta.dims() != [rows, cols] {
                candle_core::bail!(
                    "LoRA {}: {} gives a {:?} delta for {name}, whose weight is {:?}",
                    adapter.path.display(),
                    module.file_prefix,
                    delta.dims(),
                    shape.dims()
                );
            }
            merged = (merged + (delta.reshape(shape.clone())? * factor)?)?;
        }
        Ok(merged)
    }

    fn record(&self, component: &'static str, name: &str) {
        if let Some(key) = request_key(component, name) {
            if let Ok(mut asked) = self.asked.lock() {
                asked.insert((component, key));
            }
        }
    }

    /// After the components `built` are built: an error listing the adapters' modules that no
    /// layer asked for (those of a component not among them, which this model does not have,
    /// included), unless unmatched modules are to be ignored.
    pub fn check_matched(&self, built: &[&str]) -> Result<()> {
        if self.ignore_unmatched {
            return Ok(());
        }
        let asked = self.asked.lock().map(|a| a.clone()).unwrap_or_default();
        for adapter in &self.adapters {
            let unmatched: Vec<String> = adapter
                .modules
                .iter()
                .filter(|m| {
                    !built.contains(&m.component) || !asked.contains(&(m.component, m.key.clone()))
                })
                .map(|m| m.file_prefix.clone())
                .collect();
            if !unmatched.is_empty() {
                return Err(Error::Lora {
                    path: adapter.path.clone(),
                    message: format!(
                        "{} of its modules match no layer of this model: {} (a LoRA for \
                         another model family? ignoring unmatched modules, \
                         --lora-ignore-unmatched, merges the rest)",
                        unmatched.len(),
                        listed(&unmatched)
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The builder backend that merges the deltas.
struct MergingBackend {
    set: Arc<LoraSet>,
    component: &'static str,
    inner: candle_nn::VarBuilder<'static>,
}

impl SimpleBackend for MergingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(entries) = self.set.entries(self.component, name) else {
            return self
                .inner
                .get_with_hints_dtype(shape, name, hints, dtype)?
                .to_device(device);
        };
        self.set.record(self.component, name);
        let weight = self
            .inner
            .get_with_hints_dtype(shape, name, hints, DType::F32)?;
        self.set
            .merge(name, weight, entries)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(entries) = self.set.entries(self.component, name) else {
            return self
                .inner
                .get_unchecked_dtype(name, dtype)?
                .to_device(device);
        };
        self.set.record(self.component, name);
        let weight = self.inner.get_unchecked_dtype(name, DType::F32)?;
        self.set
            .merge(name, weight, entries)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A quantized source that does not answer for LoRA'd layers.
struct WithoutMerged {
    set: Arc<LoraSet>,
    component: &'static str,
    source: Arc<dyn QuantizedSource>,
}

impl QuantizedSource for WithoutMerged {
    fn get(
        &self,
        name: &str,
        shape: &Shape,
    ) -> Option<candle_core::Result<Arc<dyn QuantizedMatrix>>> {
        if self.set.entries(self.component, name).is_some() {
            return None;
        }
        self.source.get(name, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn write(
        dir: &Path,
        name: &str,
        tensors: &[(&str, Tensor)],
        metadata: Option<HashMap<String, String>>,
    ) -> PathBuf {
        let path = dir.join(name);
        let data: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        safetensors::tensor::serialize_to_file(data, metadata, &path).unwrap();
        path
    }

    fn open(files: &[LoraFile], ignore: bool) -> Result<Arc<LoraSet>> {
        LoraSet::open(files, &UNet2DConditionConfig::default(), ignore).map(|s| s.unwrap())
    }

    /// `name` of `component` as the wrapped builder returns it, the weight being `base`.
    fn merged(set: &Arc<LoraSet>, component: &'static str, name: &str, base: &Tensor) -> Tensor {
        let map = HashMap::from([(name.to_string(), base.clone())]);
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        set.wrap(component, vb).get(base.shape(), name).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            // Tolerance: f32 rounding of products of a few small numbers.
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    fn blocks(layers: &[usize]) -> UnetBlocks {
        UnetBlocks {
            layers_per_block: layers.to_vec(),
        }
    }

    #[test]
    fn sgm_block_names_map_to_diffusers_modules() {
        let sdxl = blocks(&[2, 2, 2]);
        for (sgm, diffusers) in [
            ("input_blocks_0_0", "conv_in"),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            (
                "input_blocks_2_0_out_layers_3",
                "down_blocks_0_resnets_1_conv2",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_4_0_skip_connection",
                "down_blocks_1_resnets_0_conv_shortcut",
            ),
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_8_1_proj_out",
                "down_blocks_2_attentions_1_proj_out",
            ),
            (
                "middle_block_0_emb_layers_1",
                "mid_block_resnets_0_time_emb_proj",
            ),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            ("middle_block_2_in_layers_2", "mid_block_resnets_1_conv1"),
            (
                "output_blocks_0_0_in_layers_2",
                "up_blocks_0_resnets_0_conv1",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_3_0_skip_connection",
                "up_blocks_1_resnets_0_conv_shortcut",
            ),
            (
                "output_blocks_5_1_transformer_blocks_1_ff_net_2",
                "up_blocks_1_attentions_2_transformer_blocks_1_ff_net_2",
            ),
            (
                "output_blocks_8_0_out_layers_3",
                "up_blocks_2_resnets_2_conv2",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
            ("out_2", "conv_out"),
        ] {
            assert_eq!(
                sgm_to_diffusers(sgm, &sdxl).as_deref(),
                Some(diffusers),
                "{sgm}"
            );
        }
        // An up block without attention has its upsampler at `.1` (SD1.5's first up block).
        let sd15 = blocks(&[2, 2, 2, 2]);
        assert_eq!(
            sgm_to_diffusers("output_blocks_2_1_conv", &sd15).as_deref(),
            Some("up_blocks_0_upsamplers_0_conv")
        );
        assert_eq!(
            sgm_to_diffusers("input_blocks_11_0_in_layers_2", &sd15).as_deref(),
            Some("down_blocks_3_resnets_1_conv1")
        );
        // Diffusers names are not sgm names; indexes past the layout are none.
        assert_eq!(
            sgm_to_diffusers("down_blocks_0_resnets_0_conv1", &sdxl),
            None
        );
        assert_eq!(
            sgm_to_diffusers("input_blocks_9_0_in_layers_2", &sdxl),
            None
        );
        assert_eq!(
            sgm_to_diffusers("output_blocks_9_0_in_layers_2", &sdxl),
            None
        );
    }

    #[test]
    fn file_prefixes_name_their_component_and_module() {
        let sdxl = blocks(&[2, 2, 2]);
        for (prefix, component, key) in [
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                "unet",
                "down_blocks_0_attentions_0_proj_in",
            ),
            (
                "lora_unet_input_blocks_1_0_in_layers_2",
                "unet",
                "down_blocks_0_resnets_0_conv1",
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                "text_encoder",
                "encoder_layers_0_self_attn_q_proj",
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                "text_encoder",
                "encoder_layers_0_mlp_fc1",
            ),
            (
                "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
                "text_encoder_2",
                "encoder_layers_1_self_attn_k_proj",
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                "unet",
                "mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
            ),
            (
                "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
                "text_encoder_2",
                "encoder_layers_1_self_attn_out_proj",
            ),
            (
                "text_encoder.encoder.layers.1.self_attn.out_proj",
                "text_encoder",
                "encoder_layers_1_self_attn_out_proj",
            ),
        ] {
            assert_eq!(
                module_key(prefix, &sdxl),
                Some((component, key.to_string())),
                "{prefix}"
            );
        }
        assert_eq!(module_key("lora_vae_decoder_conv_in", &sdxl), None);
        // What the models ask for meets those keys.
        assert_eq!(
            request_key("text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight").as_deref(),
            Some("encoder_layers_0_mlp_fc1")
        );
        assert_eq!(request_key("unet", "conv_in.bias"), None);
    }

    #[test]
    fn a_linear_lora_adds_multiplier_alpha_over_rank_up_down() {
        let dir = tempfile::tempdir().unwrap();
        // rank 2, in 3, out 2; alpha 1 -> scale 0.5.
        let down = t(&[1., 0., 2., 0., 1., -1.], &[2, 3]);
        let up = t(&[1., 2., 3., 4.], &[2, 2]);
        let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let path = write(
            dir.path(),
            "a.safetensors",
            &[
                (
                    &format!("{key}.lora_down.weight"),
                    down.to_dtype(DType::F16).unwrap(),
                ),
                (
                    &format!("{key}.lora_up.weight"),
                    up.to_dtype(DType::F16).unwrap(),
                ),
                (
                    &format!("{key}.alpha"),
                    Tensor::new(1f32, &Device::Cpu).unwrap(),
                ),
            ],
            None,
        );
        let base = t(&[0.5; 6], &[2, 3]);
        let set = open(&[LoraFile::new(&path, 0.8)], false).unwrap();
        let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
        let out = merged(&set, "unet", name, &base);
        // up @ down = [[1, 2, 0], [3, 4, 2]]; times 0.8 * 0.5 = 0.4.
        close(&values(&out), &[0.9, 1.3, 0.5, 1.7, 2.1, 1.3]);
        set.check_matched(&["unet", "text_encoder"]).unwrap();
        // Without `.alpha`, alpha = rank: scale 1.
        let path = write(
            dir.path(),
            "b.safetensors",
            &[
                (&format!("{key}.lora_down.weight"), down.clone()),
                (&format!("{key}.lora_up.weight"), up.clone()),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&path, 1.0)], false).unwrap();
        close(
            &values(&merged(&set, "unet", name, &base)),
            &[1.5, 2.5, 0.5, 3.5, 4.5, 2.5],
        );
        // Two files add their deltas.
        let set = open(
            &[LoraFile::new(&path, 1.0), LoraFile::new(&path, -1.0)],
            false,
        )
        .unwrap();
        close(&values(&merged(&set, "unet", name, &base)), &[0.5; 6]);
    }

    #[test]
    fn a_locon_conv_delta_is_up_times_flattened_down_reshaped() {
        let dir = tempfile::tempdir().unwrap();
        let down: Vec<f32> = (0..2 * 2 * 9).map(|i| (i as f32 - 17.0) * 0.1).collect();
        let up = [1., -1., 0.5, 2., 0., 1.];
        let key = "lora_unet_down_blocks_0_resnets_0_conv1";
        let path = write(
            dir.path(),
            "c.safetensors",
            &[
                (&format!("{key}.lora_down.weight"), t(&down, &[2, 2, 3, 3])),
                (&format!("{key}.lora_up.weight"), t(&up, &[3, 2, 1, 1])),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&path, 1.0)], false).unwrap();
        let base = Tensor::zeros((3, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let out = merged(&set, "unet", "down_blocks.0.resnets.0.conv1.weight", &base);
        assert_eq!(out.dims(), [3, 2, 3, 3]);
        let mut expected = vec![0f32; 3 * 18];
        for o in 0..3 {
            for c in 0..18 {
                expected[o * 18 + c] = (0..2).map(|r| up[o * 2 + r] * down[r * 18 + c]).sum();
            }
        }
        close(&values(&out), &expected);
    }

    #[test]
    fn peft_alpha_comes_from_the_metadata_else_it_is_the_rank() {
        let dir = tempfile::tempdir().unwrap();
        let key = "text_encoder.text_model.encoder.layers.0.mlp.fc1";
        let tensors = [
            (
                format!("{key}.lora_A.weight"),
                t(&[1., 1., 1., 1.], &[2, 2]),
            ),
            (
                format!("{key}.lora_B.weight"),
                t(&[1., 0., 0., 1.], &[2, 2]),
            ),
        ];
        let tensors: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let metadata = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"text_encoder.r": 2, "text_encoder.lora_alpha": 1.0}"#.to_string(),
        )]);
        let with = write(dir.path(), "p.safetensors", &tensors, Some(metadata));
        let without = write(dir.path(), "q.safetensors", &tensors, None);
        let base = t(&[0.; 4], &[2, 2]);
        let name = "text_model.encoder.layers.0.mlp.fc1.weight";
        let set = open(&[LoraFile::new(&with, 1.0)], false).unwrap();
        close(
            &values(&merged(&set, "text_encoder", name, &base)),
            &[0.5; 4],
        );
        let set = open(&[LoraFile::new(&without, 1.0)], false).unwrap();
        close(
            &values(&merged(&set, "text_encoder", name, &base)),
            &[1.0; 4],
        );
        // rsLoRA divides by the square root of the rank.
        let metadata = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"text_encoder.lora_alpha": 2.0, "text_encoder.use_rslora": true}"#.to_string(),
        )]);
        let rs = write(dir.path(), "r.safetensors", &tensors, Some(metadata));
        let set = open(&[LoraFile::new(&rs, 1.0)], false).unwrap();
        close(
            &values(&merged(&set, "text_encoder", name, &base)),
            &[std::f32::consts::SQRT_2; 4],
        );
    }

    #[test]
    fn unmatched_modules_are_an_error_listing_them_unless_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let key = "lora_te2_text_model_encoder_layers_0_mlp_fc1";
        let path = write(
            dir.path(),
            "u.safetensors",
            &[
                (&format!("{key}.lora_down.weight"), t(&[1., 1.], &[1, 2])),
                (&format!("{key}.lora_up.weight"), t(&[1., 1.], &[2, 1])),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&path, 1.0)], false).unwrap();
        let message = set
            .check_matched(&["text_encoder", "unet"])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(key) && message.contains("u.safetensors"),
            "{message}"
        );
        let set = open(&[LoraFile::new(&path, 1.0)], true).unwrap();
        set.check_matched(&["text_encoder", "unet"]).unwrap();
    }

    #[test]
    fn dora_and_unknown_layouts_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = "lora_unet_conv_in";
        let dora = write(
            dir.path(),
            "d.safetensors",
            &[
                (&format!("{key}.lora_down.weight"), t(&[1., 1.], &[1, 2])),
                (&format!("{key}.lora_up.weight"), t(&[1., 1.], &[2, 1])),
                (&format!("{key}.dora_scale"), t(&[1., 1.], &[2, 1])),
            ],
            None,
        );
        let message = open(&[LoraFile::new(&dora, 1.0)], false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("DoRA") && message.contains(key),
            "{message}"
        );
        let odd = write(
            dir.path(),
            "o.safetensors",
            &[("lora_unet_conv_in.oft_blocks", t(&[1.], &[1]))],
            None,
        );
        let message = open(&[LoraFile::new(&odd, 1.0)], false)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("oft_blocks"), "{message}");
        let half = write(
            dir.path(),
            "h.safetensors",
            &[(&format!("{key}.lora_down.weight"), t(&[1., 1.], &[1, 2]))],
            None,
        );
        let message = open(&[LoraFile::new(&half, 1.0)], false)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("lora_down"), "{message}");
    }

    #[test]
    fn loha_is_the_elementwise_product_of_two_low_rank_products() {
        let dir = tempfile::tempdir().unwrap();
        let key = "lora_unet_conv_in";
        let (w1a, w1b) = ([1., 2., 3., 4.], [1., 0., 0., 1.]);
        let (w2a, w2b) = ([2., 0., 0., 2.], [1., 1., 1., 1.]);
        let path = write(
            dir.path(),
            "l.safetensors",
            &[
                (&format!("{key}.hada_w1_a"), t(&w1a, &[2, 2])),
                (&format!("{key}.hada_w1_b"), t(&w1b, &[2, 2])),
                (&format!("{key}.hada_w2_a"), t(&w2a, &[2, 2])),
                (&format!("{key}.hada_w2_b"), t(&w2b, &[2, 2])),
                (
                    &format!("{key}.alpha"),
                    Tensor::new(1f32, &Device::Cpu).unwrap(),
                ),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&path, 1.0)], false).unwrap();
        let base = t(&[0.; 4], &[2, 2]);
        // (w1a @ w1b) = [[1, 2], [3, 4]], (w2a @ w2b) = [[2, 2], [2, 2]]; scale 1 / 2.
        close(
            &values(&merged(&set, "unet", "conv_in.weight", &base)),
            &[1., 2., 3., 4.],
        );
    }

    #[test]
    fn the_tucker_rebuild_is_lycoris_einsum() {
        // einsum("i j k l, j r, i p -> p r k l", t, b, a) written out.
        let (i, j, k, p, r) = (2, 3, 2, 2, 2);
        let tv: Vec<f32> = (0..i * j * k * k).map(|x| x as f32 * 0.1 - 0.5).collect();
        let av: Vec<f32> = (0..i * p).map(|x| x as f32 - 1.0).collect();
        let bv: Vec<f32> = (0..j * r).map(|x| 0.5 * x as f32).collect();
        let out = tucker(&t(&tv, &[i, j, k, k]), &t(&av, &[i, p]), &t(&bv, &[j, r])).unwrap();
        assert_eq!(out.dims(), [p, r, k, k]);
        let mut expected = vec![0f32; p * r * k * k];
        for pp in 0..p {
            for rr in 0..r {
                for kk in 0..k * k {
                    let mut sum = 0.0;
                    for ii in 0..i {
                        for jj in 0..j {
                            sum +=
                                tv[(ii * j + jj) * k * k + kk] * bv[jj * r + rr] * av[ii * p + pp];
                        }
                    }
                    expected[(pp * r + rr) * k * k + kk] = sum;
                }
            }
        }
        close(&values(&out), &expected);
    }

    #[test]
    fn lokr_is_a_kronecker_product_scaled_only_with_low_rank_factors() {
        let dir = tempfile::tempdir().unwrap();
        let key = "lora_unet_conv_in";
        let w1 = t(&[1., 2.], &[1, 2]);
        let w2 = t(&[1., 0., 0., 1.], &[2, 2]);
        let full = write(
            dir.path(),
            "k.safetensors",
            &[
                (&format!("{key}.lokr_w1"), w1.clone()),
                (&format!("{key}.lokr_w2"), w2.clone()),
                (
                    &format!("{key}.alpha"),
                    Tensor::new(8f32, &Device::Cpu).unwrap(),
                ),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&full, 1.0)], false).unwrap();
        let base = t(&[0.; 8], &[2, 4]);
        // kron([[1, 2]], I2) = [[1, 0, 2, 0], [0, 1, 0, 2]]; no low-rank factor: scale 1.
        let expected = [1., 0., 2., 0., 0., 1., 0., 2.];
        close(
            &values(&merged(&set, "unet", "conv_in.weight", &base)),
            &expected,
        );
        // w2 as a rank-1 product [[1], [1]] @ [[1, 1]] with alpha 0.5: scale 0.5.
        let low = write(
            dir.path(),
            "k2.safetensors",
            &[
                (&format!("{key}.lokr_w1"), w1),
                (&format!("{key}.lokr_w2_a"), t(&[1., 1.], &[2, 1])),
                (&format!("{key}.lokr_w2_b"), t(&[1., 1.], &[1, 2])),
                (
                    &format!("{key}.alpha"),
                    Tensor::new(0.5f32, &Device::Cpu).unwrap(),
                ),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&low, 1.0)], false).unwrap();
        close(
            &values(&merged(&set, "unet", "conv_in.weight", &base)),
            &[0.5, 0.5, 1., 1., 0.5, 0.5, 1., 1.],
        );
    }

    #[test]
    fn a_delta_of_the_wrong_shape_is_an_error_naming_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let key = "lora_unet_conv_in";
        let path = write(
            dir.path(),
            "s.safetensors",
            &[
                (
                    &format!("{key}.lora_down.weight"),
                    t(&[1., 1., 1.], &[1, 3]),
                ),
                (&format!("{key}.lora_up.weight"), t(&[1., 1.], &[2, 1])),
            ],
            None,
        );
        let set = open(&[LoraFile::new(&path, 1.0)], false).unwrap();
        let map = HashMap::from([("conv_in.weight".to_string(), t(&[0.; 4], &[2, 2]))]);
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let message = set
            .wrap("unet", vb)
            .get((2, 2), "conv_in.weight")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(key) && message.contains("[2, 3]"),
            "{message}"
        );
    }

    #[test]
    fn lora_specs_take_an_optional_weight_after_the_last_colon() {
        assert_eq!(
            LoraFile::parse("a.safetensors").unwrap(),
            LoraFile::new("a.safetensors", 1.0)
        );
        assert_eq!(
            LoraFile::parse("dir/a.safetensors:0.6").unwrap(),
            LoraFile::new("dir/a.safetensors", 0.6)
        );
        assert_eq!(
            LoraFile::parse(r"C:\loras\a.safetensors").unwrap(),
            LoraFile::new(r"C:\loras\a.safetensors", 1.0)
        );
        assert!(LoraFile::parse("").is_err());
        assert!(LoraFile::parse(":0.5").is_err());
        assert!(LoraFile::parse("a:NaN").is_err());
    }

    #[test]
    fn the_addnet_hash_skips_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}abc");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            addnet_hash(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
