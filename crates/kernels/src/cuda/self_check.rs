//! The parity checks of our CUDA kernels against our CPU kernels (`nn.rs`, `attention`) on
//! seeded random inputs of the shapes SD1.5 and SDXL use and of odd ones: a library function, so
//! that the test (`tests/cuda_parity.rs`) and a CLI command on a GPU machine without Rust run the
//! same checks.
//!
//! Each check computes the CPU reference in f32 from the same (dtype-rounded) inputs the GPU
//! gets, so what is left is the kernel's own error: f32 arithmetic in another order, and the
//! rounding of the output to f16/bf16.

use std::fmt;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;

use super::{conv2d_with, flash_attention, geglu, group_norm, ConvKernel};
use crate::attention::{attention, AttentionMode};
use crate::dispatch::{GpuKernels, KernelOptions, Route};
use crate::nn::{self, Conv2d, GroupNorm};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    /// What ran, with its shape (`flash attention D=40 1x2x4096x77`).
    pub name: String,
    pub dtype: DType,
    /// The largest `|gpu - cpu|` over the output (NaN if the GPU produced a NaN the CPU did not).
    pub max_abs_diff: f32,
    /// The largest `|cpu|`, which the tolerance is relative to.
    pub reference_max: f32,
    /// The absolute tolerance: [`relative_tolerance`] of the dtype times `reference_max`.
    pub tolerance: f32,
    pub pass: bool,
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {:?}: max |diff| {:.3e}, tolerance {:.3e} (max |ref| {:.3e})",
            if self.pass { "pass" } else { "FAIL" },
            self.name,
            self.dtype,
            self.max_abs_diff,
            self.tolerance,
            self.reference_max
        )
    }
}

/// The tolerance relative to the reference's largest magnitude: f32 1e-4 (f32 sums in another
/// order); f16 1e-3 (rounding the output is off by at most 2^-11 = 4.9e-4 of a value); bf16 8e-3
/// (2^-8 = 3.9e-3). Twice the rounding for the half types leaves room for the f32 differences.
pub fn relative_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
        _ => 1e-4,
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Runs every check on `device` (a CUDA device) and returns the results, passing or not; an
/// error only when a kernel could not run at all.
pub fn self_check(device: &Device) -> Result<Vec<CheckResult>> {
    let mut results = Vec::new();
    results.push(routing(device)?);
    attention_checks(device, &mut results)?;
    conv_checks(device, &mut results)?;
    group_norm_checks(device, &mut results)?;
    geglu_checks(device, &mut results)?;
    layer_checks(device, &mut results)?;
    Ok(results)
}

/// Seeded values uniform in `offset ± amplitude`, f32 on the CPU (candle's CPU `randn` is not
/// seeded).
fn random(shape: &[usize], seed: u64, amplitude: f32, offset: f32) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            offset + amplitude * unit
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// An input of `dtype`: `(the f32 CPU copy of the rounded values, the values on the device)`.
fn input(values: &Tensor, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let rounded = values.to_dtype(dtype)?;
    Ok((rounded.to_dtype(DType::F32)?, rounded.to_device(device)?))
}

/// `got` (on the device) against `reference` (f32 on the CPU).
fn compare(name: String, dtype: DType, got: &Tensor, reference: &Tensor) -> Result<CheckResult> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = reference
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let reference_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tolerance = relative_tolerance(dtype) * reference_max.max(1e-6);
    let max_abs_diff = if got.dims() != reference.dims() {
        f32::INFINITY
    } else {
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        let mut worst = 0f32;
        for (a, b) in got.iter().zip(&want) {
            let diff = (a - b).abs();
            if diff.is_nan() && !b.is_nan() {
                worst = f32::NAN;
                break;
            }
            worst = worst.max(diff);
        }
        worst
    };
    Ok(CheckResult {
        name,
        dtype,
        max_abs_diff,
        reference_max,
        tolerance,
        pass: max_abs_diff <= tolerance,
    })
}

/// `SDRS_GPU_KERNELS=ours` sends a CUDA tensor to [`Route::Cuda`], the default to candle.
fn routing(device: &Device) -> Result<CheckResult> {
    let x = Tensor::zeros((1, 4), DType::F16, device)?;
    let ours = KernelOptions {
        gpu_kernels: GpuKernels::Ours,
        ..Default::default()
    };
    let right = ours.route(&x) == Route::Cuda
        && KernelOptions::default().route(&x) == Route::Candle
        && ours.attention_for(&x.reshape((1, 1, 1, 4))?) == AttentionMode::Flash;
    Ok(CheckResult {
        name: "dispatch: SDRS_GPU_KERNELS=ours routes CUDA tensors to our kernels".into(),
        dtype: DType::F16,
        max_abs_diff: if right { 0.0 } else { 1.0 },
        reference_max: 0.0,
        tolerance: 0.0,
        pass: right,
    })
}

fn attention_checks(device: &Device, results: &mut Vec<CheckResult>) -> Result<()> {
    // (batch, heads, Lq, Lk, D, Dv): SD1.5's head dims with its self-attention over 4096 latent
    // pixels against 77 text tokens and SDXL-like 1024 x 1024, then odd sizes and every tile.
    let mut cases = Vec::new();
    for d in [40, 64, 80, 160] {
        cases.push((1, 2, 4096, 77, d, d));
        cases.push((1, 2, 1024, 1024, d, d));
    }
    cases.extend([
        (2, 3, 77, 1000, 40, 40),
        (1, 2, 1000, 77, 64, 64),
        (1, 1, 1, 1, 8, 8),
        (1, 2, 33, 65, 96, 96),
        (1, 2, 33, 65, 128, 128),
        (1, 2, 31, 40, 256, 256),
        (1, 2, 50, 70, 64, 40),
    ]);
    for (seed, &(b, h, lq, lk, d, dv)) in cases.iter().enumerate() {
        let seed = seed as u64 * 3;
        let q = random(&[b, h, lq, d], seed + 1, 3.0, 0.0)?;
        let k = random(&[b, h, lk, d], seed + 2, 3.0, 0.0)?;
        let v = random(&[b, h, lk, dv], seed + 3, 3.0, 0.0)?;
        let scale = 1.0 / (d as f64).sqrt();
        for dtype in DTYPES {
            let (q_ref, q_gpu) = input(&q, dtype, device)?;
            let (k_ref, k_gpu) = input(&k, dtype, device)?;
            let (v_ref, v_gpu) = input(&v, dtype, device)?;
            let reference = attention(&q_ref, &k_ref, &v_ref, scale, &KernelOptions::default())?;
            let got = flash_attention(&q_gpu, &k_gpu, &v_gpu, scale)?;
            let name = format!("flash attention D={d} Dv={dv} {b}x{h}x{lq}x{lk}");
            results.push(compare(name, dtype, &got, &reference)?);
        }
    }
    // The heads as SD makes them: transposed views of [B, L, H, D] projections.
    let (b, l, h, d) = (2, 300, 5, 64);
    let q = random(&[b, l, h, d], 90, 3.0, 0.0)?;
    let kv = random(&[b, 77, h, d], 91, 3.0, 0.0)?;
    for dtype in DTYPES {
        let (q_ref, q_gpu) = input(&q, dtype, device)?;
        let (kv_ref, kv_gpu) = input(&kv, dtype, device)?;
        let heads = |t: &Tensor| t.transpose(1, 2);
        let reference = attention(
            &heads(&q_ref)?,
            &heads(&kv_ref)?,
            &heads(&kv_ref)?,
            0.125,
            &KernelOptions::default(),
        )?;
        let got = flash_attention(&heads(&q_gpu)?, &heads(&kv_gpu)?, &heads(&kv_gpu)?, 0.125)?;
        let name = format!("flash attention strided views D={d} {b}x{h}x{l}x77");
        results.push(compare(name, dtype, &got, &reference)?);
    }
    Ok(())
}

fn conv_checks(device: &Device, results: &mut Vec<CheckResult>) -> Result<()> {
    // (images, channels, height, width, out channels, kernel, stride, padding, dilation,
    // residual): odd sizes and channel counts no tile divides, SD's 320-channel 3x3 at 64x64, a
    // 1x1 projection, a stride-2 downsampler, a dilated kernel, and a tiny one.
    let cases = [
        (2, 37, 17, 23, 70, 3, 1, 1, 1, true),
        (1, 320, 64, 64, 320, 3, 1, 1, 1, false),
        (1, 320, 9, 11, 640, 1, 1, 0, 1, true),
        (1, 64, 33, 33, 64, 3, 2, 1, 1, false),
        (1, 8, 15, 15, 5, 3, 1, 2, 2, false),
        (1, 4, 8, 8, 3, 3, 1, 1, 1, true),
    ];
    for (seed, &(n, c, hgt, wid, o, k, stride, padding, dilation, with_residual)) in
        cases.iter().enumerate()
    {
        let seed = 100 + seed as u64 * 4;
        let config = Conv2dConfig {
            padding,
            stride,
            dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        let x = random(&[n, c, hgt, wid], seed, 1.0, 0.0)?;
        let w = random(
            &[o, c, k, k],
            seed + 1,
            1.0 / ((c * k * k) as f32).sqrt(),
            0.0,
        )?;
        let bias = random(&[o], seed + 2, 0.5, 0.0)?;
        let bias_gpu = bias.to_device(device)?;
        for dtype in DTYPES {
            let (x_ref, x_gpu) = input(&x, dtype, device)?;
            let (w_ref, w_gpu) = input(&w, dtype, device)?;
            let layer = Conv2d::new(w_ref, Some(bias.clone()), config)?;
            let mut reference = layer.forward(&x_ref)?;
            let mut residual_gpu = None;
            if with_residual {
                let residual = random(reference.dims(), seed + 3, 1.0, 0.0)?;
                let (residual_ref, residual_on_gpu) = input(&residual, dtype, device)?;
                reference = (reference + residual_ref)?;
                residual_gpu = Some(residual_on_gpu);
            }
            let kernels: &[ConvKernel] = if dtype == DType::F32 {
                &[ConvKernel::Simt]
            } else {
                &[ConvKernel::Simt, ConvKernel::TensorCores]
            };
            for &kernel in kernels {
                let got = conv2d_with(
                    kernel,
                    &x_gpu,
                    &w_gpu,
                    Some(&bias_gpu),
                    residual_gpu.as_ref(),
                    &config,
                )?;
                let name = format!(
                    "conv2d {kernel:?} {n}x{c}x{hgt}x{wid} -> {o} k{k} s{stride} p{padding} \
                     d{dilation}{}",
                    if with_residual { " + residual" } else { "" }
                );
                results.push(compare(name, dtype, &got, &reference)?);
            }
        }
    }
    Ok(())
}

fn group_norm_checks(device: &Device, results: &mut Vec<CheckResult>) -> Result<()> {
    // (shape, groups, eps, offset of the values): odd planes, SD's 320 channels at 64x64, a
    // VAE-like 128 channels at 128x128 (65536 values a group, 8 statistics chunks) off zero,
    // a 3-D input, one value per group.
    let cases: [(&[usize], usize, f64, f32); 5] = [
        (&[2, 64, 17, 19], 32, 1e-5, 0.0),
        (&[1, 320, 64, 64], 32, 1e-5, 0.0),
        (&[1, 128, 128, 128], 32, 1e-6, 3.0),
        (&[2, 6, 5], 3, 1e-5, 0.5),
        (&[1, 32, 1, 1], 32, 1e-5, 0.0),
    ];
    for (seed, &(shape, groups, eps, offset)) in cases.iter().enumerate() {
        let seed = 200 + seed as u64 * 3;
        let channels = shape[1];
        let x = random(shape, seed, 1.0, offset)?;
        let weight = random(&[channels], seed + 1, 0.5, 1.0)?;
        let bias = random(&[channels], seed + 2, 0.5, 0.0)?;
        let layer = GroupNorm::new(weight.clone(), bias.clone(), groups, eps)?;
        let (weight_gpu, bias_gpu) = (weight.to_device(device)?, bias.to_device(device)?);
        for dtype in DTYPES {
            let (x_ref, x_gpu) = input(&x, dtype, device)?;
            for silu in [false, true] {
                let reference = if silu {
                    layer.forward_silu(&x_ref)?
                } else {
                    layer.forward(&x_ref)?
                };
                let got = group_norm(&x_gpu, &weight_gpu, &bias_gpu, groups, eps, silu)?;
                let name = format!(
                    "group norm{} {shape:?} groups {groups}",
                    if silu { " + silu" } else { "" }
                );
                results.push(compare(name, dtype, &got, &reference)?);
            }
        }
    }
    Ok(())
}

fn geglu_checks(device: &Device, results: &mut Vec<CheckResult>) -> Result<()> {
    // SD1.5's 640-wide feed-forward over 77 tokens, SD's 1280-wide one over 4096, odd widths.
    let shapes: [&[usize]; 4] = [&[2, 77, 2 * 640], &[1, 4096, 2 * 1280], &[3, 10], &[7, 2]];
    for (seed, shape) in shapes.iter().enumerate() {
        let x = random(shape, 300 + seed as u64, 3.0, 0.0)?;
        for dtype in DTYPES {
            let (x_ref, x_gpu) = input(&x, dtype, device)?;
            let reference = nn::geglu(&x_ref, &KernelOptions::default())?;
            let got = geglu(&x_gpu)?;
            results.push(compare(
                format!("geglu {shape:?}"),
                dtype,
                &got,
                &reference,
            )?);
        }
    }
    Ok(())
}

/// The layers with `SDRS_GPU_KERNELS=ours` on the device (the wiring of nn.rs and the
/// attention to the kernels above), f16 as the GPU pipelines run.
fn layer_checks(device: &Device, results: &mut Vec<CheckResult>) -> Result<()> {
    let dtype = DType::F16;
    let ours = KernelOptions {
        gpu_kernels: GpuKernels::Ours,
        ..Default::default()
    };

    let q = random(&[1, 8, 256, 40], 400, 3.0, 0.0)?;
    let k = random(&[1, 8, 77, 40], 401, 3.0, 0.0)?;
    let (q_ref, q_gpu) = input(&q, dtype, device)?;
    let (k_ref, k_gpu) = input(&k, dtype, device)?;
    let scale = 1.0 / 40f64.sqrt();
    let reference = attention(&q_ref, &k_ref, &k_ref, scale, &KernelOptions::default())?;
    let got = attention(&q_gpu, &k_gpu, &k_gpu, scale, &ours)?;
    results.push(compare(
        "layer: attention::attention".into(),
        dtype,
        &got,
        &reference,
    )?);

    let config = Conv2dConfig {
        padding: 1,
        stride: 1,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    let x = random(&[1, 32, 19, 21], 410, 1.0, 0.0)?;
    let w = random(&[48, 32, 3, 3], 411, 0.06, 0.0)?;
    let b = random(&[48], 412, 0.5, 0.0)?;
    let residual = random(&[1, 48, 19, 21], 413, 1.0, 0.0)?;
    let (x_ref, x_gpu) = input(&x, dtype, device)?;
    let (w_ref, w_gpu) = input(&w, dtype, device)?;
    let (b_ref, b_gpu) = input(&b, dtype, device)?;
    let (r_ref, r_gpu) = input(&residual, dtype, device)?;
    let reference = (Conv2d::new(w_ref, Some(b_ref), config)?.forward(&x_ref)? + r_ref)?;
    let layer = Conv2d::new(w_gpu, Some(b_gpu), config)?.with_options(ours);
    let got = layer.forward_add(&x_gpu, &r_gpu)?;
    results.push(compare(
        "layer: Conv2d::forward_add".into(),
        dtype,
        &got,
        &reference,
    )?);

    let x = random(&[2, 64, 16, 16], 420, 1.0, 0.2)?;
    let weight = random(&[64], 421, 0.5, 1.0)?;
    let bias = random(&[64], 422, 0.5, 0.0)?;
    let (x_ref, x_gpu) = input(&x, dtype, device)?;
    let reference = GroupNorm::new(weight.clone(), bias.clone(), 32, 1e-5)?.forward_silu(&x_ref)?;
    let layer = GroupNorm::new(weight.to_device(device)?, bias.to_device(device)?, 32, 1e-5)?
        .with_options(ours);
    let got = layer.forward_silu(&x_gpu)?;
    results.push(compare(
        "layer: GroupNorm::forward_silu".into(),
        dtype,
        &got,
        &reference,
    )?);

    let x = random(&[2, 77, 2 * 320], 430, 3.0, 0.0)?;
    let (x_ref, x_gpu) = input(&x, dtype, device)?;
    let reference = nn::geglu(&x_ref, &KernelOptions::default())?;
    let got = nn::geglu(&x_gpu, &ours)?;
    results.push(compare("layer: nn::geglu".into(), dtype, &got, &reference)?);
    Ok(())
}
