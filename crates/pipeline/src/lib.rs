//! Stable Diffusion pipelines for sdrs: loading diffusers model folders, text-to-image and
//! image-to-image with classifier-free guidance, and the parity checks against diffusers' reference
//! outputs.

pub mod bench;
pub mod builtin;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod model_files;
pub mod parity;
pub mod pipeline;
pub mod single_file;
pub mod tensor_files;
pub mod weights;

pub use builtin::BuiltinModel;
pub use device::{dtype_name, parse_device, parse_dtype, resolve_dtype};
pub use error::{Error, Result};
pub use model_files::ModelFiles;
/// The pipeline module under its earlier name (`sdrs_pipeline::stable_diffusion::...`).
pub use pipeline as stable_diffusion;
pub use pipeline::preview;
pub use pipeline::MicroConditioning;
pub use pipeline::{InitImage, LoadOptions, ModelFamily, Request, StableDiffusion, StepProgress};
