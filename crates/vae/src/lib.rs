//! diffusers' `AutoencoderKL` for sdrs: encodes images to the latent distribution and decodes
//! latents back to images (SD1.x, SD2.x and SDXL VAEs).

pub mod autoencoder_kl;
pub mod config;
pub mod error;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, DiagonalGaussian};
pub use config::AutoencoderKLConfig;
pub use error::{Error, Result};
