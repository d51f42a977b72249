//! `sdrs coreml`: Apple Core ML models on every OS: `inspect` a package, a compiled model or a
//! resources folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use sdrs_coreml::inspect::{inspect, Inspection, ModelReport, DEFAULT_ANE_BUDGET_BYTES};

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
