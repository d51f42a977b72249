//! The model families the pipeline runs (SD1.x/2.x, SDXL base, SDXL refiner), told apart by a
//! model's own configs as diffusers' `DiffusionPipeline.from_pretrained` picks a pipeline class.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model_files::ModelFiles;
use crate::single_file::CheckpointFamily;

use super::preview::LatentSpace;

/// Which kind of Stable Diffusion model a folder holds, detected from its own files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD1.x and SD2.x: one CLIP text encoder.
    Sd,
    /// SDXL base: two text encoders and micro-conditioning.
    SdxlBase,
    /// SDXL refiner: the second text encoder and aesthetic-score conditioning.
    SdxlRefiner,
}

impl ModelFamily {
    /// SDXL when the UNet takes `text_time` added conditions; the refiner when the model has no
    /// first text encoder (or says it wants aesthetic scores).
    pub fn detect(root: &Path) -> Result<Self> {
        Self::detect_in(&ModelFiles::Folder(root.to_path_buf()))
    }

    /// The family of a diffusers folder or of a single checkpoint file, from its configs or its
    /// tensor names alone (no weights are read).
    pub fn detect_model(path: &Path) -> Result<Self> {
        if path.is_file() {
            Ok(Checkpoint::open(path)?.family().into())
        } else {
            Self::detect(path)
        }
    }

    /// [`Self::detect`] for any source of configs.
    pub fn detect_in(files: &ModelFiles) -> Result<Self> {
        let unet = files.json("unet/config.json")?;
        let sdxl = unet["addition_embed_type"].as_str() == Some("text_time");
        if !sdxl {
            if files.has_dir("text_encoder") {
                return Ok(Self::Sd);
            }
            return Err(Error::MissingFile {
                path: files.location("text_encoder"),
                what: "a Stable Diffusion 1.x/2.x model needs its text encoder".to_string(),
            });
        }
        let aesthetics = files
            .optional_json("model_index.json")?
            .is_some_and(|index| index["requires_aesthetics_score"].as_bool() == Some(true));
        if aesthetics || !files.has_file("text_encoder/config.json") {
            Ok(Self::SdxlRefiner)
        } else {
            Ok(Self::SdxlBase)
        }
    }

    /// The name used in messages and metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sd => "SD1.x/2.x",
            Self::SdxlBase => "SDXL",
            Self::SdxlRefiner => "SDXL refiner",
        }
    }

    /// diffusers' default guidance scale for this family's pipeline.
    pub fn default_guidance_scale(&self) -> f64 {
        match self {
            Self::Sd => 7.5,
            Self::SdxlBase | Self::SdxlRefiner => 5.0,
        }
    }

    /// The latent space of the family's VAE (the linear previews are fitted per VAE).
    pub fn latent_space(&self) -> LatentSpace {
        match self {
            Self::Sd => LatentSpace::Sd,
            Self::SdxlBase | Self::SdxlRefiner => LatentSpace::Sdxl,
        }
    }
}

impl From<CheckpointFamily> for ModelFamily {
    fn from(family: CheckpointFamily) -> Self {
        match family {
            CheckpointFamily::Sd15 | CheckpointFamily::Sd2 => ModelFamily::Sd,
            CheckpointFamily::SdxlBase => ModelFamily::SdxlBase,
            CheckpointFamily::SdxlRefiner => ModelFamily::SdxlRefiner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refiner_shares_the_sdxl_latent_space_and_guidance() {
        assert_eq!(ModelFamily::Sd.latent_space(), LatentSpace::Sd);
        assert_eq!(ModelFamily::SdxlRefiner.latent_space(), LatentSpace::Sdxl);
        assert_eq!(
            ModelFamily::SdxlRefiner.default_guidance_scale(),
            ModelFamily::SdxlBase.default_guidance_scale()
        );
    }

    #[test]
    fn single_checkpoint_families_map_onto_pipeline_families() {
        assert_eq!(ModelFamily::from(CheckpointFamily::Sd2), ModelFamily::Sd);
        assert_eq!(
            ModelFamily::from(CheckpointFamily::SdxlRefiner),
            ModelFamily::SdxlRefiner
        );
    }
}
