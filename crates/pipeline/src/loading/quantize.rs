//! Quantization at load (`--quantize kmeans6`, `int8`, `q8_0`, ...): each layer weight the spec
//! applies to is read from the component's dense weights when the model asks for it, quantized,
//! and kept only in its compressed form, so a quantized model never holds its dense weights.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Shape};
use sdrs_kernels::weight::QuantizedSource;
use sdrs_kernels::QuantizedMatrix;
use sdrs_quant::QuantSpec;

use crate::error::{Error, Result};

/// A mixed-bit recipe, as `sdrs quantize --analyze` writes it: a method (`spec`) and per-layer
/// palettization bits, keyed by component and tensor name
/// (`unet/down_blocks.0.resnets.0.conv1.weight`); layers it does not name stay dense.
///
/// The file is JSON: `{"method": "kmeans6", "layers": {"unet/...weight": 4, ...}}`, plus what the
/// analysis measured (ignored when read).
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub spec: QuantSpec,
    pub layers: BTreeMap<String, u32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RecipeFile {
    method: String,
    layers: BTreeMap<String, u32>,
    #[serde(flatten)]
    measured: serde_json::Map<String, serde_json::Value>,
}

impl Recipe {
    /// Reads a recipe file; every bit width is checked against the method.
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::loading::weights::read_text(path)?;
        let file: RecipeFile = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |value: String, expected: String| Error::InvalidParameter {
            name: "recipe",
            value: format!("{}: {value}", path.display()),
            expected,
        };
        let spec: QuantSpec = file
            .method
            .parse()
            .map_err(|e: sdrs_quant::Error| bad(file.method.clone(), e.to_string()))?;
        for (layer, &bits) in &file.layers {
            spec.with_bits(bits)
                .map_err(|e| bad(format!("{layer} = {bits}"), e.to_string()))?;
            if !layer.contains('/') {
                return Err(bad(
                    layer.clone(),
                    "layer names of the form component/tensor (unet/conv_in.weight)".to_string(),
                ));
            }
        }
        Ok(Self {
            spec,
            layers: file.layers,
        })
    }

    /// The recipe as its JSON file, with `measured` (what the analysis found) beside it.
    pub fn to_json(&self, measured: serde_json::Map<String, serde_json::Value>) -> String {
        let file = RecipeFile {
            method: self.spec.to_string(),
            layers: self.layers.clone(),
            measured,
        };
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }
}

/// The components quantization applies to: the UNet and the text encoders (the VAE stays dense,
/// as its decode is the image itself and its weights are a small part of the model).
pub const QUANTIZED_COMPONENTS: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

/// A [`QuantizedSource`] that quantizes the weights of one component's dense builder on demand.
pub struct QuantizeAtLoad {
    component: &'static str,
    dense: candle_nn::VarBuilder<'static>,
    spec: QuantSpec,
    recipe: Option<Arc<Recipe>>,
    dtype: DType,
}

impl QuantizeAtLoad {
    /// Quantizes `component`'s weights from `dense` (its builder) with `spec` (and `recipe`'s
    /// per-layer bit widths), computing as `dtype`.
    pub fn new(
        component: &'static str,
        dense: candle_nn::VarBuilder<'static>,
        spec: QuantSpec,
        recipe: Option<Arc<Recipe>>,
        dtype: DType,
    ) -> Self {
        Self {
            component,
            dense,
            spec,
            recipe,
            dtype,
        }
    }
}

impl QuantizedSource for QuantizeAtLoad {
    fn get(
        &self,
        name: &str,
        shape: &Shape,
    ) -> Option<candle_core::Result<Arc<dyn QuantizedMatrix>>> {
        let spec = match layer_spec(
            self.spec,
            self.recipe.as_deref(),
            self.component,
            name,
            shape.dims(),
        ) {
            Ok(spec) => spec?,
            Err(e) => return Some(Err(candle_core::Error::Msg(e.to_string()))),
        };
        let quantize = || -> candle_core::Result<Arc<dyn QuantizedMatrix>> {
            let weight = self.dense.get_with_hints_dtype(
                shape.clone(),
                name,
                candle_nn::Init::Const(0.0),
                DType::F32,
            )?;
            let matrix = spec
                .quantize(name, &weight, self.dtype)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok(Arc::new(matrix))
        };
        Some(quantize())
    }
}

/// The spec for `component`'s layer weight `name` of `shape`, or `None` when it stays dense:
/// without a recipe `spec` itself; with one, `spec` at the recipe's bit width where it names the
/// layer, and none where it does not (Apple's mixed-bit recipes leave unnamed layers in float16);
/// none either where the spec does not apply to the shape.
pub fn layer_spec(
    spec: QuantSpec,
    recipe: Option<&Recipe>,
    component: &str,
    name: &str,
    shape: &[usize],
) -> Result<Option<QuantSpec>> {
    let spec = match recipe {
        None => spec,
        Some(recipe) => {
            let key = format!("{component}/{name}");
            let Some(&bits) = recipe.layers.get(&key) else {
                return Ok(None);
            };
            spec.with_bits(bits).map_err(|e| Error::InvalidParameter {
                name: "recipe",
                value: format!("{key} = {bits}"),
                expected: e.to_string(),
            })?
        }
    };
    Ok(spec.applies_to(shape).then_some(spec))
}

/// Several sources, asked in order: the first that has a tensor gives it.
pub struct Chain(pub Vec<Arc<dyn QuantizedSource>>);

impl QuantizedSource for Chain {
    fn get(
        &self,
        name: &str,
        shape: &Shape,
    ) -> Option<candle_core::Result<Arc<dyn QuantizedMatrix>>> {
        self.0.iter().find_map(|source| source.get(name, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    fn recipe_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipe.json");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn recipes_read_back_what_they_write_and_refuse_bad_entries() {
        let recipe = Recipe {
            spec: "kmeans6".parse().unwrap(),
            layers: BTreeMap::from([("unet/conv_in.weight".to_string(), 4)]),
        };
        let (_dir, path) = recipe_file(&recipe.to_json(serde_json::Map::new()));
        assert_eq!(Recipe::read(&path).unwrap(), recipe);
        for (text, expected) in [
            (
                r#"{"method": "kmeans6", "layers": {"unet/a.weight": 5}}"#,
                "bits = 5",
            ),
            (
                r#"{"method": "kmeans6", "layers": {"a.weight": 4}}"#,
                "component/tensor",
            ),
            (
                r#"{"method": "int8", "layers": {"unet/a.weight": 4}}"#,
                "kmeans",
            ),
            (r#"{"method": "kmeans", "layers": {}}"#, "\"kmeans\""),
            (r#"{"layers": {}}"#, "method"),
        ] {
            let (_dir, path) = recipe_file(text);
            let message = Recipe::read(&path).unwrap_err().to_string();
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn a_recipe_leaves_the_layers_it_does_not_name_dense() {
        let weight = Tensor::randn(0f32, 1.0, (64, 64), &Device::Cpu).unwrap();
        let tensors = HashMap::from([
            ("a.weight".to_string(), weight.clone()),
            ("b.weight".to_string(), weight),
        ]);
        let dense = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let spec: QuantSpec = "kmeans6".parse().unwrap();
        let shape = Shape::from((64, 64));
        let plain = QuantizeAtLoad::new("unet", dense.clone(), spec, None, DType::F32);
        assert!(plain.get("a.weight", &shape).is_some());
        assert!(
            plain.get("a.weight", &Shape::from(64)).is_none(),
            "1-D stays dense"
        );
        let recipe = Recipe {
            spec,
            layers: BTreeMap::from([("unet/a.weight".to_string(), 2)]),
        };
        let mixed = QuantizeAtLoad::new("unet", dense, spec, Some(Arc::new(recipe)), DType::F32);
        let matrix = mixed.get("a.weight", &shape).unwrap().unwrap();
        assert_eq!(matrix.format(), "kmeans2");
        assert!(mixed.get("b.weight", &shape).is_none());
    }
}
