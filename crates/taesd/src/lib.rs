//! Tiny autoencoders of the TAESD family (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) as diffusers'
//! `AutoencoderTiny`, loadable from the diffusers layout or madebyollin's original files.
//!
//! Tracing spans (no subscriber is installed here): `taesd.encode` and `taesd.decode`, at info
//! level.

pub mod autoencoder_tiny;
pub mod config;
pub mod convert;
pub mod error;
pub mod loader;
pub mod metrics;
pub mod unet_2d_blocks;
pub mod vae;

pub use autoencoder_tiny::{AutoencoderTiny, TinyVariant};
pub use config::AutoencoderTinyConfig;
pub use convert::bare_to_diffusers_key;
pub use error::{BareKeyError, Error, Half, Result};
pub use loader::{detect_layout, Layout};
pub use metrics::{compare_images, ImageMetrics};
pub use sdrs_blocks::Activation;
pub use vae::UpsampleMode;
