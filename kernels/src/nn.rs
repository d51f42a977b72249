//! `Linear` and `Conv2d` layers that read the same checkpoint keys as candle-nn's (`weight`,
//! `bias`) and run on our kernels on the CPU (f32, bf16, f16 with f32 accumulation, the bias
//! fused in as the GEMM's starting value); on other devices they call candle's own operations.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
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

/// Runs `$body` with `$x` bound to the contiguous slice of a CPU storage in f32, bf16 or f16.
macro_rules! with_slice {
    ($op:expr, ($s:expr, $l:expr), |$x:ident| $body:expr) => {{
        match $s {
            CpuStorage::F32(a) => {
                let $x = contiguous(a, $l, $op)?;
                $body
            }
            CpuStorage::BF16(a) => {
                let $x = contiguous(a, $l, $op)?;
                $body
            }
            CpuStorage::F16(a) => {
                let $x = contiguous(a, $l, $op)?;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {:?}", $op, other.dtype()),
        }
    }};
}

/// Runs `$body` with `$x` and `$w` bound to the contiguous slices of two CPU storages of any mix
/// of f32, bf16 and f16 (activations may stay in f32 while the weights are half precision).
macro_rules! with_slices {
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), |$x:ident, $w:ident| $body:expr) => {{
        use CpuStorage::{BF16, F16, F32};
        macro_rules! arm {
            ($a:expr, $b:expr) => {{
                let $x = contiguous($a, $l1, $op)?;
                let $w = contiguous($b, $l2, $op)?;
                $body
            }};
        }
        match ($s1, $s2) {
            (F32(a), F32(b)) => arm!(a, b),
            (F32(a), BF16(b)) => arm!(a, b),
            (F32(a), F16(b)) => arm!(a, b),
            (BF16(a), F32(b)) => arm!(a, b),
            (BF16(a), BF16(b)) => arm!(a, b),
            (BF16(a), F16(b)) => arm!(a, b),
            (F16(a), F32(b)) => arm!(a, b),
            (F16(a), BF16(b)) => arm!(a, b),
            (F16(a), F16(b)) => arm!(a, b),
            _ => candle_core::bail!(
                "{}: input {:?} and weight {:?} must be f32, bf16 or f16",
                $op,
                $s1.dtype(),
                $s2.dtype()
            ),
        }
    }};
}

/// Whether our CPU kernels take this tensor: on the CPU, in f32, bf16 or f16 (others go to
/// candle's own operations).
pub(crate) fn on_cpu_kernels(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Whether our CPU kernels take this input and weight.
fn on_our_kernels(xs: &Tensor, weight: &Tensor) -> bool {
    on_cpu_kernels(xs) && matches!(weight.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// candle's own layer for other devices, in the weight's dtype, the result in the input's.
fn on_candle(
    xs: &Tensor,
    weight: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if xs.dtype() == weight.dtype() {
        f(xs)
    } else {
        f(&xs.to_dtype(weight.dtype())?)?.to_dtype(xs.dtype())
    }
}

/// Whether the weight is bf16, which selects the bf16 dot-product kernels (the activations are
/// rounded to bf16 as they are packed, as PyTorch's bf16 autocast does).
fn is_bf16<W: 'static>() -> bool {
    std::any::TypeId::of::<W>() == std::any::TypeId::of::<bf16>()
}

/// `x [.., K] · wᵀ` for `w [N, K]`, the output starting from `bias [N]` when there is one.
struct LinearOp {
    bias: Option<Vec<f32>>,
}

impl LinearOp {
    fn run<X: Element, W: Element>(
        &self,
        x: &[X],
        w: &[W],
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut c = match &self.bias {
            Some(bias) => bias.repeat(m),
            None => vec![0f32; m * n],
        };
        let level = cpu::level();
        let (a, b) = (Strided::row_major(x, m, k), Strided::row_major(w, n, k).t());
        if is_bf16::<W>() {
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
        let out = with_slices!("sdrs-linear", (s1, l1), (s2, l2), |x, w| self
            .run(x, w, m, k, n));
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
            return on_candle(xs, self.weight(), |xs| self.inner.forward(xs));
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
    /// The convolution of `x` by `w`, plus the bias, plus `residual` (the output's shape, f32)
    /// when given, added into the output in place: a resnet's skip sum costs no extra tensor.
    fn run<X: Element, W: Element>(
        &self,
        x: &[X],
        w: &[W],
        images: usize,
        g: ConvGeometry,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let Some((out_h, out_w)) = g.output_size() else {
            return Vec::new();
        };
        let plane = out_h * out_w;
        let mut out = vec![0f32; images * g.out_channels * plane];
        if let Some(bias) = &self.bias {
            for (chunk, &value) in out.chunks_mut(plane).zip(bias.iter().cycle()) {
                chunk.fill(value);
            }
        }
        conv2d_kernel(cpu::level(), g, images, x, w, &mut out, is_bf16::<W>());
        if let Some(residual) = residual {
            // Added last, in place: the same sums, in the same order, as `conv + residual`.
            out.iter_mut().zip(residual).for_each(|(o, r)| *o += r);
        }
        out
    }

    /// [`Self::run`] on the storages of the input and the weight, the result in the input's dtype.
    fn convolve(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        g: ConvGeometry,
        shape: Shape,
        residual: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let images = shape.dims()[0];
        let out = with_slices!("sdrs-conv2d", (s1, l1), (s2, l2), |x, w| self
            .run(x, w, images, g, residual));
        Ok((storage_from_f32(out, s1.dtype())?, shape))
    }

    /// The geometry of input `l1` convolved by weight `l2`, and the output shape.
    fn geometry(&self, l1: &Layout, l2: &Layout) -> Result<(ConvGeometry, Shape)> {
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
        Ok((g, Shape::from((images, out_channels, out_h, out_w))))
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
        let (g, shape) = self.geometry(l1, l2)?;
        self.convolve((s1, l1), (s2, l2), g, shape, None)
    }
}

/// The convolution with a residual added (third operand: f32, the output's shape).
impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sdrs-conv2d-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, shape) = self.geometry(l1, l2)?;
        if l3.shape() != &shape {
            candle_core::bail!(
                "sdrs-conv2d-add: residual {:?} is not the output's shape {shape:?}",
                l3.shape()
            );
        }
        let CpuStorage::F32(residual) = s3 else {
            candle_core::bail!(
                "sdrs-conv2d-add: the residual must be f32, got {:?}",
                s3.dtype()
            );
        };
        let residual = contiguous(residual, l3, "sdrs-conv2d-add")?;
        self.convolve((s1, l1), (s2, l2), g, shape, Some(residual))
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

    fn op(&self) -> Conv2dOp {
        Conv2dOp {
            bias: self.bias_f32.clone(),
            config: *self.config(),
        }
    }

    /// `self.forward(xs) + residual` with no tensor for the sum: the residual (an f32 tensor of
    /// the output's shape, as a resnet's skip connection) is added into the convolution's output
    /// as it is finished, bit for bit the plain sum; other dtypes and devices take the plain sum.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let fused = on_our_kernels(xs, self.weight())
            && self.config().groups == 1
            && xs.dtype() == DType::F32
            && residual.dtype() == DType::F32
            && residual.device().is_cpu();
        if !fused {
            return self.forward(xs)? + residual;
        }
        xs.contiguous()?
            .apply_op3_no_bwd(self.weight(), &residual.contiguous()?, &self.op())
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !on_our_kernels(xs, self.weight()) || self.config().groups != 1 {
            return on_candle(xs, self.weight(), |xs| self.inner.forward(xs));
        }
        xs.contiguous()?.apply_op2_no_bwd(self.weight(), &self.op())
    }
}

/// The `[out, in / groups, k, k]` weight of a convolution under `vb`.
fn conv_weight(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: &Conv2dConfig,
    vb: &VarBuilder,
) -> Result<Tensor> {
    let groups = config.groups.max(1);
    vb.get(
        (out_channels, in_channels / groups, kernel_size, kernel_size),
        "weight",
    )
}

/// candle-nn's `conv2d`: weight `[out, in / groups, k, k]` and bias `[out]` under `vb`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = conv_weight(in_channels, out_channels, kernel_size, &config, &vb)?;
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
    let weight = conv_weight(in_channels, out_channels, kernel_size, &config, &vb)?;
    Conv2d::new(weight, None, config)
}

/// A linear layer without bias (candle-nn's `linear_no_bias`).
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}

/// `nn.GroupNorm` with its statistics, weight and bias in f32 whatever the input's dtype (torch's
/// half-precision kernels accumulate in f32 too); the result is in the input's dtype.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels cannot form {groups} groups");
        }
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
            groups,
            eps,
        })
    }
}

impl GroupNorm {
    /// The normalisation followed by SiLU, in one pass over the data on the CPU (what every
    /// resnet and the output heads do).
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        if dims.len() < 2 || dims[1] != self.weight.elem_count() {
            candle_core::bail!(
                "GroupNorm: input {:?} does not have {} channels in dim 1",
                xs.shape(),
                self.weight.elem_count()
            );
        }
        if on_cpu_kernels(xs) {
            let op = GroupNormOp {
                weight: self.weight.to_vec1::<f32>()?,
                bias: self.bias.to_vec1::<f32>()?,
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return xs.contiguous()?.apply_op1_no_bwd(&op);
        }
        let per_group = xs.elem_count() / dims[0] / self.groups;
        let x = xs
            .reshape((dims[0], self.groups, per_group))?
            .to_dtype(DType::F32)?;
        let mean = (x.sum_keepdim(2)? / per_group as f64)?;
        let x = x.broadcast_sub(&mean)?;
        let var = (x.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut affine = vec![1; dims.len()];
        affine[1] = dims[1];
        let y = x
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(affine.clone())?)?
            .broadcast_add(&self.bias.reshape(affine)?)?;
        let y = if silu { y.silu()? } else { y };
        y.to_dtype(xs.dtype())
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }
}

/// GroupNorm (+ SiLU) on `[N, C, ...]`: statistics per (image, group) in f64, then one pass
/// that normalises, applies the affine and the activation, and writes the input's dtype.
struct GroupNormOp {
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    fn run<T: Element>(&self, x: &[T], images: usize, channels: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let group_channels = channels / self.groups;
        let spatial = x.len() / (images * channels).max(1);
        let chunk = group_channels * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk.max(1))
            .zip(x.par_chunks(chunk.max(1)))
            .enumerate()
            .for_each(|(index, (dst, src))| {
                let (mut sum, mut sq) = (0f64, 0f64);
                for v in src {
                    let v = v.to_f32() as f64;
                    sum += v;
                    sq += v * v;
                }
                let n = src.len().max(1) as f64;
                let mean = sum / n;
                let var = (sq / n - mean * mean).max(0.0);
                let rstd = 1.0 / (var + self.eps).sqrt();
                let group = index % self.groups;
                for (c, (d_row, s_row)) in dst
                    .chunks_mut(spatial.max(1))
                    .zip(src.chunks(spatial.max(1)))
                    .enumerate()
                {
                    let channel = group * group_channels + c;
                    let scale = (rstd as f32) * self.weight[channel];
                    let (mean, shift) = (mean as f32, self.bias[channel]);
                    for (d, s) in d_row.iter_mut().zip(s_row) {
                        // Centre first: folding the mean into the shift loses digits when the
                        // variance is tiny and `scale` huge.
                        let y = (s.to_f32() - mean) * scale + shift;
                        *d = if self.silu { silu(y) } else { y };
                    }
                }
            });
        out
    }
}

/// `y * sigmoid(y)`, with the exponential of a non-positive argument only (no overflow).
#[inline(always)]
fn silu(y: f32) -> f32 {
    let e = crate::attention::exp_neg(-y.abs());
    let sigmoid = if y >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    y * sigmoid
}

impl candle_core::CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "sdrs-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (images, channels) = (layout.dims()[0], layout.dims()[1]);
        let op = "sdrs-group-norm";
        let out = with_slice!(op, (storage, layout), |x| self.run(x, images, channels));
        Ok((
            storage_from_f32(out, storage.dtype())?,
            layout.shape().clone(),
        ))
    }
}

/// candle-nn's `group_norm`: `weight` and `bias` of `channels` under `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    GroupNorm::new(weight, bias, groups, eps)
}

/// `nn.LayerNorm` over the last dimension, computed in f32 like [`GroupNorm`].
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = xs.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)?
            .to_dtype(xs.dtype())
    }
}

/// candle-nn's `layer_norm`: `weight` and `bias` of `dim` under `vb`.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get(dim, "weight")?;
    let bias = vb.get(dim, "bias")?;
    LayerNorm::new(weight, bias, eps)
}

/// GEGLU's gating (Shazeer 2020): `[..., 2n]` -> `[..., n]`, `value * gelu(gate)` with `value`
/// the first half of the last dimension and `gate` the second, GELU in torch's exact erf form.
/// One pass over the data on the CPU (no split copies, a vectorisable erf); candle's ops elsewhere.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let last = projected.dim(candle_core::D::Minus1)?;
    if last % 2 != 0 {
        candle_core::bail!(
            "geglu: the last dimension of {:?} must be even (value and gate halves)",
            projected.shape()
        );
    }
    let half = last / 2;
    if on_cpu_kernels(projected) {
        return projected.contiguous()?.apply_op1_no_bwd(&GegluOp);
    }
    let value = projected.narrow(candle_core::D::Minus1, 0, half)?;
    let gate = projected.narrow(candle_core::D::Minus1, half, half)?;
    value * gate.gelu_erf()?
}

struct GegluOp;

impl GegluOp {
    fn run<T: Element>(x: &[T], last: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let half = last / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(half.max(1))
            .zip(x.par_chunks(last.max(1)))
            .for_each(|(dst, src)| {
                let (value, gate) = src.split_at(half);
                for ((d, v), g) in dst.iter_mut().zip(value).zip(gate) {
                    *d = v.to_f32() * gelu_erf(g.to_f32());
                }
            });
        out
    }
}

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))`.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)` to within 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free so that loops over it
/// vectorise (the library `erf` is a scalar call).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * crate::attention::exp_neg(-z * z);
    y.copysign(x)
}

impl candle_core::CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "sdrs-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let last = dims.last().copied().unwrap_or(0);
        let op = "sdrs-geglu";
        let out = with_slice!(op, (storage, layout), |x| Self::run(x, last));
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last /= 2;
        }
        Ok((storage_from_f32(out, storage.dtype())?, Shape::from(shape)))
    }
}
