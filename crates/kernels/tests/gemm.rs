//! GEMM parity against a plain f64 reference on seeded random inputs, for every kernel level this
//! CPU runs, odd sizes, transposed operands and bf16/f16 inputs.

use half::{bf16, f16};
use sdrs_kernels::cpu::Level;
use sdrs_kernels::gemm::{gemm, gemm_bf16, Strided};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// `a [m, k]` times `b` given as `[n, k]` (a linear layer's weight), in f64.
fn reference(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                .sum();
        }
    }
    c
}

/// Largest error relative to the largest reference magnitude.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-30f64, |s, v| s.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

const SIZES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (7, 77, 5),
    (77, 129, 321),
    (130, 513, 40),
    (2, 320, 1280),
    (33, 1, 17),
    (200, 1030, 97),
];

#[test]
fn f32_gemm_matches_the_reference_on_every_level() {
    for level in Level::available() {
        for (m, k, n) in SIZES {
            let a = random(m * k, 1);
            let w = random(n * k, 2);
            let mut c = vec![0f32; m * n];
            let b = Strided::row_major(&w, n, k).t();
            gemm(level, &Strided::row_major(&a, m, k), &b, &mut c, n);
            let error = relative_error(&c, &reference(&a, &w, m, k, n));
            // f32 accumulation over up to 1030 terms: a few ulps of the result.
            assert!(error < 1e-5, "{level:?} {m}x{k}x{n}: {error}");
        }
    }
}

#[test]
fn gemm_accumulates_into_c_and_reads_row_major_b() {
    let (m, k, n) = (9, 33, 35);
    let a = random(m * k, 3);
    let w = random(n * k, 4);
    // B as a row-major [k, n] copy of w's transpose.
    let mut b = vec![0f32; k * n];
    for j in 0..n {
        for p in 0..k {
            b[p * n + j] = w[j * k + p];
        }
    }
    let mut c = vec![1f32; m * n];
    gemm(
        sdrs_kernels::cpu::detected(),
        &Strided::row_major(&a, m, k),
        &Strided::row_major(&b, k, n),
        &mut c,
        n,
    );
    let want: Vec<f64> = reference(&a, &w, m, k, n).iter().map(|v| v + 1.0).collect();
    let error = relative_error(&c, &want);
    assert!(error < 1e-5, "{error}");
}

#[test]
fn half_precision_inputs_match_the_reference_on_the_rounded_values() {
    for level in Level::available() {
        for (m, k, n) in SIZES {
            let a: Vec<bf16> = random(m * k, 5).into_iter().map(bf16::from_f32).collect();
            let w: Vec<bf16> = random(n * k, 6).into_iter().map(bf16::from_f32).collect();
            let af: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
            let wf: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
            let want = reference(&af, &wf, m, k, n);
            for dot in [false, true] {
                let mut c = vec![0f32; m * n];
                let (a, b) = (
                    Strided::row_major(&a, m, k),
                    Strided::row_major(&w, n, k).t(),
                );
                if dot {
                    gemm_bf16(level, &a, &b, &mut c, n);
                } else {
                    gemm(level, &a, &b, &mut c, n);
                }
                // Exact products of bf16 values, summed in f32.
                let error = relative_error(&c, &want);
                assert!(error < 1e-5, "{level:?} dot={dot} {m}x{k}x{n}: {error}");
            }
            let a16: Vec<f16> = af.iter().map(|x| f16::from_f32(*x)).collect();
            let mut c = vec![0f32; m * n];
            let b = Strided::row_major(&wf, n, k).t();
            gemm(level, &Strided::row_major(&a16, m, k), &b, &mut c, n);
            assert!(relative_error(&c, &want) < 1e-5, "{level:?} f16");
        }
    }
}

#[test]
fn wide_products_computed_by_whole_column_blocks_match_the_reference() {
    // With one thread, 2100 columns are enough 512-column blocks for the path that gives each
    // task whole blocks (a convolution's pixels); K spans two depth blocks, both row-major B
    // (as im2col reads) and a transposed one.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (m, k, n) = (9, 600, 2100);
    let round =
        |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect() };
    let a = round(random(m * k, 3));
    let w = round(random(n * k, 4));
    let want = reference(&a, &w, m, k, n);
    let w_kn: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
    pool.install(|| {
        for level in Level::available() {
            for transposed in [false, true] {
                for dot in [false, true] {
                    let b = if transposed {
                        Strided::row_major(&w, n, k).t()
                    } else {
                        Strided::row_major(&w_kn, k, n)
                    };
                    let mut c = vec![0f32; m * n];
                    let a = Strided::row_major(&a, m, k);
                    if dot {
                        gemm_bf16(level, &a, &b, &mut c, n);
                    } else {
                        gemm(level, &a, &b, &mut c, n);
                    }
                    let error = relative_error(&c, &want);
                    assert!(error < 1e-5, "{level:?} t={transposed} dot={dot}: {error}");
                }
            }
        }
    });
}
