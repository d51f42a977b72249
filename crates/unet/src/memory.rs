//! An estimate of the activation memory at the peak of one UNet forward, from the config alone:
//! what a generation checks against the memory available before it allocates anything.

use crate::config::UNet2DConditionConfig;
use crate::Result;

/// Full-width buffers alive at once inside a transformer block's feed-forward (the block's
/// input, its normalised copy, GEGLU's `8C` projection, the `4C` gate and the `4C` product).
/// With [`SKIP_CONNECTIONS`] of the skip connections this gives 23 buffers of `C x L` for SD1.5,
/// which is what SD1.5's f32 step measures: its peak RSS grows by 182 MB from 256x256 to 512x512
/// at guidance batch 2 (`sdrs bench -m sd15 --parts unet --dtype f32 --size N`), 23.1 buffers of
/// 320 channels for the 3072 tokens added per image. SDXL (no attention at its first level)
/// comes out at 13.9 buffers of its first level; its f32 step measures 14.8 (467 MB more from
/// 512x512 to 1024x1024, `-m sdxl`).
const FEED_FORWARD_BUFFERS: u64 = 18;

/// A resnet's buffers, in units of its input (`in`) and output (`out`) channels: input and
/// normalised input, then the first convolution's output, its normalised copy and the second's.
const RESNET_IN_BUFFERS: u64 = 2;
const RESNET_OUT_BUFFERS: u64 = 3;

/// The peak activation elements of one forward over `rows` latents of `height` x `width`
/// (latent pixels), in elements of the activation dtype: every skip connection of the down path
/// (held until the up path takes it), plus the widest stage's transient buffers (a transformer's
/// feed-forward where a level has attention, else a resnet of the up path, whose input is the
/// level's channels concatenated with its skip connection's).
///
/// Attention's score matrix is not counted: the flash kernels never make it, and the other modes
/// work in bounded slices. Saturates rather than overflows.
pub fn peak_activation_elements(
    config: &UNet2DConditionConfig,
    rows: usize,
    height: usize,
    width: usize,
) -> Result<u64> {
    let levels = config.num_blocks();
    let layers = config.layers_per_block.expand("layers_per_block", levels)?;
    let attention = config.down_blocks_have_cross_attention();
    let channels = &config.block_out_channels;
    // Tokens at level `i`: each downsampler halves both sides (rounding up, as a stride-2
    // convolution with padding 1 does).
    let tokens = |level: usize| -> u64 {
        let (mut h, mut w) = (height as u64, width as u64);
        for _ in 0..level {
            h = h.div_ceil(2);
            w = w.div_ceil(2);
        }
        h.saturating_mul(w)
    };
    let first = channels.first().copied().unwrap_or(0) as u64;
    let mut skips = first.saturating_mul(tokens(0));
    let mut transient = 0u64;
    for level in 0..levels {
        let c = channels.get(level).copied().unwrap_or(0) as u64;
        let l = tokens(level);
        let layers = layers.get(level).copied().unwrap_or(0) as u64;
        skips = skips.saturating_add(layers.saturating_mul(c).saturating_mul(l));
        if level + 1 < levels {
            skips = skips.saturating_add(c.saturating_mul(tokens(level + 1)));
        }
        let stage = if attention.get(level).copied().unwrap_or(false) {
            FEED_FORWARD_BUFFERS.saturating_mul(c)
        } else {
            // The up path's first resnet here takes the level below's channels and this skip.
            let below = channels.get(level + 1).copied().unwrap_or(c as usize) as u64;
            RESNET_IN_BUFFERS
                .saturating_mul(c.saturating_add(below))
                .saturating_add(RESNET_OUT_BUFFERS.saturating_mul(c))
        };
        transient = transient.max(stage.saturating_mul(l));
    }
    Ok(skips.saturating_add(transient).saturating_mul(rows as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UNet2DConditionConfig {
        serde_json::from_str(
            r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn sd15_is_about_23_buffers_of_its_first_level() {
        let config = sd15();
        let elements = peak_activation_elements(&config, 1, 64, 64).unwrap();
        let buffers = elements as f64 / (320.0 * 64.0 * 64.0);
        assert!((22.5..23.5).contains(&buffers), "{buffers}");
        // Linear in rows and in the latent area.
        assert_eq!(
            peak_activation_elements(&config, 2, 128, 64).unwrap(),
            4 * elements
        );
    }

    #[test]
    fn sdxl_is_about_14_buffers_of_its_first_level() {
        let config: UNet2DConditionConfig = serde_json::from_str(
            r#"{"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10]}"#,
        )
        .unwrap();
        let elements = peak_activation_elements(&config, 1, 128, 128).unwrap();
        let buffers = elements as f64 / (320.0 * 128.0 * 128.0);
        assert!((13.5..14.5).contains(&buffers), "{buffers}");
    }

    #[test]
    fn a_level_without_attention_counts_its_resnets() {
        let mut config = sd15();
        config.down_block_types[0] = "DownBlock2D".to_string();
        let elements = peak_activation_elements(&config, 1, 64, 64).unwrap();
        let with_attention = peak_activation_elements(&sd15(), 1, 64, 64).unwrap();
        assert!(elements < with_attention);
    }

    #[test]
    fn absurd_sizes_saturate() {
        let config = sd15();
        assert_eq!(
            peak_activation_elements(&config, usize::MAX, usize::MAX, usize::MAX).unwrap(),
            u64::MAX
        );
    }
}
