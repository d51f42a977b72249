//! `features/prompt_parser_cases.json` and `features/reference/prompt_weighting`: AUTOMATIC1111's
//! prompt syntax. The parser's pieces and weights (exact), each prompt's chunks (ids, the ids each
//! encoder gets, weights: exact), its weighted and unweighted conditioning for SD1.5 at both clip
//! skips and for SDXL (with the pooled projection), the weighting alone on the reference's states
//! (exact), and whole generations through the pipeline with weighted prompt and negative prompt.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use sdrs_pipeline::components::{ClipPromptEncoder, PromptEncoder, TextLayer};
use sdrs_pipeline::prompt::{emphasize, parse_prompt_attention, prompt_chunks, PromptChunk};
use sdrs_pipeline::stable_diffusion::{ModelFamily, PromptSyntax, Request, StableDiffusion};
use sdrs_pipeline::weights::read_json;
use sdrs_pipeline::{Error, Result};
use serde_json::Value;

use super::{get, ids_diff, max_abs_diff, CaseResult, Outcome, Runner};
use crate::tolerances::CaseKind;

/// A family's text encoders in the order their states are concatenated, with their widths.
#[derive(Default)]
struct Encoders {
    encoders: Vec<ClipPromptEncoder>,
    widths: Vec<usize>,
}

/// The two families of the reference, with the fixture pipeline and the text encoders of each.
#[derive(Clone, Copy)]
enum Family {
    Sd15,
    Sdxl,
}

impl Family {
    fn key(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sdxl => "sdxl",
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Family::Sd15 => "tiny-sd15",
            Family::Sdxl => "tiny-sdxl",
        }
    }

    /// `(tokenizer, text encoder)` folders, in the order the conditioning concatenates them.
    fn encoders(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Family::Sd15 => &[("tokenizer", "text_encoder")],
            Family::Sdxl => &[
                ("tokenizer", "text_encoder"),
                ("tokenizer_2", "text_encoder_2"),
            ],
        }
    }
}

impl Runner<'_> {
    /// Every prompt-syntax case under the extended set `features/` (`dir`).
    pub(super) fn prompt_weighting_cases(&mut self, dir: &Path) -> Result<()> {
        self.prompt_parser_cases(&dir.join("prompt_parser_cases.json"));
        let json = dir.join("reference/prompt_weighting.json");
        let tensors = dir.join("reference/prompt_weighting.safetensors");
        if !json.is_file() || !tensors.is_file() {
            self.missing("prompt_weighting", &format!("{} not found", json.display()));
            return Ok(());
        }
        let info = read_json(&json)?;
        let reference = load(&tensors)?;
        for family in [Family::Sd15, Family::Sdxl] {
            self.prompt_family_cases(family, &info, &reference)?;
        }
        let images = info["images"].as_array().cloned().unwrap_or_default();
        if images.is_empty() {
            self.missing(
                "prompt_weighting:image",
                "prompt_weighting.json lists no images",
            );
        }
        for image in images {
            let key = image["key"].as_str().unwrap_or_default().to_string();
            self.case(
                format!("prompt_weighting:image:{key}"),
                CaseKind::Pipeline,
                |r| r.prompt_image_case(&key, &image, &info, &reference),
            );
        }
        Ok(())
    }

    /// A failed case `name`, for a part of the reference that is not there.
    fn missing(&mut self, name: &str, reason: &str) {
        self.push(CaseResult {
            name: name.to_string(),
            max_diff: None,
            tolerance: 0.0,
            outcome: Outcome::Fail(Some(reason.to_string())),
        });
    }

    /// `prompt_parser:<index>`: `parse_prompt_attention` of each text, pieces and weights exact.
    fn prompt_parser_cases(&mut self, path: &Path) {
        let cases = match read_json(path) {
            Ok(cases) => cases.as_array().cloned().unwrap_or_default(),
            Err(e) => return self.missing("prompt_parser", &e.to_string()),
        };
        if cases.is_empty() {
            self.missing("prompt_parser", "prompt_parser_cases.json lists no cases");
        }
        for (index, case) in cases.iter().enumerate() {
            self.case(format!("prompt_parser:{index}"), CaseKind::BitExact, |_| {
                let text = case["text"].as_str().unwrap_or_default();
                Ok(parsed_diff(
                    &parse_prompt_attention(text),
                    &case["expected"],
                ))
            });
        }
    }

    /// The cases of one family's prompts (`sd15` or `sdxl` of the JSON).
    fn prompt_family_cases(
        &mut self,
        family: Family,
        info: &Value,
        reference: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let cases = info[family.key()].as_object().cloned().unwrap_or_default();
        if cases.is_empty() {
            let name = format!("prompt_weighting:{}", family.key());
            self.missing(&name, "prompt_weighting.json lists no prompts for it");
            return Ok(());
        }
        let prefix = format!("prompt_weighting:{}:", family.key());
        let encoders = self.prompt_encoders(family);
        for (name, case) in &cases {
            let prompt = case["prompt"].as_str().unwrap_or_default();
            self.case(
                format!("{prefix}chunks_{name}"),
                CaseKind::Tokenizer,
                |_| {
                    let encoders = encoders.as_ref().map_err(clone_error)?;
                    chunks_diff(&encoders.encoders, prompt, case)
                },
            );
            let clip_skips: &[Option<usize>] = match family {
                Family::Sd15 => &[Some(1), Some(2)],
                Family::Sdxl => &[None],
            };
            for &clip_skip in clip_skips {
                let (label, tensor) = match clip_skip {
                    Some(skip) => (
                        format!("{prefix}clipskip{skip}_{name}"),
                        format!("{}_clipskip{skip}_{name}", family.key()),
                    ),
                    None => (format!("{prefix}{name}"), format!("sdxl_{name}")),
                };
                self.case(label.clone(), CaseKind::WeightedConditioning, |r| {
                    let encoders = encoders.as_ref().map_err(clone_error)?;
                    r.conditioning_diff(family, prompt, clip_skip, encoders, reference, &tensor)
                });
                // The weighting alone, on the reference's own unweighted states: A1111's
                // arithmetic, so its bits.
                self.case(format!("{label}@emphasis"), CaseKind::BitExact, |_| {
                    let encoders = encoders.as_ref().map_err(clone_error)?;
                    emphasis_diff(&encoders.widths, case, reference, &tensor)
                });
                // A prompt with no syntax in one chunk is encoded exactly as diffusers does.
                if is_plain(prompt, case) {
                    self.case(format!("{label}@plain"), CaseKind::BitExact, |r| {
                        r.syntaxes_diff(family, prompt, clip_skip)
                    });
                }
            }
        }
        Ok(())
    }

    /// The family's text encoders with their tokenizers, from the fixture pipeline's folder, and
    /// the width of each one's hidden states.
    fn prompt_encoders(&self, family: Family) -> Result<Encoders> {
        let root = self.fixtures.join(family.folder());
        let mut encoders = Encoders::default();
        for &(tokenizer, encoder) in family.encoders() {
            let tokenizer = sdrs_clip::ClipTokenizer::from_dir(&root.join(tokenizer))?;
            let model = self.text_encoder(&format!("{}/{encoder}", family.folder()))?;
            encoders.widths.push(model.config().hidden_size);
            let device = &self.options.device;
            let encoder = ClipPromptEncoder::new(encoder, tokenizer, model, device);
            encoders.encoders.push(encoder);
        }
        Ok(encoders)
    }

    /// The request for one prompt through the fixture pipeline, unguided (the positive
    /// conditioning alone).
    fn prompt_request(
        pipeline: &StableDiffusion,
        prompt: &str,
        clip_skip: Option<usize>,
        syntax: PromptSyntax,
    ) -> Request {
        let mut request = Request::new(pipeline, prompt, pipeline.scheduler_config().clone());
        request.guidance_scale = 1.0;
        request.clip_skip = clip_skip;
        request.prompt_syntax = syntax;
        request
    }

    /// The weighted conditioning as the pipeline encodes the prompt against `<tensor>_cond`.
    /// What is not weighted is held to the text encoders' bound first (an error above it): the
    /// chunks' unweighted states (`<tensor>_unweighted`) and SDXL's pooled projection
    /// (`<tensor>_pooled`).
    fn conditioning_diff(
        &mut self,
        family: Family,
        prompt: &str,
        clip_skip: Option<usize>,
        encoders: &Encoders,
        reference: &HashMap<String, Tensor>,
        tensor: &str,
    ) -> Result<f64> {
        let text_tolerance = self.tolerance(CaseKind::TextEncoder)?;
        let layer = match (family, clip_skip) {
            (Family::Sd15, skip) => TextLayer::Normalized {
                clip_skip: skip.unwrap_or(1),
            },
            (Family::Sdxl, skip) => TextLayer::Raw {
                clip_skip: skip.unwrap_or(2),
            },
        };
        let unweighted = unweighted_states(&encoders.encoders, prompt, layer)?;
        within(
            &unweighted,
            reference,
            &format!("{tensor}_unweighted"),
            text_tolerance,
        )?;
        let pipeline = self.pipeline(family.folder(), false)?;
        let request = Self::prompt_request(pipeline, prompt, clip_skip, PromptSyntax::A1111);
        let conditioning = pipeline.encode_prompts(&request)?;
        if let Family::Sdxl = family {
            let added = conditioning
                .added
                .as_ref()
                .ok_or_else(|| Error::InvalidParameter {
                    name: "conditioning",
                    value: "no pooled embedding".to_string(),
                    expected: "SDXL's pooled projection".to_string(),
                })?;
            let pooled = format!("{tensor}_pooled");
            within(&added.text_embeds, reference, &pooled, text_tolerance)?;
        }
        max_abs_diff(
            &conditioning.embeddings,
            get(reference, &format!("{tensor}_cond"))?,
        )
    }

    /// The largest difference between the pipeline's conditioning of `prompt` in A1111's syntax
    /// and in the plain one (diffusers').
    fn syntaxes_diff(
        &mut self,
        family: Family,
        prompt: &str,
        clip_skip: Option<usize>,
    ) -> Result<f64> {
        let pipeline = self.pipeline(family.folder(), false)?;
        let encode = |syntax| {
            pipeline.encode_prompts(&Self::prompt_request(pipeline, prompt, clip_skip, syntax))
        };
        let (a1111, plain) = (encode(PromptSyntax::A1111)?, encode(PromptSyntax::Plain)?);
        let mut worst = max_abs_diff(&a1111.embeddings, &plain.embeddings)?;
        if let (Some(a), Some(p)) = (&a1111.added, &plain.added) {
            worst = worst.max(max_abs_diff(&a.text_embeds, &p.text_embeds)?);
        }
        Ok(worst)
    }

    /// `prompt_weighting:image:<key>`: the whole generation with the case's prompt and negative
    /// prompt, after checking the conditioning the pipeline built against the embeddings the
    /// reference passed to diffusers (an error when it is over its bound).
    fn prompt_image_case(
        &mut self,
        key: &str,
        image: &Value,
        info: &Value,
        reference: &HashMap<String, Tensor>,
    ) -> Result<f64> {
        let field_error = |field: &str, expected: &str| Error::InvalidParameter {
            name: "prompt_weighting.json field",
            value: format!("images[{key}].{field}"),
            expected: expected.to_string(),
        };
        let folder = image["pipeline"]
            .as_str()
            .ok_or_else(|| field_error("pipeline", "a fixture pipeline folder"))?;
        let family = match self.pipeline(folder, false)?.family() {
            ModelFamily::Sd => Family::Sd15,
            ModelFamily::SdxlBase | ModelFamily::SdxlRefiner => Family::Sdxl,
        };
        let prompt_of = |field: &str| -> Result<String> {
            let case = image[field]
                .as_str()
                .ok_or_else(|| field_error(field, "a prompt case"))?;
            info[family.key()][case]["prompt"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| field_error(field, "a prompt case of its family"))
        };
        let (prompt, negative) = (prompt_of("prompt_case")?, prompt_of("negative_case")?);
        let clip_skip = match image["clip_skip_a1111"].as_str() {
            None => None,
            Some(text) => Some(
                text.trim_start_matches("clipskip")
                    .parse::<usize>()
                    .map_err(|_| field_error("clip_skip_a1111", "clipskip<N>"))?,
            ),
        };
        let text_tolerance = self.tolerance(CaseKind::TextEncoder)?;
        let weighted_tolerance = self.tolerance(CaseKind::WeightedConditioning)?;
        let pipeline = self.pipeline(folder, false)?;
        let scheduler = image["scheduler_config"].clone();
        if !scheduler.is_object() {
            return Err(field_error("scheduler_config", "a scheduler config"));
        }
        let mut request = Request::new(pipeline, &prompt, scheduler);
        request.negative_prompt = Some(negative);
        request.clip_skip = clip_skip;
        request.prompt_syntax = PromptSyntax::A1111;
        let whole = |field: &str| -> Result<usize> {
            let value = image[field].as_u64();
            value
                .map(|v| v as usize)
                .ok_or_else(|| field_error(field, "a whole number"))
        };
        request.steps = whole("num_inference_steps")?;
        request.height = whole("height")?;
        request.width = whole("width")?;
        request.guidance_scale = image["guidance_scale"]
            .as_f64()
            .ok_or_else(|| field_error("guidance_scale", "a number"))?;
        request.seed = image["generator_seed"].as_u64();
        request.latents = reference.get(&format!("{key}_latents")).cloned();

        let conditioning = pipeline.encode_prompts(&request)?;
        // The rows are the negative branch, then the positive one.
        let mut checks = vec![(
            "prompt_embeds",
            conditioning.embeddings.clone(),
            weighted_tolerance,
        )];
        if let Some(added) = &conditioning.added {
            let pooled = added.text_embeds.clone();
            checks.push(("pooled_prompt_embeds", pooled, text_tolerance));
        }
        for (name, rows, bound) in checks {
            for (row, branch) in [(0, "negative_"), (1, "")] {
                let tensor = format!("{key}_{branch}{name}");
                within(&rows.get(row)?.unsqueeze(0)?, reference, &tensor, bound)?;
            }
        }
        let output = pipeline.generate(&request, &mut |_| {})?;
        max_abs_diff(&output, get(reference, &format!("{key}_image"))?)
    }
}

/// Whether `prompt` has no syntax and fits one chunk (its parse is itself at weight 1).
fn is_plain(prompt: &str, case: &Value) -> bool {
    let parsed = case["parsed"].as_array().cloned().unwrap_or_default();
    let single = parsed.len() == 1
        && parsed[0][0].as_str() == Some(prompt)
        && parsed[0][1].as_f64() == Some(1.0);
    single && case["n_chunks"].as_u64() == Some(1)
}

/// 0 when `ours` is `expected` (`[[text, weight], ...]`) piece for piece, else the largest
/// weight difference (infinite where the texts or the number of pieces differ).
fn parsed_diff(ours: &[(String, f64)], expected: &Value) -> f64 {
    let expected = expected.as_array().cloned().unwrap_or_default();
    if expected.len() != ours.len() {
        return f64::INFINITY;
    }
    let mut worst = 0f64;
    for ((text, weight), pair) in ours.iter().zip(&expected) {
        match (pair[0].as_str(), pair[1].as_f64()) {
            (Some(t), Some(w)) if t == text => worst = worst.max((weight - w).abs()),
            _ => return f64::INFINITY,
        }
    }
    worst
}

/// The chunks of `prompt` for each encoder against the reference: the parse, the ids with `eos`
/// padding (`chunks_token_ids`), the ids each encoder gets (`chunks_model_ids`, and
/// `chunks_model_ids_te2` for a second encoder) and the weights, all exact.
fn chunks_diff(encoders: &[ClipPromptEncoder], prompt: &str, case: &Value) -> Result<f64> {
    let mut worst = parsed_diff(&parse_prompt_attention(prompt), &case["parsed"]);
    for (index, encoder) in encoders.iter().enumerate() {
        let rules = encoder.token_rules();
        let chunks = prompt_chunks(prompt, &rules, |text| encoder.tokenize(text))?;
        let rows = |field: &str| case[field].as_array().cloned().unwrap_or_default();
        let model_field = match index {
            0 => "chunks_model_ids",
            _ => "chunks_model_ids_te2",
        };
        let (ids, model_ids, weights) = (
            rows("chunks_token_ids"),
            rows(model_field),
            rows("chunks_weights"),
        );
        let counts = [ids.len(), model_ids.len(), weights.len()];
        if counts.iter().any(|&n| n != chunks.len()) {
            return Ok(f64::INFINITY);
        }
        for (c, chunk) in chunks.iter().enumerate() {
            worst = worst
                .max(ids_diff(&chunk.ids, &ids[c]))
                .max(ids_diff(&chunk.model_ids(&rules), &model_ids[c]))
                .max(weights_diff(chunk, &weights[c]));
        }
    }
    Ok(worst)
}

fn weights_diff(chunk: &PromptChunk, expected: &Value) -> f64 {
    let expected: Vec<f64> = expected
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    if expected.len() != chunk.weights.len() {
        return f64::INFINITY;
    }
    chunk
        .weights
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// An error naming the reference tensor `name` when `ours` is further than `bound` from it.
fn within(
    ours: &Tensor,
    reference: &HashMap<String, Tensor>,
    name: &str,
    bound: f64,
) -> Result<()> {
    let diff = max_abs_diff(ours, get(reference, name)?)?;
    if diff > bound {
        return Err(Error::InvalidParameter {
            name: "conditioning",
            value: format!("max|diff| {diff:.3e} from {name}"),
            expected: format!("within {bound:e}"),
        });
    }
    Ok(())
}

/// [`emphasize`] applied to the reference's unweighted states (`<tensor>_unweighted`), chunk by
/// chunk and encoder by encoder (`widths` along the features) with the JSON's weights, against
/// the reference's weighted ones (`<tensor>_cond`).
fn emphasis_diff(
    widths: &[usize],
    case: &Value,
    reference: &HashMap<String, Tensor>,
    tensor: &str,
) -> Result<f64> {
    let unweighted = get(reference, &format!("{tensor}_unweighted"))?;
    let expected = get(reference, &format!("{tensor}_cond"))?;
    let chunks = case["chunks_weights"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tokens = unweighted.dim(1)? / chunks.len().max(1);
    let mut worst = 0f64;
    for (index, weights) in chunks.iter().enumerate() {
        let weights: Vec<f64> = weights
            .as_array()
            .map(|w| w.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let mut offset = 0;
        for &width in widths {
            let part = |t: &Tensor| {
                t.narrow(1, index * tokens, tokens)?
                    .narrow(2, offset, width)
            };
            let mut values = part(unweighted)?.flatten_all()?.to_vec1::<f32>()?;
            emphasize(&mut values, &weights);
            let ours = Tensor::from_vec(values, (1, tokens, width), &Device::Cpu)?;
            worst = worst.max(max_abs_diff(&ours, &part(expected)?)?);
            offset += width;
        }
    }
    Ok(worst)
}

/// Each chunk of `prompt` encoded without its weights by each encoder, the encoders' states
/// concatenated along the features and the chunks along the tokens: `[1, 77 * chunks, C]`.
fn unweighted_states(
    encoders: &[ClipPromptEncoder],
    prompt: &str,
    layer: TextLayer,
) -> Result<Tensor> {
    let mut per_encoder = Vec::new();
    for encoder in encoders {
        let rules = encoder.token_rules();
        let chunks = prompt_chunks(prompt, &rules, |text| encoder.tokenize(text))?;
        let states = chunks
            .iter()
            .map(|chunk| {
                Ok(encoder
                    .encode_ids(&chunk.model_ids(&rules), layer, false)?
                    .hidden_state)
            })
            .collect::<Result<Vec<_>>>()?;
        per_encoder.push(Tensor::cat(&states, 1)?);
    }
    Ok(Tensor::cat(&per_encoder, 2)?)
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| Error::Weights {
        component: "reference",
        path: path.to_path_buf(),
        source,
    })
}

fn clone_error(error: &Error) -> Error {
    Error::InvalidParameter {
        name: "text encoders",
        value: String::new(),
        expected: error.to_string(),
    }
}
