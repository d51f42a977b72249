//! A random generator that reproduces `torch.Generator('cpu').manual_seed(seed)` followed by
//! `torch.randn(shape)` (float32), following PyTorch's `aten/src/ATen/core/MT19937RNGEngine.h`
//! (the mt19937 engine), `CPUGeneratorImpl.cpp`, `core/TransformationHelper.h` (uniform from bits)
//! and `native/cpu/DistributionKernels.cpp` / `DistributionTemplates.h` (the normal fill).
//!
//! torch draws normals two ways: tensors of 16 or more elements are first filled with uniforms and
//! then transformed by Box-Muller in blocks of 16 (the last, partial block is re-drawn and
//! recomputed over the final 16 elements); smaller tensors draw one double-precision normal per
//! element, Box-Muller in pairs with the second value cached in the generator for the next draw.

use candle_core::{DType, Device, Shape, Tensor};

use crate::{NoiseSource, Result};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne twister, seeded as torch seeds it (`init_genrand` with the low 32 bits).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; N],
    /// Words left before the state is regenerated (torch's `left_`).
    left: usize,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            left: 1,
            next: 0,
        }
    }

    fn twist(&mut self) {
        let mix = |u: u32, v: u32| -> u32 {
            let y = (u & UPPER_MASK) | (v & LOWER_MASK);
            (y >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
        };
        for i in 0..N {
            let j = (i + M) % N;
            self.state[i] = self.state[j] ^ mix(self.state[i], self.state[(i + 1) % N]);
        }
        self.left = N;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator('cpu')` after `manual_seed(seed)`: successive draws continue one stream, as
/// diffusers draws the initial latents and then every step's noise from the same generator.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// The cached second normal of the small-tensor (double) Box-Muller path.
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator('cpu').manual_seed(seed)`: any 64-bit seed (torch's engine uses its low 32 bits).
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed),
            next_double_normal: None,
        }
    }

    /// torch's `random()`: one 32-bit word.
    fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// torch's `random64()`: two words, the first in the high half.
    fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: the low 24 bits of a word, scaled by 2^-24.
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: the low 53 bits of two words, scaled by 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)`: Box-Muller with the sine half cached.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n)` values in float32, in memory order.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !n.is_multiple_of(16) {
            // torch re-draws the last 16 uniforms (overlapping the last full block) and
            // transforms them again.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }
}

/// Box-Muller over 16 uniforms, pairing element j with j + 8, as torch's AVX2 `normal_fill_16_AVX2`
/// computes it: float32 throughout, with the Cephes-derived `log256_ps` / `sincos256_ps`
/// approximations of `aten/src/ATen/cpu/avx_mathfun.h` (so the values match torch's x86-64 wheels
/// to the last bit rather than a correctly rounded libm). torch compiles that file with FMA enabled
/// and GCC fuses each multiply whose only use is an add or subtract, in statement order; the
/// `mul_add` calls below sit exactly where those fusions happen.
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0f32 as f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let theta = two_pi * u2;
        let (sin, cos) = cephes_sincos(theta);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// `log256_ps` for one lane: Cephes `logf` (range reduction to `[sqrt(1/2), sqrt(2))`, a degree-8
/// polynomial, `ln 2` split in two), with every operation rounded to float32 and no fused
/// multiply-adds. Positive normal inputs only (torch feeds it `1 - u`, `u` in `[0, 1)`).
// The constants are the upstream decimal literals, rounded to f32 as the C compiler does.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn cephes_log(x: f32) -> f32 {
    const SQRTHF: f32 = 0.707_106_781_186_547_524;
    const P: [f32; 9] = [
        7.037_683_629_2e-2,
        -1.151_461_031_0e-1,
        1.167_699_874_0e-1,
        -1.242_014_084_6e-1,
        1.424_932_278_7e-1,
        -1.666_805_766_5e-1,
        2.000_071_476_5e-1,
        -2.499_999_399_3e-1,
        3.333_333_117_4e-1,
    ];
    const Q1: f32 = -2.121_944_40e-4;
    const Q2: f32 = 0.693_359_375;
    if x <= 0.0 || x.is_nan() {
        return f32::NAN;
    }
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = m < SQRTHF;
    let tmp = if below { m } else { 0.0 };
    m -= 1.0;
    if below {
        e -= 1.0;
    }
    m += tmp;
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y = (y * m).mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(Q2, m + y)
}

/// `sincos256_ps` for one lane: Cephes `sinf`/`cosf` with the octant reduction by `4 / pi`, the
/// three-part extended-precision `pi / 4`, and float32 polynomials. Returns `(sin, cos)`.
// The constants are the upstream decimal literals, rounded to f32 as the C compiler does.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_544_735_16;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_484_985_351_562_5e-4;
    const DP3: f32 = -3.774_894_977_445_941_08e-8;
    const SIN: [f32; 3] = [-1.951_529_589_1e-4, 8.332_160_873_6e-3, -1.666_665_461_1e-1];
    const COS: [f32; 3] = [
        2.443_315_711_809_948e-5,
        -1.388_731_625_493_765e-3,
        4.166_664_568_298_827e-2,
    ];
    let sign_sin = x.is_sign_negative();
    let x = x.abs();
    let mut j = (x * FOPI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sin = j & 4 != 0;
    let use_sin_poly = j & 2 == 0;
    let x = y.mul_add(DP3, y.mul_add(DP2, y.mul_add(DP1, x)));
    let cos_negative = (!(j - 2)) & 4 != 0;
    let z = x * x;
    let mut c = COS[0].mul_add(z, COS[1]);
    c = c.mul_add(z, COS[2]);
    c = (c * z).mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SIN[0].mul_add(z, SIN[1]);
    s = s.mul_add(z, SIN[2]);
    s = (s * z).mul_add(x, x);
    let (sin, cos) = if use_sin_poly { (s, c) } else { (c, s) };
    let sin = if sign_sin != swap_sin { -sin } else { sin };
    let cos = if cos_negative { -cos } else { cos };
    (sin, cos)
}

impl NoiseSource for TorchGenerator {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let values = self.randn_vec(shape.elem_count());
        let t = Tensor::from_vec(values, shape.clone(), &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // std::mt19937 with the default seed 5489: the 10000th output is 4123659995.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn small_draws_use_the_cached_normal() {
        let mut a = TorchGenerator::new(0);
        let three = a.randn_vec(3);
        let mut b = TorchGenerator::new(0);
        let mut one_by_one = Vec::new();
        for _ in 0..3 {
            one_by_one.extend(b.randn_vec(1));
        }
        assert_eq!(three, one_by_one);
        // torch.randn(3, generator=manual_seed(0)) = [1.5410, -0.2934, -2.1788]
        assert!((three[0] - 1.5410).abs() < 1e-4 && (three[2] + 2.1788).abs() < 1e-4);
    }
}
