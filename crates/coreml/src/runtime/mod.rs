//! Running Apple's Stable Diffusion resource folders (the `Resources` of
//! `apple/coreml-stable-diffusion-*` and community SDXL conversions): which models a folder has
//! ([`resources`]), what crosses a model's boundary ([`features`]), the glue that turns the
//! pipeline's tensors into each model's inputs as Apple's `StableDiffusionPipeline.swift` feeds
//! them ([`text_encoder`], [`unet`], [`vae`]), and the models themselves: Core ML on Apple
//! platforms (`apple`), recorded input/output pairs everywhere ([`standin`]).

use std::collections::HashMap;
use std::sync::Arc;

pub mod features;
pub mod resources;
pub mod standin;
pub mod text_encoder;
pub mod unet;
pub mod vae;

#[cfg(target_vendor = "apple")]
pub mod apple;

pub use features::{ArrayData, ArrayDtype, FeatureInfo, ModelDescription, MultiArray};
pub use resources::{BundleKind, ModelFile, ModelFormat, Resources};
pub use standin::StandIn;
pub use text_encoder::{TextEncoderGlue, TextOutput};
pub use unet::{UnetGlue, UnetInputs};
pub use vae::VaeGlue;

use crate::{Error, Result};

/// One Core ML model: its declared features and a prediction over named multi-arrays.
pub trait CoreMlModel: Send + Sync {
    /// The model's name, for messages (`TextEncoder`, `UnetChunk2`, ...).
    fn name(&self) -> &str;
    fn inputs(&self) -> &[FeatureInfo];
    fn outputs(&self) -> &[FeatureInfo];
    /// Every declared input in, every declared output out, in the declared dtypes and shapes.
    fn predict(&self, inputs: &HashMap<String, MultiArray>) -> Result<HashMap<String, MultiArray>>;
}

/// Builds the model of one file of a resources folder (Core ML's on Apple platforms, stand-ins
/// in tests).
pub type ModelFactory<'a> = dyn Fn(&ModelFile) -> Result<Arc<dyn CoreMlModel>> + 'a;

/// Which processors Core ML may run a model on (`MLComputeUnits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeUnits {
    #[default]
    All,
    CpuAndNeuralEngine,
    CpuAndGpu,
    CpuOnly,
}

impl ComputeUnits {
    pub const ALL: [ComputeUnits; 4] = [
        Self::All,
        Self::CpuAndNeuralEngine,
        Self::CpuAndGpu,
        Self::CpuOnly,
    ];

    /// The command line's spelling: `all`, `cpu-and-ne`, `cpu-and-gpu`, `cpu-only`.
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::CpuAndNeuralEngine => "cpu-and-ne",
            Self::CpuAndGpu => "cpu-and-gpu",
            Self::CpuOnly => "cpu-only",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|units| units.name() == name)
            .ok_or_else(|| Error::InvalidParameter {
                name: "compute units",
                value: name.to_string(),
                expected: "all, cpu-and-ne, cpu-and-gpu or cpu-only".to_string(),
            })
    }
}

/// The VAE scaling factor of a folder that says none: diffusers' `vae/config.json` values of the
/// published SD 1.x (0.18215) and SDXL (0.13025) autoencoders, told apart by the bundle kind.
pub fn default_scaling_factor(kind: BundleKind) -> f64 {
    match kind {
        BundleKind::Sd => 0.18215,
        BundleKind::Sdxl | BundleKind::SdxlRefiner => 0.13025,
    }
}

/// The one output `model` must have named `name`, or why not.
pub(crate) fn take_output(
    model: &str,
    outputs: &mut HashMap<String, MultiArray>,
    name: &str,
) -> Result<MultiArray> {
    outputs.remove(name).ok_or_else(|| {
        crate::error::model(
            model,
            format!("the prediction has no output {name} (it has {:?})", {
                let mut names: Vec<_> = outputs.keys().cloned().collect();
                names.sort();
                names
            }),
        )
    })
}
