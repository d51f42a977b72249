//! `sdrs`: the command-line front end (generate images, check parity against diffusers).

mod bench;
mod coreml;
mod coreml_backend;
mod embeddings;
mod generate;
mod hub;
mod input;
mod lora;
mod output;
mod parity;
mod progress;
mod quantize;
mod quantize_analyze;
mod roundtrip;
mod selfcheck;
mod serve;
mod system;
mod trace;
mod vae_tiling;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Stable Diffusion in pure Rust.
#[derive(Debug, Parser)]
#[command(name = "sdrs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an image from a text prompt.
    Generate(Box<generate::GenerateArgs>),
    /// Check sdrs against diffusers' reference outputs in a fixtures folder.
    Parity(parity::ParityArgs),
    /// Encode an image and decode it back with an autoencoder; print MAE, RMSE and PSNR.
    Roundtrip(roundtrip::RoundtripArgs),
    /// Time the text encoder, a UNet step, the VAE and TAESD decodes and a whole generation.
    Bench(bench::BenchArgs),
    /// Check our CUDA kernels against the CPU kernels on the GPU (for a GPU machine without Rust).
    Selfcheck(selfcheck::SelfcheckArgs),
    /// Write a model with quantized weights (palettized, int8/int4, GGUF), or a mixed-bit recipe.
    Quantize(Box<quantize::QuantizeArgs>),
    /// Download a model from Hugging Face into the cache ahead of time; print where it is.
    Pull(hub::PullArgs),
    /// List the models in the Hugging Face cache with their revisions and sizes on disk.
    Models(hub::ModelsArgs),
    /// Apple Core ML models: inspect, chunk and palettize `.mlpackage` files (on every OS).
    Coreml(coreml::CoremlArgs),
    /// Serve loaded models over HTTP: AUTOMATIC1111's API, /api/generate and a web page.
    Serve(Box<serve::ServeArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sdrs_kernels::memory::keep_freed_memory();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Parity(args) => parity::run(args),
        Command::Roundtrip(args) => roundtrip::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Selfcheck(args) => selfcheck::run(args),
        Command::Quantize(args) => quantize::run(*args),
        Command::Pull(args) => hub::run_pull(args),
        Command::Models(args) => hub::run_models(args),
        Command::Coreml(args) => coreml::run(args),
        Command::Serve(args) => serve::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(error)
            if matches!(
                error.downcast_ref::<sdrs_pipeline::Error>(),
                Some(sdrs_pipeline::Error::Cancelled)
            ) =>
        {
            eprintln!("interrupted: stopped at the end of a step, no image written");
            ExitCode::from(output::INTERRUPTED_EXIT)
        }
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: library errors often say their cause in their own
/// message already, and `{:#}` would repeat it.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    if text.contains("CUDA_ERROR_OUT_OF_MEMORY") {
        text.push_str(
            "\nthe GPU ran out of memory: a smaller -W/-H, --attention sliced \
             or --dtype f16 needs less (`sdrs bench --device cuda --size N` prints the peak GPU \
             memory a size needs), and --device cpu needs none",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::describe;

    /// An error that says its cause in its own message, as the library errors do.
    #[derive(Debug)]
    struct Outer {
        source: std::io::Error,
    }

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "outer: {}", self.source)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn out_of_gpu_memory_says_what_needs_less() {
        let error = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let text = describe(&error.context("vae decode"));
        assert!(
            text.contains("--attention sliced") && text.contains("-W/-H"),
            "{text}"
        );
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::other("disk on fire");
        let error = anyhow::Error::new(Outer { source: io() }).context("cannot load");
        assert_eq!(describe(&error), "cannot load: outer: disk on fire");
        let error = anyhow::Error::new(io()).context("cannot load");
        assert_eq!(describe(&error), "cannot load: disk on fire");
    }
}
