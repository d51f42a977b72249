//! `features/reference/inpainting.json`: diffusers' `StableDiffusionInpaintPipeline` with a
//! 9-channel inpainting UNet and with a regular 4-channel one (latent blending). Each case is
//! checked on its image (`inpainting:<case>`) and on every intermediate the reference holds
//! (`inpainting:<case>:<tensor>`: the processed mask, masked image, latent mask, masked-image
//! latents, image latents, noise and start latents), which names the stage a failure starts at.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use sdrs_pipeline::stable_diffusion::{InitImage, Inpainting, LoadOptions, Request};
use sdrs_pipeline::weights::read_json;
use sdrs_pipeline::{Error, Result, StableDiffusion};

use super::{diffusers_request, get, max_abs_diff, CaseResult, Outcome, Runner};
use crate::tolerances::CaseKind;

/// The intermediates of a case: the reference's tensor suffix, the kind whose bound it is held
/// to, and what sdrs computed for it.
type Intermediate = (&'static str, CaseKind, fn(&Inpainting) -> Option<&Tensor>);

const INTERMEDIATES: [Intermediate; 7] = [
    // Thresholds and a nearest resize of the same values: exact.
    ("mask_condition", CaseKind::BitExact, |i| {
        Some(&i.mask_condition)
    }),
    // `(2x - 1) * 0 or 1` in f32, as torch computes it: exact.
    ("masked_image", CaseKind::BitExact, |i| {
        Some(&i.masked_image)
    }),
    ("mask_latent", CaseKind::BitExact, |i| Some(&i.mask_latent)),
    // VAE encodes (the mean plus the generator's sample): the VAE's bound.
    ("masked_image_latents", CaseKind::Vae, |i| {
        Some(&i.masked_image_latents)
    }),
    ("image_latents", CaseKind::Vae, |i| i.image_latents.as_ref()),
    // Torch's generator, or the explicit latents: the generator's bound.
    ("noise", CaseKind::Rng, |i| Some(&i.noise)),
    // The noise scaled, or the image latents noised: the VAE's bound.
    ("latents_start", CaseKind::Vae, |i| Some(&i.start_latents)),
];

impl Runner<'_> {
    /// Every case of `dir/reference/inpainting.json` (`dir`: the features folder); the case's
    /// pipeline folder is looked up in `dir`, then in the fixtures folder.
    pub(super) fn inpainting_cases(&mut self, dir: &Path) -> Result<()> {
        let info = read_json(&dir.join("reference/inpainting.json"))?;
        let path = dir.join("reference/inpainting.safetensors");
        let reference = super::load_reference(&path)?;
        let cases = info["cases"].as_array().cloned().unwrap_or_default();
        if cases.is_empty() {
            self.push(CaseResult {
                name: "inpainting".to_string(),
                max_diff: None,
                tolerance: 0.0,
                outcome: Outcome::Fail(Some("inpainting.json lists no cases".to_string())),
            });
        }
        for case in cases {
            let key = case["key"].as_str().unwrap_or_default().to_string();
            let name = format!("inpainting:{key}");
            let wanted = self.wanted(&name)
                || INTERMEDIATES
                    .iter()
                    .any(|(what, ..)| self.wanted(&format!("{name}:{what}")));
            if !wanted {
                continue;
            }
            let computed = self
                .inpainting_case(dir, &key, &case, &reference)
                .map_err(|e| e.to_string());
            for (what, kind, select) in INTERMEDIATES {
                let reference_key = format!("{key}_{what}");
                let expected = reference.get(&reference_key);
                let Some(expected) = expected else {
                    // The reference does not hold it for this case (the image latents of an
                    // inpainting UNet); the draw order checks that sdrs encodes what diffusers does.
                    continue;
                };
                self.case(format!("{name}:{what}"), kind, |_| {
                    let (inpainting, _) = computed.as_ref().map_err(|e| failed(&key, e))?;
                    let ours = select(inpainting).ok_or_else(|| {
                        failed(
                            &key,
                            &format!(
                                "the reference has {reference_key} but sdrs did not compute it"
                            ),
                        )
                    })?;
                    max_abs_diff(ours, expected)
                });
            }
            self.case(name, CaseKind::Pipeline, |_| {
                let (_, image) = computed.as_ref().map_err(|e| failed(&key, e))?;
                max_abs_diff(image, get(&reference, &format!("{key}_image"))?)
            });
        }
        Ok(())
    }

    /// One case's intermediates and image; the draw order the case documents is checked against
    /// what sdrs encoded.
    fn inpainting_case(
        &mut self,
        dir: &Path,
        key: &str,
        case: &serde_json::Value,
        reference: &HashMap<String, Tensor>,
    ) -> Result<(Inpainting, Tensor)> {
        let folder = case["pipeline"].as_str().unwrap_or_default();
        let pipeline = self.feature_pipeline(dir, folder)?;
        let request = inpainting_request(pipeline, key, case, reference)?;
        let inpainting = pipeline.inpainting_start(&request)?;
        let draws = case["generator_draw_order"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let encodes_image = draws
            .iter()
            .any(|d| d.as_str().is_some_and(|d| d.starts_with("image_latents")));
        if encodes_image != inpainting.image_latents.is_some() {
            return Err(Error::InvalidParameter {
                name: "generator draw order",
                value: format!("{draws:?}"),
                expected: format!(
                    "the image latents {} as sdrs does",
                    if encodes_image { "not drawn" } else { "drawn" }
                ),
            });
        }
        let image = pipeline.generate(&request, &mut |_| {})?;
        Ok((inpainting, image))
    }

    /// The pipeline folder `folder` of `dir` (the features folder), else of the fixtures folder,
    /// loaded once.
    fn feature_pipeline(&mut self, dir: &Path, folder: &str) -> Result<&StableDiffusion> {
        let own = dir.join(folder);
        let path = if own.is_dir() {
            own
        } else {
            self.fixtures.join(folder)
        };
        let cache_key = path.display().to_string();
        if !self.pipelines.contains_key(&cache_key) {
            let options = LoadOptions::new(self.options.device.clone(), self.options.dtype, None)
                .with_kernels(self.options.kernels);
            let pipeline = StableDiffusion::load(&path, &options)?;
            self.pipelines.insert(cache_key.clone(), pipeline);
        }
        Ok(&self.pipelines[&cache_key])
    }
}

/// The request an `inpainting.json` case describes: its prompts, schedule, size and strength,
/// the shared init image and mask, and its explicit latents when it has them.
fn inpainting_request(
    pipeline: &StableDiffusion,
    key: &str,
    case: &serde_json::Value,
    reference: &HashMap<String, Tensor>,
) -> Result<Request> {
    let number = |field: &str| -> Result<f64> {
        case[field].as_f64().ok_or_else(|| Error::InvalidParameter {
            name: "inpainting.json field",
            value: format!("{key}.{field}"),
            expected: "a number".to_string(),
        })
    };
    let scheduler = case["scheduler_config"].clone();
    if !scheduler.is_object() {
        return Err(Error::InvalidParameter {
            name: "inpainting.json field",
            value: format!("{key}.scheduler_config"),
            expected: "a diffusers scheduler config".to_string(),
        });
    }
    let mut request = diffusers_request(
        pipeline,
        case["prompt"].as_str().unwrap_or_default(),
        scheduler,
    );
    request.negative_prompt = case["negative_prompt"].as_str().map(str::to_string);
    request.steps = number("num_inference_steps")? as usize;
    request.guidance_scale = number("guidance_scale")?;
    request.strength = number("strength")?;
    request.height = number("height")? as usize;
    request.width = number("width")? as usize;
    request.seed = case["generator_seed"].as_u64();
    if case["explicit_latents"].as_bool() == Some(true) {
        request.latents = Some(get(reference, &format!("{key}_latents"))?.clone());
    }
    request.init_image = InitImage::Pixels(get(reference, "init_image")?.clone());
    request.mask = Some(get(reference, "mask")?.clone());
    Ok(request)
}

/// A case whose computation failed, for each of its checks.
fn failed(key: &str, why: &str) -> Error {
    Error::InvalidParameter {
        name: "inpainting case",
        value: key.to_string(),
        expected: why.to_string(),
    }
}
