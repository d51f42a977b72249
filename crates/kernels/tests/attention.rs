//! Flash and sliced attention against the naive candle computation on seeded random inputs: odd
//! lengths and head sizes, single keys, non-contiguous views, f32/bf16/f16, every SIMD level.

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::attention::{attention, flash_at, naive, AttentionMode};
use sdrs_kernels::cpu::Level;
use sdrs_kernels::KernelOptions;

/// Options running attention in `mode`.
fn with(attention: AttentionMode) -> KernelOptions {
    KernelOptions {
        attention,
        ..Default::default()
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    let mut state = seed;
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Spread of about +-3 so the softmax is far from uniform.
            3.0 * (((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0)
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    // (batch, heads, Lq, Lk, D)
    (1, 1, 1, 1, 1),
    (2, 3, 77, 1, 40),
    (1, 2, 33, 77, 40),
    (2, 2, 130, 129, 8),
    (1, 1, 5, 300, 64),
    (1, 17, 9, 9, 3),
    // Several key blocks with a partial last one, several value panels, a partial query block.
    (1, 2, 65, 193, 80),
];

#[test]
fn flash_and_sliced_match_naive_in_f32() {
    for (b, h, lq, lk, d) in SHAPES {
        let q = randn(&[b, h, lq, d], 1);
        let k = randn(&[b, h, lk, d], 2);
        let v = randn(&[b, h, lk, d + 1], 3);
        let scale = 1.0 / (d as f64).sqrt();
        let reference = naive(&q, &k, &v, scale).unwrap();
        for mode in [
            AttentionMode::Flash,
            AttentionMode::Sliced(None),
            AttentionMode::Sliced(Some(2)),
            AttentionMode::Auto,
        ] {
            let got = attention(&q, &k, &v, scale, &with(mode)).unwrap();
            assert_eq!(got.dims(), reference.dims());
            // Values are convex combinations of v (|v| <= 3): f32 rounding of a few ulps.
            let diff = max_diff(&got, &reference);
            assert!(diff < 2e-5, "{mode} {b}x{h}x{lq}x{lk}x{d}: {diff}");
        }
    }
}

#[test]
fn flash_matches_naive_on_every_simd_level() {
    for level in Level::available() {
        for (b, h, lq, lk, d) in SHAPES {
            let q = randn(&[b, h, lq, d], 11);
            let k = randn(&[b, h, lk, d], 12);
            let v = randn(&[b, h, lk, d], 13);
            let reference = naive(&q, &k, &v, 0.3).unwrap();
            let got = flash_at(level, &q, &k, &v, 0.3).unwrap();
            let diff = max_diff(&got, &reference);
            assert!(diff < 2e-5, "{level:?} {b}x{h}x{lq}x{lk}x{d}: {diff}");
        }
    }
}

#[test]
fn flash_reads_non_contiguous_views() {
    // [B, L, H, D] transposed to [B, H, L, D], as the UNet's head split produces.
    let q = randn(&[2, 50, 3, 16], 4).transpose(1, 2).unwrap();
    let k = randn(&[2, 70, 3, 16], 5).transpose(1, 2).unwrap();
    let v = randn(&[2, 70, 3, 16], 6).transpose(1, 2).unwrap();
    assert!(!q.is_contiguous());
    let reference = naive(&q, &k, &v, 0.25).unwrap();
    let got = attention(&q, &k, &v, 0.25, &with(AttentionMode::Flash)).unwrap();
    assert!(max_diff(&got, &reference) < 2e-5);
    // The sliced path takes the same views (the head split no longer copies them).
    let sliced = attention(&q, &k, &v, 0.25, &with(AttentionMode::Sliced(Some(2)))).unwrap();
    assert!(max_diff(&sliced, &reference) < 2e-5);
}

#[test]
fn half_precision_inputs_match_the_f32_result_on_the_rounded_values() {
    for dtype in [DType::BF16, DType::F16] {
        let round = |t: Tensor| t.to_dtype(dtype).unwrap();
        let (q, k, v) = (
            round(randn(&[1, 2, 40, 24], 7)),
            round(randn(&[1, 2, 65, 24], 8)),
            round(randn(&[1, 2, 65, 24], 9)),
        );
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let reference = naive(&f32(&q), &f32(&k), &f32(&v), 0.2).unwrap();
        let got = attention(&q, &k, &v, 0.2, &with(AttentionMode::Flash)).unwrap();
        assert_eq!(got.dtype(), dtype);
        // Only the output rounding differs (bf16: 2^-8 of |v| <= 3).
        let diff = max_diff(&got, &reference);
        assert!(diff < 2e-2, "{dtype:?}: {diff}");
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let q = randn(&[1, 2, 4, 8], 1);
    let k = randn(&[1, 2, 5, 7], 2);
    let error = attention(&q, &k, &k, 1.0, &with(AttentionMode::Flash)).unwrap_err();
    assert!(error.to_string().contains("do not fit"), "{error}");
}
