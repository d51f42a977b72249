//! `sdrs`: the command-line front end (generate images, check parity against diffusers).

mod bench;
mod generate;
mod input;
mod output;
mod parity;
mod progress;
mod roundtrip;
mod system;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Parity(args) => parity::run(args),
        Command::Roundtrip(args) => roundtrip::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
