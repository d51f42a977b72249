//! The floating-point work of each model counted from its configuration, so that a time measured by
//! `sdrs bench` becomes GFLOP/s.
//!
//! FLOPs count the multiply-adds of convolutions, linear layers and attention products as two
//! operations each (the convention of PyTorch's FLOP counter and of GEMM benchmarks); norms,
//! activations and element-wise adds are left out, as they are below 1% of a UNet step.

use sdrs_clip::ClipTextConfig;
use sdrs_unet::{Result, UNet2DConditionConfig};
use sdrs_vae::AutoencoderKLConfig;

/// `2 * H * W * in * out * k * k` for a convolution producing an `H x W` map.
fn conv(h: usize, w: usize, cin: usize, cout: usize, k: usize) -> f64 {
    2.0 * (h * w) as f64 * (cin * cout * k * k) as f64
}

/// `2 * rows * in * out` for a linear layer over `rows` vectors.
fn linear(rows: usize, cin: usize, cout: usize) -> f64 {
    2.0 * rows as f64 * (cin * cout) as f64
}

/// Scores and weighted sum of one attention over `nq` queries and `nk` keys of total width `dim`.
fn attention_products(nq: usize, nk: usize, dim: usize) -> f64 {
    2.0 * 2.0 * (nq * nk) as f64 * dim as f64
}

/// A resnet block at `h x w` (two 3x3 convs, a 1x1 shortcut when the width changes, and the
/// time-embedding projection when there is one).
fn resnet(h: usize, w: usize, cin: usize, cout: usize, temb: usize) -> f64 {
    let shortcut = if cin != cout {
        conv(h, w, cin, cout, 1)
    } else {
        0.0
    };
    conv(h, w, cin, cout, 3) + conv(h, w, cout, cout, 3) + shortcut + linear(1, temb, cout)
}

/// A `Transformer2DModel` of `depth` basic blocks over an `h x w` map of `c` channels, with
/// cross-attention to `context_len` tokens of width `context_dim` (GEGLU feed-forward of 4c).
fn transformer(h: usize, w: usize, c: usize, depth: usize, context: (usize, usize)) -> f64 {
    let (context_len, context_dim) = context;
    let n = h * w;
    let self_attention = 4.0 * linear(n, c, c) + attention_products(n, n, c);
    let cross_attention = 2.0 * linear(n, c, c)
        + 2.0 * linear(context_len, context_dim, c)
        + attention_products(n, context_len, c);
    let feed_forward = linear(n, c, 8 * c) + linear(n, 4 * c, c);
    let projections = 2.0 * linear(n, c, c);
    projections + depth as f64 * (self_attention + cross_attention + feed_forward)
}

/// FLOPs of one UNet forward pass over `batch` latents of `height x width` (latent pixels),
/// conditioned on `context_len` text tokens; a config whose per-block lists do not fit its block
/// count is an error.
pub fn unet_flops(
    cfg: &UNet2DConditionConfig,
    batch: usize,
    height: usize,
    width: usize,
    context_len: usize,
) -> Result<f64> {
    let channels = &cfg.block_out_channels;
    let n = channels.len();
    let temb = cfg.time_embed_dim();
    let layers = cfg.layers_per_block.expand("layers_per_block", n)?;
    let context_dims = cfg.cross_attention_dim.expand("cross_attention_dim", n)?;
    let down_depths = cfg.down_transformer_layers()?;
    let up_depths = cfg.up_transformer_layers()?;
    let (mut h, mut w) = (height, width);
    let mut flops = conv(h, w, cfg.in_channels, channels[0], cfg.conv_in_kernel);
    flops += linear(1, channels[0], temb) + linear(1, temb, temb);
    if let Some(dim) = cfg.projection_class_embeddings_input_dim {
        flops += linear(1, dim, temb) + linear(1, temb, temb);
    }

    let mut sizes = Vec::with_capacity(n);
    let mut input = channels[0];
    for (i, block) in cfg.down_block_types.iter().enumerate() {
        let cross = block.starts_with("CrossAttn");
        for (j, &depth) in down_depths[i].iter().enumerate().take(layers[i]) {
            let cin = if j == 0 { input } else { channels[i] };
            flops += resnet(h, w, cin, channels[i], temb);
            if cross {
                let context = (context_len, context_dims[i]);
                flops += transformer(h, w, channels[i], depth, context);
            }
        }
        sizes.push((h, w));
        input = channels[i];
        if i + 1 < n {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
            flops += conv(h, w, channels[i], channels[i], 3);
        }
    }

    let last = channels[n - 1];
    flops += 2.0 * resnet(h, w, last, last, temb);
    if cfg.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn") {
        let context = (context_len, context_dims[n - 1]);
        flops += transformer(h, w, last, cfg.mid_transformer_layers()?, context);
    }

    let reversed: Vec<usize> = channels.iter().rev().copied().collect();
    let mut reversed_layers = layers.clone();
    reversed_layers.reverse();
    let mut reversed_context = context_dims.clone();
    reversed_context.reverse();
    let mut previous = reversed[0];
    for (i, block) in cfg.up_block_types.iter().enumerate() {
        let cross = block.starts_with("CrossAttn");
        let out = reversed[i];
        let skip_input = reversed[(i + 1).min(n - 1)];
        (h, w) = sizes[n - 1 - i];
        let count = reversed_layers[i] + 1;
        for (j, &depth) in up_depths[i].iter().enumerate().take(count) {
            let skip = if j + 1 == count { skip_input } else { out };
            let cin = if j == 0 { previous } else { out };
            flops += resnet(h, w, cin + skip, out, temb);
            if cross {
                let context = (context_len, reversed_context[i]);
                flops += transformer(h, w, out, depth, context);
            }
        }
        if i + 1 < n {
            let (next_h, next_w) = sizes[n - 2 - i];
            flops += conv(next_h, next_w, out, out, 3);
        }
        previous = out;
    }
    let (h, w) = sizes[0];
    flops += conv(h, w, channels[0], cfg.out_channels, cfg.conv_out_kernel);
    Ok(batch as f64 * flops)
}

/// FLOPs of one VAE decode of `batch` latents of `height x width` (latent pixels).
pub fn vae_decode_flops(
    cfg: &AutoencoderKLConfig,
    batch: usize,
    height: usize,
    width: usize,
) -> f64 {
    let channels = &cfg.block_out_channels;
    let Some(&last) = channels.last() else {
        return 0.0;
    };
    let (mut h, mut w) = (height, width);
    let latent = cfg.latent_channels;
    let mut flops = if cfg.use_post_quant_conv {
        conv(h, w, latent, latent, 1)
    } else {
        0.0
    };
    flops += conv(h, w, latent, last, 3);
    flops += 2.0 * resnet(h, w, last, last, 0);
    if cfg.mid_block_add_attention {
        flops += 4.0 * linear(h * w, last, last) + attention_products(h * w, h * w, last);
    }
    let mut previous = last;
    for (i, &out) in channels.iter().rev().enumerate() {
        for j in 0..=cfg.layers_per_block {
            let cin = if j == 0 { previous } else { out };
            flops += resnet(h, w, cin, out, 0);
        }
        if i + 1 < channels.len() {
            (h, w) = (2 * h, 2 * w);
            flops += conv(h, w, out, out, 3);
        }
        previous = out;
    }
    flops += conv(h, w, channels[0], cfg.out_channels, 3);
    batch as f64 * flops
}

/// FLOPs of one CLIP text encoder pass over `batch` prompts of `tokens` tokens.
pub fn clip_flops(cfg: &ClipTextConfig, batch: usize, tokens: usize) -> f64 {
    let d = cfg.hidden_size;
    let layer = 4.0 * linear(tokens, d, d)
        + attention_products(tokens, tokens, d)
        + 2.0 * linear(tokens, d, cfg.intermediate_size);
    batch as f64 * (cfg.num_hidden_layers as f64 * layer + linear(1, d, cfg.projection_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdrs_pipeline::BuiltinModel;

    fn unet(model: BuiltinModel) -> UNet2DConditionConfig {
        serde_json::from_str(model.file("unet/config.json").unwrap()).unwrap()
    }

    #[test]
    fn sd15_unet_step_matches_the_published_count() {
        // The baseline: about 1606 GFLOP per SD1.5 step at 512x512 with CFG (batch 2),
        // measured with PyTorch's FLOP counter. Within 1%: norms and activations are not counted.
        let gflop = unet_flops(&unet(BuiltinModel::Sd15), 2, 64, 64, 77).unwrap() / 1e9;
        assert!((gflop - 1606.0).abs() < 16.0, "{gflop} GFLOP");
    }

    #[test]
    fn flops_scale_with_batch_and_grow_with_size() {
        let cfg = unet(BuiltinModel::SdxlBase);
        let one = unet_flops(&cfg, 1, 128, 128, 77).unwrap();
        let two = unet_flops(&cfg, 2, 128, 128, 77).unwrap();
        assert!((two / one - 2.0).abs() < 1e-12);
        // Convolutions scale with the area, self-attention faster than that.
        let small = unet_flops(&cfg, 1, 64, 64, 77).unwrap();
        assert!(one / small > 4.0, "{}", one / small);
    }

    #[test]
    fn vae_and_clip_counts_are_in_the_known_range() {
        let vae: AutoencoderKLConfig =
            serde_json::from_str(BuiltinModel::Sd15.file("vae/config.json").unwrap()).unwrap();
        // The SD1.5 decoder at 512x512 is about 2.5 TFLOP (1.24 TMAC).
        let tflop = vae_decode_flops(&vae, 1, 64, 64) / 1e12;
        assert!((2.2..2.8).contains(&tflop), "{tflop} TFLOP");
        let clip: ClipTextConfig =
            serde_json::from_str(BuiltinModel::Sd15.file("text_encoder/config.json").unwrap())
                .unwrap();
        // 123M parameters over 77 tokens: about 2 * 85M * 77 = 13 GFLOP.
        let gflop = clip_flops(&clip, 1, 77) / 1e9;
        assert!((10.0..16.0).contains(&gflop), "{gflop} GFLOP");
    }
}
