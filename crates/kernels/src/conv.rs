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
