//! The built-in configs and CLIP vocabulary: the embedded vocabulary tokenizes exactly as the
//! fixture tokenizer folders (transformers' ids), and a single checkpoint that does not have the
//! published shapes is refused with an error naming the tensor, both shapes and the way out.

use std::path::PathBuf;

use sdrs_pipeline::{BuiltinModel, Error, LoadOptions, ModelFiles, StableDiffusion};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect()
}

// Tolerance: exact equality of every id.
#[test]
fn builtin_vocabulary_tokenizes_like_the_fixture_tokenizers() {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(!cases.is_empty());
    let sd15 = ModelFiles::Builtin(BuiltinModel::Sd15)
        .tokenizer("tokenizer")
        .unwrap();
    let folder = ModelFiles::Folder(fixtures().join("tiny-sd15"))
        .tokenizer("tokenizer")
        .unwrap();
    let sdxl_2 = ModelFiles::Builtin(BuiltinModel::SdxlBase)
        .tokenizer("tokenizer_2")
        .unwrap();
    let refiner_2 = ModelFiles::Builtin(BuiltinModel::SdxlRefiner)
        .tokenizer("tokenizer_2")
        .unwrap();
    let sdxl_1 = ModelFiles::Builtin(BuiltinModel::SdxlBase)
        .tokenizer("tokenizer")
        .unwrap();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(sd15.encode(prompt).unwrap(), expected, "{prompt:?}");
        assert_eq!(folder.encode(prompt).unwrap(), expected, "{prompt:?}");
        assert_eq!(sdxl_1.encode(prompt).unwrap(), expected, "{prompt:?}");
        assert_eq!(
            sd15.encode_untruncated(prompt).unwrap(),
            ids(&case["ids_untruncated"]),
            "{prompt:?}"
        );
        let expected_2 = ids(&case["ids_tokenizer_2"]);
        assert_eq!(sdxl_2.encode(prompt).unwrap(), expected_2, "{prompt:?}");
        assert_eq!(refiner_2.encode(prompt).unwrap(), expected_2, "{prompt:?}");
    }
}

#[test]
fn builtin_configs_detect_their_family() {
    use sdrs_pipeline::ModelFamily;
    let family = |model| ModelFamily::detect_in(&ModelFiles::Builtin(model)).unwrap();
    assert_eq!(family(BuiltinModel::Sd15), ModelFamily::Sd);
    assert_eq!(family(BuiltinModel::SdxlBase), ModelFamily::SdxlBase);
    assert_eq!(family(BuiltinModel::SdxlRefiner), ModelFamily::SdxlRefiner);
}

#[test]
fn tiny_checkpoints_do_not_fit_the_published_shapes_and_say_so() {
    for (file, model) in [
        ("tiny-sd15-single-file.safetensors", "sd15"),
        ("tiny-sdxl-single-file.safetensors", "sdxl"),
    ] {
        let path = fixtures().join(file);
        let error = match StableDiffusion::load_single_file_builtin(&path, &LoadOptions::default())
        {
            Ok(_) => panic!("{file} loaded with the published configs"),
            Err(error) => error,
        };
        assert!(
            matches!(&error, Error::NotPublishedShapes { model: m, .. } if *m == model),
            "{error:?}"
        );
        let message = error.to_string();
        // The tiny models have fewer layers than the published ones: the first tensor the
        // published config needs and the checkpoint lacks is named.
        assert!(
            message.contains(file)
                && message.contains(&format!("published {model} model"))
                && message.contains("--config")
                && message.contains("text_model.encoder.layers."),
            "{message}"
        );
    }
}
