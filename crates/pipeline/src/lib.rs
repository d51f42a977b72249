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

/// The pipeline module under its earlier name (`sdrs_pipeline::stable_diffusion::...`).
pub use pipeline as stable_diffusion;
pub use pipeline::{components, preview, refiner};

pub use builtin::BuiltinModel;
pub use device::{dtype_name, parse_device, parse_dtype, resolve_dtype, DeviceChoice, DtypeChoice};
pub use error::{Error, Result};
pub use model_files::ModelFiles;
pub use pipeline::components::{
    AddedConditions, Denoiser, LatentDecoder, LatentEncoder, PromptEncoder, TextEmbeddings,
    TextLayer,
};
pub use pipeline::{
    Conditioning, InitImage, LoadOptions, MicroConditioning, ModelFamily, NativeSize, Refiner,
    Request, StableDiffusion, StepProgress,
};
