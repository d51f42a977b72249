//! The UNet's boundary as Apple's `Unet.swift` crosses it: `sample`, `timestep` [B],
//! `encoder_hidden_states` in BC1S ([B, C, 1, S], the split-einsum layout of 1x1 convolutions;
//! the pipeline's [B, S, C] transposed), SDXL's `time_ids` and `text_embeds`, each converted to
//! the dtype the model declares; a chunked UNet (`UnetChunk1..N`) runs chunk after chunk, each fed
//! the outputs of the chunks before it merged over the original inputs, by name; the batch is the
//! one the model was compiled for (2: the guidance pair), other batches run in slices of it.

use std::collections::HashMap;
use std::sync::Arc;

use super::features::{FeatureInfo, MultiArray};
use super::{take_output, CoreMlModel};
use crate::error::model as model_error;
use crate::Result;

/// One UNet evaluation in the pipeline's layout, f32 (any dtype is converted).
#[derive(Debug, Clone)]
pub struct UnetInputs {
    /// `[B, C, h, w]`.
    pub sample: MultiArray,
    /// `[B]`.
    pub timestep: MultiArray,
    /// `[B, S, C]` (the text encoders' layout).
    pub encoder_hidden_states: MultiArray,
    /// SDXL: `[B, 6]` (the refiner: 5).
    pub time_ids: Option<MultiArray>,
    /// SDXL: `[B, D]`, the second text encoder's pooled embedding.
    pub text_embeds: Option<MultiArray>,
}

/// `[B, S, C]` to BC1S `[B, C, 1, S]`.
pub fn to_bc1s(array: &MultiArray) -> Result<MultiArray> {
    let [b, s, c] = three_dims(array, "[B, S, C]")?;
    let values = array.to_f32();
    let mut out = vec![0f32; values.len()];
    for bi in 0..b {
        for si in 0..s {
            for ci in 0..c {
                out[(bi * c + ci) * s + si] = values[(bi * s + si) * c + ci];
            }
        }
    }
    MultiArray::from_f32(&[b, c, 1, s], out)
}

/// BC1S `[B, C, 1, S]` back to `[B, S, C]`.
pub fn from_bc1s(array: &MultiArray) -> Result<MultiArray> {
    let (b, c, s) = match array.shape.as_slice() {
        &[b, c, 1, s] => (b, c, s),
        other => {
            return Err(crate::Error::InvalidParameter {
                name: "BC1S array",
                value: format!("{other:?}"),
                expected: "[B, C, 1, S]".to_string(),
            })
        }
    };
    let values = array.to_f32();
    let mut out = vec![0f32; values.len()];
    for bi in 0..b {
        for ci in 0..c {
            for si in 0..s {
                out[(bi * s + si) * c + ci] = values[(bi * c + ci) * s + si];
            }
        }
    }
    MultiArray::from_f32(&[b, s, c], out)
}

fn three_dims(array: &MultiArray, what: &str) -> Result<[usize; 3]> {
    match array.shape.as_slice() {
        &[a, b, c] => Ok([a, b, c]),
        other => Err(crate::Error::InvalidParameter {
            name: "encoder hidden states",
            value: format!("{other:?}"),
            expected: what.to_string(),
        }),
    }
}

/// The UNet (whole or in chunks).
pub struct UnetGlue {
    chunks: Vec<Arc<dyn CoreMlModel>>,
    /// The inputs the caller provides: every chunk input no earlier chunk outputs.
    inputs: Vec<FeatureInfo>,
    output: String,
}

const SAMPLE: &str = "sample";
const TIMESTEP: &str = "timestep";
const CONTEXT: &str = "encoder_hidden_states";
const TIME_IDS: &str = "time_ids";
const TEXT_EMBEDS: &str = "text_embeds";
const NOISE_PRED: &str = "noise_pred";

impl UnetGlue {
    /// `chunks`: `[Unet]`, or `UnetChunk1..N` in order.
    pub fn new(chunks: Vec<Arc<dyn CoreMlModel>>) -> Result<Self> {
        let Some(last) = chunks.last() else {
            return Err(model_error(
                "Unet",
                "no model (Unet or UnetChunk1..N) to run",
            ));
        };
        let output = match last.outputs() {
            [only] => only.name.clone(),
            outputs => outputs
                .iter()
                .find(|f| f.name == NOISE_PRED)
                .map(|f| f.name.clone())
                .ok_or_else(|| model_error(last.name(), "no noise_pred output"))?,
        };
        let mut inputs: Vec<FeatureInfo> = Vec::new();
        let mut produced: Vec<&str> = Vec::new();
        for chunk in &chunks {
            for feature in chunk.inputs() {
                if !produced.contains(&feature.name.as_str())
                    && !inputs.iter().any(|f| f.name == feature.name)
                {
                    inputs.push(feature.clone());
                }
            }
            produced.extend(chunk.outputs().iter().map(|f| f.name.as_str()));
        }
        for required in [SAMPLE, TIMESTEP, CONTEXT] {
            if !inputs.iter().any(|f| f.name == required) {
                return Err(model_error(
                    chunks[0].name(),
                    format!("no {required} input: not a Stable Diffusion UNet"),
                ));
            }
        }
        if let Some(unknown) = inputs.iter().find(|f| {
            ![SAMPLE, TIMESTEP, CONTEXT, TIME_IDS, TEXT_EMBEDS].contains(&f.name.as_str())
        }) {
            return Err(model_error(
                chunks[0].name(),
                format!(
                    "input {} is produced by no earlier chunk and is none of sample, timestep, \
                     encoder_hidden_states, time_ids, text_embeds (a ControlNet UNet?)",
                    unknown.name
                ),
            ));
        }
        Ok(Self {
            chunks,
            inputs,
            output,
        })
    }

    fn input(&self, name: &str) -> Option<&FeatureInfo> {
        self.inputs.iter().find(|f| f.name == name)
    }

    fn name(&self) -> &str {
        self.chunks[0].name()
    }

    /// The declared `sample` shape `[B, C, h, w]`: the batch and latent size it was compiled for.
    pub fn sample_shape(&self) -> &[usize] {
        self.input(SAMPLE).map_or(&[], |f| f.shape.as_slice())
    }

    /// The declared `encoder_hidden_states` width C (of BC1S [B, C, 1, S]).
    pub fn context_width(&self) -> Option<usize> {
        self.input(CONTEXT).and_then(|f| f.shape.get(1).copied())
    }

    /// The declared `time_ids` length (SDXL 6, the refiner 5); `None` for SD.
    pub fn time_ids_len(&self) -> Option<usize> {
        self.input(TIME_IDS).and_then(|f| f.shape.get(1).copied())
    }

    /// The model output for `inputs` (any batch), `[B, C, h, w]` f32.
    pub fn predict(&self, inputs: &UnetInputs) -> Result<MultiArray> {
        let declared = self.sample_shape();
        let batch = inputs.sample.shape.first().copied().unwrap_or(0);
        if inputs.sample.shape.get(1..) != declared.get(1..) {
            return Err(model_error(
                self.name(),
                format!(
                    "latents {:?}: the model was compiled for {:?} (Core ML models have a fixed \
                     size: {}x{} pixels at 8 pixels per latent)",
                    inputs.sample.shape,
                    declared,
                    declared.get(3).copied().unwrap_or(0) * 8,
                    declared.get(2).copied().unwrap_or(0) * 8,
                ),
            ));
        }
        let mut given: Vec<(&str, MultiArray)> = vec![
            (SAMPLE, inputs.sample.clone()),
            (TIMESTEP, inputs.timestep.clone()),
            (CONTEXT, to_bc1s(&inputs.encoder_hidden_states)?),
        ];
        for (name, value, what) in [
            (TIME_IDS, &inputs.time_ids, "time ids"),
            (TEXT_EMBEDS, &inputs.text_embeds, "pooled text embeddings"),
        ] {
            match (value, self.input(name)) {
                (Some(value), Some(_)) => given.push((name, value.clone())),
                (None, None) => {}
                (None, Some(_)) => {
                    return Err(model_error(
                        self.name(),
                        format!("the model takes {name} (SDXL's {what}) and none were given"),
                    ))
                }
                (Some(_), None) => {
                    return Err(model_error(
                        self.name(),
                        format!("{name} given, but the model has no such input (not SDXL)"),
                    ))
                }
            }
        }
        for (name, value) in &given {
            if value.shape.first() != Some(&batch) {
                return Err(model_error(
                    self.name(),
                    format!(
                        "{name} has shape {:?}; its batch is not the latents' {batch}",
                        value.shape
                    ),
                ));
            }
        }
        let model_batch = declared.first().copied().unwrap_or(1).max(1);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < batch {
            let take = model_batch.min(batch - start);
            let mut pool = HashMap::new();
            for (name, value) in &given {
                let mut rows = value.rows(start, take)?;
                if take < model_batch {
                    // The model runs only its compiled batch: repeat the last row to fill it
                    // (rows are independent) and keep the rows asked for.
                    let last = rows.rows(take - 1, 1)?;
                    let mut filled = vec![rows];
                    filled.extend(std::iter::repeat_n(last, model_batch - take));
                    rows = MultiArray::concat_rows(&filled)?;
                }
                pool.insert((*name).to_string(), rows);
            }
            let out = self.run_chunks(pool)?;
            parts.push(out.rows(0, take)?);
            start += take;
        }
        let out = MultiArray::concat_rows(&parts)?;
        MultiArray::from_f32(&out.shape, out.to_f32())
    }

    fn run_chunks(&self, mut pool: HashMap<String, MultiArray>) -> Result<MultiArray> {
        for chunk in &self.chunks {
            let mut feed = HashMap::new();
            for feature in chunk.inputs() {
                let value = pool.get(&feature.name).ok_or_else(|| {
                    model_error(
                        chunk.name(),
                        format!(
                            "input {} is neither an original input nor an earlier chunk's output",
                            feature.name
                        ),
                    )
                })?;
                feature.check_shape(chunk.name(), value)?;
                feed.insert(feature.name.clone(), value.to_dtype(feature.dtype));
            }
            let outputs = chunk.predict(&feed)?;
            pool.extend(outputs);
        }
        let last = self.chunks.last().map_or("Unet", |c| c.name());
        take_output(last, &mut pool, &self.output)
    }
}
