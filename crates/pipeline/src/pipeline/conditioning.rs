//! Prompt conditioning for each model family, as diffusers' pipelines build it from the text
//! encoders (any [`PromptEncoder`]): SD1.x/2.x take the last (or clip-skipped) hidden state; SDXL
//! concatenates both encoders' penultimate states and adds the second encoder's pooled projection
//! and the micro-conditioning time ids (`pipeline_stable_diffusion_xl.py`, `..._img2img.py`).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

use super::components::{AddedConditions, PromptEncoder, TextLayer};

/// The model family's text side.
pub(crate) enum TextEncoders {
    /// SD1.x/2.x: one encoder.
    Sd(Box<dyn PromptEncoder>),
    /// SDXL: the base model's two encoders (CLIP-L-like, then OpenCLIP-bigG-like with a projection),
    /// or the refiner's second one alone.
    Sdxl {
        encoders: Vec<Box<dyn PromptEncoder>>,
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

/// What the denoiser is conditioned on for a whole batch (the negative row first when guided).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The prompt embeddings, `[B, tokens, D]`.
    pub embeddings: Tensor,
    /// SDXL's pooled embedding and time ids.
    pub added: Option<AddedConditions>,
}

impl Conditioning {
    /// The conditioning of a batch of `images` images with the same prompts: each row `images`
    /// times in place (`[negative, positive]` -> `[negative x images, positive x images]`), the
    /// layout the guided prediction splits into its unconditional and conditional halves, as
    /// diffusers' `num_images_per_prompt` builds it.
    pub fn for_batch(&self, images: usize) -> Result<Self> {
        if images == 1 {
            return Ok(self.clone());
        }
        let rows = |t: &Tensor| -> Result<Tensor> {
            let index: Vec<u32> = (0..t.dim(0)? as u32)
                .flat_map(|row| std::iter::repeat_n(row, images))
                .collect();
            let index = Tensor::from_vec(index, images * t.dim(0)?, t.device())?;
            Ok(t.index_select(&index, 0)?)
        };
        Ok(Self {
            embeddings: rows(&self.embeddings)?,
            added: match &self.added {
                Some(added) => Some(AddedConditions {
                    text_embeds: rows(&added.text_embeds)?,
                    time_ids: rows(&added.time_ids)?,
                }),
                None => None,
            },
        })
    }
}

impl TextEncoders {
    /// The conditioning of one image's prompts, in `dtype` on `device` (the denoiser's).
    pub fn encode(
        &self,
        prompts: &Prompts,
        micro: &MicroConditioning,
        dtype: DType,
        device: &Device,
    ) -> Result<Conditioning> {
        let _span = tracing::info_span!("encode_prompts", guided = prompts.guided).entered();
        match self {
            TextEncoders::Sd(encoder) => {
                let layer = TextLayer::Normalized {
                    clip_skip: prompts.clip_skip.unwrap_or(1),
                };
                let embed = |prompt: &str| -> Result<Tensor> {
                    Ok(encoder.encode(prompt, layer, false)?.hidden_state)
                };
                let mut rows = Vec::new();
                if prompts.guided {
                    // diffusers encodes a missing negative prompt as the empty string.
                    rows.push(embed(prompts.negative.unwrap_or(""))?);
                }
                rows.push(embed(prompts.prompt)?);
                Ok(Conditioning {
                    embeddings: Tensor::cat(&rows, 0)?.to_device(device)?.to_dtype(dtype)?,
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
                        sdxl_encode(encoders, [negative, negative_2], 2)?
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
    encoders: &[Box<dyn PromptEncoder>],
    prompts: [&str; 2],
    clip_skip: usize,
) -> Result<(Tensor, Tensor)> {
    let mut states = Vec::new();
    let mut pooled = None;
    for (index, (encoder, prompt)) in encoders.iter().zip(prompts).enumerate() {
        let last = index + 1 == encoders.len();
        let encoded = encoder.encode(prompt, TextLayer::Raw { clip_skip }, last)?;
        states.push(encoded.hidden_state);
        pooled = encoded.pooled;
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
        embeddings: embeddings.to_device(device)?.to_dtype(dtype)?,
        added: Some(AddedConditions {
            text_embeds: pooled.to_device(device)?.to_dtype(dtype)?,
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
    fn batch_conditioning_repeats_each_row_in_place() {
        let device = Device::Cpu;
        let rows = |values: Vec<f32>, shape: &[usize]| Tensor::from_vec(values, shape, &device);
        let conditioning = Conditioning {
            embeddings: rows(vec![0., 1., 2., 3.], &[2, 1, 2]).unwrap(),
            added: Some(AddedConditions {
                text_embeds: rows(vec![5., 6.], &[2, 1]).unwrap(),
                time_ids: rows(vec![7., 8.], &[2, 1]).unwrap(),
            }),
        };
        let repeated = conditioning.for_batch(2).unwrap();
        assert_eq!(repeated.embeddings.dims(), [4, 1, 2]);
        let values: Vec<f32> = repeated
            .embeddings
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(values, [0., 1., 0., 1., 2., 3., 2., 3.]);
        let added = repeated.added.unwrap();
        let pooled: Vec<f32> = added.text_embeds.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(pooled, [5., 5., 6., 6.]);
        assert_eq!(added.time_ids.dims(), [4, 1]);
        let times: Vec<f32> = added.time_ids.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(times, [7., 7., 8., 8.]);
    }

    #[test]
    fn refiner_time_ids_end_with_the_aesthetic_scores() {
        let (positive, negative) = refiner_time_ids(&micro());
        assert_eq!(positive, vec![1024.0, 768.0, 0.0, 16.0, 6.0]);
        assert_eq!(negative, vec![1024.0, 768.0, 0.0, 16.0, 2.5]);
    }
}
