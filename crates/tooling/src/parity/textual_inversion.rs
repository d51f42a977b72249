//! `features/reference/textual_inversion.json`: textual-inversion embeddings (A1111, diffusers and
//! SDXL files) loaded into the tiny pipelines as diffusers' `load_textual_inversion` loads them:
//! the token ids of the prompt with the added tokens, its embeddings (and SDXL's pooled one), and
//! whole generations with and without the embeddings. Which cases there are comes from the JSON
//! and from the tensors the reference file holds for each (`<key>_<what>`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sdrs_pipeline::loading::embeddings::{read_embedding_file, EmbeddingFile, EmbeddingVectors};
use sdrs_pipeline::stable_diffusion::{LoadOptions, Request, StableDiffusion};
use sdrs_pipeline::weights::read_json;
use sdrs_pipeline::{Error, Result};

use super::{get, ids_diff, max_abs_diff, CaseResult, Outcome, Runner};
use crate::tolerances::CaseKind;

/// What one `<key>_<suffix>` reference tensor is checked as.
enum Check {
    /// `input_ids` (tokenizer 1) or `input_ids_2`.
    Ids {
        second: bool,
    },
    PromptEmbeds,
    PooledPromptEmbeds,
    /// The generation with the embeddings from the explicit `<key>_latents`.
    Image,
    /// The same generation before the embeddings are loaded.
    BaseImage,
    /// The generation with the embeddings from the case's generator seed.
    SeededImage,
    /// Anything else: vectors the files hold (`cat_vectors`, `clip_l`, ...), matched by value.
    Vectors,
}

impl Check {
    fn of(suffix: &str) -> Option<Self> {
        Some(match suffix {
            "latents" => return None,
            "input_ids" => Check::Ids { second: false },
            "input_ids_2" => Check::Ids { second: true },
            "prompt_embeds" => Check::PromptEmbeds,
            "pooled_prompt_embeds" => Check::PooledPromptEmbeds,
            "image" => Check::Image,
            "base_image" => Check::BaseImage,
            "seeded_image" => Check::SeededImage,
            _ => Check::Vectors,
        })
    }

    fn kind(&self) -> CaseKind {
        match self {
            Check::Ids { .. } => CaseKind::Tokenizer,
            Check::PromptEmbeds | Check::PooledPromptEmbeds => CaseKind::TextEncoder,
            Check::Image | Check::BaseImage | Check::SeededImage => CaseKind::Pipeline,
            Check::Vectors => CaseKind::BitExact,
        }
    }
}

fn field_error(key: &str, field: &str, expected: &str) -> Error {
    Error::InvalidParameter {
        name: "textual_inversion.json field",
        value: format!("{key}.{field}"),
        expected: expected.to_string(),
    }
}

impl Runner<'_> {
    /// Every case of `dir/reference/textual_inversion.json`; a JSON without cases is a failure.
    pub(super) fn textual_inversion_cases(&mut self, dir: &Path) -> Result<()> {
        let read = || -> Result<(serde_json::Value, HashMap<String, Tensor>)> {
            let info = read_json(&dir.join("reference/textual_inversion.json"))?;
            let path = dir.join("reference/textual_inversion.safetensors");
            let reference = super::load_reference(&path)?;
            Ok((info, reference))
        };
        let (info, reference) = match read() {
            Ok(read) => read,
            Err(e) => {
                self.fail_all("textual_inversion:", e.to_string());
                return Ok(());
            }
        };
        let cases = info["cases"].as_array().cloned().unwrap_or_default();
        if cases.is_empty() {
            self.fail_all(
                "textual_inversion:",
                "textual_inversion.json has no cases: nothing was checked".to_string(),
            );
            return Ok(());
        }
        for case in &cases {
            let key = case["key"].as_str().unwrap_or_default().to_string();
            let mut suffixes: Vec<String> = reference
                .keys()
                .filter_map(|name| name.strip_prefix(&format!("{key}_")).map(str::to_string))
                .collect();
            suffixes.sort();
            if suffixes.is_empty() {
                self.case(
                    format!("textual_inversion:{key}"),
                    CaseKind::Pipeline,
                    |_| {
                        Err(field_error(
                            &key,
                            "key",
                            "a key with tensors in the reference file",
                        ))
                    },
                );
            }
            for suffix in suffixes {
                let Some(check) = Check::of(&suffix) else {
                    continue;
                };
                let name = format!("textual_inversion:{key}_{suffix}");
                let expected = format!("{key}_{suffix}");
                self.case(name, check.kind(), |r| {
                    r.textual_inversion_check(dir, case, &check, &reference, &expected)
                });
            }
        }
        Ok(())
    }

    /// One failed line standing for a whole set that could not be checked.
    fn fail_all(&mut self, name: &str, reason: String) {
        let tolerance = self.tolerance(CaseKind::Pipeline).unwrap_or(f64::NAN);
        self.push(CaseResult {
            name: name.to_string(),
            max_diff: None,
            tolerance,
            outcome: Outcome::Fail(Some(reason)),
        });
    }

    fn textual_inversion_check(
        &mut self,
        dir: &Path,
        case: &serde_json::Value,
        check: &Check,
        reference: &HashMap<String, Tensor>,
        expected: &str,
    ) -> Result<f64> {
        let key = case["key"].as_str().unwrap_or_default();
        let files = embedding_files(dir, case)?;
        match check {
            Check::Vectors => {
                let wanted = get(reference, expected)?;
                let mut best = f64::INFINITY;
                for (_, file) in &files {
                    let sets = match &file.vectors {
                        EmbeddingVectors::Single(v) => vec![v],
                        EmbeddingVectors::Sdxl { clip_l, clip_g } => vec![clip_l, clip_g],
                    };
                    for set in sets {
                        if set.dims() == wanted.dims() {
                            best = best.min(max_abs_diff(set, wanted)?);
                        }
                    }
                }
                Ok(best)
            }
            Check::Ids { second } => {
                let (tokenizer_dir, ids_field) = if *second {
                    ("tokenizer_2", "added_token_ids_2")
                } else {
                    ("tokenizer", "added_token_ids")
                };
                let folder = pipeline_folder(dir, &self.fixtures, case)?;
                let mut tokenizer =
                    sdrs_clip::ClipTokenizer::from_dir(&folder.join(tokenizer_dir))?;
                for (token, file) in &files {
                    let n = match &file.vectors {
                        EmbeddingVectors::Single(v) => v.dim(0)?,
                        EmbeddingVectors::Sdxl { clip_l, clip_g } => {
                            (if *second { clip_g } else { clip_l }).dim(0)?
                        }
                    };
                    tokenizer.add_embedding_token(token, n)?;
                }
                let prompt = case["prompt"]
                    .as_str()
                    .ok_or_else(|| field_error(key, "prompt", "a prompt"))?;
                let ids: Vec<u32> = get(reference, expected)?
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?
                    .into_iter()
                    .map(|v| v as u32)
                    .collect();
                let expected_ids = serde_json::Value::from(ids);
                let mut worst = ids_diff(&tokenizer.encode(prompt)?, &expected_ids);
                // The ids the pipeline gave each token, against the JSON's.
                let index = usize::from(*second);
                let pipeline = self.textual_inversion_pipeline(dir, case, true)?;
                for loaded in pipeline.embeddings() {
                    let given = loaded
                        .ids
                        .get(index.min(loaded.ids.len().saturating_sub(1)));
                    let names = std::iter::once(loaded.token.clone())
                        .chain((1..loaded.num_vectors).map(|i| format!("{}_{i}", loaded.token)));
                    for (i, name) in names.enumerate() {
                        let want = case[ids_field][&name].as_u64();
                        let got = given.and_then(|ids| ids.get(i)).map(|&id| id as u64);
                        if want.is_none() || want != got {
                            worst = f64::INFINITY;
                        }
                    }
                }
                Ok(worst)
            }
            Check::PromptEmbeds | Check::PooledPromptEmbeds => {
                let pipeline = self.textual_inversion_pipeline(dir, case, true)?;
                let mut request = textual_inversion_request(pipeline, case, reference)?;
                // Unguided: only the prompt's own row.
                request.guidance_scale = 1.0;
                let conditioning = pipeline.encode_prompts(&request)?;
                let got = match check {
                    Check::PromptEmbeds => conditioning.embeddings,
                    _ => {
                        conditioning
                            .added
                            .ok_or_else(|| field_error(key, "pipeline", "an SDXL pipeline"))?
                            .text_embeds
                    }
                };
                max_abs_diff(&got, get(reference, expected)?)
            }
            Check::Image | Check::BaseImage | Check::SeededImage => {
                let with_embeddings = !matches!(check, Check::BaseImage);
                let pipeline = self.textual_inversion_pipeline(dir, case, with_embeddings)?;
                let mut request = textual_inversion_request(pipeline, case, reference)?;
                if matches!(check, Check::SeededImage) {
                    request.latents = None;
                    request.seed = Some(
                        case["seeded_generator_seed"]
                            .as_u64()
                            .ok_or_else(|| field_error(key, "seeded_generator_seed", "a seed"))?,
                    );
                }
                let image = pipeline.generate(&request, &mut |_| {})?;
                max_abs_diff(&image, get(reference, expected)?)
            }
        }
    }

    /// The case's pipeline, with its embeddings loaded (`with_embeddings`) or as it loads, kept
    /// for the following cases.
    fn textual_inversion_pipeline(
        &mut self,
        dir: &Path,
        case: &serde_json::Value,
        with_embeddings: bool,
    ) -> Result<&StableDiffusion> {
        let folder = pipeline_folder(dir, &self.fixtures, case)?;
        let cache_key = format!(
            "textual_inversion:{}{}",
            folder.display(),
            if with_embeddings { "+embeddings" } else { "" }
        );
        if !self.pipelines.contains_key(&cache_key) {
            let options = LoadOptions::new(self.options.device.clone(), self.options.dtype, None)
                .with_kernels(self.options.kernels);
            let mut pipeline = StableDiffusion::load(&folder, &options)?;
            if with_embeddings {
                for (token, file) in embedding_files(dir, case)? {
                    pipeline.add_embedding(&token, &file)?;
                }
            }
            self.pipelines.insert(cache_key.clone(), pipeline);
        }
        Ok(&self.pipelines[&cache_key])
    }
}

/// The case's pipeline folder: in the features folder, else in the fixtures folder.
fn pipeline_folder(dir: &Path, fixtures: &Path, case: &serde_json::Value) -> Result<PathBuf> {
    let key = case["key"].as_str().unwrap_or_default();
    let name = case["pipeline"]
        .as_str()
        .ok_or_else(|| field_error(key, "pipeline", "a pipeline folder name"))?;
    let local = dir.join(name);
    Ok(if local.is_dir() {
        local
    } else {
        fixtures.join(name)
    })
}

/// The case's embedding files with their tokens, in diffusers' load order: by the first id each
/// token was given (`added_token_ids`), then by name.
fn embedding_files(dir: &Path, case: &serde_json::Value) -> Result<Vec<(String, EmbeddingFile)>> {
    let key = case["key"].as_str().unwrap_or_default();
    let files = case["files"]
        .as_object()
        .filter(|files| !files.is_empty())
        .ok_or_else(|| field_error(key, "files", "an object of token -> embedding file"))?;
    let mut entries: Vec<(u64, String, PathBuf)> = Vec::new();
    for (token, path) in files {
        let path = path
            .as_str()
            .ok_or_else(|| field_error(key, &format!("files.{token}"), "a file path"))?;
        let first_id = case["added_token_ids"][token].as_u64().unwrap_or(u64::MAX);
        entries.push((first_id, token.clone(), dir.join(path)));
    }
    entries.sort();
    entries
        .into_iter()
        .map(|(_, token, path)| Ok((token, read_embedding_file(&path)?)))
        .collect()
}

/// The request of a case: its prompts, steps, guidance, scheduler, size and explicit latents.
fn textual_inversion_request(
    pipeline: &StableDiffusion,
    case: &serde_json::Value,
    reference: &HashMap<String, Tensor>,
) -> Result<Request> {
    let key = case["key"].as_str().unwrap_or_default();
    let mut request =
        super::json_case_request(pipeline, "textual_inversion.json field", key, case)?;
    request.latents = reference.get(&format!("{key}_latents")).cloned();
    Ok(request)
}
