//! `sdrs quantize`: writes a model with compressed weights, either as a diffusers folder whose
//! quantized layers are stored as lookup tables and packed indices (or int8/int4 values and
//! scales, or GGUF blocks) that `-m` loads like any other, or as a GGUF single file as
//! stable-diffusion.cpp's converter writes one; `--analyze` measures each layer's sensitivity and
//! writes a mixed-bit recipe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use sdrs_pipeline::checkpoint::TensorSource;
use sdrs_pipeline::loading::export::ModelWeights;
use sdrs_pipeline::loading::quantize::{layer_spec, Recipe, QUANTIZED_COMPONENTS};
use sdrs_pipeline::BuiltinModel;
use sdrs_quant::gguf::{GgmlType, WriteTensor};
use sdrs_quant::QuantSpec;

use crate::quantize_analyze::{psnr_table, Weights};

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model: a diffusers folder, a `.safetensors` or a GGUF checkpoint.
    #[arg(short = 'm', long)]
    pub model: PathBuf,

    /// For a single checkpoint: a diffusers folder of the same family whose configs and
    /// tokenizers to use (default: the built-in ones of its family).
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Where to write: a new folder (`--format sdrs`), a `.gguf` file (`--format gguf`), or the
    /// recipe JSON (`--analyze`). An existing target is never overwritten.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,

    /// What to write: `sdrs` (a diffusers folder with quantized layers) or `gguf` (a single
    /// GGUF file with the checkpoint's original names; needs a single-file model and `--type`).
    #[arg(long, value_enum, default_value = "sdrs")]
    pub format: Format,

    /// Bits per weight: 1, 2, 3, 4, 6 or 8 for kmeans; 8 (int8) or 4 (int4 per block of 32)
    /// for linear.
    #[arg(long, default_value_t = 6)]
    pub bits: u32,

    /// One lookup table per tensor (`per-tensor`) or per G output channels (`grouped:G`).
    #[arg(long, default_value = "per-tensor")]
    pub granularity: String,

    /// kmeans (palettization) or linear (int8 per output channel, int4 per block).
    #[arg(long, value_enum, default_value = "kmeans")]
    pub method: Method,

    /// The whole method as one spec (`kmeans4:grouped16`, `int8:zp`, `q8_0`, ...), instead of
    /// `--method`, `--bits` and `--granularity`.
    #[arg(long, value_parser = crate::generate::parse_quantize)]
    pub quantize: Option<QuantSpec>,

    /// Per-layer bits from a mixed-bit recipe (`--analyze` writes one); its method is the default.
    #[arg(long)]
    pub recipe: Option<PathBuf>,

    /// With `--format gguf`: the block type of the quantized tensors (q8_0, q5_1, q5_0, q4_1,
    /// q4_0, q6_k, q5_k, q4_k, q3_k, q2_k).
    #[arg(long = "type", value_parser = parse_gguf_type)]
    pub gguf_type: Option<GgmlType>,

    /// Measure each UNet layer's sensitivity (PSNR of the UNet's output with that layer alone
    /// palettized at each bit width) and write a mixed-bit recipe to `-o`.
    #[arg(long)]
    pub analyze: bool,

    /// With `--analyze`: the recipe's target average bits per weight.
    #[arg(long)]
    pub target_bits: Option<f64>,

    /// With `--analyze`: the lowest per-layer PSNR (dB) a layer may fall to (instead of
    /// `--target-bits`).
    #[arg(long)]
    pub psnr_floor: Option<f64>,

    /// With `--analyze`: the bit widths tried.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,6,8")]
    pub analyze_bits: Vec<u32>,

    /// With `--analyze` and `--psnr`: the seed of the fixed UNet inputs (and of the random
    /// weights when `-m` names a built-in architecture, `sd15` or `sdxl`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Print the whole UNet's output PSNR against the unquantized model for each of these specs
    /// (comma-separated, e.g. `kmeans8,kmeans6,kmeans4,int8,q8_0`; with `--recipe`, the recipe's
    /// too), writing nothing. `-m` may name a built-in architecture (`sd15`, `sdxl`): its
    /// seeded random weights at full size.
    #[arg(long, value_delimiter = ',', value_parser = crate::generate::parse_quantize)]
    pub psnr: Vec<QuantSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Sdrs,
    Gguf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    Kmeans,
    Linear,
}

fn parse_gguf_type(name: &str) -> Result<GgmlType, String> {
    match name.parse::<QuantSpec>() {
        Ok(QuantSpec::Gguf(ty)) => Ok(ty),
        _ => Err(format!(
            "{name:?} is not a GGUF type sdrs writes; accepted: {}",
            sdrs_quant::spec::GGUF_TYPES.map(|t| t.name()).join(", ")
        )),
    }
}

/// `--quantize` and `--recipe` of `generate` and `bench` resolved: the recipe's method is the
/// default, and a recipe with per-layer bits needs a method that has bit widths.
pub fn resolve(
    spec: Option<QuantSpec>,
    recipe: Option<&Path>,
) -> Result<(Option<QuantSpec>, Option<Arc<Recipe>>)> {
    let Some(path) = recipe else {
        return Ok((spec, None));
    };
    let recipe = Recipe::read(path).with_context(|| format!("--recipe {}", path.display()))?;
    let spec = spec.unwrap_or(recipe.spec);
    if let Some((layer, &bits)) = recipe.layers.iter().next() {
        spec.with_bits(bits).with_context(|| {
            format!(
                "--recipe {} ({layer}) with --quantize {spec}",
                path.display()
            )
        })?;
    }
    Ok((Some(spec), Some(Arc::new(recipe))))
}

impl QuantizeArgs {
    /// The method the flags ask for.
    fn spec(&self) -> Result<QuantSpec> {
        if let Some(spec) = self.quantize {
            return Ok(spec);
        }
        let text = match self.method {
            Method::Kmeans => format!("kmeans{}:{}", self.bits, self.granularity),
            Method::Linear => match self.bits {
                8 => "int8".to_string(),
                4 => "int4:block32".to_string(),
                other => {
                    bail!("--bits {other} with --method linear: accepted 8 (int8) or 4 (int4)")
                }
            },
        };
        text.parse::<QuantSpec>()
            .with_context(|| "--method, --bits and --granularity".to_string())
    }
}

pub fn run(args: QuantizeArgs) -> Result<ExitCode> {
    // A built-in architecture name (`sd15`, `sdxl`) that is not a path: its seeded random
    // weights, for measuring (`--analyze`, `--psnr`) full-size models without files.
    let builtin = (!args.model.exists())
        .then(|| args.model.to_str().and_then(BuiltinModel::from_name))
        .flatten();
    if !args.psnr.is_empty() {
        let (_, recipe) = match &args.recipe {
            Some(path) => resolve(None, Some(path))?,
            None => (None, None),
        };
        return match builtin {
            Some(model) => psnr_table(
                &args.psnr,
                recipe.as_deref(),
                &Weights::Random(model, args.seed),
                args.seed,
            ),
            None => {
                let model = open(&args)?;
                psnr_table(
                    &args.psnr,
                    recipe.as_deref(),
                    &Weights::Model(&model),
                    args.seed,
                )
            }
        };
    }
    let Some(output) = args.output.clone() else {
        bail!("-o/--output is required: the folder, .gguf file or recipe to write");
    };
    if output.exists() {
        bail!(
            "{} already exists; sdrs quantize writes a new file or folder",
            output.display()
        );
    }
    if args.analyze {
        return match builtin {
            Some(model) => {
                crate::quantize_analyze::run(&args, &output, &Weights::Random(model, args.seed))
            }
            None => crate::quantize_analyze::run(&args, &output, &Weights::Model(&open(&args)?)),
        };
    }
    let model = open(&args)?;
    match args.format {
        Format::Sdrs => {
            let (spec, recipe) = match &args.recipe {
                Some(path) => resolve(args.quantize.or(Some(args.spec()?)), Some(path))?,
                None => (Some(args.spec()?), None),
            };
            let spec = spec.context("no quantization method")?;
            write_folder(&model, spec, recipe.as_deref(), &output)?;
            eprintln!("wrote {} ({spec})", output.display());
        }
        Format::Gguf => {
            let ty = args
                .gguf_type
                .context("--format gguf needs --type (q8_0, q4_0, ...)")?;
            let checkpoint = model.checkpoint().context(
                "--format gguf writes the original single-file names: give -m a .safetensors \
                 or GGUF checkpoint, not a diffusers folder",
            )?;
            let counts = write_gguf(checkpoint.tensors().as_ref(), ty, &output)?;
            eprintln!(
                "wrote {} ({}: {} tensors quantized, {} kept)",
                output.display(),
                ty.name(),
                counts.0,
                counts.1
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open(args: &QuantizeArgs) -> Result<ModelWeights> {
    ModelWeights::open(&args.model, args.config.as_deref())
        .with_context(|| format!("cannot open the model at {}", args.model.display()))
}

/// Whether the loaders read tensor `name` as a layer weight (the only tensors quantized): the
/// text encoders' token and position tables (under `embeddings.`) are looked up, not
/// multiplied, and stay dense; the UNet's `time_embedding.linear_1` is a layer like any other.
fn is_layer_weight(name: &str) -> bool {
    name.ends_with(".weight") && !name.contains("embeddings.")
}

/// The spec for `component`'s tensor `name` of `shape`, or `None` when it stays dense.
fn spec_for(
    spec: QuantSpec,
    recipe: Option<&Recipe>,
    component: &str,
    name: &str,
    shape: &[usize],
) -> Result<Option<QuantSpec>> {
    if !QUANTIZED_COMPONENTS.contains(&component) || !is_layer_weight(name) {
        return Ok(None);
    }
    Ok(layer_spec(spec, recipe, component, name, shape)?)
}

/// Writes the diffusers folder `out`: the model's files, and each component's weights with the
/// layers `spec` applies to quantized (see [`sdrs_quant::format`] for how they are stored).
fn write_folder(
    model: &ModelWeights,
    spec: QuantSpec,
    recipe: Option<&Recipe>,
    out: &Path,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".sdrs-quantize-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a folder in {}", parent.display()))?;
    model.write_files(staging.path())?;
    for component in model.components() {
        let tensors = model.tensors(component)?;
        let file = if component.starts_with("text_encoder") {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        let dir = staging.path().join(component);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let (quantized, dense) =
            write_component(tensors.as_ref(), component, spec, recipe, &dir.join(file))?;
        eprintln!("{component}: {quantized} tensors quantized, {dense} kept");
    }
    let staged = staging.keep();
    std::fs::rename(&staged, out)
        .with_context(|| format!("cannot move the written model to {}", out.display()))
}

fn write_component(
    tensors: &dyn TensorSource,
    component: &'static str,
    spec: QuantSpec,
    recipe: Option<&Recipe>,
    path: &Path,
) -> Result<(usize, usize)> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut entries = serde_json::Map::new();
    let (mut quantized, mut dense) = (0, 0);
    for (name, shape) in tensors.shapes() {
        let tensor = tensors
            .load(&name)
            .with_context(|| format!("{component}: cannot read {name}"))?;
        match spec_for(spec, recipe, component, &name, &shape)? {
            Some(spec) => {
                let matrix = spec
                    .quantize(&name, &tensor, DType::F32)
                    .with_context(|| format!("{component}: cannot quantize {name}"))?;
                let (entry, parts) = sdrs_quant::format::to_parts(&name, &shape, &matrix)?;
                entries.insert(name, entry);
                out.extend(parts);
                quantized += 1;
            }
            None => {
                out.push((name, tensor));
                dense += 1;
            }
        }
    }
    let metadata = HashMap::from([(
        sdrs_quant::format::METADATA_KEY.to_string(),
        serde_json::Value::Object(entries).to_string(),
    )]);
    sdrs_quant::format::save_safetensors(&out, metadata, path)?;
    Ok((quantized, dense))
}

/// Writes `tensors` (a checkpoint's, by their original names) as a GGUF file of type `ty`, by
/// stable-diffusion.cpp's converter's rule: a tensor is quantized when its last dimension is a
/// whole number of blocks and it is not a bias or a scale; the others keep their stored type.
fn write_gguf(tensors: &dyn TensorSource, ty: GgmlType, out: &Path) -> Result<(usize, usize)> {
    let mut written = Vec::new();
    let (mut quantized, mut kept) = (0, 0);
    for (name, shape) in tensors.shapes() {
        let tensor = tensors
            .load(&name)
            .with_context(|| format!("cannot read {name}"))?;
        let quantize = !name.ends_with(".bias")
            && !name.ends_with(".scale")
            && shape.last().is_some_and(|&d| d % ty.block_size() == 0);
        let (kind, values) = if quantize {
            quantized += 1;
            (
                ty,
                tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        } else {
            kept += 1;
            let kind = match tensor.dtype() {
                DType::F16 => GgmlType::F16,
                DType::BF16 => GgmlType::BF16,
                _ => GgmlType::F32,
            };
            (
                kind,
                tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        };
        let mut data = Vec::new();
        sdrs_quant::gguf::quantize(kind, &values, &mut data)
            .with_context(|| format!("cannot write {name} as {}", kind.name()))?;
        written.push((name, shape, kind, data));
    }
    let views: Vec<WriteTensor> = written
        .iter()
        .map(|(name, shape, ggml_type, data)| WriteTensor {
            name,
            shape,
            ggml_type: *ggml_type,
            data,
        })
        .collect();
    sdrs_quant::gguf::write_gguf(out, &[], &views)?;
    Ok((quantized, kept))
}
