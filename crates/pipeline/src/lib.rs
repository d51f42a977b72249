//! Stable Diffusion pipelines for sdrs: loading diffusers model folders and single checkpoints, and
//! text-to-image and image-to-image with classifier-free guidance (the parity runner against
//! diffusers' reference outputs is in `sdrs-tooling`).

mod conditioning;
pub mod device;
pub mod error;
pub mod loading;
pub mod preview;
pub mod random_weights;
pub mod stable_diffusion;

// The loading modules kept at their former paths (`sdrs_pipeline::single_file`, ...).
pub use loading::{builtin, checkpoint, model_files, single_file, tensor_files, weights};

pub use builtin::BuiltinModel;
pub use conditioning::MicroConditioning;
pub use device::{dtype_name, parse_device, parse_dtype, resolve_dtype};
pub use error::{Error, Result};
pub use model_files::ModelFiles;
pub use stable_diffusion::{
    InitImage, LoadOptions, ModelFamily, Request, StableDiffusion, StepProgress,
};
