//! `Linear` and `Conv2d` layers that read the same checkpoint keys as candle-nn's (`weight`,
//! `bias`) and run on our kernels on the CPU (f32, bf16, f16 with f32 accumulation, the bias
//! fused in as the GEMM's starting value); on other devices they call candle's own operations.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use half::{bf16, f16};

use crate::conv::{conv2d as conv2d_kernel, ConvGeometry};
use crate::cpu;
use crate::gemm::{gemm, gemm_bf16, Element, Strided};

/// The contiguous elements a layout covers, or an error naming the operation.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous, got {layout:?}"),
    }
}

/// The f32 accumulator converted to the operands' dtype.
fn storage_from_f32(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        other => candle_core::bail!("sdrs kernels: unsupported dtype {other:?}"),
    })
}

/// Whether our CPU kernels take this tensor (others go to candle).
fn on_our_kernels(xs: &Tensor, weight: &Tensor) -> bool {
    xs.device().is_cpu()
        && xs.dtype() == weight.dtype()
        && matches!(xs.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `x [.., K] · wᵀ` for `w [N, K]`, the output starting from `bias [N]` when there is one.
struct LinearOp {
    bias: Option<Vec<f32>>,
}

impl LinearOp {
    fn run<T: Element>(&self, x: &[T], w: &[T], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = match &self.bias {
            Some(bias) => bias.repeat(m),
            None => vec![0f32; m * n],
        };
        let level = cpu::level();
        let (a, b) = (Strided::row_major(x, m, k), Strided::row_major(w, n, k).t());
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<bf16>() {
            gemm_bf16(level, &a, &b, &mut c, n);
        } else {
            gemm(level, &a, &b, &mut c, n);
        }
        c
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "sdrs-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let (n, k) = l2.shape().dims2()?;
        let Some((&k_x, batch)) = dims.split_last() else {
            candle_core::bail!("sdrs-linear: a scalar input has no features");
        };
        if k_x != k {
            candle_core::bail!(
                "sdrs-linear: input {:?} does not match weight {:?} (last dims differ)",
                l1.shape(),
                l2.shape()
            );
        }
        let m: usize = batch.iter().product();
        let mut out_dims = batch.to_vec();
        out_dims.push(n);
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => self.run(
                contiguous(x, l1, "sdrs-linear")?,
                contiguous(w, l2, "sdrs-linear")?,
                m,
                k,
                n,
            ),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => self.run(
                contiguous(x, l1, "sdrs-linear")?,
                contiguous(w, l2, "sdrs-linear")?,
                m,
                k,
                n,
            ),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => self.run(
                contiguous(x, l1, "sdrs-linear")?,
                contiguous(w, l2, "sdrs-linear")?,
                m,
                k,
                n,
            ),
            _ => candle_core::bail!(
                "sdrs-linear: input {:?} and weight {:?} must share an f32/bf16/f16 dtype",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((storage_from_f32(out, s1.dtype())?, Shape::from(out_dims)))
    }
}

/// The bias as f32 values for the kernels' epilogue.
fn bias_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()
}

/// A linear layer, `y = x · Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The bias in f32, for the CPU kernels' epilogue.
    bias_f32: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let bias_f32 = bias_values(bias.as_ref())?;
        Ok(Self {
            inner: candle_nn::Linear::new(weight, bias),
            bias_f32,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !on_our_kernels(xs, self.weight()) {
            return self.inner.forward(xs);
        }
        let op = LinearOp {
            bias: self.bias_f32.clone(),
        };
        xs.contiguous()?.apply_op2_no_bwd(self.weight(), &op)
    }
}

/// candle-nn's `linear`: weight `[out, in]` and bias `[out]` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// A linear layer with or without bias.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Linear::new(weight, bias)
}

/// A convolution on `[N, C, H, W]` by our kernels, the output starting from the bias.
struct Conv2dOp {
    bias: Option<Vec<f32>>,
    config: Conv2dConfig,
}

impl Conv2dOp {
    fn run<T: Element>(&self, x: &[T], w: &[T], images: usize, g: ConvGeometry) -> Vec<f32> {
        let Some((out_h, out_w)) = g.output_size() else {
            return Vec::new();
        };
        let plane = out_h * out_w;
        let mut out = vec![0f32; images * g.out_channels * plane];
        if let Some(bias) = &self.bias {
            for (chunk, value) in out.chunks_mut(plane).zip(bias.iter().cycle()) {
                chunk.fill(*value);
            }
        }
        let bf16_dot = std::any::TypeId::of::<T>() == std::any::TypeId::of::<bf16>();
        conv2d_kernel(cpu::level(), g, images, x, w, &mut out, bf16_dot);
        out
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sdrs-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (images, channels, height, width) = l1.shape().dims4()?;
        let (out_channels, c_w, kernel_h, kernel_w) = l2.shape().dims4()?;
        if c_w != channels {
            candle_core::bail!(
                "sdrs-conv2d: input {:?} has {channels} channels, weight {:?} expects {c_w}",
                l1.shape(),
                l2.shape()
            );
        }
        let g = ConvGeometry {
            channels,
            out_channels,
            height,
            width,
            kernel_h,
            kernel_w,
            stride: self.config.stride,
            padding: self.config.padding,
            dilation: self.config.dilation,
        };
        let Some((out_h, out_w)) = g.output_size() else {
            candle_core::bail!(
                "sdrs-conv2d: kernel {kernel_h}x{kernel_w} does not fit input {:?} with padding {}",
                l1.shape(),
                self.config.padding
            );
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => self.run(
                contiguous(x, l1, "sdrs-conv2d")?,
                contiguous(w, l2, "sdrs-conv2d")?,
                images,
                g,
            ),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => self.run(
                contiguous(x, l1, "sdrs-conv2d")?,
                contiguous(w, l2, "sdrs-conv2d")?,
                images,
                g,
            ),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => self.run(
                contiguous(x, l1, "sdrs-conv2d")?,
                contiguous(w, l2, "sdrs-conv2d")?,
                images,
                g,
            ),
            _ => candle_core::bail!(
                "sdrs-conv2d: input {:?} and weight {:?} must share an f32/bf16/f16 dtype",
                s1.dtype(),
                s2.dtype()
            ),
        };
        let shape = Shape::from((images, out_channels, out_h, out_w));
        Ok((storage_from_f32(out, s1.dtype())?, shape))
    }
}

/// A 2-D convolution layer.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    bias_f32: Option<Vec<f32>>,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Result<Self> {
        let bias_f32 = bias_values(bias.as_ref())?;
        Ok(Self {
            inner: candle_nn::Conv2d::new(weight, bias, config),
            bias_f32,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    pub fn config(&self) -> &Conv2dConfig {
        self.inner.config()
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !on_our_kernels(xs, self.weight()) || self.config().groups != 1 {
            return self.inner.forward(xs);
        }
        let op = Conv2dOp {
            bias: self.bias_f32.clone(),
            config: *self.config(),
        };
        xs.contiguous()?.apply_op2_no_bwd(self.weight(), &op)
    }
}

/// candle-nn's `conv2d`: weight `[out, in / groups, k, k]` and bias `[out]` under `vb`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let groups = config.groups.max(1);
    let weight = vb.get(
        (out_channels, in_channels / groups, kernel_size, kernel_size),
        "weight",
    )?;
    let bias = vb.get(out_channels, "bias")?;
    Conv2d::new(weight, Some(bias), config)
}

/// A convolution without bias.
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let groups = config.groups.max(1);
    let weight = vb.get(
        (out_channels, in_channels / groups, kernel_size, kernel_size),
        "weight",
    )?;
    Conv2d::new(weight, None, config)
}

/// A linear layer without bias (candle-nn's `linear_no_bias`).
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}
