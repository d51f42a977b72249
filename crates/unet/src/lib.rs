//! diffusers' `UNet2DConditionModel` for sdrs (SD1.x, SD2.x, SDXL base and refiner). The building
//! blocks it shares with the VAE (activations, resnets, resamplers, the attention layer) are in
//! `sdrs-blocks`; the transformers, the cross-attention stages and the embeddings are here.

pub mod attention;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

// The shared blocks, at the paths this crate exposed them at before they moved to sdrs-blocks.
pub use sdrs_blocks::{activations, resnet};

pub use attention::scaled_dot_product_attention;
pub use config::{OneOrMany, UNet2DConditionConfig};
pub use error::{Error, Result};
pub use sdrs_blocks::Activation;
pub use unet_2d_condition::{AddedConditions, UNet2DConditionModel};
