//! diffusers' `AutoencoderKL` for sdrs: encodes images to the latent distribution and decodes
//! latents back to images (SD1.x, SD2.x and SDXL VAEs).
//!
//! Tracing spans (no subscriber is installed here): `vae.encoder` / `vae.decoder`, with
//! `vae.down_block` / `vae.up_block` (field `index`) and `vae.mid_block` inside, at info level;
//! the mid block's `attention` at trace level.

pub mod autoencoder_kl;
pub mod config;
pub mod error;
pub mod tiling;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, DiagonalGaussian};
pub use config::AutoencoderKLConfig;
pub use error::{Error, Result};
pub use tiling::{TilePlan, VaeTiling};
