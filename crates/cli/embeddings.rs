//! `--embedding-dir`: the textual-inversion embeddings `sdrs generate` loads (every `.safetensors`,
//! `.pt` and `.bin` file of the folder, each named after its file stem, as AUTOMATIC1111 loads its
//! `embeddings` folder), and the `TI hashes` field of the infotext for those a prompt uses.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sdrs_pipeline::loading::embeddings::LoadedEmbedding;
use sdrs_pipeline::stable_diffusion::EmbeddingDir;
use sdrs_pipeline::StableDiffusion;

/// The folder to load embeddings from: `--embedding-dir`, else an `embeddings` folder beside a
/// local model (in the folder that holds the model's folder or checkpoint) when there is one. A
/// model named by a short name or a Hugging Face repo id has none.
pub fn embedding_dir(explicit: Option<&Path>, model: &str) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir.to_path_buf());
    }
    let model = Path::new(model);
    if !model.exists() {
        return None;
    }
    let beside = model.canonicalize().ok()?.parent()?.join("embeddings");
    beside.is_dir().then_some(beside)
}

/// Loads the embeddings of `dir` into `pipeline`; returns those loaded and the files skipped
/// (not embeddings for this model), with the reason.
pub fn load(pipeline: &mut StableDiffusion, dir: &Path) -> Result<EmbeddingDir> {
    pipeline
        .load_embedding_dir(dir)
        .with_context(|| format!("--embedding-dir {}", dir.display()))
}

/// AUTOMATIC1111's `TI hashes` field for the embeddings `used`: `name: hash, ...` with each name
/// stripped of `:` and `,`, quoted as A1111 quotes a value holding `:` or `,`; `None` when no
/// embedding was used.
pub fn ti_hashes(used: &[&LoadedEmbedding]) -> Option<(String, String)> {
    if used.is_empty() {
        return None;
    }
    let value = used
        .iter()
        .map(|e| {
            let name = e.token.replace([':', ','], "");
            format!("{name}: {}", e.short_hash())
        })
        .collect::<Vec<_>>()
        .join(", ");
    // A1111's `quote`: json.dumps of a value with a comma, colon or newline (this one has one).
    let quoted = serde_json::to_string(&value).unwrap_or(value);
    Some(("TI hashes".to_string(), quoted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(token: &str, sha256: &str) -> LoadedEmbedding {
        LoadedEmbedding {
            token: token.to_string(),
            path: PathBuf::from(format!("{token}.pt")),
            num_vectors: 1,
            ids: vec![vec![49408]],
            sha256: sha256.to_string(),
        }
    }

    #[test]
    fn ti_hashes_are_short_hashes_quoted_as_a1111_writes_them() {
        let a = loaded("my:style", "0123456789abcdef0123");
        let b = loaded("b,x", "fedcba9876543210ffff");
        assert_eq!(
            ti_hashes(&[&a, &b]),
            Some((
                "TI hashes".to_string(),
                "\"mystyle: 0123456789ab, bx: fedcba987654\"".to_string()
            ))
        );
        assert_eq!(ti_hashes(&[]), None);
    }

    #[test]
    fn the_default_folder_is_beside_a_local_model_only() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let model_text = model.to_str().unwrap();
        assert_eq!(embedding_dir(None, model_text), None);
        std::fs::create_dir(dir.path().join("embeddings")).unwrap();
        let found = embedding_dir(None, model_text).unwrap();
        assert_eq!(found, dir.path().canonicalize().unwrap().join("embeddings"));
        assert_eq!(embedding_dir(None, "sd15"), None);
        assert_eq!(embedding_dir(None, "org/name@main"), None);
        let explicit = Path::new("/somewhere/else");
        assert_eq!(
            embedding_dir(Some(explicit), model_text).as_deref(),
            Some(explicit)
        );
    }
}
