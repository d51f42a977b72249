//! Times one latent decode with a tiny autoencoder against the full SD1.5 VAE at 512x512 and
//! 1024x1024, on the CPU in f32.
//!
//! `cargo run --release --example decode_timing [-- <taesd folder>]` (default: the full-size
//! random-weight TAESD of the test fixtures). The full VAE is built from the published SD1.5 VAE
//! configuration with zero weights: the arithmetic, and so the time, is the same as with real ones.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdrs_taesd::AutoencoderTiny;
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig};

/// The VAE configuration of stable-diffusion-v1-5 (also SDXL's, but for the scaling factor).
const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

fn main() -> Result<()> {
    let device = Device::Cpu;
    let taesd_dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/taesd").into());
    let tiny = AutoencoderTiny::from_dir(&taesd_dir, DType::F32, &device)?;
    let config: AutoencoderKLConfig = serde_json::from_str(SD15_VAE_CONFIG)?;
    let vae = AutoencoderKL::new(VarBuilder::zeros(DType::F32, &device), &config)?;

    println!("| size | tiny autoencoder decode | full VAE decode | ratio |");
    println!("|---|---|---|---|");
    for size in [512usize, 1024] {
        let latents = Tensor::randn(0f32, 1.0, (1, 4, size / 8, size / 8), &device)?;
        let start = Instant::now();
        tiny.decode(&latents)?;
        let tiny_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        vae.decode(&latents)?;
        let full_s = start.elapsed().as_secs_f64();
        println!(
            "| {size}x{size} | {tiny_s:.2} s | {full_s:.2} s | {:.0}x |",
            full_s / tiny_s
        );
    }
    Ok(())
}
