//! The CLIP text encoder, transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
//! (follows `models/clip/modeling_clip.py`): token + position embeddings, a stack of pre-norm
//! causal self-attention layers, a final layer norm, the pooled end-of-text token and its
//! optional projection.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use sdrs_kernels::nn::{LayerNorm, Linear};
use sdrs_kernels::VarBuilder;

use crate::activations::Activation;
use crate::configuration_clip::ClipTextConfig;
use crate::error::{Error, Result};

/// `CLIPTextEmbeddings`: `token_embedding(input_ids) + position_embedding(0..seq_len)`.
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
    /// Rows after the checkpoint's vocabulary (textual-inversion embeddings): the row of id
    /// `vocab_size + i` is row `i`, in the token embedding's dtype. Kept apart so that adding
    /// rows never copies the vocabulary's table (diffusers' `resize_token_embeddings` does).
    extra_tokens: Option<Tensor>,
    vocab_size: usize,
}

impl ClipTextEmbeddings {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                vb.pp("token_embedding").candle().clone(),
            )?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embedding").candle().clone(),
            )?,
            extra_tokens: None,
            vocab_size: cfg.vocab_size,
        })
    }

    /// The number of extra rows.
    fn num_extra(&self) -> usize {
        self.extra_tokens
            .as_ref()
            .map_or(0, |t| t.dim(0).unwrap_or(0))
    }

    /// Appends `rows` (`[n, hidden]`) after the extra rows already there.
    fn add_rows(&mut self, rows: &Tensor) -> Result<()> {
        let table = self.token_embedding.embeddings();
        let hidden = table.dim(1)?;
        match rows.dims() {
            [n, h] if *n > 0 && *h == hidden => {}
            dims => {
                return Err(Error::InvalidTokenEmbeddings {
                    shape: dims.to_vec(),
                    expected: format!(
                        "[n, {hidden}] with n >= 1: this text encoder's hidden size is {hidden}"
                    ),
                })
            }
        }
        let rows = rows.to_device(table.device())?.to_dtype(table.dtype())?;
        self.extra_tokens = Some(match &self.extra_tokens {
            Some(extra) => Tensor::cat(&[extra, &rows], 0)?,
            None => rows,
        });
        Ok(())
    }

    /// The token embeddings of `input_ids` (u32), looking ids past the vocabulary up in the
    /// extra rows.
    fn token_embeddings(&self, input_ids: &Tensor) -> Result<Tensor> {
        let Some(extra) = &self.extra_tokens else {
            return Ok(self.token_embedding.forward(input_ids)?);
        };
        let vocab = self.vocab_size as u32;
        let is_extra = input_ids.ge(vocab)?;
        if is_extra
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?
            == 0
        {
            return Ok(self.token_embedding.forward(input_ids)?);
        }
        // Each id looked up in both tables (0 standing in where it is not that table's), then
        // the right one picked per position.
        let zeros = input_ids.zeros_like()?;
        let base_ids = is_extra.where_cond(&zeros, input_ids)?;
        // u32 arithmetic: the shift is applied where it cannot underflow (the other positions
        // hold `vocab` first, so they become row 0).
        let vocab_ids = Tensor::full(vocab, input_ids.shape(), input_ids.device())?;
        let extra_ids = (is_extra.where_cond(input_ids, &vocab_ids)? - &vocab_ids)?;
        let base = self.token_embedding.forward(&base_ids)?;
        let hidden = extra.dim(1)?;
        let (batch, seq) = input_ids.dims2()?;
        let added = extra
            .index_select(&extra_ids.flatten_all()?, 0)?
            .reshape((batch, seq, hidden))?;
        let mask = is_extra.unsqueeze(2)?.broadcast_as((batch, seq, hidden))?;
        Ok(mask.where_cond(&added, &base)?)
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let position_ids = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let tokens = self.token_embeddings(input_ids)?;
        let positions = self.position_embedding.forward(&position_ids)?;
        // The pipeline's activation dtype for these weights (f32 on the CPU, whose kernels take
        // half-precision weights with f32 inputs).
        let dtype = sdrs_kernels::dispatch::activation_dtype(tokens.dtype(), tokens.device());
        Ok(tokens
            .to_dtype(dtype)?
            .broadcast_add(&positions.to_dtype(dtype)?)?)
    }
}

/// `CLIPAttention`: multi-head self-attention; softmax in f32.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        Ok(Self {
            q_proj: sdrs_kernels::nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: sdrs_kernels::nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: sdrs_kernels::nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: sdrs_kernels::nn::linear(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `xs`: `[batch, seq, hidden]`; `mask`: f32 `[seq, seq]`, added to the scores.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, seq_len, hidden) = xs.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, seq_len, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?.broadcast_add(mask)?)?
                .to_dtype(dtype)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq_len, hidden))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: sdrs_kernels::nn::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: sdrs_kernels::nn::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation: cfg.activation()?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.activation.forward(&self.fc1.forward(xs)?)?;
        Ok(self.fc2.forward(&xs)?)
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual connection.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: sdrs_kernels::nn::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
            layer_norm2: sdrs_kernels::nn::layer_norm(h, eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + attn)?;
        let mlp = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        Ok((xs + mlp)?)
    }
}

/// What [`ClipTextModel::forward`] returns (transformers' `CLIPTextModelOutput` with
/// `output_hidden_states=True`).
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `final_layer_norm` of the last layer's output: `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// The embeddings' output, then each layer's output, none of them normalized:
    /// `num_hidden_layers + 1` tensors `[batch, seq, hidden]`. `hidden_states[len - 2]` is the
    /// raw penultimate layer SDXL conditions on.
    pub hidden_states: Vec<Tensor>,
    /// `pooler_output`: `last_hidden_state` at each row's end-of-text token, `[batch, hidden]`.
    pub pooled: Tensor,
    /// `text_embeds`: `pooled @ text_projection`, `[batch, projection_dim]`, when the checkpoint
    /// has a `text_projection` (`CLIPTextModelWithProjection`).
    pub text_embeds: Option<Tensor>,
}

/// transformers' `CLIPTextModel` (or `CLIPTextModelWithProjection` when the weights have a
/// `text_projection.weight`).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` is at the root of the checkpoint: keys `text_model.embeddings...`,
    /// `text_model.encoder.layers.{i}...`, `text_model.final_layer_norm...` and, for the
    /// projection variant, `text_projection.weight`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let text_model = vb.pp("text_model");
        let layers_vb = text_model.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(layers_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(sdrs_kernels::nn::linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(text_model.pp("embeddings"), cfg)?,
            layers,
            final_layer_norm: sdrs_kernels::nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                text_model.pp("final_layer_norm"),
            )?,
            text_projection,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn num_hidden_layers(&self) -> usize {
        self.layers.len()
    }

    /// Appends token-embedding rows (`[n, hidden_size]`, textual-inversion vectors) after the
    /// vocabulary and the rows added before: the ids from `vocab_size() + added` on. Returns
    /// the first new id. Only the new rows are stored; the checkpoint's table is not copied.
    pub fn add_token_embeddings(&mut self, rows: &Tensor) -> Result<u32> {
        let first = self.vocab_size();
        self.embeddings.add_rows(rows)?;
        Ok(first as u32)
    }

    /// The ids the model can embed: the checkpoint's `vocab_size` plus the rows added by
    /// [`Self::add_token_embeddings`].
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size + self.embeddings.num_extra()
    }

    /// The width of the token embeddings (`hidden_size`).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Whether the checkpoint has a `text_projection` (so `text_embeds` is computed).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Runs the whole model. `input_ids`: `[batch, seq]` of any integer (or integral float) dtype,
    /// `seq <= max_position_embeddings`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (ids, rows) = self.check_ids(input_ids)?;
        let hidden_states = self.run(&ids, self.layers.len())?;
        let last = hidden_states.last().ok_or_else(|| Error::InvalidInputIds {
            shape: input_ids.dims().to_vec(),
            expected: "no hidden state was produced".to_string(),
        })?;
        let last_hidden_state = self.final_layer_norm.forward(last)?;

        let positions = pooled_positions(&rows, self.config.eos_token_id);
        let (batch, seq_len, hidden) = last_hidden_state.dims3()?;
        let flat_index: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &pos)| (row * seq_len + pos) as u32)
            .collect();
        let flat_index = Tensor::from_vec(flat_index, batch, last_hidden_state.device())?;
        let pooled = last_hidden_state
            .reshape((batch * seq_len, hidden))?
            .index_select(&flat_index, 0)?;
        let text_embeds = match &self.text_projection {
            Some(projection) => Some(projection.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled,
            text_embeds,
        })
    }

    /// `hidden_states[index]` without running the layers after it: 0 is the embeddings' output,
    /// `i` the raw (not normalized) output of layer `i`. SDXL's penultimate-layer conditioning is
    /// `hidden_state(ids, num_hidden_layers() - 1)`.
    pub fn hidden_state(&self, input_ids: &Tensor, index: usize) -> Result<Tensor> {
        let num_layers = self.layers.len();
        if index > num_layers {
            return Err(Error::LayerOutOfRange {
                what: "hidden state index",
                value: index,
                num_layers,
                expected: format!("must be at most {num_layers}"),
            });
        }
        let (ids, _) = self.check_ids(input_ids)?;
        let mut states = self.run(&ids, index)?;
        states.pop().ok_or_else(|| Error::InvalidInputIds {
            shape: input_ids.dims().to_vec(),
            expected: "no hidden state was produced".to_string(),
        })
    }

    /// The prompt embeddings with AUTOMATIC1111's "clip skip": 1 (or 0) is `last_hidden_state`;
    /// `k >= 2` is `final_layer_norm(hidden_states[-k])`, the layer `k - 1` before the last, as
    /// diffusers' Stable Diffusion pipelines compute it for `clip_skip = k - 1`. Layers after the
    /// one used are not run.
    pub fn forward_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let num_layers = self.layers.len();
        let skip = clip_skip.max(1);
        if skip > num_layers + 1 {
            return Err(Error::LayerOutOfRange {
                what: "clip skip",
                value: clip_skip,
                num_layers,
                expected: format!("must be at most {}", num_layers + 1),
            });
        }
        let state = self.hidden_state(input_ids, num_layers + 1 - skip)?;
        self.final_layer_norm(&state)
    }

    /// The model's `final_layer_norm`, for callers that pick a hidden state themselves.
    pub fn final_layer_norm(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.final_layer_norm.forward(xs)?)
    }

    /// Checks `input_ids` and returns them as u32, with a host copy of the rows.
    fn check_ids(&self, input_ids: &Tensor) -> Result<(Tensor, Vec<Vec<u32>>)> {
        let shape = input_ids.dims().to_vec();
        let max = self.config.max_position_embeddings;
        match shape.as_slice() {
            [batch, seq] if *batch > 0 && *seq > 0 && *seq <= max => {}
            _ => {
                return Err(Error::InvalidInputIds {
                    shape,
                    expected: format!(
                    "[batch, seq] with batch >= 1 and 1 <= seq <= max_position_embeddings ({max})"
                ),
                })
            }
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let rows = ids.to_vec2::<u32>()?;
        let vocab_size = self.vocab_size();
        if let Some(&bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::InvalidInputIds {
                shape,
                expected: format!(
                    "ids below vocab_size ({vocab_size}, added embeddings included), found {bad}"
                ),
            });
        }
        Ok((ids, rows))
    }

    /// `hidden_states[0..=num_layers]`: the embeddings, then the output of each of the first
    /// `num_layers` layers. Every entry point runs the layers through here, so the encoder's
    /// span is opened here.
    fn run(&self, input_ids: &Tensor, num_layers: usize) -> Result<Vec<Tensor>> {
        let _span = tracing::info_span!("clip.text_encoder", layers = num_layers).entered();
        let seq_len = input_ids.dim(1)?;
        let mask = causal_mask(seq_len, input_ids.device())?;
        let mut xs = self.embeddings.forward(input_ids)?;
        let mut states = Vec::with_capacity(num_layers + 1);
        states.push(xs.clone());
        for (i, layer) in self.layers.iter().take(num_layers).enumerate() {
            let _span = tracing::trace_span!("clip.layer", index = i).entered();
            xs = layer.forward(&xs, &mask)?;
            states.push(xs.clone());
        }
        Ok(states)
    }
}

/// Additive causal mask `[seq, seq]` (f32): 0 where a token may attend, `-inf` on future tokens.
fn causal_mask(seq_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (seq_len, seq_len), device)?)
}

/// The position of each row's pooled token, as `CLIPTextTransformer.forward` picks it.
///
/// Quirk kept from transformers: configs saved before the fix have `eos_token_id == 2`, for which
/// the legacy rule applies: the position of the highest id (CLIP's `<|endoftext|>` is the last id
/// of the vocabulary). Otherwise it is the first position holding `eos_token_id`, or 0 when a row
/// has none (torch's `argmax` of an all-zero row). A config without `eos_token_id` takes the
/// legacy rule too. Ties go to the first position, as in torch's `argmax`.
pub fn pooled_positions(rows: &[Vec<u32>], eos_token_id: Option<u32>) -> Vec<usize> {
    rows.iter()
        .map(|row| match eos_token_id {
            Some(eos) if eos != 2 => row.iter().position(|&id| id == eos).unwrap_or(0),
            _ => {
                let mut best = 0;
                for (i, &id) in row.iter().enumerate() {
                    if id > row[best] {
                        best = i;
                    }
                }
                best
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_token_is_first_eos_or_legacy_argmax() {
        let rows = vec![
            vec![5, 9, 7, 7, 7],
            vec![5, 7, 0, 0, 0],
            vec![5, 6, 6, 6, 6],
        ];
        assert_eq!(pooled_positions(&rows, Some(7)), vec![2, 1, 0]);
        assert_eq!(pooled_positions(&rows, Some(2)), vec![1, 1, 1]);
        assert_eq!(pooled_positions(&rows, None), vec![1, 1, 1]);
    }

    #[test]
    fn causal_mask_hides_only_future_tokens() {
        let mask = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            mask,
            vec![
                vec![0.0, inf, inf],
                vec![0.0, 0.0, inf],
                vec![0.0, 0.0, 0.0]
            ]
        );
    }

    fn tiny_model(hidden_act: &str, with_projection: bool) -> ClipTextModel {
        let cfg = ClipTextConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            projection_dim: 4,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            hidden_act: hidden_act.into(),
            eos_token_id: Some(9),
            ..Default::default()
        };
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from(candle_nn::VarBuilder::from_varmap(
            &map,
            DType::F32,
            &Device::Cpu,
        ));
        if with_projection {
            // Creates the tensor so that `contains_tensor` finds it.
            vb.get((4, 8), "text_projection.weight").unwrap();
        }
        ClipTextModel::new(vb.clone(), &cfg).unwrap();
        // A VarMap initialises some weights to constants; make every one random, then build
        // again on the same (now random) variables.
        for var in map.all_vars() {
            let noise = Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        }
        ClipTextModel::new(vb, &cfg).unwrap()
    }

    #[test]
    fn shapes_clip_skip_and_early_exit_agree() {
        let model = tiny_model("gelu", true);
        let ids = Tensor::new(&[[8u32, 1, 2, 9, 9], [8, 3, 9, 9, 9]], &Device::Cpu).unwrap();
        let out = model.forward(&ids).unwrap();
        assert_eq!(out.hidden_states.len(), 4);
        assert_eq!(out.last_hidden_state.dims(), &[2, 5, 8]);
        assert_eq!(out.pooled.dims(), &[2, 8]);
        assert_eq!(out.text_embeds.as_ref().unwrap().dims(), &[2, 4]);

        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let penultimate = model.hidden_state(&ids, 2).unwrap();
        assert_eq!(diff(&penultimate, &out.hidden_states[2]), 0.0);
        let skip1 = model.forward_clip_skip(&ids, 1).unwrap();
        assert_eq!(diff(&skip1, &out.last_hidden_state), 0.0);
        let skip2 = model.forward_clip_skip(&ids, 2).unwrap();
        let expected = model.final_layer_norm(&out.hidden_states[2]).unwrap();
        assert_eq!(diff(&skip2, &expected), 0.0);
        // The pooled rows are the first eos (id 9) of each row: positions 3 and 2.
        let pooled0 = out.last_hidden_state.get(0).unwrap().get(3).unwrap();
        let pooled1 = out.last_hidden_state.get(1).unwrap().get(2).unwrap();
        assert_eq!(diff(&out.pooled.get(0).unwrap(), &pooled0), 0.0);
        assert_eq!(diff(&out.pooled.get(1).unwrap(), &pooled1), 0.0);
    }

    #[test]
    fn added_token_rows_embed_the_ids_after_the_vocabulary() {
        let mut model = tiny_model("gelu", false);
        let ids = Tensor::new(&[[8u32, 10, 11, 1, 9]], &Device::Cpu).unwrap();
        assert!(matches!(
            model.forward(&ids),
            Err(Error::InvalidInputIds { .. })
        ));
        let rows = Tensor::randn(0f32, 1.0, (2, 8), &Device::Cpu).unwrap();
        assert_eq!(model.add_token_embeddings(&rows).unwrap(), 10);
        assert_eq!(model.vocab_size(), 12);
        let wrong = Tensor::zeros((1, 7), DType::F32, &Device::Cpu).unwrap();
        let err = model.add_token_embeddings(&wrong).unwrap_err();
        assert!(err.to_string().contains("hidden size is 8"), "{err}");
        assert_eq!(model.vocab_size(), 12);
        let more = Tensor::randn(0f32, 1.0, (1, 8), &Device::Cpu).unwrap();
        assert_eq!(model.add_token_embeddings(&more).unwrap(), 12);

        let tokens = model.embeddings.token_embeddings(&ids).unwrap();
        let row = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        let table = model.embeddings.token_embedding.embeddings().clone();
        assert_eq!(
            row(&tokens.get(0).unwrap().get(0).unwrap()),
            row(&table.get(8).unwrap())
        );
        assert_eq!(
            row(&tokens.get(0).unwrap().get(1).unwrap()),
            row(&rows.get(0).unwrap())
        );
        assert_eq!(
            row(&tokens.get(0).unwrap().get(2).unwrap()),
            row(&rows.get(1).unwrap())
        );
        assert_eq!(
            row(&tokens.get(0).unwrap().get(3).unwrap()),
            row(&table.get(1).unwrap())
        );
        let with_third = Tensor::new(&[[8u32, 12, 9]], &Device::Cpu).unwrap();
        let tokens = model.embeddings.token_embeddings(&with_third).unwrap();
        assert_eq!(
            row(&tokens.get(0).unwrap().get(1).unwrap()),
            row(&more.get(0).unwrap())
        );
        assert!(model.forward(&ids).is_ok());
        let past = Tensor::new(&[[8u32, 13, 9]], &Device::Cpu).unwrap();
        assert!(matches!(
            model.forward(&past),
            Err(Error::InvalidInputIds { .. })
        ));
    }

    #[test]
    fn out_of_range_requests_are_errors() {
        let model = tiny_model("quick_gelu", false);
        assert!(!model.has_projection());
        let ids = Tensor::new(&[[8u32, 1, 9]], &Device::Cpu).unwrap();
        assert!(model.forward(&ids).unwrap().text_embeds.is_none());
        assert!(matches!(
            model.forward_clip_skip(&ids, 5),
            Err(Error::LayerOutOfRange { value: 5, .. })
        ));
        assert!(model.forward_clip_skip(&ids, 4).is_ok());
        assert!(matches!(
            model.hidden_state(&ids, 4),
            Err(Error::LayerOutOfRange { value: 4, .. })
        ));
        let too_long = Tensor::zeros((1, 7), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            model.forward(&too_long),
            Err(Error::InvalidInputIds { .. })
        ));
        let out_of_vocab = Tensor::new(&[[8u32, 10, 9]], &Device::Cpu).unwrap();
        assert!(matches!(
            model.forward(&out_of_vocab),
            Err(Error::InvalidInputIds { .. })
        ));
        let flat = Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            model.forward(&flat),
            Err(Error::InvalidInputIds { .. })
        ));
    }
}
