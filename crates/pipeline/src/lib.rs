//! Stable Diffusion pipelines for sdrs: loading diffusers model folders and single checkpoints, and
//! text-to-image and image-to-image with classifier-free guidance (the parity runner against
//! diffusers' reference outputs is in `sdrs-tooling`).

pub mod device;
pub mod error;
pub mod loading;
pub mod pipeline;
pub mod random_weights;

// The loading modules kept at their former paths (`sdrs_pipeline::single_file`, ...).
pub use loading::{builtin, checkpoint, model_files, single_file, tensor_files, weights};

/// The pipeline module under its earlier name (`sdrs_pipeline::stable_diffusion::...`).
pub use pipeline as stable_diffusion;
pub use pipeline::{components, preview, prompt, refiner, vae_tiling};

pub use builtin::BuiltinModel;
pub use device::{
    dtype_name, gpu_memory_in_use, parse_device, parse_dtype, resolve_dtype, DeviceChoice,
    DeviceSelection, DtypeChoice, GpuMemoryPeak,
};
pub use error::{Error, Result};
pub use loading::{addnet_hash, LoraFile};
pub use model_files::ModelFiles;
pub use pipeline::components::{
    AddedConditions, Denoiser, LatentDecoder, LatentEncoder, PromptEncoder, TextEmbeddings,
    TextLayer,
};
pub use pipeline::{
    Conditioning, InitImage, LoadOptions, MicroConditioning, ModelFamily, NativeSize, PromptSyntax,
    Refiner, Request, StableDiffusion, StepProgress,
};
