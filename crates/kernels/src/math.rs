//! Scalar math the kernels share, written so that loops over it vectorise: a fast `e^x` for
//! non-positive arguments (softmax, SiLU, erf), SiLU and torch's exact-erf GELU.

/// `e^x` for `x <= 0` to about 2e-7 relative: `2^n · p(r)` with `x = n ln2 + r`, `|r| <= ln2/2`
/// and a degree-6 Taylor polynomial. Written so the compiler vectorises it with no library call:
/// `n` is rounded to nearest by adding and subtracting 1.5 · 2^23 (`floor` is a call to libm
/// on x86-64 targets without SSE4.1, which is every function not compiled for AVX), and `2^n` is
/// built from the low bits of that sum, where `n` sits as an integer (a saturating `as i32` and
/// `f32::max`'s NaN rule both compile to scalar code).
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    // Also maps NaN to the clamp.
    let x = if x > -87.0 { x } else { -87.0 };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low 9 bits of `shifted` hold `n` in two's complement; `n + 127` in 1..=127 becomes
    // the exponent field and everything above it is shifted out.
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

/// [`exp_neg`] with fused multiply-adds, for loops compiled with FMA (there each `mul_add` is one
/// instruction; elsewhere it is a library call): about half the instructions, and as accurate.
#[inline(always)]
pub fn exp_neg_fused(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = if x > -87.0 { x } else { -87.0 };
    let shifted = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-1.428_606_8e-6, n.mul_add(-0.693_145_75, x));
    let p = (1.0f32 / 720.0).mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

/// `y * sigmoid(y)`, with the exponential of a non-positive argument only (no overflow).
#[inline(always)]
pub fn silu(y: f32) -> f32 {
    let e = exp_neg(-y.abs());
    let sigmoid = if y >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    y * sigmoid
}

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)` to within 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free so that loops over it
/// vectorise (the library `erf` is a scalar call).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_neg(-z * z);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=20000 {
            let x = -87.0 * i as f32 / 20000.0;
            let got = exp_neg(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-6, "{worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NAN) < 1e-37, "NaN is clamped like -inf");
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn erf_and_silu_match_their_definitions() {
        for i in -400..=400 {
            let x = i as f32 / 50.0;
            let silu_want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(
                (silu(x) as f64 - silu_want).abs() < 1e-6 * (1.0 + silu_want.abs()),
                "{x}"
            );
            assert!((erf(x) + erf(-x)).abs() < 1e-7, "erf is odd at {x}");
        }
        assert!((erf(0.5) - 0.520_499_9).abs() < 2e-7);
    }
}
