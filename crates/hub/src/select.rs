//! Which files of a repo the pipeline reads, chosen from the repo's file list: configs,
//! tokenizer files and `.safetensors` weights (the `fp16` variant when asked for), never
//! PyTorch pickles (`.bin`, `.ckpt`), flax (`.msgpack`), ONNX or TensorFlow files.
//!
//! The weight choice mirrors `sdrs_pipeline::weights::find_weights`, so that the loader finds in
//! the snapshot exactly the files fetched here.

use std::collections::BTreeSet;

use serde_json::Value;

/// The file stems diffusers (`diffusion_pytorch_model`) and transformers (`model`) save weights under.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// The files a CLIP tokenizer folder may hold; `sdrs_clip::ClipTokenizer::from_dir` reads them.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The pipeline components with weights; `model_index.json` may list others (safety checker,
/// feature extractor, image encoder) that the pipeline does not run.
const WEIGHT_COMPONENTS: [&str; 4] = ["text_encoder", "text_encoder_2", "unet", "vae"];
const TOKENIZERS: [&str; 2] = ["tokenizer", "tokenizer_2"];

/// What kind of repo the first file of the listing says this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers pipeline: `model_index.json` names the components.
    Pipeline,
    /// One component at the repo's root (`config.json` and weights), such as TAESD.
    Component,
}

impl Layout {
    /// The layout of a repo with these files, and the file to read first.
    pub fn of(files: &[String]) -> Option<(Self, &'static str)> {
        if files.iter().any(|f| f == "model_index.json") {
            Some((Self::Pipeline, "model_index.json"))
        } else if files.iter().any(|f| f == "config.json") {
            Some((Self::Component, "config.json"))
        } else {
            None
        }
    }
}

/// The files to fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Paths inside the repo, configs first.
    pub files: Vec<String>,
    /// The `*.safetensors.index.json` files among them, whose shards are fetched once they are read.
    pub indexes: Vec<String>,
    /// True when a component has no weights of the preferred kind and its fallback was chosen.
    pub fell_back: bool,
}

/// A file the model needs that the listing lacks: a path, or for weights the candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub file: String,
    pub detail: String,
}

/// The files a model with `layout` needs, from the repo's `files`; `index` is the parsed
/// `model_index.json` of a pipeline (ignored for a component).
///
/// `variant` (`fp16`) is preferred when given, with the plain files as fallback; without it the
/// plain files are preferred and the `fp16` files are the fallback.
pub fn select_files(
    layout: Layout,
    index: &Value,
    files: &[String],
    variant: Option<&str>,
) -> Result<Selection, Missing> {
    let listed: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    let mut selection = Selection::default();
    let require = |selection: &mut Selection, file: String| -> Result<(), Missing> {
        if !listed.contains(file.as_str()) {
            return Err(Missing {
                file,
                detail: String::new(),
            });
        }
        selection.files.push(file);
        Ok(())
    };
    match layout {
        Layout::Component => {
            require(&mut selection, "config.json".to_string())?;
            choose_weights(&listed, "", variant, &mut selection)?;
        }
        Layout::Pipeline => {
            require(&mut selection, "model_index.json".to_string())?;
            require(
                &mut selection,
                "scheduler/scheduler_config.json".to_string(),
            )?;
            for component in WEIGHT_COMPONENTS {
                if is_present(index, component) {
                    require(&mut selection, format!("{component}/config.json"))?;
                }
            }
            for tokenizer in TOKENIZERS {
                if !is_present(index, tokenizer) {
                    continue;
                }
                let found: Vec<String> = TOKENIZER_FILES
                    .iter()
                    .map(|file| format!("{tokenizer}/{file}"))
                    .filter(|file| listed.contains(file.as_str()))
                    .collect();
                let has = |name: &str| found.iter().any(|f| f.ends_with(name));
                let complete = has("/tokenizer.json") || (has("/vocab.json") && has("/merges.txt"));
                if !complete {
                    return Err(Missing {
                        file: format!("{tokenizer}/vocab.json"),
                        detail: format!(
                            " (the tokenizer needs {tokenizer}/tokenizer.json, or vocab.json and merges.txt)"
                        ),
                    });
                }
                selection.files.extend(found);
            }
            for component in WEIGHT_COMPONENTS {
                if is_present(index, component) {
                    choose_weights(&listed, &format!("{component}/"), variant, &mut selection)?;
                }
            }
        }
    }
    Ok(selection)
}

/// Whether `model_index.json` lists a component (the refiner lists `text_encoder` as
/// `[null, null]`).
fn is_present(index: &Value, component: &str) -> bool {
    match index.get(component) {
        Some(Value::Array(entry)) => entry.iter().any(|v| !v.is_null()),
        Some(Value::Null) | None => false,
        Some(_) => true,
    }
}

/// Picks one component's weights under `prefix` (`unet/`, or `` for the root).
fn choose_weights(
    listed: &BTreeSet<&str>,
    prefix: &str,
    variant: Option<&str>,
    selection: &mut Selection,
) -> Result<(), Missing> {
    let order: [Option<&str>; 2] = match variant {
        Some(v) => [Some(v), None],
        None => [None, Some("fp16")],
    };
    let mut candidates = Vec::new();
    for (rank, variant) in order.iter().enumerate() {
        for stem in STEMS {
            let base = match variant {
                Some(v) => format!("{prefix}{stem}.{v}.safetensors"),
                None => format!("{prefix}{stem}.safetensors"),
            };
            let index = format!("{base}.index.json");
            if listed.contains(base.as_str()) {
                selection.files.push(base);
                selection.fell_back |= rank > 0;
                return Ok(());
            }
            if listed.contains(index.as_str()) {
                selection.indexes.push(index.clone());
                selection.files.push(index);
                selection.fell_back |= rank > 0;
                return Ok(());
            }
            candidates.push(base);
        }
    }
    let pickles = listed
        .iter()
        .any(|f| f.starts_with(prefix) && !f[prefix.len()..].contains('/') && f.ends_with(".bin"));
    let detail = if pickles {
        " (only PyTorch .bin weights, which sdrs does not load: it reads .safetensors only)"
            .to_string()
    } else {
        format!(" (looked for {})", candidates.join(", "))
    };
    Err(Missing {
        file: candidates.first().cloned().unwrap_or_default(),
        detail,
    })
}

/// The shard files a `*.safetensors.index.json` at `index_path` names, as repo paths; `None`
/// when a shard name would leave the index's folder or is not a `.safetensors` file.
pub fn shard_files(index_path: &str, index: &Value) -> Option<Vec<String>> {
    let dir = match index_path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/"),
        None => String::new(),
    };
    let map = index.get("weight_map")?.as_object()?;
    let mut shards = BTreeSet::new();
    for value in map.values() {
        let name = value.as_str()?;
        let safe = !name.is_empty()
            && !name.contains(['/', '\\'])
            && !name.starts_with('.')
            && name.ends_with(".safetensors");
        if !safe {
            return None;
        }
        shards.insert(format!("{dir}{name}"));
    }
    Some(shards.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listing(files: &[&str]) -> Vec<String> {
        files.iter().map(|f| f.to_string()).collect()
    }

    const SD15: &[&str] = &[
        ".gitattributes",
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "v1-5-pruned.ckpt",
        "v1-5-pruned.safetensors",
    ];

    fn sd15_index() -> Value {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        })
    }

    #[test]
    fn sd15_takes_configs_tokenizer_and_plain_safetensors_only() {
        let files = listing(SD15);
        let (layout, first) = Layout::of(&files).unwrap();
        assert_eq!((layout, first), (Layout::Pipeline, "model_index.json"));
        let s = select_files(layout, &sd15_index(), &files, None).unwrap();
        assert_eq!(
            s.files,
            listing(&[
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "unet/config.json",
                "vae/config.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json",
                "tokenizer/special_tokens_map.json",
                "text_encoder/model.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ])
        );
        assert!(!s.fell_back);
        for file in &s.files {
            for banned in [".bin", ".ckpt", ".msgpack", ".onnx", ".pb"] {
                assert!(!file.ends_with(banned), "{file}");
            }
        }
    }

    #[test]
    fn fp16_variant_is_preferred_when_asked_and_plain_files_fill_gaps() {
        let mut files = listing(SD15);
        files.retain(|f| f != "vae/diffusion_pytorch_model.fp16.safetensors");
        let s = select_files(Layout::Pipeline, &sd15_index(), &files, Some("fp16")).unwrap();
        let weights: Vec<&String> = s
            .files
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .collect();
        assert_eq!(
            weights,
            [
                "text_encoder/model.fp16.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ]
        );
        assert!(s.fell_back);
    }

    #[test]
    fn only_fp16_files_are_the_fallback_without_a_variant() {
        let mut files = listing(SD15);
        files.retain(|f| f != "unet/diffusion_pytorch_model.safetensors");
        let s = select_files(Layout::Pipeline, &sd15_index(), &files, None).unwrap();
        assert!(s
            .files
            .contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(s.fell_back);
    }

    #[test]
    fn refiner_skips_the_null_text_encoder() {
        let files = listing(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "tokenizer_2/tokenizer.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]);
        let index = json!({
            "text_encoder": [null, null], "tokenizer": [null, null],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"]
        });
        let s = select_files(Layout::Pipeline, &index, &files, None).unwrap();
        assert_eq!(s.files.len(), files.len());
    }

    #[test]
    fn sharded_weights_go_through_their_index() {
        let mut files = listing(SD15);
        files.retain(|f| f != "unet/diffusion_pytorch_model.safetensors");
        files.push("unet/diffusion_pytorch_model.safetensors.index.json".to_string());
        let s = select_files(Layout::Pipeline, &sd15_index(), &files, None).unwrap();
        assert_eq!(
            s.indexes,
            ["unet/diffusion_pytorch_model.safetensors.index.json"]
        );
        let index = json!({"weight_map": {
            "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
            "c": "diffusion_pytorch_model-00001-of-00002.safetensors"
        }});
        assert_eq!(
            shard_files(&s.indexes[0], &index).unwrap(),
            [
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors"
            ]
        );
        let evil = json!({"weight_map": {"a": "../../../etc/passwd"}});
        assert_eq!(shard_files("unet/x.index.json", &evil), None);
    }

    #[test]
    fn missing_weights_name_the_file_and_pickles_are_called_out() {
        let files = listing(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/pytorch_model.bin",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]);
        let missing = select_files(Layout::Pipeline, &sd15_index(), &files, None).unwrap_err();
        assert_eq!(
            missing.file,
            "text_encoder/diffusion_pytorch_model.safetensors"
        );
        assert!(missing.detail.contains(".bin"), "{}", missing.detail);
        let no_config: Vec<String> = files
            .iter()
            .filter(|f| *f != "vae/config.json")
            .cloned()
            .collect();
        let missing = select_files(Layout::Pipeline, &sd15_index(), &no_config, None).unwrap_err();
        assert_eq!(missing.file, "vae/config.json");
    }

    #[test]
    fn a_root_component_such_as_taesd_takes_its_config_and_weights() {
        let files = listing(&[
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            "taesd_decoder.pth",
            "taesd_decoder.safetensors",
        ]);
        let (layout, first) = Layout::of(&files).unwrap();
        assert_eq!((layout, first), (Layout::Component, "config.json"));
        let s = select_files(layout, &Value::Null, &files, None).unwrap();
        assert_eq!(
            s.files,
            ["config.json", "diffusion_pytorch_model.safetensors"]
        );
        assert_eq!(Layout::of(&listing(&["model.ckpt"])), None);
    }
}
