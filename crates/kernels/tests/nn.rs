//! The layers on our kernels against candle's own linear and conv2d on seeded random inputs:
//! odd sizes, strides, padding, 1x1 kernels, non-contiguous inputs, f32/bf16/f16.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use sdrs_kernels::nn::{geglu, Conv2d, Linear};
use sdrs_kernels::KernelOptions;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // candle's CPU randn is not seeded: build the values from a small LCG instead.
    let count: usize = shape.iter().product();
    let mut state = seed;
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn max_relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale
}

#[test]
fn linear_matches_candle_for_every_dtype_and_odd_sizes() {
    for (batch, k, n) in [(1, 1, 1), (77, 40, 7), (3, 321, 129)] {
        let x = randn(&[2, batch, k], 1);
        let w = randn(&[n, k], 2);
        let b = randn(&[n], 3);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let (x, w, b) = (
                x.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
            );
            let ours = Linear::new(w.clone(), Some(b.clone())).unwrap();
            let got = ours.forward(&x).unwrap();
            // The reference in f32 on the same rounded values: the only difference left is
            // the output's rounding to the dtype (bf16: 2^-8 relative).
            let reference = candle_nn::Linear::new(
                w.to_dtype(DType::F32).unwrap(),
                Some(b.to_dtype(DType::F32).unwrap()),
            )
            .forward(&x.to_dtype(DType::F32).unwrap())
            .unwrap();
            assert_eq!(got.dims(), reference.dims());
            assert_eq!(got.dtype(), dtype);
            let diff = max_relative_diff(&got, &reference);
            assert!(diff < tol, "{dtype:?} {batch}x{k}x{n}: {diff}");
        }
    }
}

#[test]
fn linear_takes_non_contiguous_inputs_and_no_bias() {
    let x = randn(&[5, 24], 4).t().unwrap();
    let w = randn(&[9, 5], 5);
    let got = Linear::new(w.clone(), None).unwrap().forward(&x).unwrap();
    let reference = candle_nn::Linear::new(w, None).forward(&x).unwrap();
    assert!(max_relative_diff(&got, &reference) < 1e-5);
}

#[test]
fn conv2d_matches_candle_for_strides_padding_and_dtypes() {
    conv_cases();
}

#[test]
fn conv2d_by_whole_column_blocks_matches_candle() {
    // With one thread, the 40x60 case has enough 512-pixel blocks for the path that packs whole
    // blocks of im2col rows per task.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(conv_cases);
}

fn conv_cases() {
    let cases = [
        // (batch, cin, cout, h, w, kernel, stride, padding)
        (1, 3, 5, 7, 9, 3, 1, 1),
        (2, 4, 8, 16, 16, 3, 2, 1),
        (1, 6, 3, 5, 6, 1, 1, 0),
        (1, 5, 7, 9, 8, 3, 2, 0),
        (2, 33, 17, 11, 13, 3, 1, 1),
        // Padding wider than the input: whole stretches of a row lie in the padding.
        (1, 2, 3, 4, 3, 3, 1, 3),
        (1, 3, 4, 6, 7, 5, 1, 2),
        (1, 4, 5, 40, 60, 3, 1, 1),
    ];
    for (batch, cin, cout, h, w, k, stride, padding) in cases {
        let x = randn(&[batch, cin, h, w], 6);
        let weight = randn(&[cout, cin, k, k], 7);
        let bias = randn(&[cout], 8);
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let (xd, wd, bd) = (
                x.to_dtype(dtype).unwrap(),
                weight.to_dtype(dtype).unwrap(),
                bias.to_dtype(dtype).unwrap(),
            );
            let got = Conv2d::new(wd.clone(), Some(bd.clone()), config)
                .unwrap()
                .forward(&xd)
                .unwrap();
            let reference = candle_nn::Conv2d::new(
                wd.to_dtype(DType::F32).unwrap(),
                Some(bd.to_dtype(DType::F32).unwrap()),
                config,
            )
            .forward(&xd.to_dtype(DType::F32).unwrap())
            .unwrap();
            assert_eq!(
                got.dims(),
                reference.dims(),
                "{cin}->{cout} {h}x{w} s{stride}"
            );
            let diff = max_relative_diff(&got, &reference);
            assert!(
                diff < tol,
                "{dtype:?} {cin}->{cout} {h}x{w} k{k} s{stride}: {diff}"
            );
        }
    }
}

#[test]
fn convolution_with_a_residual_matches_candle() {
    let cases = [
        // (batch, cin, cout, h, w, kernel, stride, padding)
        (1, 3, 5, 14, 18, 3, 1, 1),
        (2, 4, 6, 10, 6, 3, 1, 1),
        (1, 5, 4, 12, 14, 3, 2, 1),
        (1, 2, 3, 12, 15, 1, 1, 0),
        (1, 3, 2, 6, 8, 5, 1, 4),
        (1, 6, 7, 9, 8, 3, 1, 0),
    ];
    for (batch, cin, cout, h, w, k, stride, padding) in cases {
        let x = randn(&[batch, cin, h, w], 31);
        let weight = randn(&[cout, cin, k, k], 32);
        let bias = randn(&[cout], 33);
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let reference = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), config)
            .forward(&x)
            .unwrap();
        let residual = randn(reference.dims(), 34);
        let name = format!("{cin}->{cout} {h}x{w} k{k} s{stride} p{padding}");
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let conv = Conv2d::new(
                weight.to_dtype(dtype).unwrap(),
                Some(bias.to_dtype(dtype).unwrap()),
                config,
            )
            .unwrap();
            let got = conv.forward_add(&x, &residual).unwrap();
            assert_eq!(got.dims(), reference.dims(), "{name}");
            let expected = (&reference + &residual).unwrap();
            let diff = max_relative_diff(&got, &expected);
            assert!(diff < tol, "with residual {dtype:?} {name}: {diff}");
        }
    }
    let conv = Conv2d::new(randn(&[2, 3, 3, 3], 35), None, Conv2dConfig::default()).unwrap();
    let error = conv
        .forward_add(&randn(&[1, 3, 8, 8], 36), &randn(&[1, 2, 7, 7], 37))
        .unwrap_err();
    assert!(error.to_string().contains("residual"), "{error}");
}

#[test]
fn mismatched_shapes_are_errors_not_panics() {
    let w = randn(&[4, 6], 9);
    let x = randn(&[2, 5], 10);
    let error = Linear::new(w, None).unwrap().forward(&x).unwrap_err();
    assert!(error.to_string().contains("[2, 5]"), "{error}");
    let conv = Conv2d::new(randn(&[2, 3, 3, 3], 11), None, Conv2dConfig::default()).unwrap();
    let error = conv.forward(&randn(&[1, 4, 8, 8], 12)).unwrap_err();
    assert!(error.to_string().contains("channels"), "{error}");
}

#[test]
fn conv_kernel_matches_candle_on_every_simd_level() {
    use sdrs_kernels::conv::{conv2d, ConvGeometry};
    use sdrs_kernels::gemm::Strided;
    let (cin, cout, h, w) = (5, 7, 9, 11);
    let x = randn(&[1, cin, h, w], 13);
    let weight = randn(&[cout, cin, 3, 3], 14);
    let reference = x.conv2d(&weight, 1, 2, 1, 1).unwrap();
    let g = ConvGeometry {
        channels: cin,
        out_channels: cout,
        height: h,
        width: w,
        kernel_h: 3,
        kernel_w: 3,
        stride: 2,
        padding: 1,
        dilation: 1,
    };
    let (out_h, out_w) = g.output_size().unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ws = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for level in sdrs_kernels::cpu::Level::available() {
        for bf16_dot in [false, true] {
            let mut out = vec![0f32; cout * out_h * out_w];
            let w = Strided::row_major(&ws, cout, cin * 9);
            conv2d(level, g, 1, &xs, &w, &mut out, bf16_dot);
            let got = Tensor::from_vec(out, (1, cout, out_h, out_w), &Device::Cpu).unwrap();
            let diff = max_relative_diff(&got, &reference);
            // bf16_dot rounds the operands to bf16 where the CPU has the instructions.
            let tol = if bf16_dot { 1e-2 } else { 1e-5 };
            assert!(diff < tol, "{level:?} bf16_dot={bf16_dot}: {diff}");
        }
    }
}

#[test]
fn fused_group_norm_and_silu_match_candle() {
    use sdrs_kernels::nn::GroupNorm;
    for (shape, groups) in [
        (vec![2, 8, 5, 7], 4),
        (vec![1, 6, 9], 3),
        (vec![1, 32, 1, 1], 32),
    ] {
        let channels = shape[1];
        let x = randn(&shape, 21);
        let weight = randn(&[channels], 22);
        let bias = randn(&[channels], 23);
        let ours = GroupNorm::new(weight.clone(), bias.clone(), groups, 1e-5).unwrap();
        let reference = candle_nn::GroupNorm::new(weight, bias, channels, groups, 1e-5)
            .unwrap()
            .forward(&x)
            .unwrap();
        // f32 statistics and one rounding per element: a few ulps.
        let diff = max_relative_diff(&ours.forward(&x).unwrap(), &reference);
        assert!(diff < 1e-5, "{shape:?}: {diff}");
        let fused = ours.forward_silu(&x).unwrap();
        assert!(max_relative_diff(&fused, &reference.silu().unwrap()) < 1e-5);
        let half = ours
            .forward_silu(&x.to_dtype(DType::BF16).unwrap())
            .unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }
    let ours = GroupNorm::new(randn(&[4], 1), randn(&[4], 2), 2, 1e-5).unwrap();
    let error = ours.forward(&randn(&[1, 3, 2, 2], 3)).unwrap_err();
    assert!(error.to_string().contains("4 channels"), "{error}");
}

#[test]
fn geglu_matches_value_times_candle_gelu_erf() {
    for (shape, seed) in [
        (vec![1, 2], 1),
        (vec![2, 77, 2 * 37], 2),
        (vec![3, 1, 2 * 640], 3),
    ] {
        // Wider than [-1, 1]: erf's tails matter.
        let x = (randn(&shape, seed) * 6.0).unwrap();
        let half = shape[shape.len() - 1] / 2;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let wide = x.to_dtype(DType::F32).unwrap();
            let value = wide.narrow(candle_core::D::Minus1, 0, half).unwrap();
            let gate = wide.narrow(candle_core::D::Minus1, half, half).unwrap();
            let want = (value * gate.gelu_erf().unwrap()).unwrap();
            let got = geglu(&x, &KernelOptions::default()).unwrap();
            assert_eq!(got.dtype(), dtype);
            let diff = max_relative_diff(&got, &want);
            // f32: the erf approximation (1.5e-7) and rounding; half precision: the output's rounding.
            let tolerance = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
            assert!(diff < tolerance, "{shape:?} {dtype:?}: {diff}");
        }
    }
    let odd = randn(&[2, 3], 4);
    assert!(geglu(&odd, &KernelOptions::default())
        .unwrap_err()
        .to_string()
        .contains("even"));
}
