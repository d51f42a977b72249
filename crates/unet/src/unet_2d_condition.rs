//! `UNet2DConditionModel` of diffusers' `models/unets/unet_2d_condition.py`: the noise-prediction
//! UNet of SD1.x, SD2.x and SDXL (base and refiner).

use candle_core::{DType, Tensor};
use sdrs_blocks::resnet::{conv2d_same, norm_act, Conv2d};
use sdrs_blocks::Activation;
use sdrs_kernels::nn::GroupNorm;
use sdrs_kernels::VarBuilder;

use crate::config::{block_type_name, UNet2DConditionConfig};
use crate::embeddings::{TimestepEmbedding, Timesteps};
use crate::error::{Error, Result};
use crate::unet_2d_blocks::{
    spatial_size, BlockConfig, CrossAttnConfig, CrossAttnDownBlock2D, CrossAttnUpBlock2D,
    DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D,
};

/// SDXL's extra conditions (`added_cond_kwargs` in diffusers), for `addition_embed_type:
/// "text_time"`.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// The pooled, projected text embedding of the second text encoder, `[B, D]`.
    pub text_embeds: Tensor,
    /// Original size, crop offset and target size (or aesthetic score for the refiner), `[B, n]`.
    pub time_ids: Tensor,
}

#[derive(Debug, Clone)]
enum DownBlock {
    Plain(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

#[derive(Debug, Clone)]
enum UpBlock {
    Plain(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

impl UpBlock {
    fn num_layers(&self) -> usize {
        match self {
            Self::Plain(block) => block.num_layers(),
            Self::CrossAttn(block) => block.num_layers(),
        }
    }
}

/// `text_time` added embedding: sinusoidal features of each time id, concatenated with the
/// text embeddings and projected to the time-embedding size.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
    addition_time_embed_dim: usize,
    input_dim: usize,
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    time_embed_act: Option<Activation>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<UNetMidBlock2DCrossAttn>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    /// The `cross_attention_dim` of every block that has cross-attention.
    cross_attention_dims: Vec<usize>,
    num_upsamplers: usize,
    config: UNet2DConditionConfig,
}

impl UNet2DConditionModel {
    /// Builds the model; `vb` is at the root of `unet/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        cfg.check_supported()?;
        let n = cfg.num_blocks();
        let channels = &cfg.block_out_channels;
        let act = Activation::from_config("act_fn", &cfg.act_fn)?;
        let groups = cfg.norm_num_groups.ok_or_else(|| Error::Unsupported {
            key: "norm_num_groups".to_string(),
            value: "null".to_string(),
            accepted: "a number of groups".to_string(),
        })?;
        let optional_act = |key: &str, name: &Option<String>| -> Result<Option<Activation>> {
            name.as_deref()
                .map(|name| Activation::from_config(key, name))
                .transpose()
                .map_err(Error::from)
        };

        let conv_in = conv2d_same(
            vb.pp("conv_in"),
            cfg.in_channels,
            channels[0],
            cfg.conv_in_kernel,
        )?;

        let time_embed_dim = cfg.time_embed_dim();
        let time_proj = Timesteps::new(channels[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            channels[0],
            time_embed_dim,
            act,
            optional_act("timestep_post_act", &cfg.timestep_post_act)?,
        )?;
        let add_embedding = match (
            cfg.addition_embed_type.as_deref(),
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(addition_time_embed_dim), Some(input_dim)) => {
                Some(TextTimeEmbedding {
                    add_time_proj: Timesteps::new(
                        addition_time_embed_dim,
                        cfg.flip_sin_to_cos,
                        cfg.freq_shift,
                    ),
                    // `TimestepEmbedding`'s own default activation, not the UNet's `act_fn`.
                    add_embedding: TimestepEmbedding::new(
                        vb.pp("add_embedding"),
                        input_dim,
                        time_embed_dim,
                        Activation::Silu,
                        None,
                    )?,
                    addition_time_embed_dim,
                    input_dim,
                })
            }
            _ => None,
        };
        let time_embed_act = optional_act("time_embedding_act_fn", &cfg.time_embedding_act_fn)?;

        let heads = cfg.num_heads_per_block()?;
        let layers = cfg.layers_per_block.expand("layers_per_block", n)?;
        let cross = cfg.cross_attention_dim.expand("cross_attention_dim", n)?;
        let block_cfg = |num_layers, in_channels, out_channels| BlockConfig {
            num_layers,
            in_channels,
            out_channels,
            temb_channels: Some(time_embed_dim),
            resnet_eps: cfg.norm_eps,
            resnet_groups: groups,
            act,
            output_scale_factor: 1.0,
        };
        let mut cross_attention_dims = Vec::new();

        let down_depths = cfg.down_transformer_layers()?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = channels[0];
        for (i, block_type) in cfg.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channels[i];
            let is_final = i + 1 == n;
            let block = block_cfg(layers[i], input_channel, output_channel);
            let padding = (!is_final).then_some(cfg.downsample_padding);
            let vb = vb.pp("down_blocks").pp(i.to_string());
            down_blocks.push(match block_type_name(block_type) {
                "CrossAttnDownBlock2D" => {
                    let attn = CrossAttnConfig {
                        num_attention_heads: heads[i],
                        transformer_layers_per_block: down_depths[i].clone(),
                        cross_attention_dim: cross[i],
                        use_linear_projection: cfg.use_linear_projection,
                    };
                    cross_attention_dims.push(cross[i]);
                    DownBlock::CrossAttn(CrossAttnDownBlock2D::new(vb, &block, &attn, padding)?)
                }
                _ => DownBlock::Plain(DownBlock2D::new(vb, &block, padding)?),
            });
        }

        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let last = channels[n - 1];
                let block = BlockConfig {
                    output_scale_factor: cfg.mid_block_scale_factor,
                    ..block_cfg(1, last, last)
                };
                let attn = CrossAttnConfig {
                    num_attention_heads: heads[n - 1],
                    transformer_layers_per_block: vec![cfg.mid_transformer_layers()?],
                    cross_attention_dim: cross[n - 1],
                    use_linear_projection: cfg.use_linear_projection,
                };
                cross_attention_dims.push(cross[n - 1]);
                Some(UNetMidBlock2DCrossAttn::new(
                    vb.pp("mid_block"),
                    &block,
                    &attn,
                )?)
            }
            None => None,
        };

        let up_depths = cfg.up_transformer_layers()?;
        let reversed = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rev_channels, rev_heads) = (reversed(channels), reversed(&heads));
        let (rev_layers, rev_cross) = (reversed(&layers), reversed(&cross));
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = rev_channels[0];
        for (i, block_type) in cfg.up_block_types.iter().enumerate() {
            let is_final = i + 1 == n;
            let prev_output_channel = output_channel;
            output_channel = rev_channels[i];
            let input_channel = rev_channels[(i + 1).min(n - 1)];
            let block = block_cfg(rev_layers[i] + 1, input_channel, output_channel);
            let vb = vb.pp("up_blocks").pp(i.to_string());
            up_blocks.push(match block_type_name(block_type) {
                "CrossAttnUpBlock2D" => {
                    let attn = CrossAttnConfig {
                        num_attention_heads: rev_heads[i],
                        transformer_layers_per_block: up_depths[i].clone(),
                        cross_attention_dim: rev_cross[i],
                        use_linear_projection: cfg.use_linear_projection,
                    };
                    cross_attention_dims.push(rev_cross[i]);
                    UpBlock::CrossAttn(CrossAttnUpBlock2D::new(
                        vb,
                        &block,
                        &attn,
                        prev_output_channel,
                        !is_final,
                    )?)
                }
                _ => UpBlock::Plain(UpBlock2D::new(vb, &block, prev_output_channel, !is_final)?),
            });
        }

        let conv_norm_out = sdrs_kernels::nn::group_norm(
            groups,
            channels[0],
            cfg.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = conv2d_same(
            vb.pp("conv_out"),
            channels[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
        )?;
        cross_attention_dims.dedup();

        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            add_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act,
            conv_out,
            cross_attention_dims,
            num_upsamplers: n - 1,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Predicts the model output (noise, or v) for `sample` `[B, C, H, W]` at `timesteps` `[B]`
    /// (or one timestep for the whole batch; any float dtype, fractional values allowed),
    /// conditioned on `encoder_hidden_states` `[B, 77, cross_attention_dim]` and, for SDXL,
    /// `added`. Any height and width work; computation is in `sample`'s dtype.
    #[tracing::instrument(level = "info", name = "unet", skip_all)]
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (batch, height, width) = match *sample.dims() {
            [b, c, h, w] if c == cfg.in_channels && h > 0 && w > 0 => (b, h, w),
            _ => {
                return Err(Error::InputShape {
                    input: "sample",
                    found: sample.dims().to_vec(),
                    expected: format!("[batch, {}, height, width]", cfg.in_channels),
                })
            }
        };
        let dtype = sample.dtype();
        let device = sample.device();

        let timesteps = match timesteps.dims() {
            [] => timesteps.reshape(1)?.broadcast_as(batch)?,
            [1] => timesteps.broadcast_as(batch)?,
            [b] if *b == batch => timesteps.clone(),
            found => {
                return Err(Error::InputShape {
                    input: "timesteps",
                    found: found.to_vec(),
                    expected: format!("[{batch}] (one per batch item) or a single timestep"),
                })
            }
        };
        let timesteps = timesteps.to_device(device)?;

        let context_ok = match *encoder_hidden_states.dims() {
            [b, _, d] => b == batch && self.cross_attention_dims.iter().all(|&c| c == d),
            _ => false,
        };
        if !context_ok {
            return Err(Error::InputShape {
                input: "encoder_hidden_states",
                found: encoder_hidden_states.dims().to_vec(),
                expected: format!(
                    "[{batch}, tokens, cross_attention_dim {:?}]",
                    self.cross_attention_dims
                ),
            });
        }
        let encoder_hidden_states = encoder_hidden_states.to_dtype(dtype)?;

        // Latent sizes that are not a multiple of the total downsampling are handled by
        // upsampling to each skip connection's size instead of doubling (diffusers'
        // `forward_upsample_size`).
        let overall_factor = u32::try_from(self.num_upsamplers)
            .ok()
            .and_then(|n| 1usize.checked_shl(n))
            .unwrap_or(usize::MAX);
        let forward_upsample_size = height % overall_factor != 0 || width % overall_factor != 0;

        let sample = if cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };

        // Time embedding, plus SDXL's text/time embedding.
        let emb = {
            let _span = tracing::info_span!("unet.time_embedding").entered();
            let t_emb = self.time_proj.forward(&timesteps)?.to_dtype(dtype)?;
            let mut emb = self.time_embedding.forward(&t_emb)?;
            if let Some(add) = &self.add_embedding {
                let added = added.ok_or_else(|| Error::MissingAddedCondition {
                    addition_embed_type: "text_time".to_string(),
                    missing: "text_embeds and time_ids",
                })?;
                emb = (emb + self.text_time_embedding(add, added, batch, dtype)?)?;
            }
            if let Some(act) = &self.time_embed_act {
                emb = act.forward(&emb)?;
            }
            emb
        };
        let emb = Some(&emb);

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let _span = tracing::info_span!("unet.down_block", index = i).entered();
            let (out, states) = match block {
                DownBlock::Plain(block) => block.forward(&xs, emb)?,
                DownBlock::CrossAttn(block) => block.forward(&xs, emb, &encoder_hidden_states)?,
            };
            xs = out;
            skips.extend(states);
        }

        if let Some(mid) = &self.mid_block {
            let _span = tracing::info_span!("unet.mid_block").entered();
            xs = mid.forward(&xs, emb, &encoder_hidden_states)?;
        }

        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let _span = tracing::info_span!("unet.up_block", index = i).entered();
            // The size of the skip connection the next block starts with.
            let upsample_size = if i != last && forward_upsample_size {
                let next = skips.len().checked_sub(block.num_layers() + 1);
                next.and_then(|j| skips.get(j))
                    .map(spatial_size)
                    .transpose()?
            } else {
                None
            };
            xs = match block {
                UpBlock::Plain(block) => block.forward(&xs, &mut skips, emb, upsample_size)?,
                UpBlock::CrossAttn(block) => {
                    block.forward(&xs, &mut skips, emb, &encoder_hidden_states, upsample_size)?
                }
            };
        }

        let xs = norm_act(&self.conv_norm_out, self.conv_act, &xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }

    /// `add_embedding(concat(text_embeds, flatten(add_time_proj(time_ids))))`.
    fn text_time_embedding(
        &self,
        add: &TextTimeEmbedding,
        added: &AddedConditions,
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let device = added.text_embeds.device();
        let (text_dim, num_ids) = match (added.text_embeds.dims(), added.time_ids.dims()) {
            ([b1, d], [b2, k]) if *b1 == batch && *b2 == batch => (*d, *k),
            ([b1, _], _) if *b1 == batch => {
                return Err(Error::InputShape {
                    input: "time_ids",
                    found: added.time_ids.dims().to_vec(),
                    expected: format!("[{batch}, number of ids]"),
                })
            }
            (found, _) => {
                return Err(Error::InputShape {
                    input: "text_embeds",
                    found: found.to_vec(),
                    expected: format!("[{batch}, embedding size]"),
                })
            }
        };
        if text_dim + num_ids * add.addition_time_embed_dim != add.input_dim {
            return Err(Error::InputShape {
                input: "text_embeds",
                found: added.text_embeds.dims().to_vec(),
                expected: format!(
                    "[{batch}, D] with D + {num_ids} time ids x addition_time_embed_dim {} = \
                     projection_class_embeddings_input_dim {}",
                    add.addition_time_embed_dim, add.input_dim
                ),
            });
        }
        let time_ids = added.time_ids.to_device(device)?.flatten_all()?;
        let time_embeds = add.add_time_proj.forward(&time_ids)?.reshape((batch, ()))?;
        let text_embeds = added.text_embeds.to_device(device)?.to_dtype(DType::F32)?;
        let add_embeds = Tensor::cat(&[&text_embeds, &time_embeds], 1)?;
        add.add_embedding.forward(&add_embeds.to_dtype(dtype)?)
    }
}
