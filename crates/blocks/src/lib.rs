//! The diffusers building blocks that more than one sdrs model uses: the `act_fn` activations,
//! `ResnetBlock2D` and its resamplers, the `Attention` layer with the one
//! [`scaled_dot_product_attention`], and the VAE's encoder/decoder stages of
//! `unet_2d_blocks.py`. The UNet, the VAE and the tiny autoencoders build on them; what only one
//! model uses stays in that model's crate.
//!
//! Each [`Attention`] call opens a trace-level `attention` span (field `cross`); the models open
//! the spans around the blocks, where the block's index is known.

pub mod activations;
pub mod attention;
pub mod error;
pub mod resnet;
pub mod unet_2d_blocks;

pub use activations::Activation;
pub use attention::{scaled_dot_product_attention, Attention, AttentionConfig};
pub use error::{Error, Result};
pub use resnet::{Conv2d, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
pub use unet_2d_blocks::{BlockConfig, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};
