//! `features/reference/tiled_vae.json`: diffusers' tiled VAE (`enable_tiling()` with the tile
//! sizes and overlap of each case) on the tiny VAEs: `tiled_vae:<case>:decode` (the decoded
//! image) and `tiled_vae:<case>:encode` (the blended moments' mean and log-variance), and a seeded
//! generation whose final decode is tiled, `tiled_vae:<case>` (final latents and image).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use sdrs_pipeline::stable_diffusion::{activation_dtype, LoadOptions, StableDiffusion};
use sdrs_pipeline::weights::read_json;
use sdrs_pipeline::{Error, Result};
use sdrs_vae::VaeTiling;

use super::{diffusers_request, get, max_abs_diff, CaseResult, Outcome, Runner};
use crate::tolerances::CaseKind;

/// The `VaeTiling` of a case's `tile_sample_min_size`, `tile_latent_min_size` and
/// `tile_overlap_factor` (at the top level, or under `vae_tiling`).
fn case_tiling(key: &str, fields: &serde_json::Value) -> Result<VaeTiling> {
    let field_error = |field: &str, expected: &str| Error::InvalidParameter {
        name: "tiled_vae.json field",
        value: format!("{key}.{field}"),
        expected: expected.to_string(),
    };
    let size = |field: &str| -> Result<usize> {
        fields[field]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| field_error(field, "a whole number"))
    };
    let overlap = fields["tile_overlap_factor"]
        .as_f64()
        .ok_or_else(|| field_error("tile_overlap_factor", "a number"))?;
    Ok(VaeTiling::new(
        size("tile_sample_min_size")?,
        size("tile_latent_min_size")?,
        overlap,
    )?)
}

impl Runner<'_> {
    /// Every case of `tiled_vae.json` under `dir` (the `features/` set); a JSON without cases is
    /// a failure.
    pub(super) fn tiled_vae_cases(&mut self, dir: &Path) -> Result<()> {
        let json_path = dir.join("reference/tiled_vae.json");
        let info = read_json(&json_path)?;
        let cases = info["cases"].as_array().cloned().unwrap_or_default();
        if cases.is_empty() {
            self.push(CaseResult {
                name: "tiled_vae".to_string(),
                max_diff: None,
                tolerance: 0.0,
                outcome: Outcome::Fail(Some(format!("{} lists no cases", json_path.display()))),
            });
            return Ok(());
        }
        let path = dir.join("reference/tiled_vae.safetensors");
        let reference = super::load_reference(&path)?;
        let (dtype, device) = (self.options.dtype, &self.options.device);
        let vae_kind = match activation_dtype(dtype, device) {
            DType::F16 | DType::BF16 => CaseKind::VaeHalfActivations,
            _ => CaseKind::Vae,
        };
        for case in cases {
            let key = case["key"].as_str().unwrap_or_default().to_string();
            if let Some(vae) = case["vae"].as_str() {
                let vae = vae.to_string();
                for encode in [false, true] {
                    let pass = if encode { "encode" } else { "decode" };
                    self.case(format!("tiled_vae:{key}:{pass}"), vae_kind, |r| {
                        r.tiled_vae(&key, &vae, &case, &reference, encode)
                    });
                }
            } else if case["pipeline"].is_string() {
                self.case(format!("tiled_vae:{key}"), CaseKind::Pipeline, |r| {
                    r.tiled_vae_pipeline(&key, &case, &reference)
                });
            } else {
                self.push(CaseResult {
                    name: format!("tiled_vae:{key}"),
                    max_diff: None,
                    tolerance: 0.0,
                    outcome: Outcome::Fail(Some(
                        "the case names neither a `vae` nor a `pipeline`".to_string(),
                    )),
                });
            }
        }
        Ok(())
    }

    /// One VAE case: `latents` decoded, or `image` encoded, with the case's tiles.
    fn tiled_vae(
        &mut self,
        key: &str,
        vae: &str,
        case: &serde_json::Value,
        reference: &HashMap<String, Tensor>,
        encode: bool,
    ) -> Result<f64> {
        let tiling = case_tiling(key, case)?;
        let dir = self.fixtures.join(vae);
        let config = sdrs_vae::AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
        let model = sdrs_vae::AutoencoderKL::new(self.weights("vae", &dir)?, &config)?;
        let (dtype, device) = (self.options.dtype, self.options.device.clone());
        let input = |name: &str| -> Result<Tensor> {
            Ok(get(reference, name)?
                .to_device(&device)?
                .to_dtype(activation_dtype(dtype, &device))?)
        };
        if encode {
            let dist = model.encode_tiled(&input("image")?, &tiling)?;
            let mean = max_abs_diff(&dist.mean, get(reference, &format!("{key}_encoded_mean"))?)?;
            let logvar = max_abs_diff(
                &dist.logvar,
                get(reference, &format!("{key}_encoded_logvar"))?,
            )?;
            Ok(mean.max(logvar))
        } else {
            let decoded = model.decode_tiled(&input("latents")?, &tiling)?;
            max_abs_diff(&decoded, get(reference, &format!("{key}_decoded"))?)
        }
    }

    /// The seeded generation with a tiled final decode: its final latents (when the reference
    /// has them) and image.
    fn tiled_vae_pipeline(
        &mut self,
        key: &str,
        case: &serde_json::Value,
        reference: &HashMap<String, Tensor>,
    ) -> Result<f64> {
        let field_error = |field: &str, expected: &str| Error::InvalidParameter {
            name: "tiled_vae.json field",
            value: format!("{key}.{field}"),
            expected: expected.to_string(),
        };
        let tiling = case_tiling(key, &case["vae_tiling"])?;
        let folder = case["pipeline"].as_str().unwrap_or_default();
        let options = LoadOptions::new(self.options.device.clone(), self.options.dtype, None)
            .with_kernels(self.options.kernels);
        let mut pipeline = StableDiffusion::load(&self.fixtures.join(folder), &options)?;
        pipeline.set_vae_tiles(Some(tiling));
        let scheduler = case
            .get("scheduler_config")
            .filter(|c| c.is_object())
            .cloned()
            .ok_or_else(|| field_error("scheduler_config", "a scheduler config"))?;
        let mut request = diffusers_request(
            &pipeline,
            case["prompt"].as_str().unwrap_or_default(),
            scheduler,
        );
        request.negative_prompt = case["negative_prompt"].as_str().map(str::to_string);
        request.steps = case["num_inference_steps"]
            .as_u64()
            .ok_or_else(|| field_error("num_inference_steps", "a whole number"))?
            as usize;
        request.guidance_scale = case["guidance_scale"]
            .as_f64()
            .ok_or_else(|| field_error("guidance_scale", "a number"))?;
        request.seed = Some(
            case["generator_seed"]
                .as_u64()
                .ok_or_else(|| field_error("generator_seed", "a whole number"))?,
        );
        for (field, value) in [
            ("height", &mut request.height),
            ("width", &mut request.width),
        ] {
            *value = case[field]
                .as_u64()
                .ok_or_else(|| field_error(field, "a whole number"))? as usize;
        }
        let latents = pipeline.denoise(&request, &mut |_| {})?;
        let image = pipeline.decode(&latents)?;
        let mut worst = max_abs_diff(&image, get(reference, &format!("{key}_image"))?)?;
        // The final latents' name is the one `tensors` gives that ends in `_latents`.
        let text = case["tensors"].as_str().unwrap_or_default();
        let final_latents = text
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .find(|word| word.ends_with("_latents") && reference.contains_key(*word));
        if let Some(name) = final_latents {
            worst = worst.max(max_abs_diff(&latents, get(reference, name)?)?);
        }
        Ok(worst)
    }
}
