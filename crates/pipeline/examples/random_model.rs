//! Writes a full-size model with seeded random weights as a diffusers folder, for measuring
//! loading from files (time, peak memory) without downloading anything:
//!
//! `cargo run --release -p sdrs-pipeline --example random_model -- sd15 /tmp/sd15-random [f16|bf16|f32]`
//!
//! The weights are those `sdrs bench` builds in the process (seed 7), stored as `fp16` variant
//! files for f16 (as the published models ship them) and plain files otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdrs_pipeline::random_weights::RandomWeights;
use sdrs_pipeline::BuiltinModel;

/// Random weights that remember every tensor a model constructor asked for.
struct Recording {
    weights: RandomWeights,
    seen: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.weights.get(shape, name, init, dtype, device)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(name.to_string(), tensor.clone());
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.weights.get_unchecked(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains_tensor(name)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(dir)) = (args.first(), args.get(1)) else {
        return Err(format!(
            "usage: random_model <{}> <folder> [f16|bf16|f32]",
            BuiltinModel::names()
        )
        .into());
    };
    let model = BuiltinModel::from_name(model)
        .ok_or_else(|| format!("unknown model {model}; accepted: {}", BuiltinModel::names()))?;
    let dtype = sdrs_pipeline::parse_dtype(args.get(2).map_or("f16", String::as_str))?;
    let dir = PathBuf::from(dir);
    for (path, contents) in model.files() {
        write(&dir.join(path), contents.as_bytes())?;
        if path.ends_with("tokenizer_config.json") {
            let tokenizer = dir
                .join(path)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            write(
                &tokenizer.join("vocab.json"),
                include_bytes!("../../clip/assets/vocab.json"),
            )?;
            write(
                &tokenizer.join("merges.txt"),
                include_bytes!("../../clip/assets/merges.txt"),
            )?;
        }
    }
    let suffix = if dtype == DType::F16 { ".fp16" } else { "" };
    for component in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        let Some(config) = model.json(&format!("{component}/config.json")) else {
            continue;
        };
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let recording = Recording {
            weights: RandomWeights::for_component(7, component),
            seen: seen.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(recording), dtype, Device::Cpu);
        match component {
            "unet" => drop(sdrs_unet::UNet2DConditionModel::new(
                vb.into(),
                &serde_json::from_value(config)?,
            )?),
            "vae" => drop(sdrs_vae::AutoencoderKL::new(
                vb.into(),
                &serde_json::from_value(config)?,
            )?),
            _ => drop(sdrs_clip::ClipTextModel::new(
                vb.into(),
                &serde_json::from_value(config)?,
            )?),
        }
        let tensors = std::mem::take(&mut *seen.lock().map_err(|_| "poisoned")?);
        let stem = if component.starts_with("text_encoder") {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        let path = dir
            .join(component)
            .join(format!("{stem}{suffix}.safetensors"));
        candle_core::safetensors::save(&tensors, &path)?;
        eprintln!("wrote {} ({} tensors)", path.display(), tensors.len());
    }
    Ok(())
}

fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, contents)
}
