//! `sdrs coreml`: Apple Core ML models on every OS: `inspect` a package, a compiled model or a
//! resources folder; `chunk` a UNet as coremltools' `bisect_model` does; `palettize` (or linearly
//! quantize) a package's weights as coremltools' compression passes do.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use sdrs_coreml::chunk::{chunk_package, ChunkOptions};
use sdrs_coreml::inspect::{inspect, Inspection, ModelReport, DEFAULT_ANE_BUDGET_BYTES};
use sdrs_coreml::palettize::{
    compress_package, CompressOptions, Granularity, LinearDtype, Mode, Recipe,
    DEFAULT_WEIGHT_THRESHOLD,
};

#[derive(Debug, Args)]
pub struct CoremlArgs {
    #[command(subcommand)]
    pub command: CoremlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CoremlCommand {
    /// Inputs, outputs, op counts and weight bytes of a model; for a resources folder, which
    /// pipeline it holds and whether each model fits the Neural Engine budget.
    Inspect(InspectArgs),
    /// Split a UNet package into chunks whose weights each fit a budget, as coremltools'
    /// `bisect_model` (Apple's `--chunk-unet`) does: `UnetChunk1.mlpackage`, `UnetChunk2...`.
    Chunk(ChunkArgs),
    /// Rewrite a package's weights with k-means lookup tables (or linear int8/int4), as
    /// coremltools' `palettize_weights` / `linear_quantize_weights` do.
    Palettize(PalettizeArgs),
}

#[derive(Debug, Args)]
pub struct ChunkArgs {
    /// The `.mlpackage` to split (an ML program with one `main` function).
    pub package: PathBuf,
    /// Folder for the chunks (default: beside the package).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Number of chunks (default 2, the cut coremltools makes).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64), conflicts_with = "max_chunk_bytes")]
    pub chunks: Option<u64>,
    /// Largest weight size of one chunk: picks the fewest chunks that fit (e.g. `1073741824`,
    /// or with a unit: `1GiB`, `900MB`).
    #[arg(long, value_parser = crate::system::parse_bytes)]
    pub max_chunk_bytes: Option<u64>,
    /// Name of the chunk packages: `<prefix>1.mlpackage`, ...
    #[arg(long, default_value = "UnetChunk")]
    pub prefix: String,
}

#[derive(Debug, Args)]
pub struct PalettizeArgs {
    /// The `.mlpackage` whose weights to compress.
    pub package: PathBuf,
    /// Bits per palette index: 1, 2, 3, 4, 6 or 8 (k-means lookup tables).
    #[arg(long, conflicts_with_all = ["int8", "int4", "recipe"])]
    pub nbits: Option<u32>,
    /// One lookup table per tensor, or per `G` output channels (`grouped:G`; needs an iOS18 /
    /// specification 9 package).
    #[arg(long, default_value = "per-tensor", value_parser = parse_granularity)]
    pub granularity: Granularity,
    /// A mixed-bit recipe: a JSON object mapping weight (const op) names to bits, 16 = keep fp16.
    #[arg(long, conflicts_with_all = ["int8", "int4"])]
    pub recipe: Option<PathBuf>,
    /// Linear symmetric int8 instead of a palette (per output channel, or per `--block-size`).
    #[arg(long, conflicts_with = "int4")]
    pub int8: bool,
    /// Linear symmetric int4 in blocks of `--block-size` input channels (iOS18 packages).
    #[arg(long)]
    pub int4: bool,
    /// Block size along the input channels for `--int8`/`--int4` (iOS18 packages).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub block_size: Option<u64>,
    /// Weights of at most this many elements stay dense.
    #[arg(long, default_value_t = DEFAULT_WEIGHT_THRESHOLD as u64)]
    pub weight_threshold: u64,
    /// The package to write (default: beside the input, `<name>_<mode>.mlpackage`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// `per-tensor` or `grouped:G`.
fn parse_granularity(s: &str) -> Result<Granularity, String> {
    if s == "per-tensor" {
        return Ok(Granularity::PerTensor);
    }
    match s.strip_prefix("grouped:").map(str::parse::<usize>) {
        Some(Ok(g)) if g > 0 => Ok(Granularity::PerGroupedChannel { group_size: g }),
        _ => Err(format!(
            "{s:?}: expected per-tensor or grouped:G with G output channels per table (e.g. grouped:16)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An `.mlpackage`, an `.mlmodelc`, or a resources folder of them (Apple's `Resources`).
    pub path: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Weight bytes one model may have to run on the Neural Engine, in MiB (Apple's guidance for
    /// iOS/iPadOS: under 1 GiB; larger models can fall back to the CPU without a word).
    #[arg(long, default_value_t = DEFAULT_ANE_BUDGET_BYTES >> 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub ane_budget_mb: u64,
}

pub fn run(args: CoremlArgs) -> Result<ExitCode> {
    match args.command {
        CoremlCommand::Inspect(a) => run_inspect(a),
        CoremlCommand::Chunk(a) => run_chunk(a),
        CoremlCommand::Palettize(a) => run_palettize(a),
    }
}

fn run_inspect(args: InspectArgs) -> Result<ExitCode> {
    let report = inspect(&args.path, args.ane_budget_mb << 20)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_chunk(args: ChunkArgs) -> Result<ExitCode> {
    let out_dir = match &args.output {
        Some(o) => o.clone(),
        None => args
            .package
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let opts = ChunkOptions {
        chunks: args.chunks.map(|n| n as usize),
        max_chunk_bytes: args.max_chunk_bytes,
        prefix: args.prefix.clone(),
    };
    let report = chunk_package(&args.package, &out_dir, &opts)?;
    for (i, cut) in report.incisions.iter().enumerate() {
        let tensors = report.cut_tensors.get(i).map_or(0, |t| t.len());
        eprintln!(
            "cut {}: after op {} ({}, index {} of {}), {tensors} tensors cross it",
            i + 1,
            cut.name,
            cut.op_type,
            cut.index,
            cut.n_ops
        );
    }
    for c in &report.chunks {
        println!(
            "saved {} ({} of weights, {} inputs, {} outputs)",
            c.path.display(),
            mib(c.const_bytes),
            c.inputs.len(),
            c.outputs.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_palettize(args: PalettizeArgs) -> Result<ExitCode> {
    let block_size = args.block_size.map(|b| b as usize);
    let (mode, label) = if args.int8 || args.int4 {
        let dtype = if args.int4 {
            LinearDtype::Int4
        } else {
            LinearDtype::Int8
        };
        let name = if args.int4 { "int4" } else { "int8" };
        let label = match block_size {
            Some(b) => format!("{name}_block{b}"),
            None => format!("{name}_perchannel"),
        };
        (Mode::Linear { dtype, block_size }, label)
    } else if let Some(recipe) = &args.recipe {
        (
            Mode::Recipe(Recipe::from_json_file(recipe)?),
            "mixedbit".to_string(),
        )
    } else {
        let Some(nbits) = args.nbits else {
            anyhow::bail!("say what to do: --nbits 1|2|3|4|6|8, --recipe FILE, --int8 or --int4");
        };
        if block_size.is_some() {
            anyhow::bail!(
                "--block-size is for --int8/--int4; palettes use --granularity grouped:G"
            );
        }
        let label = match &args.granularity {
            Granularity::PerTensor => format!("pal{nbits}"),
            Granularity::PerGroupedChannel { group_size } => {
                format!("pal{nbits}_group{group_size}")
            }
        };
        (
            Mode::Palettize {
                nbits,
                granularity: args.granularity.clone(),
            },
            label,
        )
    };
    let output = match &args.output {
        Some(o) => o.clone(),
        None => {
            let stem = args
                .package
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            args.package
                .with_file_name(format!("{stem}_{label}.mlpackage"))
        }
    };
    let opts = CompressOptions {
        mode,
        weight_threshold: args.weight_threshold as usize,
    };
    let report = compress_package(&args.package, &output, &opts)?;
    for s in &report.skipped {
        eprintln!("kept {} dense: {}", s.weight, s.reason);
    }
    println!(
        "saved {}: {} weights compressed ({} by coremltools' exact k-means), {} kept; weights {} -> {}",
        output.display(),
        report.compressed,
        report.exact_kmeans,
        report.kept,
        mib(report.weight_bytes_before),
        mib(report.weight_bytes_after)
    );
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn render(r: &Inspection) -> String {
    let mut out = String::new();
    if let Some(f) = &r.folder {
        out += &format!(
            "{}: {} pipeline, UNet {}, attention {}, tokenizer files {}\n  models: {}\n",
            f.path.display(),
            f.pipeline,
            if f.chunked { "chunked" } else { "in one piece" },
            f.attention,
            if f.tokenizer {
                "present"
            } else {
                "missing (vocab.json, merges.txt)"
            },
            f.models.join(", ")
        );
    }
    for m in &r.models {
        out += &render_model(m, r);
    }
    out
}

fn render_model(m: &ModelReport, r: &Inspection) -> String {
    let mut out = format!(
        "\n{} ({}, specification {}, {}{})\n",
        m.path.display(),
        m.format,
        m.specification_version,
        m.model_type,
        m.opset
            .as_ref()
            .map(|o| format!(", opset {o}"))
            .unwrap_or_default()
    );
    for (label, list) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
        out += &format!("  {label}:\n");
        for f in list {
            out += &format!("    {} {} {} {:?}\n", f.name, f.kind, f.dtype, f.shape);
        }
    }
    let total: usize = m.ops.values().sum();
    out += &format!(
        "  ops: {total}{}\n",
        m.const_ops
            .map(|c| format!(" (plus {c} const)"))
            .unwrap_or_default()
    );
    let mut ops: Vec<_> = m.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let line: Vec<String> = ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out += &format!("    {}\n", line.join(", "));
    if !m.weights.is_empty() {
        out += "  weights:\n";
        for (kind, w) in &m.weights {
            if kind.starts_with("constexpr_") {
                out += &format!(
                    "    {kind}: {} weights, {} stored for {} dense ({:.2}x smaller)\n",
                    w.count,
                    mib(w.stored),
                    mib(w.dense),
                    w.dense as f64 / w.stored.max(1) as f64
                );
            } else {
                out += &format!("    {kind}: {} constants, {}\n", w.count, mib(w.stored));
            }
        }
    }
    out += &format!(
        "  weight file: {}; Neural Engine budget {}: {}\n",
        mib(m.weight_file_bytes),
        mib(r.ane_budget_bytes),
        if r.fits_ane(m) {
            "fits"
        } else {
            "too large (chunk or palettize it)"
        }
    );
    for (k, v) in &m.metadata {
        out += &format!("  {k}: {v}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_is_per_tensor_or_grouped() {
        assert_eq!(parse_granularity("per-tensor"), Ok(Granularity::PerTensor));
        assert_eq!(
            parse_granularity("grouped:16"),
            Ok(Granularity::PerGroupedChannel { group_size: 16 })
        );
        assert!(parse_granularity("grouped:0").is_err());
        assert!(parse_granularity("per-channel").is_err());
    }
}
