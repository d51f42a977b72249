//! diffusers' `UNet2DConditionModel` for sdrs (SD1.x, SD2.x, SDXL base and refiner), with the
//! building blocks (resnets, attention, transformers, resamplers) the VAE reuses.

pub mod activations;
pub mod attention;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod resnet;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use activations::Activation;
pub use attention::scaled_dot_product_attention;
pub use config::{OneOrMany, UNet2DConditionConfig};
pub use error::{Error, Result};
pub use unet_2d_condition::{AddedConditions, UNet2DConditionModel};
