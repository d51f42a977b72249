//! Finds the models of a Core ML Stable Diffusion resources folder as Apple's
//! `StableDiffusionPipeline+Resources.swift` / `StableDiffusionXLPipeline+Resources.swift` name
//! them: `TextEncoder`, `TextEncoder2` (SDXL), `Unet` or `UnetChunk1..N` (the chunks win),
//! `VAEDecoder`, `VAEEncoder` (optional), `vocab.json`, `merges.txt`; each model compiled
//! (`.mlmodelc`, described by its `metadata.json`) or a package (`.mlpackage`, described by its
//! spec).

use std::path::{Path, PathBuf};

use super::features::ModelDescription;
use crate::package::MlPackage;
use crate::{Error, Result};

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// `X.mlmodelc`: compiled, loadable as it is.
    Compiled,
    /// `X.mlpackage`: compiled once before loading.
    Package,
}

/// One model of the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFile {
    /// The bundle name (`UnetChunk1`).
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
}

impl ModelFile {
    /// The model's declared inputs and outputs, read from its files without Core ML.
    pub fn describe(&self) -> Result<ModelDescription> {
        match self.format {
            ModelFormat::Compiled => {
                ModelDescription::from_metadata_json(&self.path.join("metadata.json"))
            }
            ModelFormat::Package => {
                // The spec alone: a real UNet's weight file is gigabytes.
                let (model, _) = MlPackage::read_spec(&self.path)?;
                ModelDescription::from_spec(&model, &self.path)
            }
        }
    }
}

/// Which pipeline the folder is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// SD 1.x / 2.x: one text encoder.
    Sd,
    /// SDXL base: both text encoders.
    Sdxl,
    /// SDXL refiner: the second text encoder only, 5 time ids (aesthetic score).
    SdxlRefiner,
}

impl BundleKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd => "SD",
            Self::Sdxl => "SDXL",
            Self::SdxlRefiner => "SDXL refiner",
        }
    }
}

/// The models and tokenizer files of one resources folder.
#[derive(Debug, Clone)]
pub struct Resources {
    pub folder: PathBuf,
    pub kind: BundleKind,
    pub text_encoder: Option<ModelFile>,
    pub text_encoder_2: Option<ModelFile>,
    /// `[Unet]`, or the chunks in order.
    pub unet: Vec<ModelFile>,
    pub vae_decoder: ModelFile,
    pub vae_encoder: Option<ModelFile>,
    pub vocab: PathBuf,
    pub merges: PathBuf,
}

/// `folder/name.mlmodelc` (preferred: nothing to compile) or `folder/name.mlpackage`.
pub(crate) fn find_model(folder: &Path, name: &str) -> Option<ModelFile> {
    [
        ("mlmodelc", ModelFormat::Compiled),
        ("mlpackage", ModelFormat::Package),
    ]
    .into_iter()
    .map(|(ext, format)| ModelFile {
        name: name.to_string(),
        path: folder.join(format!("{name}.{ext}")),
        format,
    })
    .find(|m| m.path.is_dir())
}

fn expected(folder: &Path, name: &str, what: &str) -> Error {
    Error::Missing {
        path: folder.join(format!("{name}.mlmodelc")),
        what: format!("{what}: {name}.mlmodelc or {name}.mlpackage"),
    }
}

/// `prefixChunk1`, `prefixChunk2`, ... while they exist.
fn find_chunks(folder: &Path, prefix: &str) -> Result<Vec<ModelFile>> {
    let mut chunks = Vec::new();
    while let Some(chunk) = find_model(folder, &format!("{prefix}Chunk{}", chunks.len() + 1)) {
        chunks.push(chunk);
    }
    if chunks.len() == 1 {
        return Err(expected(
            folder,
            &format!("{prefix}Chunk2"),
            "the second half of a chunked UNet",
        ));
    }
    Ok(chunks)
}

impl Resources {
    /// Reads which models `folder` has. A folder without a UNet, a VAE decoder, a text encoder or
    /// the tokenizer files is an error naming the file expected.
    pub fn discover(folder: &Path) -> Result<Self> {
        if !folder.is_dir() {
            return Err(Error::Missing {
                path: folder.to_path_buf(),
                what: "a Core ML resources folder (TextEncoder, Unet, VAEDecoder, vocab.json, \
                       merges.txt)"
                    .to_string(),
            });
        }
        let text_encoder = find_model(folder, "TextEncoder");
        let text_encoder_2 = find_model(folder, "TextEncoder2");
        if text_encoder.is_none() && text_encoder_2.is_none() {
            return Err(expected(folder, "TextEncoder", "the text encoder"));
        }
        // Apple names the refiner's UNet `UnetRefiner`; chunks win over the whole model, as the
        // Swift pipeline prefers them (they fit the Neural Engine's limits).
        let mut unet = Vec::new();
        for prefix in ["Unet", "UnetRefiner"] {
            unet = find_chunks(folder, prefix)?;
            if unet.is_empty() {
                unet.extend(find_model(folder, prefix));
            }
            if !unet.is_empty() {
                break;
            }
        }
        if unet.is_empty() {
            return Err(expected(
                folder,
                "Unet",
                "the UNet (or UnetChunk1 and UnetChunk2)",
            ));
        }
        let vae_decoder = find_model(folder, "VAEDecoder")
            .ok_or_else(|| expected(folder, "VAEDecoder", "the VAE decoder"))?;
        let vae_encoder = find_model(folder, "VAEEncoder");
        let (vocab, merges) = (folder.join("vocab.json"), folder.join("merges.txt"));
        for file in [&vocab, &merges] {
            if !file.is_file() {
                return Err(Error::Missing {
                    path: file.clone(),
                    what: "the CLIP tokenizer's vocab.json and merges.txt".to_string(),
                });
            }
        }
        // The refiner conditions on 5 time ids (the aesthetic score instead of the target size)
        // and has only the second text encoder; an unreadable description is reported when the
        // model loads, not here.
        let aesthetic = unet[0].describe().ok().is_some_and(|d| {
            d.input("time_ids")
                .is_some_and(|f| f.shape.last() == Some(&5))
        });
        let kind = match (&text_encoder, &text_encoder_2) {
            (_, Some(_)) if aesthetic => BundleKind::SdxlRefiner,
            (Some(_), Some(_)) => BundleKind::Sdxl,
            (None, Some(_)) => BundleKind::SdxlRefiner,
            _ => BundleKind::Sd,
        };
        Ok(Self {
            folder: folder.to_path_buf(),
            kind,
            text_encoder,
            text_encoder_2,
            unet,
            vae_decoder,
            vae_encoder,
            vocab,
            merges,
        })
    }

    pub fn is_chunked(&self) -> bool {
        self.unet.len() > 1
    }

    /// Every model of the folder, in the order a pipeline uses them.
    pub fn models(&self) -> Vec<&ModelFile> {
        let mut models: Vec<&ModelFile> = self
            .text_encoder
            .iter()
            .chain(self.text_encoder_2.iter())
            .collect();
        models.extend(self.unet.iter());
        models.push(&self.vae_decoder);
        models.extend(self.vae_encoder.iter());
        models
    }
}
