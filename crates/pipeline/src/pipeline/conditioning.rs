//! Prompt conditioning for each model family, as diffusers' pipelines build it: SD1.x/2.x take the
//! CLIP text encoder's last (or clip-skipped) hidden state; SDXL concatenates both encoders'
//! penultimate states and adds the second encoder's pooled projection and the micro-conditioning
//! time ids (`pipeline_stable_diffusion_xl.py`, `..._img2img.py`).

use candle_core::{DType, Device, Tensor};
use sdrs_clip::{ClipTextModel, ClipTokenizer};
use sdrs_unet::AddedConditions;

use crate::error::{Error, Result};

/// One CLIP text encoder with its tokenizer.
pub(crate) struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    fn ids(&self, prompt: &str, device: &Device) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let len = ids.len();
        Ok(Tensor::from_vec(ids, (1, len), device)?)
    }

    /// SD1.x: `last_hidden_state`, or with clip skip `k >= 2` the normalized hidden state `k` from the end.
    fn sd_embeddings(
        &self,
        prompt: &str,
        clip_skip: Option<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let ids = self.ids(prompt, device)?;
        Ok(match clip_skip {
            None | Some(0) | Some(1) => self.model.forward(&ids)?.last_hidden_state,
            Some(skip) => self.model.forward_clip_skip(&ids, skip)?,
        })
    }

    /// SDXL: the raw hidden state `clip_skip` from the end (default 2, the penultimate layer), and
    /// the projected pooled output when `pooled` is asked for (which needs every layer).
    fn sdxl_embeddings(
        &self,
        prompt: &str,
        clip_skip: usize,
        pooled: bool,
        device: &Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ids = self.ids(prompt, device)?;
        let layers = self.model.num_hidden_layers();
        let index = (layers + 1)
            .checked_sub(clip_skip)
            .ok_or_else(|| Error::InvalidParameter {
                name: "clip skip",
                value: clip_skip.to_string(),
                expected: format!("at most {} for this text encoder", layers + 1),
            })?;
        if !pooled {
            return Ok((self.model.hidden_state(&ids, index)?, None));
        }
        let out = self.model.forward(&ids)?;
        let state = out.hidden_states[index].clone();
        let embeds = out.text_embeds.ok_or_else(|| Error::MissingFile {
            path: "text_encoder_2/model.safetensors".into(),
            what:
                "text_projection.weight (SDXL's second text encoder is CLIPTextModelWithProjection)"
                    .to_string(),
        })?;
        Ok((state, Some(embeds)))
    }
}

/// The model family's text side.
pub(crate) enum TextEncoders {
    /// SD1.x/2.x: one encoder.
    Sd(Box<TextEncoder>),
    /// SDXL: the base model's two encoders (CLIP-L-like, then OpenCLIP-bigG-like with a projection),
    /// or the refiner's second one alone.
    Sdxl {
        encoders: Vec<TextEncoder>,
        force_zeros_for_empty_prompt: bool,
        /// The refiner's aesthetic-score time ids instead of the target size.
        requires_aesthetics_score: bool,
    },
}

/// The prompts of one request, each optional as in diffusers.
pub(crate) struct Prompts<'a> {
    pub prompt: &'a str,
    pub prompt_2: Option<&'a str>,
    pub negative: Option<&'a str>,
    pub negative_2: Option<&'a str>,
    pub clip_skip: Option<usize>,
    /// Whether the unconditional (negative) branch is needed at all.
    pub guided: bool,
}

/// SDXL's micro-conditioning, in pixels `(height, width)` and `(top, left)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    pub original_size: (usize, usize),
    pub crops_coords_top_left: (usize, usize),
    pub target_size: (usize, usize),
    /// Refiner only.
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

/// What the UNet is conditioned on for a whole batch (negative rows first).
pub(crate) struct Conditioning {
    pub embeddings: Tensor,
    pub added: Option<AddedConditions>,
}

impl TextEncoders {
    pub fn encode(
        &self,
        prompts: &Prompts,
        micro: &MicroConditioning,
        dtype: DType,
        device: &Device,
    ) -> Result<Conditioning> {
        match self {
            TextEncoders::Sd(encoder) => {
                let mut rows = Vec::new();
                if prompts.guided {
                    // diffusers encodes a missing negative prompt as the empty string.
                    let negative = prompts.negative.unwrap_or("");
                    rows.push(encoder.sd_embeddings(negative, prompts.clip_skip, device)?);
                }
                rows.push(encoder.sd_embeddings(prompts.prompt, prompts.clip_skip, device)?);
                Ok(Conditioning {
                    embeddings: Tensor::cat(&rows, 0)?.to_dtype(dtype)?,
                    added: None,
                })
            }
            TextEncoders::Sdxl {
                encoders,
                force_zeros_for_empty_prompt,
                requires_aesthetics_score,
            } => {
                let skip = prompts.clip_skip.unwrap_or(2);
                let (embeds, pooled) = sdxl_encode(
                    encoders,
                    [prompts.prompt, prompts.prompt_2.unwrap_or(prompts.prompt)],
                    skip,
                    device,
                )?;
                let (positive_ids, negative_ids) = if *requires_aesthetics_score {
                    refiner_time_ids(micro)
                } else {
                    (base_time_ids(micro), base_time_ids(micro))
                };
                if !prompts.guided {
                    return finish(embeds, pooled, positive_ids, dtype, device);
                }
                let (neg_embeds, neg_pooled) =
                    if prompts.negative.is_none() && *force_zeros_for_empty_prompt {
                        (embeds.zeros_like()?, pooled.zeros_like()?)
                    } else {
                        let negative = prompts.negative.unwrap_or("");
                        let negative_2 = prompts.negative_2.unwrap_or(negative);
                        // diffusers conditions the negative branch on the penultimate layer
                        // whatever the clip skip.
                        sdxl_encode(encoders, [negative, negative_2], 2, device)?
                    };
                finish(
                    Tensor::cat(&[neg_embeds, embeds], 0)?,
                    Tensor::cat(&[neg_pooled, pooled], 0)?,
                    [negative_ids, positive_ids].concat(),
                    dtype,
                    device,
                )
            }
        }
    }
}

/// The SDXL prompt embeddings (each encoder's hidden state, concatenated along the features) and
/// the last encoder's pooled projection. Prompts pair with encoders in order, so the refiner (one
/// encoder) uses the first prompt, as diffusers' `zip(prompts, tokenizers, text_encoders)` does.
fn sdxl_encode(
    encoders: &[TextEncoder],
    prompts: [&str; 2],
    clip_skip: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut states = Vec::new();
    let mut pooled = None;
    for (index, (encoder, prompt)) in encoders.iter().zip(prompts).enumerate() {
        let last = index + 1 == encoders.len();
        let (state, embeds) = encoder.sdxl_embeddings(prompt, clip_skip, last, device)?;
        states.push(state);
        pooled = embeds;
    }
    let pooled = pooled.ok_or_else(|| Error::MissingFile {
        path: "text_encoder_2".into(),
        what: "an SDXL model needs text_encoder_2 with its text_projection".to_string(),
    })?;
    Ok((Tensor::cat(&states, 2)?, pooled))
}

/// `(h, w, top, left, target_h, target_w)`: the SDXL base model's time ids.
fn base_time_ids(micro: &MicroConditioning) -> Vec<f32> {
    [
        micro.original_size.0,
        micro.original_size.1,
        micro.crops_coords_top_left.0,
        micro.crops_coords_top_left.1,
        micro.target_size.0,
        micro.target_size.1,
    ]
    .iter()
    .map(|&v| v as f32)
    .collect()
}

/// `(h, w, top, left, aesthetic score)` for the positive and the negative branch of the refiner.
fn refiner_time_ids(micro: &MicroConditioning) -> (Vec<f32>, Vec<f32>) {
    let common = [
        micro.original_size.0 as f32,
        micro.original_size.1 as f32,
        micro.crops_coords_top_left.0 as f32,
        micro.crops_coords_top_left.1 as f32,
    ];
    let mut positive = common.to_vec();
    positive.push(micro.aesthetic_score as f32);
    let mut negative = common.to_vec();
    negative.push(micro.negative_aesthetic_score as f32);
    (positive, negative)
}

fn finish(
    embeddings: Tensor,
    pooled: Tensor,
    time_ids: Vec<f32>,
    dtype: DType,
    device: &Device,
) -> Result<Conditioning> {
    let batch = embeddings.dim(0)?;
    let per_row = time_ids.len() / batch.max(1);
    let time_ids = Tensor::from_vec(time_ids, (batch, per_row), device)?;
    Ok(Conditioning {
        embeddings: embeddings.to_dtype(dtype)?,
        added: Some(AddedConditions {
            text_embeds: pooled.to_dtype(dtype)?,
            time_ids: time_ids.to_dtype(dtype)?,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro() -> MicroConditioning {
        MicroConditioning {
            original_size: (1024, 768),
            crops_coords_top_left: (0, 16),
            target_size: (896, 640),
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }

    #[test]
    fn base_time_ids_are_original_crop_target_in_height_width_order() {
        assert_eq!(
            base_time_ids(&micro()),
            vec![1024.0, 768.0, 0.0, 16.0, 896.0, 640.0]
        );
    }

    #[test]
    fn refiner_time_ids_end_with_the_aesthetic_scores() {
        let (positive, negative) = refiner_time_ids(&micro());
        assert_eq!(positive, vec![1024.0, 768.0, 0.0, 16.0, 6.0]);
        assert_eq!(negative, vec![1024.0, 768.0, 0.0, 16.0, 2.5]);
    }
}
