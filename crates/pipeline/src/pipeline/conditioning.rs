//! Prompt conditioning for each model family, as diffusers' pipelines build it from the text
//! encoders (any [`PromptEncoder`]): SD1.x/2.x take the last (or clip-skipped) hidden state; SDXL
//! concatenates both encoders' penultimate states and adds the second encoder's pooled projection
//! and the micro-conditioning time ids (`pipeline_stable_diffusion_xl.py`, `..._img2img.py`).
//! With AUTOMATIC1111's prompt syntax each prompt is encoded chunk by chunk with its weights
//! (`modules/sd_hijack_clip.py`, the "Original" emphasis of `modules/sd_emphasis.py`) and the
//! negative and positive conditioning are padded to the same length with the encoded empty prompt
//! (`pad_cond_uncond` of `modules/sd_samplers_cfg_denoiser.py`).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

use super::components::{AddedConditions, PromptEncoder, TextEmbeddings, TextLayer};
use super::prompt::{emphasize, prompt_chunks, PromptChunk};
use super::PromptSyntax;

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
    pub syntax: PromptSyntax,
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
                let mut rows = Vec::new();
                if prompts.guided {
                    // diffusers (and A1111) encode a missing negative prompt as the empty string.
                    rows.push([prompts.negative.unwrap_or("")]);
                }
                rows.push([prompts.prompt]);
                let embeddings = match prompts.syntax {
                    PromptSyntax::Plain => {
                        let states = rows
                            .iter()
                            .map(|[prompt]| Ok(encoder.encode(prompt, layer, false)?.hidden_state))
                            .collect::<Result<Vec<_>>>()?;
                        Tensor::cat(&states, 0)?
                    }
                    PromptSyntax::A1111 => {
                        weighted_rows(&[encoder.as_ref()], &rows, layer, false)?.0
                    }
                };
                Ok(Conditioning {
                    embeddings: embeddings.to_device(device)?.to_dtype(dtype)?,
                    added: None,
                })
            }
            TextEncoders::Sdxl {
                encoders,
                force_zeros_for_empty_prompt,
                requires_aesthetics_score,
            } => {
                let skip = prompts.clip_skip.unwrap_or(2);
                let positive = [prompts.prompt, prompts.prompt_2.unwrap_or(prompts.prompt)];
                let (positive_ids, negative_ids) = if *requires_aesthetics_score {
                    refiner_time_ids(micro)
                } else {
                    (base_time_ids(micro), base_time_ids(micro))
                };
                let zeroed = prompts.negative.is_none() && *force_zeros_for_empty_prompt;
                let negative = prompts.negative.unwrap_or("");
                let negative = [negative, prompts.negative_2.unwrap_or(negative)];
                let (embeds, pooled) = match prompts.syntax {
                    PromptSyntax::Plain => {
                        let (embeds, pooled) = sdxl_encode(encoders, positive, skip)?;
                        if !prompts.guided {
                            (embeds, pooled)
                        } else if zeroed {
                            with_zeros_first(embeds, pooled)?
                        } else {
                            // diffusers conditions the negative branch on the penultimate layer
                            // whatever the clip skip.
                            let (neg_embeds, neg_pooled) = sdxl_encode(encoders, negative, 2)?;
                            (
                                Tensor::cat(&[neg_embeds, embeds], 0)?,
                                Tensor::cat(&[neg_pooled, pooled], 0)?,
                            )
                        }
                    }
                    PromptSyntax::A1111 => {
                        let encoders: Vec<&dyn PromptEncoder> =
                            encoders.iter().map(|e| e.as_ref()).collect();
                        let layer = TextLayer::Raw { clip_skip: skip };
                        let rows: &[[&str; 2]] = if prompts.guided && !zeroed {
                            &[negative, positive]
                        } else {
                            &[positive]
                        };
                        let (embeds, pooled) = weighted_rows(&encoders, rows, layer, true)?;
                        let pooled = pooled.ok_or_else(missing_text_encoder_2)?;
                        if prompts.guided && zeroed {
                            with_zeros_first(embeds, pooled)?
                        } else {
                            (embeds, pooled)
                        }
                    }
                };
                let time_ids = if prompts.guided {
                    [negative_ids, positive_ids].concat()
                } else {
                    positive_ids
                };
                finish(embeds, pooled, time_ids, dtype, device)
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
    let pooled = pooled.ok_or_else(missing_text_encoder_2)?;
    Ok((Tensor::cat(&states, 2)?, pooled))
}

fn missing_text_encoder_2() -> Error {
    Error::MissingFile {
        path: "text_encoder_2".into(),
        what: "an SDXL model needs text_encoder_2 with its text_projection".to_string(),
    }
}

/// SDXL's zeroed negative branch (`force_zeros_for_empty_prompt` without a negative prompt)
/// before the positive one.
fn with_zeros_first(embeds: Tensor, pooled: Tensor) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::cat(&[embeds.zeros_like()?, embeds], 0)?,
        Tensor::cat(&[pooled.zeros_like()?, pooled], 0)?,
    ))
}

/// A1111's conditioning of rows of prompts (the negative, then the positive), each row one
/// prompt per encoder: each prompt encoded by [`encode_weighted`], every encoder's states padded
/// at the end to the longest with copies of its encoding of the empty prompt (A1111 pads the
/// shorter of the negative and positive conditioning so; the same padding lines up SDXL's two
/// encoders when their prompts have different chunk counts), then concatenated along the
/// features. Returns `[rows, tokens, features]` and, with `pooled`, the last encoder's pooled
/// projection of each row's first chunk, `[rows, D]`.
fn weighted_rows<const N: usize>(
    encoders: &[&dyn PromptEncoder],
    rows: &[[&str; N]],
    layer: TextLayer,
    pooled: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let last = encoders.len().saturating_sub(1);
    let mut states: Vec<Vec<Tensor>> = Vec::new();
    let mut pools = Vec::new();
    for row in rows {
        let mut row_states = Vec::new();
        for (index, (encoder, prompt)) in encoders.iter().zip(row).enumerate() {
            let encoded = encode_weighted(*encoder, prompt, layer, pooled && index == last)?;
            row_states.push(encoded.hidden_state);
            pools.extend(encoded.pooled);
        }
        states.push(row_states);
    }
    let tokens = states
        .iter()
        .flatten()
        .map(|state| state.dim(1))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    for (index, encoder) in encoders.iter().enumerate() {
        let mut empty: Option<Tensor> = None;
        for row in &mut states {
            let missing = tokens - row[index].dim(1)?;
            if missing == 0 {
                continue;
            }
            let empty = match &empty {
                Some(empty) => empty,
                None => empty.insert(encode_weighted(*encoder, "", layer, false)?.hidden_state),
            };
            let copies = missing / empty.dim(1)?;
            let padding = empty.repeat((1, copies, 1))?;
            row[index] = Tensor::cat(&[&row[index], &padding], 1)?;
        }
    }
    let rows = states
        .iter()
        .map(|row| Tensor::cat(row, 2))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let pooled = match pools.len() {
        0 => None,
        _ => Some(Tensor::cat(&pools, 0)?),
    };
    Ok((Tensor::cat(&rows, 0)?, pooled))
}

/// One prompt in A1111's syntax encoded by one encoder: its chunks ([`prompt_chunks`]) encoded
/// one by one and weighted ([`emphasize_chunk`]), concatenated along the tokens,
/// `[1, 77 * chunks, C]`; with `pooled`, the pooled projection of the first chunk (unweighted),
/// as A1111 takes it.
fn encode_weighted(
    encoder: &dyn PromptEncoder,
    prompt: &str,
    layer: TextLayer,
    pooled: bool,
) -> Result<TextEmbeddings> {
    let rules = encoder.token_rules();
    let chunks = prompt_chunks(prompt, &rules, |text| encoder.tokenize(text))?;
    let mut states = Vec::with_capacity(chunks.len());
    let mut first_pooled = None;
    for (index, chunk) in chunks.iter().enumerate() {
        let encoded = encoder.encode_ids(&chunk.model_ids(&rules), layer, pooled && index == 0)?;
        if index == 0 {
            first_pooled = encoded.pooled;
        }
        states.push(emphasize_chunk(&encoded.hidden_state, chunk)?);
    }
    Ok(TextEmbeddings {
        hidden_state: Tensor::cat(&states, 1)?,
        pooled: first_pooled,
    })
}

/// A1111's emphasis of one chunk's hidden state `z` `[1, tokens, C]` by the chunk's weights
/// ([`emphasize`]), computed on the CPU in f32 and returned in `z`'s dtype on its device.
fn emphasize_chunk(z: &Tensor, chunk: &PromptChunk) -> Result<Tensor> {
    // Left as it is, without the round trip through the CPU.
    if chunk.is_unweighted() {
        return Ok(z.clone());
    }
    let (_, tokens, _) = z.dims3()?;
    if tokens != chunk.weights.len() {
        return Err(Error::InvalidParameter {
            name: "prompt chunk",
            value: format!("{} weights", chunk.weights.len()),
            expected: format!("one per token of the encoder's {tokens}"),
        });
    }
    let mut values = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    emphasize(&mut values, &chunk.weights);
    Ok(Tensor::from_vec(values, z.shape(), &Device::Cpu)?
        .to_dtype(z.dtype())?
        .to_device(z.device())?)
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
