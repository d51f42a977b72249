//! diffusers' `UNet2DConditionModel` for sdrs (SD1.x, SD2.x, SDXL base and refiner). The building
//! blocks it shares with the VAE (activations, resnets, resamplers, the attention layer) are in
//! `sdrs-blocks`; the transformers, the cross-attention stages and the embeddings are here.
//!
//! Tracing spans (no subscriber is installed here): `unet` per forward pass, with
//! `unet.time_embedding`, `unet.down_block` / `unet.up_block` (field `index`) and
//! `unet.mid_block` inside, at info level; `unet.transformer_block` (field `index`, its depth in
//! its `Transformer2DModel`) and `attention` (field `cross`) at trace level.

pub mod attention;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod memory;
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
