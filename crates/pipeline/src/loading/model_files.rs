//! Where a model's configs, tokenizers and scheduler settings come from: a diffusers folder on
//! disk, or the configs of a published model built into the binary (so that a single checkpoint
//! of SD1.5, SDXL base or SDXL refiner loads with no config folder and no network).

use std::path::{Path, PathBuf};

use sdrs_clip::{ClipTextConfig, ClipTokenizer};
use sdrs_unet::UNet2DConditionConfig;
use sdrs_vae::AutoencoderKLConfig;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::loading::builtin::BuiltinModel;
use crate::loading::single_file::CheckpointFamily;
use crate::loading::weights::read_json;

/// The source of a model's non-weight files, addressed by their path in the diffusers layout
/// (`unet/config.json`, `tokenizer/vocab.json`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A folder in the diffusers layout.
    Folder(PathBuf),
    /// The built-in configs of a published model, with the built-in CLIP vocabulary.
    Builtin(BuiltinModel),
}

impl ModelFiles {
    /// Where `path` is, for messages: the file in the folder, or `<built-in sd15>/path`.
    pub fn location(&self, path: &str) -> PathBuf {
        match self {
            Self::Folder(root) => root.join(path),
            Self::Builtin(model) => {
                PathBuf::from(format!("<built-in {}>", model.name())).join(path)
            }
        }
    }

    /// Whether the file exists.
    pub fn has_file(&self, path: &str) -> bool {
        match self {
            Self::Folder(root) => root.join(path).is_file(),
            Self::Builtin(model) => model.file(path).is_some(),
        }
    }

    /// Whether the component folder exists.
    pub fn has_dir(&self, dir: &str) -> bool {
        match self {
            Self::Folder(root) => root.join(dir).is_dir(),
            Self::Builtin(model) => {
                let prefix = format!("{dir}/");
                model
                    .files()
                    .iter()
                    .any(|(path, _)| path.starts_with(&prefix))
            }
        }
    }

    /// A JSON file, which must exist.
    pub fn json(&self, path: &str) -> Result<serde_json::Value> {
        match self {
            Self::Folder(root) => read_json(&root.join(path)),
            Self::Builtin(model) => {
                let text = model.file(path).ok_or_else(|| self.missing(path))?;
                serde_json::from_str(text).map_err(|source| Error::Json {
                    path: self.location(path),
                    source,
                })
            }
        }
    }

    /// A JSON file, or `None` when it does not exist.
    pub fn optional_json(&self, path: &str) -> Result<Option<serde_json::Value>> {
        if self.has_file(path) {
            self.json(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `<dir>/config.json` of a CLIP text encoder.
    pub fn text_config(&self, dir: &str) -> Result<ClipTextConfig> {
        let path = format!("{dir}/config.json");
        match self {
            Self::Folder(root) => Ok(ClipTextConfig::from_file(&root.join(&path))?),
            Self::Builtin(_) => {
                let config: ClipTextConfig = self.parse(&path)?;
                config.validate()?;
                Ok(config)
            }
        }
    }

    /// `unet/config.json`.
    pub fn unet_config(&self) -> Result<UNet2DConditionConfig> {
        match self {
            Self::Folder(root) => Ok(UNet2DConditionConfig::from_file(
                &root.join("unet").join("config.json"),
            )?),
            Self::Builtin(_) => self.parse("unet/config.json"),
        }
    }

    /// `vae/config.json`.
    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        match self {
            Self::Folder(root) => Ok(AutoencoderKLConfig::from_file(
                &root.join("vae").join("config.json"),
            )?),
            Self::Builtin(_) => self.parse("vae/config.json"),
        }
    }

    /// The CLIP tokenizer of the `dir` folder (`tokenizer`, `tokenizer_2`). Built-in models use
    /// the built-in vocabulary with their own special-token configs.
    pub fn tokenizer(&self, dir: &str) -> Result<ClipTokenizer> {
        match self {
            Self::Folder(root) => Ok(ClipTokenizer::from_dir(&root.join(dir))?),
            Self::Builtin(_) => {
                let config = self.optional_json(&format!("{dir}/tokenizer_config.json"))?;
                let special = self.optional_json(&format!("{dir}/special_tokens_map.json"))?;
                Ok(ClipTokenizer::builtin(config.as_ref(), special.as_ref())?)
            }
        }
    }

    fn parse<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        serde_json::from_value(self.json(path)?).map_err(|source| Error::Json {
            path: self.location(path),
            source,
        })
    }

    fn missing(&self, path: &str) -> Error {
        Error::MissingFile {
            path: self.location(path),
            what: "not among the built-in files".to_string(),
        }
    }
}

/// The built-in configs for a single checkpoint of `family`. None for SD2.x, whose published
/// models differ in ways the keys do not show (512 px epsilon vs 768 px v-prediction).
pub fn builtin_for_checkpoint(family: CheckpointFamily) -> Option<BuiltinModel> {
    match family {
        CheckpointFamily::Sd15 => Some(BuiltinModel::Sd15),
        CheckpointFamily::SdxlBase => Some(BuiltinModel::SdxlBase),
        CheckpointFamily::SdxlRefiner => Some(BuiltinModel::SdxlRefiner),
        CheckpointFamily::Sd2 => None,
    }
}

impl From<&Path> for ModelFiles {
    fn from(root: &Path) -> Self {
        Self::Folder(root.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_checkpoint_family_but_sd2_has_builtin_configs() {
        assert_eq!(
            builtin_for_checkpoint(CheckpointFamily::Sd15),
            Some(BuiltinModel::Sd15)
        );
        assert_eq!(
            builtin_for_checkpoint(CheckpointFamily::SdxlBase),
            Some(BuiltinModel::SdxlBase)
        );
        assert_eq!(
            builtin_for_checkpoint(CheckpointFamily::SdxlRefiner),
            Some(BuiltinModel::SdxlRefiner)
        );
        assert_eq!(builtin_for_checkpoint(CheckpointFamily::Sd2), None);
    }

    #[test]
    fn builtin_files_answer_like_a_folder() {
        let files = ModelFiles::Builtin(BuiltinModel::SdxlRefiner);
        assert!(files.has_file("unet/config.json"));
        assert!(files.has_dir("text_encoder_2"));
        assert!(!files.has_dir("text_encoder"));
        assert!(files
            .optional_json("text_encoder/config.json")
            .unwrap()
            .is_none());
        let err = files.json("nope.json").unwrap_err().to_string();
        assert!(err.contains("<built-in sdxl-refiner>/nope.json"), "{err}");
        for model in BuiltinModel::ALL {
            let files = ModelFiles::Builtin(model);
            files.unet_config().unwrap();
            files.vae_config().unwrap();
        }
    }
}
