//! A model opened to rewrite its weights (`sdrs quantize`): the non-weight files of its diffusers
//! layout (configs, tokenizers, scheduler), and each component's tensors under their diffusers
//! names, read one at a time in their stored dtype, from a folder or a single checkpoint alike.

use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::{Checkpoint, TensorSource};
use crate::error::{Error, Result};
use crate::loading::tensor_files::TensorFiles;
use crate::loading::weights::find_weights;
use crate::model_files::{builtin_for_checkpoint, ModelFiles};
use crate::pipeline::family::ModelFamily;

/// The non-weight files a diffusers folder of each component holds, as sdrs reads them.
const MODEL_FILES: [&str; 16] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer.json",
];

enum Weights {
    Folder(std::path::PathBuf),
    Checkpoint(Checkpoint),
}

/// A model's files and weights, for rewriting.
pub struct ModelWeights {
    files: ModelFiles,
    weights: Weights,
    family: ModelFamily,
}

impl ModelWeights {
    /// Opens a diffusers folder, or a single checkpoint (`.safetensors` or GGUF) with the configs
    /// of `config` (a diffusers folder of its family) or else the built-in ones.
    pub fn open(model: &Path, config: Option<&Path>) -> Result<Self> {
        let (files, weights) = if model.is_dir() {
            (
                ModelFiles::Folder(model.to_path_buf()),
                Weights::Folder(model.to_path_buf()),
            )
        } else if model.is_file() {
            let checkpoint = Checkpoint::open(model)?;
            let files = match config {
                Some(dir) => ModelFiles::Folder(dir.to_path_buf()),
                None => {
                    ModelFiles::Builtin(builtin_for_checkpoint(checkpoint.family()).ok_or_else(
                        || Error::NoBuiltinConfig {
                            path: model.to_path_buf(),
                            family: "SD2.x",
                        },
                    )?)
                }
            };
            (files, Weights::Checkpoint(checkpoint))
        } else {
            return Err(Error::MissingFile {
                path: model.to_path_buf(),
                what: "a diffusers model folder or a .safetensors / .gguf checkpoint".to_string(),
            });
        };
        let family = ModelFamily::detect_in(&files)?;
        Ok(Self {
            files,
            weights,
            family,
        })
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// The single checkpoint, when the model is one.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        match &self.weights {
            Weights::Checkpoint(checkpoint) => Some(checkpoint),
            Weights::Folder(_) => None,
        }
    }

    /// The components with weights, in the order a pipeline loads them.
    pub fn components(&self) -> Vec<&'static str> {
        let mut components = match self.family {
            ModelFamily::Sd => vec!["text_encoder"],
            ModelFamily::SdxlBase => vec!["text_encoder", "text_encoder_2"],
            ModelFamily::SdxlRefiner => vec!["text_encoder_2"],
        };
        components.extend(["unet", "vae"]);
        components
    }

    /// The tensors of `component` under their diffusers names.
    pub fn tensors(&self, component: &'static str) -> Result<Arc<dyn TensorSource>> {
        match &self.weights {
            Weights::Folder(root) => {
                let files = find_weights(&root.join(component), None)?;
                let tensors = TensorFiles::open(&files).map_err(|source| Error::Weights {
                    component,
                    path: files.first().cloned().unwrap_or_default(),
                    source,
                })?;
                Ok(Arc::new(tensors))
            }
            Weights::Checkpoint(checkpoint) => {
                let config = self.files.json(&format!("{component}/config.json"))?;
                checkpoint.component_tensors(component, &config)
            }
        }
    }

    /// Writes the model's non-weight files into the diffusers folder `out` (created if missing);
    /// a built-in model's tokenizers get the built-in CLIP vocabulary.
    pub fn write_files(&self, out: &Path) -> Result<()> {
        for path in MODEL_FILES {
            let text = match &self.files {
                ModelFiles::Folder(root) => {
                    let file = root.join(path);
                    if !file.is_file() {
                        continue;
                    }
                    crate::loading::weights::read_text(&file)?
                }
                ModelFiles::Builtin(model) => match model.file(path) {
                    Some(text) => text.to_string(),
                    None => {
                        let dir = path.split('/').next().unwrap_or_default();
                        let has_tokenizer = model
                            .file(&format!("{dir}/tokenizer_config.json"))
                            .is_some();
                        match path.rsplit('/').next() {
                            Some("vocab.json") if has_tokenizer => {
                                sdrs_clip::tokenizer::BUILTIN_VOCAB.to_string()
                            }
                            Some("merges.txt") if has_tokenizer => {
                                sdrs_clip::tokenizer::BUILTIN_MERGES.to_string()
                            }
                            _ => continue,
                        }
                    }
                },
            };
            let target = out.join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            std::fs::write(&target, text).map_err(|source| Error::Io {
                path: target.clone(),
                source,
            })?;
        }
        Ok(())
    }
}
