//! Tiled decoding and encoding of `AutoencoderKL`, as diffusers' `enable_tiling()` does it
//! (`models/autoencoders/autoencoder_kl.py`: `tiled_decode`, `_tiled_encode`, `blend_v`,
//! `blend_h`): overlapping tiles run through the network one at a time, each blended linearly
//! into its upper and left neighbours over the overlap, then cropped so that the tiles abut.
//! The peak memory is one tile's activations instead of the whole image's.

use candle_core::Tensor;

use crate::config::AutoencoderKLConfig;
use crate::error::{Error, Result};

/// The tile sizes and overlap of diffusers' tiled VAE: `tile_sample_min_size`,
/// `tile_latent_min_size` and `tile_overlap_factor`. Built checked by [`VaeTiling::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    sample_size: usize,
    latent_size: usize,
    overlap: f64,
}

/// Where the tiles of one tiled pass start and how they are blended and cropped, along both sides
/// (the rule is the same for rows and columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TilePlan {
    /// The side of a full input tile (latents for a decode, pixels for an encode).
    pub tile: usize,
    /// The distance between tile starts in the input.
    pub stride: usize,
    /// Output rows (columns) blended with the neighbour above (to the left).
    pub blend_extent: usize,
    /// Output rows (columns) each tile keeps.
    pub row_limit: usize,
    /// Where the tiles of each row start in the input (`range(0, height, stride)`).
    pub row_starts: Vec<usize>,
    /// Where the tiles of each column start in the input.
    pub col_starts: Vec<usize>,
}

impl TilePlan {
    /// `(rows, columns)` of tiles.
    pub fn grid(&self) -> (usize, usize) {
        (self.row_starts.len(), self.col_starts.len())
    }
}

/// diffusers' `int(x)` of a non-negative float: truncation.
fn truncate(x: f64) -> usize {
    x as usize
}

impl VaeTiling {
    /// Tiles of `sample_size` pixels decoded from `latent_size` latents (and the reverse when
    /// encoding), overlapping by the fraction `overlap`. The sizes must be positive, the overlap
    /// in `[0, 1)`, and each tile must reach past its blend (`int(size * (1 - overlap))` at least 1).
    pub fn new(sample_size: usize, latent_size: usize, overlap: f64) -> Result<Self> {
        let invalid = |name: &'static str, value: String, expected: String| {
            Err(Error::InvalidParameter {
                name,
                value,
                expected,
            })
        };
        if sample_size == 0 {
            return invalid("tile sample size", "0".into(), "a positive size".into());
        }
        if latent_size == 0 {
            return invalid("tile latent size", "0".into(), "a positive size".into());
        }
        if !(overlap.is_finite() && (0.0..1.0).contains(&overlap)) {
            return invalid(
                "tile overlap",
                overlap.to_string(),
                "a fraction in [0, 1)".into(),
            );
        }
        for (name, size) in [
            ("tile latent size", latent_size),
            ("tile sample size", sample_size),
        ] {
            if truncate(size as f64 * (1.0 - overlap)) == 0 {
                return invalid(
                    name,
                    size.to_string(),
                    format!(
                        "a tile larger than its blend: at least {} for the overlap {overlap}",
                        (1.0 / (1.0 - overlap)).ceil()
                    ),
                );
            }
        }
        Ok(Self {
            sample_size,
            latent_size,
            overlap,
        })
    }

    /// diffusers' defaults for a VAE: `sample_size` pixels (the config's), `sample_size / 2 **
    /// (len(block_out_channels) - 1)` latents, overlap 0.25.
    pub fn from_config(config: &AutoencoderKLConfig) -> Result<Self> {
        Self::for_tile_size(config, None, 0.25)
    }

    /// Tiles of `tile_size` pixels (default: the config's `sample_size`), a multiple of the VAE's
    /// scale factor, and `tile_size / factor` latents, overlapping by `overlap`.
    pub fn for_tile_size(
        config: &AutoencoderKLConfig,
        tile_size: Option<usize>,
        overlap: f64,
    ) -> Result<Self> {
        let factor = 1usize << config.block_out_channels.len().saturating_sub(1);
        let size = tile_size.unwrap_or(config.sample_size);
        if size == 0 || !size.is_multiple_of(factor) {
            return Err(Error::InvalidParameter {
                name: "tile size",
                value: size.to_string(),
                expected: format!("a positive multiple of {factor} (the VAE's scale factor)"),
            });
        }
        let tiling = Self::new(size, size / factor, overlap)?;
        // diffusers' blending lines the tiles up only when the kept part of a decoded tile is
        // its stride in pixels (and the same for encoding); other settings would give an image
        // of another size, so they are refused here, where a user chooses them.
        let latent = size / factor;
        let decode_stride = truncate(latent as f64 * (1.0 - overlap)) * factor;
        let decode_kept = size - truncate(size as f64 * overlap);
        let encode_stride = truncate(size as f64 * (1.0 - overlap));
        let encode_kept = (latent - truncate(latent as f64 * overlap)) * factor;
        if decode_stride != decode_kept || encode_stride != encode_kept {
            return Err(Error::InvalidParameter {
                name: "tile overlap",
                value: format!("{overlap} with {size}-pixel tiles"),
                expected: format!(
                    "an overlap whose blend is a whole number of latents on both sides of the \
                     VAE (such as 0.25 with tiles of a multiple of {})",
                    4 * factor
                ),
            });
        }
        Ok(tiling)
    }

    /// `tile_sample_min_size`, in pixels.
    pub fn sample_size(&self) -> usize {
        self.sample_size
    }

    /// `tile_latent_min_size`, in latents.
    pub fn latent_size(&self) -> usize {
        self.latent_size
    }

    /// `tile_overlap_factor`.
    pub fn overlap(&self) -> f64 {
        self.overlap
    }

    /// Whether diffusers decodes latents of `height` x `width` in tiles (either side over a tile).
    pub fn tiles_decode(&self, height: usize, width: usize) -> bool {
        height > self.latent_size || width > self.latent_size
    }

    /// Whether diffusers encodes an image of `height` x `width` in tiles.
    pub fn tiles_encode(&self, height: usize, width: usize) -> bool {
        height > self.sample_size || width > self.sample_size
    }

    /// The tiles of a tiled decode of latents `height` x `width`: latent tiles at a stride of
    /// `int(L * (1 - f))`, blended over `int(S * f)` pixels, keeping `S - int(S * f)`.
    pub fn decode_plan(&self, height: usize, width: usize) -> TilePlan {
        Self::plan(
            self.latent_size,
            self.sample_size,
            self.overlap,
            height,
            width,
        )
    }

    /// The tiles of a tiled encode of an image `height` x `width`: pixel tiles at a stride of
    /// `int(S * (1 - f))`, blended over `int(L * f)` latents, keeping `L - int(L * f)`.
    pub fn encode_plan(&self, height: usize, width: usize) -> TilePlan {
        Self::plan(
            self.sample_size,
            self.latent_size,
            self.overlap,
            height,
            width,
        )
    }

    fn plan(tile: usize, output: usize, overlap: f64, height: usize, width: usize) -> TilePlan {
        // `new` made the stride at least 1.
        let stride = truncate(tile as f64 * (1.0 - overlap)).max(1);
        let blend_extent = truncate(output as f64 * overlap);
        TilePlan {
            tile,
            stride,
            blend_extent,
            row_limit: output - blend_extent,
            row_starts: (0..height).step_by(stride).collect(),
            col_starts: (0..width).step_by(stride).collect(),
        }
    }
}

/// Runs `tile_fn` on each tile of `input` `[B, C, H, W]` as `plan` places them and joins the
/// outputs: each output tile blended with the (already blended) one above and the one to its left,
/// then cropped to `row_limit`. Only two rows of output tiles are held at a time.
pub(crate) fn run_tiled(
    input: &Tensor,
    plan: &TilePlan,
    tile_fn: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, height, width) = input.dims4()?;
    let mut above: Option<Vec<Tensor>> = None;
    let mut rows = Vec::with_capacity(plan.row_starts.len());
    for &i in &plan.row_starts {
        let tile_height = plan.tile.min(height - i);
        let mut row: Vec<Tensor> = Vec::with_capacity(plan.col_starts.len());
        for (j, &start) in plan.col_starts.iter().enumerate() {
            let tile_width = plan.tile.min(width - start);
            let tile = input
                .narrow(2, i, tile_height)?
                .narrow(3, start, tile_width)?;
            let mut out = tile_fn(&tile)?;
            if let Some(above) = &above {
                out = blend(&above[j], &out, plan.blend_extent, 2)?;
            }
            if j > 0 {
                out = blend(&row[j - 1], &out, plan.blend_extent, 3)?;
            }
            row.push(out);
        }
        let cropped = row
            .iter()
            .map(|tile| {
                let keep_h = plan.row_limit.min(tile.dim(2)?);
                let keep_w = plan.row_limit.min(tile.dim(3)?);
                Ok(tile.narrow(2, 0, keep_h)?.narrow(3, 0, keep_w)?)
            })
            .collect::<Result<Vec<_>>>()?;
        rows.push(Tensor::cat(&cropped, 3)?);
        above = Some(row);
    }
    Ok(Tensor::cat(&rows, 2)?)
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows of `b` become
/// `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)`, `extent` capped by both sizes.
pub(crate) fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (a_len, b_len) = (a.dim(dim)?, b.dim(dim)?);
    let extent = extent.min(a_len).min(b_len);
    if extent == 0 {
        return Ok(b.clone());
    }
    let device = b.device();
    let weights = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let values: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        let mut shape = [1usize; 4];
        shape[dim] = extent;
        Ok(Tensor::from_vec(values, &shape[..], device)?.to_dtype(b.dtype())?)
    };
    let keep_a = weights(&|t| 1.0 - t)?;
    let keep_b = weights(&|t| t)?;
    let a_tail = a.narrow(dim, a_len - extent, extent)?;
    let b_head = b.narrow(dim, 0, extent)?;
    let mixed = (a_tail.broadcast_mul(&keep_a)? + b_head.broadcast_mul(&keep_b)?)?;
    if extent == b_len {
        return Ok(mixed);
    }
    let rest = b.narrow(dim, extent, b_len - extent)?;
    Ok(Tensor::cat(&[mixed, rest], dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_plans_follow_diffusers_arithmetic() {
        let tiling = VaeTiling::new(128, 16, 0.25).unwrap();
        let decode = tiling.decode_plan(32, 48);
        assert_eq!(
            (decode.stride, decode.blend_extent, decode.row_limit),
            (12, 32, 96)
        );
        assert_eq!(decode.grid(), (3, 4));
        assert_eq!(decode.row_starts, vec![0, 12, 24]);
        let encode = tiling.encode_plan(256, 384);
        assert_eq!(
            (encode.stride, encode.blend_extent, encode.row_limit),
            (96, 4, 12)
        );
        assert_eq!(encode.grid(), (3, 4));
        // int() truncates: 16 * 0.7 = 11.2 -> 11, 128 * 0.3 = 38.4 -> 38.
        let odd = VaeTiling::new(128, 16, 0.3).unwrap().decode_plan(16, 16);
        assert_eq!((odd.stride, odd.blend_extent, odd.row_limit), (11, 38, 90));
    }

    #[test]
    fn bad_settings_name_the_value_and_the_range() {
        let message = |r: Result<VaeTiling>| r.unwrap_err().to_string();
        assert!(message(VaeTiling::new(0, 8, 0.25)).contains("tile sample size 0"));
        assert!(message(VaeTiling::new(64, 0, 0.25)).contains("tile latent size 0"));
        for bad in [1.0, -0.1, f64::NAN] {
            let text = message(VaeTiling::new(64, 8, bad));
            assert!(text.contains("[0, 1)"), "{text}");
        }
        // A 1-latent tile at half overlap would have stride int(0.5) = 0.
        let text = message(VaeTiling::new(8, 1, 0.5));
        assert!(text.contains("tile latent size 1"), "{text}");
        let config = AutoencoderKLConfig {
            block_out_channels: vec![32, 32, 64, 64],
            ..Default::default()
        };
        let text = message(VaeTiling::for_tile_size(&config, Some(100), 0.25));
        assert!(
            text.contains("100") && text.contains("multiple of"),
            "{text}"
        );
        let tiling = VaeTiling::for_tile_size(&config, Some(256), 0.25).unwrap();
        assert_eq!((tiling.sample_size(), tiling.latent_size()), (256, 32));
        let defaults = VaeTiling::from_config(&config).unwrap();
        assert_eq!((defaults.sample_size(), defaults.latent_size()), (32, 4));
        assert_eq!(defaults.overlap(), 0.25);
        // Tiles that would not line up (the kept part of a tile is not its stride) are refused
        // where a user picks them: 0.3 of 128 pixels blends 38, a stride of 11 latents is 88.
        let text = message(VaeTiling::for_tile_size(&config, Some(128), 0.3));
        assert!(text.contains("0.3 with 128-pixel tiles"), "{text}");
        assert!(VaeTiling::for_tile_size(&config, Some(128), 0.5).is_ok());
    }

    #[test]
    fn only_inputs_over_a_tile_are_tiled() {
        let tiling = VaeTiling::new(64, 8, 0.25).unwrap();
        assert!(!tiling.tiles_decode(8, 8));
        assert!(tiling.tiles_decode(8, 9));
        assert!(!tiling.tiles_encode(64, 64));
        assert!(tiling.tiles_encode(65, 64));
    }

    #[test]
    fn blending_ramps_from_the_neighbour_to_the_tile() {
        let a = Tensor::full(1f32, (1, 1, 4, 2), &Device::Cpu).unwrap();
        let b = Tensor::zeros((1, 1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        let out = blend(&a, &b, 2, 2).unwrap();
        let rows: Vec<Vec<f32>> = out
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(rows, vec![vec![1.0, 1.0], vec![0.5, 0.5], vec![0.0, 0.0]]);
        // The extent is capped by the smaller tile.
        let narrow = Tensor::zeros((1, 1, 2, 1), DType::F32, &Device::Cpu).unwrap();
        let wide = Tensor::full(1f32, (1, 1, 2, 5), &Device::Cpu).unwrap();
        let out = blend(&narrow, &wide, 4, 3).unwrap();
        let row: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&row[..5], &[0.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn tiles_join_back_into_the_whole_for_a_pointwise_pass() {
        // A pass that maps each latent to a 2x2 block of itself: blending equal overlaps and
        // cropping gives back exactly the untiled result.
        let input = Tensor::arange(0f32, 7.0 * 9.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 7, 9))
            .unwrap();
        let upsample = |t: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            Ok(t.upsample_nearest2d(h * 2, w * 2)?)
        };
        let tiling = VaeTiling::new(8, 4, 0.25).unwrap();
        let plan = tiling.decode_plan(7, 9);
        assert_eq!((plan.stride, plan.blend_extent, plan.row_limit), (3, 2, 6));
        let tiled = run_tiled(&input, &plan, upsample).unwrap();
        let whole = upsample(&input).unwrap();
        assert_eq!(tiled.dims(), whole.dims());
        let diff = (tiled - whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Tolerance: the blend weights sum to 1 in f32, a rounding at most.
        assert!(diff < 1e-4, "{diff}");
    }
}
