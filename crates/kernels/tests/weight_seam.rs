//! The weight seam: layers whose weights are a quantized matrix (here f16 values kept in memory
//! and widened while the GEMM packs them) give the dense layer's result on the same values, on
//! our CPU kernels and on candle's path, and a `VarBuilder` hands such weights to the layers.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use sdrs_kernels::nn::{conv2d, linear, Conv2d, Linear};
use sdrs_kernels::weight::{HalfMatrix, HalfSource, QuantizedMatrix};
use sdrs_kernels::{VarBuilder, Weight};

fn values(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    let mut state = seed;
    let v: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The tensor rounded to f16 and back: what a `HalfMatrix` holds.
fn rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
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
        .to_scalar::<f32>()
        .unwrap()
}

fn half(t: &Tensor) -> Arc<dyn QuantizedMatrix> {
    Arc::new(HalfMatrix::from_tensor(t).unwrap())
}

#[test]
fn a_quantized_linear_weight_gives_the_dense_result_on_every_path() {
    for (batch, k, n) in [(1, 1, 1), (77, 40, 7), (5, 321, 129)] {
        let (x, w, b) = (
            values(&[2, batch, k], 1),
            values(&[n, k], 2),
            values(&[n], 3),
        );
        let dense = Linear::new(rounded(&w), Some(b.clone())).unwrap();
        let weight = Weight::quantized(half(&w), (n, k)).unwrap();
        assert_eq!(
            weight.storage_bytes(),
            n * k * 2,
            "kept as f16, not decoded"
        );
        let quantized = Linear::new(weight, Some(b)).unwrap();
        let want = dense.forward(&x).unwrap();
        let got = quantized.forward(&x).unwrap();
        assert_eq!(got.dims(), want.dims());
        // The same products in another order (weight as A instead of B): f32 rounding only.
        assert!(max_diff(&got, &want) < 1e-4, "{batch}x{k}x{n}");
        // f64 inputs are not our kernels' dtype: candle's path with the decoded weight.
        let wide = x.to_dtype(DType::F64).unwrap();
        let candle = quantized.forward(&wide).unwrap();
        assert_eq!(candle.dtype(), DType::F64);
        assert!(max_diff(&candle, &want) < 1e-4);
    }
}

#[test]
fn a_quantized_convolution_weight_gives_the_dense_result_with_and_without_residual() {
    let (x, w, b) = (
        values(&[2, 5, 9, 11], 4),
        values(&[7, 5, 3, 3], 5),
        values(&[7], 6),
    );
    let config = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let dense = Conv2d::new(rounded(&w), Some(b.clone()), config).unwrap();
    let weight = Weight::quantized(half(&w), (7, 5, 3, 3)).unwrap();
    let quantized = Conv2d::new(weight, Some(b), config).unwrap();
    let want = dense.forward(&x).unwrap();
    let got = quantized.forward(&x).unwrap();
    assert!(max_diff(&got, &want) < 1e-5);
    let residual = values(want.dims(), 7);
    let fused = quantized.forward_add(&x, &residual).unwrap();
    assert!(max_diff(&fused, &(&want + &residual).unwrap()) < 1e-5);
    let wrong = values(&[2, 7, 3, 3], 8);
    let error = quantized.forward_add(&x, &wrong).unwrap_err();
    assert!(error.to_string().contains("residual"), "{error}");
}

#[test]
fn a_quantized_matrix_must_fit_the_layer_shape() {
    let error = Weight::quantized(half(&values(&[4, 6], 9)), (4, 5)).unwrap_err();
    assert!(error.to_string().contains("4x6"), "{error}");
}

#[test]
fn a_var_builder_hands_quantized_weights_to_the_layers() {
    let mut tensors = HashMap::new();
    tensors.insert("proj.weight".to_string(), values(&[8, 6], 10));
    tensors.insert("proj.bias".to_string(), values(&[8], 11));
    tensors.insert("conv.weight".to_string(), values(&[3, 2, 3, 3], 12));
    tensors.insert("conv.bias".to_string(), values(&[3], 13));
    let source = HalfSource::from_tensors(&tensors).unwrap();
    assert_eq!(source.len(), 2, "the two weights, not the biases");
    let dense = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let vb = VarBuilder::from(dense.clone()).with_quantized(Arc::new(source));
    let layer = linear(6, 8, vb.pp("proj")).unwrap();
    assert!(matches!(layer.weight(), Weight::Quantized { .. }));
    let conv = conv2d(2, 3, 3, Conv2dConfig::default(), vb.pp("conv")).unwrap();
    assert!(matches!(conv.weight(), Weight::Quantized { .. }));
    let plain = linear(6, 8, VarBuilder::from(dense).pp("proj")).unwrap();
    assert!(matches!(plain.weight(), Weight::Dense(_)));
    let x = values(&[3, 6], 14);
    let want = Linear::new(
        rounded(&tensors["proj.weight"]),
        Some(tensors["proj.bias"].clone()),
    )
    .unwrap()
    .forward(&x)
    .unwrap();
    assert!(max_diff(&layer.forward(&x).unwrap(), &want) < 1e-5);
    // A quantized tensor of the wrong shape names the tensor.
    let error = linear(5, 8, vb.pp("proj")).unwrap_err();
    assert!(format!("{error:#}").contains("proj.weight"), "{error:#}");
}
