//! Textual-inversion embeddings loaded into a pipeline's text encoders, as diffusers'
//! `load_textual_inversion` and AUTOMATIC1111's embeddings folder use them: each embedding's
//! vectors go to the encoder they were trained for (SDXL: `clip_l` to `text_encoder`, `clip_g` to
//! `text_encoder_2`), under a name that then stands for them in every prompt.

use std::path::Path;

use crate::error::{Error, Result};
use crate::loading::embeddings::{
    embedding_files_in, embedding_name, read_embedding_file, EmbeddingFile, EmbeddingVectors,
    LoadedEmbedding,
};

use super::components::PromptEncoder;
use super::conditioning::TextEncoders;
use super::{ModelFamily, StableDiffusion};

/// What [`StableDiffusion::load_embedding_dir`] did with a folder's files.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingDir {
    /// The embeddings loaded, in load order.
    pub loaded: Vec<LoadedEmbedding>,
    /// The files skipped, with the reason: not an embedding for this model, or a name in use.
    pub skipped: Vec<(std::path::PathBuf, String)>,
}

impl StableDiffusion {
    /// Loads the embedding file `path` (any layout of [`crate::loading::embeddings`]) under the
    /// name `token`. A name already loaded or in the vocabulary, vectors of another width than
    /// the encoder's, or an SDXL file for an SD1.x/2.x model (and the reverse) are errors.
    pub fn load_embedding(&mut self, token: &str, path: &Path) -> Result<&LoadedEmbedding> {
        let file = read_embedding_file(path)?;
        self.add_embedding(token, &file)
    }

    /// Loads every embedding file (`.safetensors`, `.pt`, `.bin`) in `dir` and its sub-folders,
    /// each named after its file stem as AUTOMATIC1111 names them, in the order of their paths.
    /// As AUTOMATIC1111 does, a file that cannot be used is skipped, with the reason: not an
    /// embedding for this model (another family's, another width, a layout it cannot read), or
    /// a name that is already a token of the vocabulary or already loaded.
    pub fn load_embedding_dir(&mut self, dir: &Path) -> Result<EmbeddingDir> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "a folder of textual-inversion embeddings".to_string(),
            });
        }
        let mut report = EmbeddingDir::default();
        for path in embedding_files_in(dir)? {
            let name = embedding_name(&path)?;
            match self.load_embedding(&name, &path) {
                Ok(loaded) => report.loaded.push(loaded.clone()),
                Err(Error::Embedding { path, reason }) => report.skipped.push((path, reason)),
                // A name the tokenizer already has (a word such as `style`): the file is left
                // out with the reason, as one unusable file does not stop AUTOMATIC1111 either.
                Err(error) => report.skipped.push((path, error.to_string())),
            }
        }
        Ok(report)
    }

    /// Loads the embeddings loaded so far again, from their files, in their order (into text
    /// encoders that were rebuilt, as [`Self::set_loras`] does).
    pub(super) fn reload_embeddings(&mut self) -> Result<()> {
        for embedding in std::mem::take(&mut self.embeddings) {
            self.load_embedding(&embedding.token, &embedding.path)?;
        }
        Ok(())
    }

    /// Adds an embedding already read from its file under the name `token`.
    ///
    /// For SDXL, the vectors of `text_encoder` are added before those of `text_encoder_2`; should
    /// the second refuse them (a width that does not fit), the first keeps the name.
    pub fn add_embedding(&mut self, token: &str, file: &EmbeddingFile) -> Result<&LoadedEmbedding> {
        let _span = tracing::info_span!("load_embedding", token).entered();
        let family = self.family;
        let text = self.text.as_mut().ok_or(Error::Released {
            component: "text encoders",
        })?;
        let mismatch = |reason: String| Error::Embedding {
            path: file.path.clone(),
            reason,
        };
        let mut ids = Vec::new();
        match (text, &file.vectors) {
            (TextEncoders::Sd(encoder), EmbeddingVectors::Single(vectors)) => {
                ids.push(encoder.add_embedding(token, vectors)?);
            }
            (TextEncoders::Sd(_), EmbeddingVectors::Sdxl { .. }) => {
                return Err(mismatch(format!(
                    "it holds clip_l and clip_g vectors, for SDXL's two text encoders; this is \
                     an {} model, with one",
                    family.name()
                )))
            }
            (TextEncoders::Sdxl { encoders, .. }, EmbeddingVectors::Sdxl { clip_l, clip_g }) => {
                let targets: Vec<_> = if family == ModelFamily::SdxlRefiner {
                    // The refiner has only the second encoder.
                    vec![clip_g]
                } else {
                    vec![clip_l, clip_g]
                };
                if targets.len() != encoders.len() {
                    return Err(mismatch(format!(
                        "the model has {} text encoders, the embedding vectors for {}",
                        encoders.len(),
                        targets.len()
                    )));
                }
                for (encoder, vectors) in encoders.iter_mut().zip(targets) {
                    let encoder: &mut Box<dyn PromptEncoder> = encoder;
                    ids.push(encoder.add_embedding(token, vectors)?);
                }
            }
            (TextEncoders::Sdxl { .. }, EmbeddingVectors::Single(_)) => {
                return Err(mismatch(format!(
                    "it holds one set of vectors; an {} model needs clip_l and clip_g vectors \
                     (an SDXL embedding)",
                    family.name()
                )))
            }
        }
        self.embeddings.push(LoadedEmbedding {
            token: token.to_string(),
            path: file.path.clone(),
            num_vectors: file.vectors.num_vectors(),
            ids,
            sha256: file.sha256.clone(),
        });
        let last = self.embeddings.len() - 1;
        Ok(&self.embeddings[last])
    }

    /// The embeddings loaded so far, in load order.
    pub fn embeddings(&self) -> &[LoadedEmbedding] {
        &self.embeddings
    }

    /// The loaded embeddings whose name one of `texts` (prompts) holds, in load order: what
    /// AUTOMATIC1111 lists as `TI hashes`. Names are matched anywhere in the text after
    /// lowercasing both, as the tokenizer matches them.
    pub fn embeddings_used(&self, texts: &[&str]) -> Vec<&LoadedEmbedding> {
        let texts: Vec<String> = texts.iter().map(|t| t.to_lowercase()).collect();
        self.embeddings
            .iter()
            .filter(|e| {
                let name = e.token.to_lowercase();
                texts.iter().any(|t| t.contains(&name))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::LoadOptions;

    fn tiny_sd15() -> StableDiffusion {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd15");
        StableDiffusion::load(&root, &LoadOptions::new(Device::Cpu, DType::F32, None)).unwrap()
    }

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    fn vectors(n: usize, dim: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (n, dim), &Device::Cpu).unwrap()
    }

    #[test]
    fn embeddings_load_by_stem_get_ids_and_change_only_prompts_that_use_them() {
        let mut pipeline = tiny_sd15();
        let dir = tempfile::tempdir().unwrap();
        let hidden = 32;
        save(
            &dir.path().join("b-style.safetensors"),
            &[("emb_params", vectors(2, hidden))],
        );
        save(
            &dir.path().join("a-thing.safetensors"),
            &[("<x>", vectors(1, hidden))],
        );
        // A file named after a word of the vocabulary is left out, with the reason.
        save(
            &dir.path().join("cat.safetensors"),
            &[("emb_params", vectors(1, hidden))],
        );
        let report = pipeline.load_embedding_dir(dir.path()).unwrap();
        assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
        assert!(report.skipped[0].0.ends_with("cat.safetensors"));
        assert!(
            report.skipped[0].1.contains("a token of the vocabulary"),
            "{:?}",
            report.skipped
        );
        let loaded = report.loaded;
        let summary: Vec<(&str, usize, &Vec<Vec<u32>>)> = loaded
            .iter()
            .map(|e| (e.token.as_str(), e.num_vectors, &e.ids))
            .collect();
        assert_eq!(
            summary,
            [
                ("a-thing", 1, &vec![vec![49408]]),
                ("b-style", 2, &vec![vec![49409, 49410]])
            ]
        );
        assert_eq!(pipeline.embeddings().len(), 2);
        let used: Vec<&str> = pipeline
            .embeddings_used(&["a photo, B-STYLE", "blurry"])
            .iter()
            .map(|e| e.token.as_str())
            .collect();
        assert_eq!(used, ["b-style"]);

        // Loading a name again is refused, and the encoder is left as it was.
        let again = dir.path().join("b-style.safetensors");
        let err = pipeline.load_embedding("b-style", &again).unwrap_err();
        assert!(err.to_string().contains("already an added token"), "{err}");
        assert_eq!(pipeline.embeddings().len(), 2);
        let next = pipeline.load_embedding("<other>", &again).unwrap();
        assert_eq!(next.ids, vec![vec![49411, 49412]]);
    }

    fn fits_path(dir: &Path) -> std::path::PathBuf {
        let fits = dir.join("fits.safetensors");
        if !fits.exists() {
            save(&fits, &[("emb_params", vectors(1, 32))]);
        }
        fits
    }

    #[test]
    fn embeddings_that_do_not_fit_the_model_are_errors_naming_both_widths() {
        let mut pipeline = tiny_sd15();
        let dir = tempfile::tempdir().unwrap();
        let wide = dir.path().join("wide.safetensors");
        save(&wide, &[("emb_params", vectors(2, 48))]);
        let err = pipeline
            .load_embedding("<wide>", &wide)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hidden size 32") && err.contains("the embedding 48"),
            "{err}"
        );
        let sdxl = dir.path().join("xl.safetensors");
        save(
            &sdxl,
            &[("clip_l", vectors(1, 32)), ("clip_g", vectors(1, 32))],
        );
        let err = pipeline
            .load_embedding("<xl>", &sdxl)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clip_g") && err.contains("xl.safetensors"),
            "{err}"
        );
        assert!(pipeline.embeddings().is_empty());
        // A word of the vocabulary is no name for an embedding (diffusers refuses it too).
        let err = pipeline
            .load_embedding("cat", &fits_path(dir.path()))
            .unwrap_err();
        assert!(
            err.to_string().contains("a token of the vocabulary"),
            "{err}"
        );
        // The refused names were not added: a fitting file takes the first id.
        let fits = fits_path(dir.path());
        let loaded = pipeline.load_embedding("<wide>", &fits).unwrap();
        assert_eq!(loaded.ids, vec![vec![49408]]);
        let err = pipeline
            .load_embedding_dir(&dir.path().join("missing"))
            .unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    }
}
