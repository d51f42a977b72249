//! AUTOMATIC1111's request and response shapes (`modules/api/models.py`): the txt2img/img2img
//! fields with its defaults, resolved into a [`Plan`] for a loaded model, and the `parameters`
//! infotext and `info` JSON it answers with.

use std::path::Path;

use sdrs_pipeline::LoraFile;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use sdrs_schedulers::{Sampler, SigmaSchedule};

use crate::{Error, Limits, Result};

/// The txt2img / img2img fields sdrs reads, with AUTOMATIC1111's defaults. Other fields are
/// ignored as AUTOMATIC1111 ignores unknown ones, except those in [`unsupported`], which are
/// reported in `info` when they ask for something sdrs does not do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler_name: Option<String>,
    /// AUTOMATIC1111's older name for `sampler_name`.
    pub sampler_index: Option<String>,
    pub scheduler: Option<String>,
    /// -1: a random seed.
    pub seed: i64,
    pub width: usize,
    pub height: usize,
    pub batch_size: usize,
    pub n_iter: usize,
    pub denoising_strength: Option<f64>,
    #[serde(skip_serializing)]
    pub init_images: Vec<String>,
    pub clip_skip: Option<usize>,
    pub override_settings: Map<String, Value>,
    pub send_images: bool,
    pub save_images: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            cfg_scale: 7.0,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            seed: -1,
            width: 512,
            height: 512,
            batch_size: 1,
            n_iter: 1,
            denoising_strength: None,
            init_images: Vec::new(),
            clip_skip: None,
            override_settings: Map::new(),
            send_images: true,
            save_images: false,
        }
    }
}

/// Parses a txt2img/img2img body. `null` fields take their default (pydantic's `Optional`).
pub fn parse_params(body: &[u8]) -> Result<(GenerationParams, Vec<String>)> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Error::BadJson(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(Error::BadJson("expected a JSON object".to_string()));
    };
    map.retain(|_, v| !v.is_null());
    let unsupported = unsupported(&map);
    match serde_json::from_value::<GenerationParams>(Value::Object(map.clone())) {
        Ok(params) => Ok((params, unsupported)),
        Err(error) => Err(wrong_field(&map, error)),
    }
}

/// The error for a body of the wrong shape, naming the first field that is at fault (serde's
/// message alone does not say which).
fn wrong_field(map: &Map<String, Value>, error: serde_json::Error) -> Error {
    for (key, value) in map {
        let one = Map::from_iter([(key.clone(), value.clone())]);
        if let Err(e) = serde_json::from_value::<GenerationParams>(Value::Object(one)) {
            return Error::BadField {
                field: key.clone(),
                reason: e.to_string(),
            };
        }
    }
    Error::BadJson(error.to_string())
}

/// The fields of `map` that ask for what sdrs does not do (AUTOMATIC1111 features sdrs lacks),
/// named so that `info` can say so instead of dropping them silently.
pub fn unsupported(map: &Map<String, Value>) -> Vec<String> {
    let set = |v: &Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty() && s != "None",
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    };
    const FEATURES: [&str; 12] = [
        "enable_hr",
        "restore_faces",
        "tiling",
        "styles",
        "subseed_strength",
        "seed_resize_from_h",
        "seed_resize_from_w",
        "script_name",
        "alwayson_scripts",
        "mask",
        "refiner_checkpoint",
        "save_images",
    ];
    let mut out: Vec<String> = FEATURES
        .iter()
        .filter(|name| map.get(**name).is_some_and(set))
        .map(|name| name.to_string())
        .collect();
    if map
        .get("init_images")
        .and_then(Value::as_array)
        .is_some_and(|a| a.len() > 1)
    {
        out.push("init_images beyond the first".to_string());
    }
    if let Some(Value::Object(settings)) = map.get("override_settings") {
        for key in settings.keys() {
            if !OVERRIDES.contains(&key.as_str()) {
                out.push(format!("override_settings.{key}"));
            }
        }
    }
    out
}

/// The settings `override_settings` and `/sdapi/v1/options` can set.
pub const OVERRIDES: [&str; 2] = ["sd_model_checkpoint", "CLIP_stop_at_last_layers"];

/// What one generation request resolves to, for one loaded model.
#[derive(Debug, Clone)]
pub struct Plan {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: Sampler,
    pub schedule: SigmaSchedule,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub batch_size: usize,
    pub n_iter: usize,
    /// Image-to-image's `denoising_strength`; `None` for text-to-image.
    pub strength: Option<f64>,
    pub clip_skip: Option<usize>,
    pub unsupported: Vec<String>,
    /// The prompt's `<lora:name:weight>` tags, resolved in the server's `--lora-dir`.
    pub loras: Vec<LoraFile>,
}

/// `prompt` without its `<lora:...>` tags. With a LoRA folder (`--lora-dir`) each tag names a
/// file `<name>.safetensors` directly in it (a name with a path in it is refused, so no request
/// reaches another file), added to `loras`; a file that is not there is named in `unsupported`
/// and skipped, as AUTOMATIC1111 carries on without a missing LoRA. Without a folder every tag is
/// named in `unsupported`.
pub fn take_loras(
    prompt: &str,
    lora_dir: Option<&Path>,
    unsupported: &mut Vec<String>,
    loras: &mut Vec<LoraFile>,
) -> Result<String> {
    let (text, tags) = sdrs_pipeline::pipeline::extra_networks::extract_loras(prompt)?;
    for tag in tags {
        let Some(dir) = lora_dir else {
            unsupported.push(format!(
                "<lora:{}> (no LoRA folder: sdrs serve --lora-dir)",
                tag.name
            ));
            continue;
        };
        let plain = !tag.name.is_empty()
            && tag.name != "."
            && tag.name != ".."
            && !tag.name.contains(['/', '\\', ':', '\0']);
        if !plain {
            return Err(Error::InvalidField {
                name: "prompt",
                value: format!("<lora:{}>", tag.name),
                expected: "a LoRA name: a file name in the server's LoRA folder, without a path"
                    .to_string(),
            });
        }
        match tag.resolve(dir) {
            Ok(file) => loras.push(file),
            Err(_) => unsupported.push(format!("<lora:{}> (not in the LoRA folder)", tag.name)),
        }
    }
    Ok(text)
}

/// The sampler and schedule for AUTOMATIC1111's `sampler_name` and `scheduler` (`Automatic`:
/// the one the label implies, else Karras for DPM++ 2M, else the sampler's own, as `sdrs
/// generate` picks).
pub fn sampler(name: Option<&str>, scheduler: Option<&str>) -> Result<(Sampler, SigmaSchedule)> {
    let (sampler, implied) = Sampler::from_name(name.unwrap_or("Euler"))?;
    let explicit = match scheduler.map(str::trim) {
        None | Some("") => None,
        Some(s) if s.eq_ignore_ascii_case("automatic") => None,
        Some(s) if s.eq_ignore_ascii_case("uniform") => Some(SigmaSchedule::Discrete),
        Some(s) => Some(SigmaSchedule::from_name(s)?),
    };
    let schedule = explicit
        .or(implied)
        .unwrap_or(if sampler == Sampler::Dpmpp2m {
            SigmaSchedule::Karras
        } else {
            SigmaSchedule::Discrete
        });
    Ok((sampler, schedule))
}

/// Checks the size, steps and image count against the model and `limits`.
pub fn check_limits(
    width: usize,
    height: usize,
    steps: usize,
    images: usize,
    factor: usize,
    limits: &Limits,
) -> Result<()> {
    for (name, value) in [("width", width), ("height", height)] {
        if value == 0 || value % factor != 0 {
            return Err(Error::InvalidField {
                name,
                value: value.to_string(),
                expected: format!("a positive multiple of {factor}"),
            });
        }
    }
    if steps == 0 {
        return Err(Error::InvalidField {
            name: "steps",
            value: "0".to_string(),
            expected: "at least 1".to_string(),
        });
    }
    if images == 0 {
        return Err(Error::InvalidField {
            name: "batch_size x n_iter",
            value: "0".to_string(),
            expected: "at least 1".to_string(),
        });
    }
    let pixels = width.saturating_mul(height);
    let checks = [
        ("width x height", pixels, limits.pixels, "--max-pixels"),
        ("steps", steps, limits.steps, "--max-steps"),
        ("batch_size x n_iter", images, limits.images, "--max-images"),
    ];
    for (what, value, limit, flag) in checks {
        if value > limit {
            return Err(Error::OverLimit {
                what,
                value,
                limit,
                flag,
            });
        }
    }
    Ok(())
}

/// A seed for `-1`, below 2^32 as AUTOMATIC1111 draws them (`sdrs generate`'s rule).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish() & 0xFFFF_FFFF
}

impl Plan {
    /// The `parameters` text of the image with `seed`, as `sdrs generate` and AUTOMATIC1111
    /// write it.
    pub fn infotext(&self, seed: u64, position: usize) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        let mut fields = vec![
            format!("Steps: {}", self.steps),
            format!("Sampler: {}", self.sampler.a1111_label()),
        ];
        if let Some(schedule) = self.schedule.a1111_label() {
            fields.push(format!("Schedule type: {schedule}"));
        }
        fields.push(format!("CFG scale: {}", self.cfg_scale));
        fields.push(format!("Seed: {seed}"));
        fields.push(format!("Size: {}x{}", self.width, self.height));
        fields.push(format!("Model: {}", self.model));
        if let Some(skip) = self.clip_skip.filter(|&s| s > 1) {
            fields.push(format!("Clip skip: {skip}"));
        }
        if let Some(strength) = self.strength {
            fields.push(format!("Denoising strength: {strength}"));
        }
        if self.batch_size > 1 {
            fields.push(format!("Batch size: {}", self.batch_size));
            fields.push(format!("Batch pos: {position}"));
        }
        fields.push(format!("Version: sdrs {}", env!("CARGO_PKG_VERSION")));
        text.push('\n');
        text.push_str(&fields.join(", "));
        text
    }

    /// The seed of image `index` over all batches: `seed + index`, as AUTOMATIC1111 counts.
    pub fn image_seed(&self, index: usize) -> u64 {
        self.seed.wrapping_add(index as u64)
    }

    /// The `parameters` field: the request as it was run (the seed resolved).
    pub fn parameters(&self, params: &GenerationParams) -> Value {
        let mut used = params.clone();
        used.seed = self.seed as i64;
        used.sampler_name = Some(self.sampler.a1111_label().to_string());
        used.scheduler = Some(schedule_label(self.schedule).to_string());
        used.override_settings.insert(
            "sd_model_checkpoint".to_string(),
            Value::String(self.model.clone()),
        );
        serde_json::to_value(used).unwrap_or(Value::Null)
    }

    /// The `info` field: a JSON string, as AUTOMATIC1111 answers.
    pub fn info(&self, seeds: &[u64], infotexts: &[String], interrupted: bool) -> String {
        let images = seeds.len();
        serde_json::json!({
            "prompt": self.prompt,
            "all_prompts": vec![&self.prompt; images],
            "negative_prompt": self.negative_prompt,
            "all_negative_prompts": vec![&self.negative_prompt; images],
            "seed": self.seed,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": vec![-1; images],
            "subseed_strength": 0,
            "width": self.width,
            "height": self.height,
            "sampler_name": self.sampler.a1111_label(),
            "scheduler": schedule_label(self.schedule),
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "n_iter": self.n_iter,
            "sd_model_name": self.model,
            "denoising_strength": self.strength,
            "clip_skip": self.clip_skip.unwrap_or(1),
            "infotexts": infotexts,
            "index_of_first_image": 0,
            "interrupted": interrupted,
            "unsupported": self.unsupported,
            "version": format!("sdrs {}", env!("CARGO_PKG_VERSION")),
        })
        .to_string()
    }
}

/// AUTOMATIC1111's scheduler label.
pub fn schedule_label(schedule: SigmaSchedule) -> &'static str {
    schedule.a1111_label().unwrap_or("Automatic")
}

/// Every sampler this build implements, as `/sdapi/v1/samplers` lists them.
pub fn samplers() -> Value {
    let all = [
        Sampler::Euler,
        Sampler::EulerA,
        Sampler::Heun,
        Sampler::Dpmpp2m,
        Sampler::Dpmpp2mSde,
        Sampler::Ddim,
        Sampler::Pndm,
        Sampler::Lms,
        Sampler::Unipc,
        Sampler::Lcm,
    ];
    Value::Array(
        all.iter()
            .filter(|s| s.is_implemented())
            .map(|s| serde_json::json!({"name": s.a1111_label(), "aliases": [], "options": {}}))
            .collect(),
    )
}

/// The schedules, as `/sdapi/v1/schedulers` lists them.
pub fn schedulers() -> Value {
    let row = |name: &str, label: &str| {
        serde_json::json!({"name": name, "label": label, "aliases": null,
            "default_rho": -1, "need_inner_model": false})
    };
    serde_json::json!([
        row("automatic", "Automatic"),
        row("uniform", "Uniform"),
        row("karras", "Karras"),
        row("exponential", "Exponential"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_automatic1111s_and_nulls_take_them() {
        let (params, unsupported) =
            parse_params(br#"{"prompt": "a cat", "steps": null, "eta": 1.0}"#).unwrap();
        assert_eq!(params.steps, 50);
        assert_eq!((params.width, params.height, params.seed), (512, 512, -1));
        assert!(unsupported.is_empty());
    }

    #[test]
    fn wrong_types_and_malformed_json_are_refused() {
        let error = parse_params(br#"{"steps": "many"}"#).unwrap_err();
        assert_eq!(error.status(), 422, "{error}");
        let error = parse_params(b"{nope").unwrap_err();
        assert_eq!(error.status(), 400, "{error}");
        let error = parse_params(b"[1]").unwrap_err();
        assert_eq!(error.status(), 400, "{error}");
    }

    #[test]
    fn features_sdrs_lacks_are_reported_not_dropped() {
        let (_, unsupported) = parse_params(
            br#"{"restore_faces": true, "tiling": false, "styles": ["x"],
                 "override_settings": {"sd_vae": "a", "sd_model_checkpoint": "b"}}"#,
        )
        .unwrap();
        assert_eq!(
            unsupported,
            ["restore_faces", "styles", "override_settings.sd_vae"]
        );
    }

    #[test]
    fn lora_tags_are_taken_out_and_reported() {
        let mut unsupported = Vec::new();
        let mut loras = Vec::new();
        let text = take_loras(
            "a cat <lora:style:0.5>, blue",
            None,
            &mut unsupported,
            &mut loras,
        )
        .unwrap();
        assert_eq!(text, "a cat , blue");
        assert_eq!(
            unsupported,
            ["<lora:style> (no LoRA folder: sdrs serve --lora-dir)"]
        );
        assert!(take_loras("a <lora:x:heavy>", None, &mut unsupported, &mut loras).is_err());
        // With a folder: a file in it is used, a missing one reported, a path refused.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("style.safetensors"), b"").unwrap();
        let mut unsupported = Vec::new();
        let text = take_loras(
            "a <lora:style:0.5> <lora:gone>",
            Some(dir.path()),
            &mut unsupported,
            &mut loras,
        )
        .unwrap();
        assert_eq!(text.trim(), "a");
        assert_eq!(
            loras,
            [LoraFile::new(dir.path().join("style.safetensors"), 0.5)]
        );
        assert_eq!(unsupported, ["<lora:gone> (not in the LoRA folder)"]);
        for name in ["../style", "/etc/x", "..", "a\\b"] {
            let prompt = format!("<lora:{name}>");
            assert!(
                take_loras(&prompt, Some(dir.path()), &mut unsupported, &mut loras).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn scheduler_automatic_follows_the_label_then_the_sampler() {
        let karras = SigmaSchedule::Karras;
        assert_eq!(
            sampler(None, None).unwrap(),
            (Sampler::Euler, SigmaSchedule::Discrete)
        );
        assert_eq!(
            sampler(Some("DPM++ 2M"), Some("Automatic")).unwrap().1,
            karras
        );
        assert_eq!(sampler(Some("Euler a"), Some("karras")).unwrap().1, karras);
        assert!(sampler(Some("warp"), None).is_err());
        assert!(sampler(Some("Euler"), Some("sideways")).is_err());
    }

    #[test]
    fn limits_refuse_with_the_flag_that_raises_them() {
        let limits = Limits::default();
        let error = check_limits(8192, 8192, 20, 1, 8, &limits).unwrap_err();
        assert!(error.to_string().contains("--max-pixels"), "{error}");
        assert_eq!(error.status(), 413);
        let error = check_limits(512, 500, 20, 1, 8, &limits).unwrap_err();
        assert_eq!(error.status(), 422);
        assert!(check_limits(64, 64, 1000, 1, 8, &limits).is_err());
        assert!(check_limits(64, 64, 10, 100, 8, &limits).is_err());
        assert!(check_limits(64, 64, 0, 1, 8, &limits).is_err());
        assert!(check_limits(64, 64, 10, 4, 8, &limits).is_ok());
    }
}
