//! `features/reference/lora_*.json`: whole generations with LoRAs merged (kohya/A1111 with LoCon,
//! two adapters at once, diffusers/PEFT), their prompt embeddings, and single weights after
//! diffusers' `fuse_lora`, each compared with what sdrs merges.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_pipeline::loading::lora::LoraSet;
use sdrs_pipeline::stable_diffusion::{LoadOptions, Request, StableDiffusion};
use sdrs_pipeline::weights::{find_weights, read_json, var_builder};
use sdrs_pipeline::{Error, LoraFile, Result};
use sdrs_unet::UNet2DConditionConfig;

use super::{get, max_abs_diff, CaseResult, Outcome, Runner};
use crate::tolerances::CaseKind;

/// The reference files and the tiny model each is made with.
const SETS: [(&str, &str); 2] = [("lora_sd15", "tiny-sd15"), ("lora_sdxl", "tiny-sdxl")];

impl Runner<'_> {
    /// Every case of `lora_sd15.json` and `lora_sdxl.json` under `dir` (the features folder).
    pub(super) fn lora_cases(&mut self, dir: &Path) -> Result<()> {
        for (set, model) in SETS {
            let json = dir.join("reference").join(format!("{set}.json"));
            if !json.is_file() {
                self.fail(set, &format!("{} not found", json.display()));
                continue;
            }
            let info = read_json(&json)?;
            let reference = self.features_reference(dir, set)?;
            let model = self.model_dir(dir, info["pipeline"].as_str().unwrap_or(model));
            self.lora_generations(set, dir, &model, &info, &reference);
            self.lora_fused(set, dir, &model, &info, &reference);
        }
        Ok(())
    }

    /// A failed case `name:` saying why (a reference without cases is a failure, not "0 passed").
    fn fail(&mut self, name: &str, why: &str) {
        let tolerance = self.tolerance(CaseKind::Pipeline).unwrap_or(f64::NAN);
        self.push(CaseResult {
            name: format!("{name}:"),
            max_diff: None,
            tolerance,
            outcome: Outcome::Fail(Some(why.to_string())),
        });
    }

    fn features_reference(&self, dir: &Path, set: &str) -> Result<HashMap<String, Tensor>> {
        let path = dir.join("reference").join(format!("{set}.safetensors"));
        super::load_reference(&path)
    }

    /// The tiny model `name` beside the features folder (where the feature fixtures were made
    /// from), else in the fixtures folder.
    fn model_dir(&self, dir: &Path, name: &str) -> PathBuf {
        match dir.parent().map(|parent| parent.join(name)) {
            Some(beside) if beside.is_dir() => beside,
            _ => self.fixtures.join(name),
        }
    }

    /// `<set>:<case>` (the image) and `<set>:<case>:prompt_embeds` for every case, on one
    /// pipeline whose LoRAs are changed case by case ([`StableDiffusion::set_loras`]).
    fn lora_generations(
        &mut self,
        set: &str,
        dir: &Path,
        model: &Path,
        info: &serde_json::Value,
        reference: &HashMap<String, Tensor>,
    ) {
        let cases = info["cases"].as_array().cloned().unwrap_or_default();
        if cases.is_empty() {
            self.fail(set, "the reference lists no cases");
            return;
        }
        let options = LoadOptions::new(self.options.device.clone(), self.options.dtype, None)
            .with_kernels(self.options.kernels);
        let mut pipeline = None;
        for case in cases {
            let key = case["key"].as_str().unwrap_or_default().to_string();
            let name = format!("{set}:{key}");
            let embeds_name = format!("{name}:prompt_embeds");
            if !self.wanted(&name) && !self.wanted(&embeds_name) {
                continue;
            }
            let mut embeds = None;
            self.case(name, CaseKind::Pipeline, |_| {
                if pipeline.is_none() {
                    pipeline = Some(StableDiffusion::load(model, &options)?);
                }
                let Some(pipeline) = pipeline.as_mut() else {
                    return Err(field_error(&key, "pipeline", "a model that loads"));
                };
                let loras = case_loras(dir, info, &case)?;
                pipeline.set_loras(&loras)?;
                let request = lora_request(pipeline, &key, &case, reference)?;
                let conditioning = pipeline.encode_prompts(&request)?;
                embeds = Some(embeddings_diff(&key, &conditioning, reference));
                let image = pipeline.generate(&request, &mut |_| {})?;
                max_abs_diff(&image, get(reference, &format!("{key}_image"))?)
            });
            if reference.contains_key(&format!("{key}_prompt_embeds")) {
                self.case(embeds_name, CaseKind::TextEncoder, |_| match embeds {
                    Some(diff) => diff,
                    None => Err(Error::InvalidParameter {
                        name: "case",
                        value: key.clone(),
                        expected: "a generation that ran (see the image case)".to_string(),
                    }),
                });
            }
        }
    }

    /// `<set>:fused:<tensor_prefix>` for every record of `fused`: the model's weight as sdrs
    /// loads it against `_original`, and with the LoRA merged at `lora_scale` against `_fused`.
    fn lora_fused(
        &mut self,
        set: &str,
        dir: &Path,
        model: &Path,
        info: &serde_json::Value,
        reference: &HashMap<String, Tensor>,
    ) {
        let records = info["fused"].as_array().cloned().unwrap_or_default();
        if records.is_empty() {
            self.fail(
                &format!("{set}:fused"),
                "the reference lists no fused weights",
            );
            return;
        }
        for record in records {
            let prefix = record["tensor_prefix"].as_str().unwrap_or_default();
            let name = format!("{set}:fused:{prefix}");
            self.case(name, CaseKind::LoraMerge, |_| {
                fused_diff(dir, model, prefix, &record, reference)
            });
        }
    }
}

fn field_error(key: &str, field: &str, expected: &str) -> Error {
    Error::InvalidParameter {
        name: "lora reference field",
        value: format!("{key}.{field}"),
        expected: expected.to_string(),
    }
}

/// The LoRA files and multipliers a case names (`adapters`, `adapter_weights`, the `files` map).
fn case_loras(
    dir: &Path,
    info: &serde_json::Value,
    case: &serde_json::Value,
) -> Result<Vec<LoraFile>> {
    let key = case["key"].as_str().unwrap_or_default();
    let adapters = case["adapters"]
        .as_array()
        .ok_or_else(|| field_error(key, "adapters", "a list of adapter names"))?;
    let weights = case["adapter_weights"]
        .as_array()
        .ok_or_else(|| field_error(key, "adapter_weights", "a list of numbers"))?;
    if adapters.len() != weights.len() {
        return Err(field_error(
            key,
            "adapter_weights",
            "one weight per adapter",
        ));
    }
    adapters
        .iter()
        .zip(weights)
        .map(|(adapter, weight)| {
            let adapter = adapter
                .as_str()
                .ok_or_else(|| field_error(key, "adapters", "adapter names"))?;
            let file = info["files"][adapter]["file"]
                .as_str()
                .ok_or_else(|| field_error(key, adapter, "an adapter of the files map"))?;
            let weight = weight
                .as_f64()
                .ok_or_else(|| field_error(key, "adapter_weights", "numbers"))?;
            Ok(LoraFile::new(dir.join(file), weight))
        })
        .collect()
}

/// The request of one case: its prompts, size, steps, guidance and scheduler, with the shared
/// `latents` (or the generator's when the case is seeded).
fn lora_request(
    pipeline: &StableDiffusion,
    key: &str,
    case: &serde_json::Value,
    reference: &HashMap<String, Tensor>,
) -> Result<Request> {
    let mut request = super::json_case_request(pipeline, "lora reference field", key, case)?;
    match case["generator_seed"].as_u64() {
        Some(seed) => request.seed = Some(seed),
        None => request.latents = Some(get(reference, "latents")?.clone()),
    }
    Ok(request)
}

/// The positive prompt's embeddings (and SDXL's pooled embedding) against the reference's:
/// the last row of the conditioning (the negative row comes first when guided).
fn embeddings_diff(
    key: &str,
    conditioning: &sdrs_pipeline::Conditioning,
    reference: &HashMap<String, Tensor>,
) -> Result<f64> {
    let last = |t: &Tensor| -> Result<Tensor> {
        let rows = t.dim(0)?;
        Ok(t.narrow(0, rows - 1, 1)?.to_dtype(DType::F32)?)
    };
    let mut diff = max_abs_diff(
        &last(&conditioning.embeddings)?,
        get(reference, &format!("{key}_prompt_embeds"))?,
    )?;
    if let Some(expected) = reference.get(&format!("{key}_pooled_prompt_embeds")) {
        let added = conditioning
            .added
            .as_ref()
            .ok_or_else(|| Error::InvalidParameter {
                name: "conditioning",
                value: key.to_string(),
                expected: "SDXL's pooled embedding, as the reference has one".to_string(),
            })?;
        diff = diff.max(max_abs_diff(&last(&added.text_embeds)?, expected)?);
    }
    Ok(diff)
}

/// One `fused` record: the weight loaded plain against `_original` and merged against `_fused`.
fn fused_diff(
    dir: &Path,
    model: &Path,
    prefix: &str,
    record: &serde_json::Value,
    reference: &HashMap<String, Tensor>,
) -> Result<f64> {
    let component = record["component"].as_str().unwrap_or_default();
    let component = ["unet", "text_encoder", "text_encoder_2"]
        .into_iter()
        .find(|c| *c == component)
        .ok_or_else(|| field_error(prefix, "component", "unet, text_encoder or text_encoder_2"))?;
    let module = record["module"]
        .as_str()
        .ok_or_else(|| field_error(prefix, "module", "a module path"))?;
    let file = record["file"]
        .as_str()
        .ok_or_else(|| field_error(prefix, "file", "a LoRA file"))?;
    let scale = record["lora_scale"]
        .as_f64()
        .ok_or_else(|| field_error(prefix, "lora_scale", "a number"))?;
    let original = get(reference, &format!("{prefix}_original"))?;
    let fused = get(reference, &format!("{prefix}_fused"))?;
    let unet = UNet2DConditionConfig::from_file(&model.join("unet").join("config.json"))?;
    // The merge is computed in f32 whatever the compute dtype; it is what is checked here.
    let files = find_weights(&model.join(component), None)?;
    let (vb, _) = var_builder(component, &files, DType::F32, &Device::Cpu)?;
    let name = format!("{module}.weight");
    let loaded = vb.get(original.shape(), &name)?;
    let set = LoraSet::open(&[LoraFile::new(dir.join(file), scale)], &unet, true)?
        .ok_or_else(|| field_error(prefix, "file", "a LoRA file"))?;
    let merged = set.wrap(component, vb).get(fused.shape(), &name)?;
    Ok(max_abs_diff(&loaded, original)?.max(max_abs_diff(&merged, fused)?))
}
