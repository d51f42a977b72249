//! The configs of the published Stable Diffusion models (SD1.5, SDXL base, SDXL refiner), built
//! into the binary: a single original-layout checkpoint of one of these shapes loads with no
//! `--config` folder and no network, and the benchmark builds real-size models from them.
//!
//! The files mirror the repos' own `model_index.json`, `*/config.json`, `scheduler/` and
//! tokenizer settings (the CLIP vocabulary itself ships in `sdrs-clip`).

/// One of the canonical models whose configs are built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuiltinModel {
    /// `stable-diffusion-v1-5/stable-diffusion-v1-5`.
    Sd15,
    /// `stabilityai/stable-diffusion-xl-base-1.0`.
    SdxlBase,
    /// `stabilityai/stable-diffusion-xl-refiner-1.0`.
    SdxlRefiner,
}

/// `(path inside the diffusers folder, contents)` for each built-in file.
type Files = &'static [(&'static str, &'static str)];

macro_rules! config_files {
    ($dir:literal: $($file:literal),+ $(,)?) => {
        &[$(($file, include_str!(concat!("../../configs/", $dir, "/", $file)))),+]
    };
}

const SD15: Files = config_files!("sd15":
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
);

const SDXL_BASE: Files = config_files!("sdxl":
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
);

const SDXL_REFINER: Files = config_files!("sdxl-refiner":
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder_2/config.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
);

impl BuiltinModel {
    /// Every built-in model, in the order help texts list them.
    pub const ALL: [BuiltinModel; 3] = [Self::Sd15, Self::SdxlBase, Self::SdxlRefiner];

    /// The short name users type (`sd15`, `sdxl`, `sdxl-refiner`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::SdxlBase => "sdxl",
            Self::SdxlRefiner => "sdxl-refiner",
        }
    }

    /// The Hugging Face repo the short name stands for.
    pub fn repo_id(&self) -> &'static str {
        match self {
            Self::Sd15 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Self::SdxlBase => "stabilityai/stable-diffusion-xl-base-1.0",
            Self::SdxlRefiner => "stabilityai/stable-diffusion-xl-refiner-1.0",
        }
    }

    /// The model a short name stands for, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|model| model.name() == name)
    }

    /// The accepted short names, for error messages.
    pub fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|model| model.name()).collect();
        names.join(", ")
    }

    /// Every built-in file of this model.
    pub fn files(&self) -> Files {
        match self {
            Self::Sd15 => SD15,
            Self::SdxlBase => SDXL_BASE,
            Self::SdxlRefiner => SDXL_REFINER,
        }
    }

    /// One built-in file by its path inside the diffusers folder (`unet/config.json`).
    pub fn file(&self, path: &str) -> Option<&'static str> {
        self.files()
            .iter()
            .find(|(name, _)| *name == path)
            .map(|(_, contents)| *contents)
    }

    /// A built-in file parsed as JSON.
    pub fn json(&self, path: &str) -> Option<serde_json::Value> {
        // The files are ours and checked by the tests below, so they always parse.
        self.file(path)
            .and_then(|text| serde_json::from_str(text).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_file_is_valid_json() {
        for model in BuiltinModel::ALL {
            for (path, text) in model.files() {
                let parsed: Result<serde_json::Value, _> = serde_json::from_str(text);
                assert!(parsed.is_ok(), "{} {path}: {parsed:?}", model.name());
            }
        }
    }

    #[test]
    fn builtin_configs_parse_into_the_model_configs() {
        for model in BuiltinModel::ALL {
            let unet: sdrs_unet::UNet2DConditionConfig =
                serde_json::from_str(model.file("unet/config.json").unwrap()).unwrap();
            let vae: sdrs_vae::AutoencoderKLConfig =
                serde_json::from_str(model.file("vae/config.json").unwrap()).unwrap();
            assert_eq!(vae.block_out_channels, vec![128, 256, 512, 512]);
            let sdxl = unet.addition_embed_type.as_deref() == Some("text_time");
            assert_eq!(sdxl, model != BuiltinModel::Sd15, "{}", model.name());
        }
    }

    #[test]
    fn short_names_round_trip() {
        for model in BuiltinModel::ALL {
            assert_eq!(BuiltinModel::from_name(model.name()), Some(model));
        }
        assert_eq!(BuiltinModel::from_name("sd14"), None);
        assert_eq!(BuiltinModel::names(), "sd15, sdxl, sdxl-refiner");
    }
}
