//! 2-D convolution (NCHW) as a GEMM over an implicit im2col matrix: the packing routine reads the
//! input patches directly, so the `C*kh*kw x H*W` matrix (over a gigabyte for a 512x512 VAE
//! layer) is never built, and the output lands in NCHW order with no transpose.

use crate::cpu::Level;
#[cfg(doc)]
use crate::gemm::Strided;
use crate::gemm::{gemm, gemm_bf16, Element, Operand};

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvGeometry {
    /// Output height and width (`None` when the kernel does not fit the padded input).
    pub fn output_size(&self) -> Option<(usize, usize)> {
        let span = |k: usize| self.dilation * (k.max(1) - 1) + 1;
        let out = |size: usize, k: usize| {
            (size + 2 * self.padding)
                .checked_sub(span(k))
                .map(|v| v / self.stride.max(1) + 1)
        };
        Some((
            out(self.height, self.kernel_h)?,
            out(self.width, self.kernel_w)?,
        ))
    }
}

/// The im2col matrix of one image, `[C*kh*kw, Ho*Wo]`, read on demand.
struct Patches<'a, T> {
    input: &'a [T],
    g: ConvGeometry,
    out_h: usize,
    out_w: usize,
}

impl<T: Element> Operand for Patches<'_, T> {
    fn rows(&self) -> usize {
        self.g.channels * self.g.kernel_h * self.g.kernel_w
    }

    fn cols(&self) -> usize {
        self.out_h * self.out_w
    }

    /// For f32 inputs at stride 1, straight from the two taps' input rows into pairs: each output
    /// row's stretch where both taps lie inside the image is one vector pairing of two input
    /// slices, with no copy of either row (the copies were a tenth of a bf16 VAE decode).
    fn read_pairs(&self, row: usize, two_rows: bool, col0: usize, out: &mut [u32]) {
        match T::as_f32(self.input) {
            Some(input) if self.g.stride == 1 => self.pairs_f32(input, row, two_rows, col0, out),
            _ => crate::gemm::read_pairs_by_rows(self, row, two_rows, col0, out),
        }
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let g = &self.g;
        let taps = g.kernel_h * g.kernel_w;
        let (c, tap) = (row / taps, row % taps);
        let (ky, kx) = (tap / g.kernel_w, tap % g.kernel_w);
        let plane = &self.input[c * g.height * g.width..(c + 1) * g.height * g.width];
        let (mut oy, mut ox) = (col0 / self.out_w, col0 % self.out_w);
        let mut j = 0;
        while j < out.len() {
            // One output row at a time: the input row is fixed, x advances by the stride.
            let run = (self.out_w - ox).min(out.len() - j);
            let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
            let dst = &mut out[j..j + run];
            if iy < 0 || iy >= g.height as isize {
                dst.fill(0.0);
            } else {
                let src = &plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                let x0 = (ox * g.stride + kx * g.dilation) as isize - g.padding as isize;
                if g.stride == 1 {
                    // A contiguous stretch of the input row between zero padding: one bounds
                    // computation and a plain (vectorised) conversion loop.
                    let lo = (-x0).clamp(0, run as isize) as usize;
                    let hi = (g.width as isize - x0).clamp(lo as isize, run as isize) as usize;
                    dst[..lo].fill(0.0);
                    if hi > lo {
                        let start = (x0 + lo as isize) as usize;
                        for (d, s) in dst[lo..hi].iter_mut().zip(&src[start..]) {
                            *d = s.to_f32();
                        }
                    }
                    dst[hi..].fill(0.0);
                } else {
                    for (i, d) in dst.iter_mut().enumerate() {
                        let ix = x0 + (i * g.stride) as isize;
                        *d = if ix >= 0 && (ix as usize) < g.width {
                            src[ix as usize].to_f32()
                        } else {
                            0.0
                        };
                    }
                }
            }
            j += run;
            ox = 0;
            oy += 1;
        }
    }
}

impl<T> Patches<'_, T> {
    /// Where im2col row `row` reads its input: the channel plane, and the tap's offsets.
    fn tap(&self, row: usize) -> (usize, usize, usize) {
        let g = &self.g;
        let taps = g.kernel_h * g.kernel_w;
        let (c, tap) = (row / taps, row % taps);
        (c, tap / g.kernel_w, tap % g.kernel_w)
    }

    /// [`Operand::read_pairs`] at stride 1 over f32 input.
    fn pairs_f32(&self, input: &[f32], row: usize, two_rows: bool, col0: usize, out: &mut [u32]) {
        let g = &self.g;
        let plane_len = g.height * g.width;
        // Per tap: its plane and offsets; the second is absent past the last row of K.
        let taps = [Some(self.tap(row)), two_rows.then(|| self.tap(row + 1))];
        let (mut oy, mut ox) = (col0 / self.out_w, col0 % self.out_w);
        let mut j = 0;
        while j < out.len() {
            let run = (self.out_w - ox).min(out.len() - j);
            // Per tap: the input row (if inside the image), its first x, and the stretch
            // `lo..hi` of this run that lies inside the row.
            let spans = taps.map(|tap| {
                let (c, ky, kx) = tap?;
                let iy = (oy + ky * g.dilation) as isize - g.padding as isize;
                if iy < 0 || iy >= g.height as isize {
                    return None;
                }
                let start = c * plane_len + iy as usize * g.width;
                let src = &input[start..start + g.width];
                let x0 = (ox + kx * g.dilation) as isize - g.padding as isize;
                let lo = (-x0).clamp(0, run as isize) as usize;
                let hi = (g.width as isize - x0).clamp(lo as isize, run as isize) as usize;
                Some((src, x0, lo, hi))
            });
            let value = |span: &Option<(&[f32], isize, usize, usize)>, i: usize| match span {
                Some((src, x0, lo, hi)) if (*lo..*hi).contains(&i) => {
                    src[(x0 + i as isize) as usize]
                }
                _ => 0.0,
            };
            let dst = &mut out[j..j + run];
            // The stretch inside both rows, paired as vectors; the edges one by one.
            let (both_lo, both_hi) = match (&spans[0], &spans[1]) {
                (Some((_, _, lo0, hi0)), Some((_, _, lo1, hi1))) => {
                    let lo = (*lo0).max(*lo1);
                    (lo, (*hi0).min(*hi1).max(lo))
                }
                _ => (0, 0),
            };
            if let (Some((even, x0e, ..)), Some((odd, x0o, ..))) = (&spans[0], &spans[1]) {
                if both_hi > both_lo {
                    let (e, o) = (
                        (x0e + both_lo as isize) as usize,
                        (x0o + both_lo as isize) as usize,
                    );
                    let n = both_hi - both_lo;
                    crate::gemm::pair_rows(
                        &even[e..e + n],
                        &odd[o..o + n],
                        &mut dst[both_lo..both_hi],
                    );
                }
            }
            for i in (0..both_lo).chain(both_hi..run) {
                dst[i] = crate::gemm::pair(value(&spans[0], i), value(&spans[1], i));
            }
            j += run;
            ox = 0;
            oy += 1;
        }
    }
}

/// Convolves each of the `images` of `input` (`[N, C, H, W]`, contiguous) with `weight` (the
/// `O x C*kh*kw` matrix of an `[O, C, kh, kw]` kernel: a [`Strided`] view of dense values, or a
/// quantized matrix decoded while it is packed), adding into `output` (`[N, O, Ho, Wo]`, f32).
/// `bf16_dot` selects the bf16 dot-product kernels.
pub fn conv2d<T: Element>(
    level: Level,
    g: ConvGeometry,
    images: usize,
    input: &[T],
    weight: &dyn Operand,
    output: &mut [f32],
    bf16_dot: bool,
) {
    let out_channels = g.out_channels;
    let Some((out_h, out_w)) = g.output_size() else {
        return;
    };
    let image_in = g.channels * g.height * g.width;
    let image_out = out_channels * out_h * out_w;
    for n in 0..images {
        let patches = Patches {
            input: &input[n * image_in..(n + 1) * image_in],
            g,
            out_h,
            out_w,
        };
        let c = &mut output[n * image_out..(n + 1) * image_out];
        if bf16_dot {
            gemm_bf16(level, weight, &patches, c, out_h * out_w);
        } else {
            gemm(level, weight, &patches, c, out_h * out_w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct pairing of f32 patches gives the bits of the generic path (both rows read in
    /// f32, then paired) for paddings, dilations and kernel sizes that put taps outside the
    /// image on each side, for runs that start and end inside output rows, and for the odd last
    /// row of K.
    #[test]
    fn direct_pairs_match_the_generic_path() {
        for (channels, height, width, kernel, padding, dilation) in [
            (2, 5, 7, 3, 1, 1),
            (3, 4, 9, 3, 0, 1),
            (1, 6, 6, 3, 2, 2),
            (2, 3, 20, 1, 0, 1),
            (1, 8, 5, 5, 3, 1),
        ] {
            let g = ConvGeometry {
                channels,
                out_channels: 1,
                height,
                width,
                kernel_h: kernel,
                kernel_w: kernel,
                stride: 1,
                padding,
                dilation,
            };
            let (out_h, out_w) = g.output_size().unwrap();
            let input: Vec<f32> = (0..channels * height * width)
                .map(|i| ((i * 29 % 31) as f32 - 15.0) / 7.0)
                .collect();
            let patches = Patches {
                input: &input,
                g,
                out_h,
                out_w,
            };
            let cols = out_h * out_w;
            for row in 0..patches.rows() {
                let two_rows = row + 1 < patches.rows();
                for (col0, len) in [
                    (0, cols),
                    (1, cols - 1),
                    (out_w / 2, out_w + 1),
                    (cols - 1, 1),
                ] {
                    let mut got = vec![0u32; len];
                    let mut want = vec![0u32; len];
                    patches.read_pairs(row, two_rows, col0, &mut got);
                    crate::gemm::read_pairs_by_rows(&patches, row, two_rows, col0, &mut want);
                    assert_eq!(got, want, "{g:?} row {row} cols {col0}+{len}");
                }
            }
        }
    }
}
