//! `sdrs quantize --analyze`: the per-layer sensitivity pass of Apple's mixed-bit palettization.
//! Each UNet layer is palettized alone at each bit width and the UNet's output on fixed inputs is
//! compared with the unquantized model's, as PSNR = 20 log10(max|ref| / RMS(diff)); a recipe then
//! gives every layer the fewest bits that keep it above a PSNR floor, or lowers the least
//! sensitive layers first until the average bits per weight reach a target. The whole-UNet PSNR of
//! each uniform bit width and of the recipe is measured and written beside it.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use sdrs_kernels::weight::QuantizedSource;
use sdrs_kernels::QuantizedMatrix;
use sdrs_pipeline::loading::export::ModelWeights;
use sdrs_pipeline::loading::quantize::{layer_spec, Recipe};
use sdrs_pipeline::random_weights::RandomWeights;
use sdrs_pipeline::{BuiltinModel, ModelFiles};
use sdrs_quant::QuantSpec;
use sdrs_unet::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};

use crate::quantize::QuantizeArgs;

/// The quantized layers of one trial, by tensor name.
struct Layers(HashMap<String, Arc<dyn QuantizedMatrix>>);

impl QuantizedSource for Layers {
    fn get(&self, name: &str, _: &Shape) -> Option<candle_core::Result<Arc<dyn QuantizedMatrix>>> {
        self.0.get(name).cloned().map(Ok)
    }
}

/// Records the layer weights a model asks for (it quantizes none of them).
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, Shape)>>);

impl QuantizedSource for Recorder {
    fn get(
        &self,
        name: &str,
        shape: &Shape,
    ) -> Option<candle_core::Result<Arc<dyn QuantizedMatrix>>> {
        if let Ok(mut names) = self.0.lock() {
            names.push((name.to_string(), shape.clone()));
        }
        None
    }
}

/// Where the UNet's dense weights come from: a model's files (read once, kept in f32), or the
/// seeded random weights of a built-in architecture (regenerated for each build).
pub enum Weights<'a> {
    Model(&'a ModelWeights),
    Random(BuiltinModel, u64),
}

/// The UNet's dense weights, its config, its layer weights and fixed inputs.
struct Bench {
    dense: candle_nn::VarBuilder<'static>,
    config: UNet2DConditionConfig,
    layers: Vec<(String, Shape)>,
    sample: Tensor,
    timestep: Tensor,
    context: Tensor,
    added: Option<AddedConditions>,
    kernels: sdrs_kernels::KernelOptions,
}

impl Bench {
    fn load(weights: &Weights, seed: u64) -> Result<Self> {
        let device = Device::Cpu;
        let (files, dense) = match weights {
            Weights::Model(model) => {
                let tensors = model.tensors("unet")?;
                let mut loaded = HashMap::new();
                for (name, _) in tensors.shapes() {
                    loaded.insert(name.clone(), tensors.load(&name)?.to_dtype(DType::F32)?);
                }
                let vb = candle_nn::VarBuilder::from_tensors(loaded, DType::F32, &device);
                (model.files().clone(), vb)
            }
            Weights::Random(model, weights_seed) => (
                ModelFiles::Builtin(*model),
                RandomWeights::for_component(*weights_seed, "unet")
                    .into_var_builder(DType::F32, &device),
            ),
        };
        let config = files.unet_config()?;
        let mut state = seed;
        let size = config.sample_size.unwrap_or(64);
        let sample = seeded_normal(&mut state, &[1, config.in_channels, size, size])?;
        let context_dim = config.cross_attention_dim.at("cross_attention_dim", 0)?;
        let context = seeded_normal(&mut state, &[1, 77, context_dim])?;
        let added = match (
            config.projection_class_embeddings_input_dim,
            config.addition_time_embed_dim,
        ) {
            (Some(input), Some(time)) if time > 0 => {
                // The pooled embedding is the second text encoder's projection; the rest of the
                // UNet's input is the time ids (6 for the base, 5 for the refiner).
                let pooled = files
                    .text_config("text_encoder_2")?
                    .projection_dim
                    .min(input);
                let ids = (input - pooled) / time;
                Some(AddedConditions {
                    text_embeds: seeded_normal(&mut state, &[1, pooled])?,
                    time_ids: Tensor::full(512f32, (1, ids), &device)?,
                })
            }
            _ => None,
        };
        let mut bench = Self {
            dense,
            config,
            layers: Vec::new(),
            sample,
            timestep: Tensor::new(&[500f32], &device)?,
            context,
            added,
            kernels: crate::system::kernel_options(Default::default())?,
        };
        let recorder = Arc::new(Recorder::default());
        bench.build(recorder.clone())?;
        let mut layers = recorder.0.lock().map(|l| l.clone()).unwrap_or_default();
        layers.sort_by(|a, b| a.0.cmp(&b.0));
        bench.layers = layers;
        Ok(bench)
    }

    fn build(&self, source: Arc<dyn QuantizedSource>) -> Result<UNet2DConditionModel> {
        let vb =
            sdrs_kernels::VarBuilder::new(self.dense.clone(), self.kernels).with_quantized(source);
        Ok(UNet2DConditionModel::new(vb, &self.config)?)
    }

    /// The UNet's output with `layers` quantized (none: the reference).
    fn run(&self, layers: HashMap<String, Arc<dyn QuantizedMatrix>>) -> Result<Tensor> {
        let unet = self.build(Arc::new(Layers(layers)))?;
        Ok(unet.forward(
            &self.sample,
            &self.timestep,
            &self.context,
            self.added.as_ref(),
        )?)
    }

    fn quantize(
        &self,
        name: &str,
        shape: &Shape,
        spec: QuantSpec,
    ) -> Result<Arc<dyn QuantizedMatrix>> {
        let tensor = self.dense.get(shape.clone(), name)?;
        Ok(Arc::new(spec.quantize(name, &tensor, DType::F32)?))
    }

    /// The UNet's output with every layer `pick` gives a spec for quantized.
    fn run_with(&self, pick: &dyn Fn(&str, &Shape) -> Result<Option<QuantSpec>>) -> Result<Tensor> {
        let mut quantized = HashMap::new();
        for (name, shape) in &self.layers {
            if let Some(spec) = pick(name, shape)? {
                quantized.insert(name.clone(), self.quantize(name, shape, spec)?);
            }
        }
        self.run(quantized)
    }
}

/// `sdrs quantize --psnr SPEC,...`: the whole UNet's output PSNR against the unquantized model
/// for each spec (every layer it applies to quantized), on fixed inputs.
pub fn psnr_table(
    specs: &[QuantSpec],
    recipe: Option<&Recipe>,
    weights: &Weights,
    seed: u64,
) -> Result<ExitCode> {
    let bench = Bench::load(weights, seed)?;
    let reference = bench.run(HashMap::new())?;
    for &spec in specs {
        let output =
            bench.run_with(&|_, shape| Ok(spec.applies_to(shape.dims()).then_some(spec)))?;
        println!(
            "{spec}: UNet output PSNR {:.2} dB",
            psnr(&reference, &output)?
        );
    }
    if let Some(recipe) = recipe {
        let output = bench.run_with(&|name, shape| {
            Ok(layer_spec(
                recipe.spec,
                Some(recipe),
                "unet",
                name,
                shape.dims(),
            )?)
        })?;
        println!(
            "{} recipe: UNet output PSNR {:.2} dB",
            recipe.spec,
            psnr(&reference, &output)?
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Standard normal values of `shape` from a splitmix64 stream (Box-Muller): the same fixed inputs
/// for a seed on every machine.
fn seeded_normal(state: &mut u64, shape: &[usize]) -> Result<Tensor> {
    let mut next = || {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // A uniform in (0, 1]: never 0, so the logarithm is finite.
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + f64::EPSILON
    };
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| {
            let (u, v) = (next().min(1.0), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// PSNR of `output` against `reference`: 20 log10(max|ref| / RMS(diff)), infinite when equal.
pub fn psnr(reference: &Tensor, output: &Tensor) -> Result<f64> {
    let reference = reference.to_dtype(DType::F64)?.flatten_all()?;
    let output = output.to_dtype(DType::F64)?.flatten_all()?;
    let peak = reference.abs()?.max(0)?.to_scalar::<f64>()?;
    let rms = (output - &reference)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?
        .sqrt();
    Ok(if rms == 0.0 {
        f64::INFINITY
    } else {
        20.0 * (peak / rms).log10()
    })
}

/// One layer's measurements.
struct Layer {
    name: String,
    elements: usize,
    psnr: BTreeMap<u32, f64>,
}

pub fn run(args: &QuantizeArgs, output: &std::path::Path, weights: &Weights) -> Result<ExitCode> {
    let base = args.quantize.unwrap_or(QuantSpec::Kmeans {
        bits: 6,
        group: None,
    });
    let mut bits = args.analyze_bits.clone();
    bits.sort_unstable();
    bits.dedup();
    for &b in &bits {
        base.with_bits(b)
            .with_context(|| format!("--analyze-bits {b} with {base}"))?;
    }
    if bits.is_empty() {
        bail!("--analyze-bits: give at least one bit width");
    }
    if args.target_bits.is_some() == args.psnr_floor.is_some() {
        bail!("--analyze needs exactly one of --target-bits or --psnr-floor");
    }
    let bench = Bench::load(weights, args.seed)?;
    let reference = bench.run(HashMap::new())?;
    let names: Vec<(String, Shape)> = bench
        .layers
        .iter()
        .filter(|(_, shape)| base.applies_to(shape.dims()))
        .cloned()
        .collect();
    let trials = names.len() * bits.len();
    eprintln!(
        "sensitivity: {} UNet layers x {} bit widths = {trials} UNet runs",
        names.len(),
        bits.len()
    );
    let progress = crate::progress::step_bar(trials);
    let mut layers = Vec::new();
    for (name, shape) in names {
        let mut psnr_by_bits = BTreeMap::new();
        for &b in &bits {
            let matrix = bench.quantize(&name, &shape, base.with_bits(b)?)?;
            let output = bench.run(HashMap::from([(name.clone(), matrix)]))?;
            psnr_by_bits.insert(b, psnr(&reference, &output)?);
            progress.inc(1);
        }
        layers.push(Layer {
            name,
            elements: shape.elem_count(),
            psnr: psnr_by_bits,
        });
    }
    progress.finish_and_clear();

    let choice = match args.target_bits {
        Some(target) => by_target_bits(&layers, &bits, target),
        None => by_psnr_floor(&layers, &bits, args.psnr_floor.unwrap_or(f64::INFINITY)),
    };
    let total: usize = layers.iter().map(|l| l.elements).sum();
    let average = layers
        .iter()
        .map(|l| choice[&l.name] as f64 * l.elements as f64)
        .sum::<f64>()
        / total.max(1) as f64;

    // Whole-UNet quality of each uniform width and of the recipe.
    let whole = |pick: &dyn Fn(&str) -> u32| -> Result<f64> {
        let output = bench.run_with(&|name, shape| {
            if !choice.contains_key(name) {
                return Ok(None);
            }
            let spec = base.with_bits(pick(name))?;
            Ok(spec.applies_to(shape.dims()).then_some(spec))
        })?;
        psnr(&reference, &output)
    };
    let mut uniform = serde_json::Map::new();
    for &b in &bits {
        let value = whole(&|_| b)?;
        eprintln!("all layers at {b} bits: UNet output PSNR {value:.2} dB");
        uniform.insert(b.to_string(), serde_json::json!(round2(value)));
    }
    let recipe_psnr = whole(&|name| choice[name])?;
    eprintln!(
        "recipe: {average:.3} bits per weight on average, UNet output PSNR {recipe_psnr:.2} dB"
    );

    let recipe = Recipe {
        spec: base,
        layers: layers
            .iter()
            .map(|l| (format!("unet/{}", l.name), choice[&l.name]))
            .collect(),
    };
    let mut measured = serde_json::Map::new();
    measured.insert("average_bits".into(), serde_json::json!(round2(average)));
    measured.insert("psnr_db".into(), serde_json::json!(round2(recipe_psnr)));
    measured.insert("uniform_psnr_db".into(), serde_json::Value::Object(uniform));
    let sensitivity: serde_json::Map<String, serde_json::Value> = layers
        .iter()
        .map(|l| {
            let by_bits: serde_json::Map<String, serde_json::Value> = l
                .psnr
                .iter()
                .map(|(b, p)| (b.to_string(), serde_json::json!(round2(*p))))
                .collect();
            (
                format!("unet/{}", l.name),
                serde_json::Value::Object(by_bits),
            )
        })
        .collect();
    measured.insert(
        "sensitivity_psnr_db".into(),
        serde_json::Value::Object(sensitivity),
    );
    crate::output::write_text_atomically(output, &recipe.to_json(measured))?;
    eprintln!("wrote {}", output.display());
    Ok(ExitCode::SUCCESS)
}

/// JSON-friendly: two decimals, infinities as a large finite value.
fn round2(value: f64) -> f64 {
    if value.is_finite() {
        (value * 100.0).round() / 100.0
    } else {
        999.0
    }
}

/// Each layer's fewest bits whose PSNR stays at or above `floor` (the most bits when none does).
fn by_psnr_floor(layers: &[Layer], bits: &[u32], floor: f64) -> HashMap<String, u32> {
    let most = bits.last().copied().unwrap_or(8);
    layers
        .iter()
        .map(|l| {
            let b = bits
                .iter()
                .copied()
                .find(|b| l.psnr.get(b).is_some_and(|&p| p >= floor))
                .unwrap_or(most);
            (l.name.clone(), b)
        })
        .collect()
}

/// Every layer starts at the most bits; the layer whose next lower width keeps the highest PSNR
/// steps down, until the element-weighted average reaches `target` or no layer can go lower.
fn by_target_bits(layers: &[Layer], bits: &[u32], target: f64) -> HashMap<String, u32> {
    let mut level: Vec<usize> = vec![bits.len().saturating_sub(1); layers.len()];
    let total: f64 = layers
        .iter()
        .map(|l| l.elements as f64)
        .sum::<f64>()
        .max(1.0);
    let average = |level: &[usize]| -> f64 {
        layers
            .iter()
            .zip(level)
            .map(|(l, &i)| bits[i] as f64 * l.elements as f64)
            .sum::<f64>()
            / total
    };
    while average(&level) > target {
        let best = layers
            .iter()
            .enumerate()
            .filter(|(i, _)| level[*i] > 0)
            .map(|(i, l)| {
                (
                    i,
                    l.psnr
                        .get(&bits[level[i] - 1])
                        .copied()
                        .unwrap_or(f64::NEG_INFINITY),
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((i, _)) => level[i] -= 1,
            None => break,
        }
    }
    layers
        .iter()
        .zip(&level)
        .map(|(l, &i)| (l.name.clone(), bits[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, elements: usize, psnr: &[(u32, f64)]) -> Layer {
        Layer {
            name: name.to_string(),
            elements,
            psnr: psnr.iter().copied().collect(),
        }
    }

    #[test]
    fn the_floor_gives_each_layer_its_fewest_bits_above_it() {
        let layers = [
            layer("a", 100, &[(2, 20.0), (4, 35.0), (8, 60.0)]),
            layer("b", 100, &[(2, 41.0), (4, 50.0), (8, 70.0)]),
            layer("c", 100, &[(2, 10.0), (4, 20.0), (8, 30.0)]),
        ];
        let choice = by_psnr_floor(&layers, &[2, 4, 8], 40.0);
        assert_eq!((choice["a"], choice["b"], choice["c"]), (8, 2, 8));
    }

    #[test]
    fn the_target_lowers_the_least_sensitive_layers_first() {
        let layers = [
            layer("sensitive", 100, &[(4, 20.0), (6, 30.0), (8, 60.0)]),
            layer("robust", 100, &[(4, 45.0), (6, 55.0), (8, 70.0)]),
        ];
        let choice = by_target_bits(&layers, &[4, 6, 8], 6.0);
        assert_eq!((choice["sensitive"], choice["robust"]), (8, 4));
        let all_low = by_target_bits(&layers, &[4, 6, 8], 1.0);
        assert_eq!((all_low["sensitive"], all_low["robust"]), (4, 4));
    }

    #[test]
    fn psnr_is_peak_over_rms() {
        let reference = Tensor::new(&[2f32, -4.0, 0.0, 1.0], &Device::Cpu).unwrap();
        let output = Tensor::new(&[2f32, -4.0, 0.0, 3.0], &Device::Cpu).unwrap();
        // RMS of the difference: sqrt(4 / 4) = 1; peak 4.
        let value = psnr(&reference, &output).unwrap();
        assert!((value - 20.0 * 4f64.log10()).abs() < 1e-9, "{value}");
        assert!(psnr(&reference, &reference).unwrap().is_infinite());
    }
}
