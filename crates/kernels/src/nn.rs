//! `Linear`, `Conv2d`, `GroupNorm`, `LayerNorm` and GEGLU, reading the same checkpoint keys as
//! candle-nn's (`weight`, `bias`). Each call asks the layer's [`KernelOptions`] where it runs
//! ([`Route`]): our CPU kernels (f32, bf16, f16 with f32 accumulation, the bias fused in as the
//! GEMM's starting value, quantized weights decoded while packing), our CUDA kernels (conv2d,
//! GroupNorm + SiLU and GEGLU; linear layers stay on cuBLAS), or candle's own operations.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor,
};
use candle_nn::Conv2dConfig;
use half::{bf16, f16};

use crate::conv::{conv2d as conv2d_kernel, ConvGeometry};
use crate::cpu::Level;
use crate::dispatch::{KernelOptions, Route};
use crate::gemm::{gemm, gemm_bf16, Element, Operand, Strided};
use crate::math::{gelu_erf, silu};
use crate::var_builder::VarBuilder;
use crate::weight::{QuantizedMatrix, QuantizedRows, Weight};

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

/// candle's layer `f` in the weight's dtype `weight`, the result in the input's.
fn on_candle(xs: &Tensor, weight: DType, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if xs.dtype() == weight {
        f(xs)
    } else {
        f(&xs.to_dtype(weight)?)?.to_dtype(xs.dtype())
    }
}

/// `c += a · b` with the kernels of `level`, in bf16 dot products when `bf16_dots`.
fn product(
    level: Level,
    bf16_dots: bool,
    a: &dyn Operand,
    b: &dyn Operand,
    c: &mut [f32],
    ldc: usize,
) {
    if bf16_dots {
        gemm_bf16(level, a, b, c, ldc);
    } else {
        gemm(level, a, b, c, ldc);
    }
}

/// The output of a product started from `bias` (one value per output feature) for `m` rows.
fn started_from(bias: Option<&[f32]>, m: usize, n: usize) -> Vec<f32> {
    match bias {
        Some(bias) => filled(m, n, |_, j| bias[j]),
        None => filled(m, n, |_, _| 0.0),
    }
}

/// A `rows x cols` row-major vector whose `(r, c)` value is `value(r, c)`, each value written
/// once, by all threads: the start (zeros or a bias) of an output a product then adds into.
fn filled(rows: usize, cols: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let total = rows * cols;
    let mut out = Vec::with_capacity(total);
    out.spare_capacity_mut()[..total]
        .par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            for (c, x) in row.iter_mut().enumerate() {
                x.write(value(r, c));
            }
        });
    // SAFETY: the loop above wrote each of the first `total` values (`rows` chunks of `cols`).
    unsafe { out.set_len(total) };
    out
}

/// `x [.., K] · wᵀ` for `w [N, K]`, the output starting from `bias [N]` when there is one.
struct LinearOp<'a> {
    bias: Option<&'a [f32]>,
    level: Level,
    bf16_dots: bool,
}

impl LinearOp<'_> {
    fn run<X: Element, W: Element>(
        &self,
        x: &[X],
        w: &[W],
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut c = started_from(self.bias, m, n);
        let (a, b) = (Strided::row_major(x, m, k), Strided::row_major(w, n, k).t());
        product(self.level, self.bf16_dots, &a, &b, &mut c, n);
        c
    }

    /// The product with a quantized weight as the GEMM's A operand (its rows are decoded in
    /// long runs while A is packed): `cᵀ = w · xᵀ`, then transposed into place.
    fn run_quantized<X: Element>(
        &self,
        w: &dyn QuantizedMatrix,
        x: &[X],
        m: usize,
        k: usize,
    ) -> Vec<f32> {
        let n = w.dims().0;
        let mut c_t = match self.bias {
            Some(bias) => filled(n, m, |r, _| bias[r]),
            None => filled(n, m, |_, _| 0.0),
        };
        let b = Strided::row_major(x, m, k).t();
        product(
            self.level,
            self.bf16_dots,
            &QuantizedRows(w),
            &b,
            &mut c_t,
            m,
        );
        let mut c = vec![0f32; m * n];
        for (j, row) in c_t.chunks(m.max(1)).enumerate() {
            for (i, v) in row.iter().enumerate() {
                c[i * n + j] = *v;
            }
        }
        c
    }

    /// The matrix sizes of input `l1` times a `[n, k]` weight, and the output shape.
    fn sizes(l1: &Layout, (n, k): (usize, usize)) -> Result<(usize, Shape)> {
        let dims = l1.dims();
        let Some((&k_x, batch)) = dims.split_last() else {
            candle_core::bail!("sdrs-linear: a scalar input has no features");
        };
        if k_x != k {
            candle_core::bail!(
                "sdrs-linear: input {:?} does not match weight [{n}, {k}] (last dims differ)",
                l1.shape()
            );
        }
        let mut out_dims = batch.to_vec();
        out_dims.push(n);
        Ok((batch.iter().product(), Shape::from(out_dims)))
    }
}

impl CustomOp2 for LinearOp<'_> {
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
        let (n, k) = l2.shape().dims2()?;
        let (m, shape) = Self::sizes(l1, (n, k))?;
        let out = with_slices!("sdrs-linear", (s1, l1), (s2, l2), |x, w| self
            .run(x, w, m, k, n));
        Ok((storage_from_f32(out, s1.dtype())?, shape))
    }
}

/// [`LinearOp`] with a quantized weight, decoded while the GEMM packs it: one operand, the input.
struct QuantizedLinearOp<'a> {
    linear: LinearOp<'a>,
    weight: &'a dyn QuantizedMatrix,
}

impl CustomOp1 for QuantizedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "sdrs-linear-quantized"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.weight.dims();
        let (m, shape) = LinearOp::sizes(l1, (n, k))?;
        let out = with_slice!("sdrs-linear-quantized", (s1, l1), |x| self
            .linear
            .run_quantized(self.weight, x, m, k));
        Ok((storage_from_f32(out, s1.dtype())?, shape))
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
    weight: Weight,
    bias: Option<Tensor>,
    /// The bias in f32, for the CPU kernels' epilogue.
    bias_f32: Option<Vec<f32>>,
    options: KernelOptions,
}

impl Linear {
    /// A layer of `weight` (`[out, in]`, dense or quantized) with the default kernel options.
    pub fn new(weight: impl Into<Weight>, bias: Option<Tensor>) -> Result<Self> {
        let weight = weight.into();
        if weight.shape().rank() != 2 {
            candle_core::bail!(
                "linear: the weight must be [out, in], got {:?}",
                weight.shape()
            );
        }
        Ok(Self {
            bias_f32: bias_values(bias.as_ref())?,
            weight,
            bias,
            options: KernelOptions::default(),
        })
    }

    /// The same layer computing with `options`.
    pub fn with_options(mut self, options: KernelOptions) -> Self {
        self.options = options;
        self
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn options(&self) -> KernelOptions {
        self.options
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Route::Cpu { level, bf16_dots } = self.options.route_product(xs, self.weight.dtype())
        else {
            let weight = self.weight.dense(xs.device())?;
            let layer = candle_nn::Linear::new(weight, self.bias.clone());
            return on_candle(xs, self.weight.dtype(), |xs| layer.forward(xs));
        };
        let linear = LinearOp {
            bias: self.bias_f32.as_deref(),
            level,
            bf16_dots,
        };
        match &self.weight {
            Weight::Dense(weight) => xs.contiguous()?.apply_op2_no_bwd(weight, &linear),
            Weight::Quantized { matrix, .. } => {
                let op = QuantizedLinearOp {
                    linear,
                    weight: matrix.as_ref(),
                };
                xs.contiguous()?.apply_op1_no_bwd(&op)
            }
        }
    }
}

/// candle-nn's `linear`: weight `[out, in]` and bias `[out]` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// A linear layer with or without bias, computing with `vb`'s kernel options.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_weight((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias)?.with_options(vb.options()))
}

/// A convolution on `[N, C, H, W]` by our kernels, the output starting from the bias. The ops it
/// implements: `x ⊛ w` ([`CustomOp2`]) and `x ⊛ w + residual` ([`CustomOp3`]) for a dense
/// weight; [`QuantizedConv2dOp`] does the same two with the weight inside the op.
struct Conv2dOp<'a> {
    bias: Option<&'a [f32]>,
    config: Conv2dConfig,
    level: Level,
    bf16_dots: bool,
}

impl Conv2dOp<'_> {
    /// The convolution of `x` by `w` (`O x C*kh*kw`), plus the bias, plus `residual` (the
    /// output's shape, f32) when given, added into the output in place: a resnet's skip sum
    /// costs no extra tensor.
    fn run<X: Element>(
        &self,
        x: &[X],
        w: &dyn Operand,
        images: usize,
        g: ConvGeometry,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let Some((out_h, out_w)) = g.output_size() else {
            return Vec::new();
        };
        let plane = out_h * out_w;
        let mut out = match self.bias {
            Some(bias) => filled(images * g.out_channels, plane, |r, _| {
                bias[r % g.out_channels]
            }),
            None => filled(images * g.out_channels, plane, |_, _| 0.0),
        };
        conv2d_kernel(self.level, g, images, x, w, &mut out, self.bf16_dots);
        if let Some(residual) = residual {
            use rayon::prelude::*;
            // Added last, in place: the same sums, in the same order, as `conv + residual`.
            out.par_chunks_mut(plane.max(1))
                .zip(residual.par_chunks(plane.max(1)))
                .for_each(|(o, r)| o.iter_mut().zip(r).for_each(|(o, r)| *o += r));
        }
        out
    }

    /// [`Self::run`] with a dense weight storage, the result in the input's dtype.
    fn convolve(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        residual: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, shape) = self.geometry(l1, l2.shape().dims4()?)?;
        let images = shape.dims()[0];
        let k = g.channels * g.kernel_h * g.kernel_w;
        let out = with_slices!("sdrs-conv2d", (s1, l1), (s2, l2), |x, w| self.run(
            x,
            &Strided::row_major(w, g.out_channels, k),
            images,
            g,
            residual
        ));
        Ok((storage_from_f32(out, s1.dtype())?, shape))
    }

    /// The geometry of input `l1` convolved by a weight of `weight` dims, and the output shape.
    fn geometry(
        &self,
        l1: &Layout,
        weight: (usize, usize, usize, usize),
    ) -> Result<(ConvGeometry, Shape)> {
        let (images, channels, height, width) = l1.shape().dims4()?;
        let (out_channels, c_w, kernel_h, kernel_w) = weight;
        if c_w != channels {
            candle_core::bail!(
                "sdrs-conv2d: input {:?} has {channels} channels, weight {:?} expects {c_w}",
                l1.shape(),
                [out_channels, c_w, kernel_h, kernel_w]
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

/// The residual operand: f32 of the output's shape.
fn residual_slice<'a>(
    s3: &'a CpuStorage,
    l3: &Layout,
    shape: &Shape,
    op: &str,
) -> Result<&'a [f32]> {
    if l3.shape() != shape {
        candle_core::bail!(
            "{op}: residual {:?} is not the output's shape {shape:?}",
            l3.shape()
        );
    }
    let CpuStorage::F32(residual) = s3 else {
        candle_core::bail!("{op}: the residual must be f32, got {:?}", s3.dtype());
    };
    contiguous(residual, l3, op)
}

impl CustomOp2 for Conv2dOp<'_> {
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
        self.convolve((s1, l1), (s2, l2), None)
    }
}

/// The convolution with a residual added (third operand: f32, the output's shape).
impl CustomOp3 for Conv2dOp<'_> {
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
        let (_, shape) = self.geometry(l1, l2.shape().dims4()?)?;
        let residual = residual_slice(s3, l3, &shape, "sdrs-conv2d-add")?;
        self.convolve((s1, l1), (s2, l2), Some(residual))
    }
}

/// [`Conv2dOp`] with a quantized weight, decoded while the GEMM packs it: `x ⊛ w`
/// ([`CustomOp1`]) and `x ⊛ w + residual` ([`CustomOp2`]).
struct QuantizedConv2dOp<'a> {
    conv: Conv2dOp<'a>,
    weight: &'a dyn QuantizedMatrix,
    /// The layer shape of the weight, `[O, C, kh, kw]`.
    dims: (usize, usize, usize, usize),
}

impl QuantizedConv2dOp<'_> {
    fn convolve(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, shape) = self.conv.geometry(l1, self.dims)?;
        let residual = match residual {
            Some((s3, l3)) => Some(residual_slice(s3, l3, &shape, "sdrs-conv2d-add")?),
            None => None,
        };
        let images = shape.dims()[0];
        let w = QuantizedRows(self.weight);
        let out = with_slice!("sdrs-conv2d", (s1, l1), |x| self
            .conv
            .run(x, &w, images, g, residual));
        Ok((storage_from_f32(out, s1.dtype())?, shape))
    }
}

impl CustomOp1 for QuantizedConv2dOp<'_> {
    fn name(&self) -> &'static str {
        "sdrs-conv2d-quantized"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        self.convolve((s1, l1), None)
    }
}

impl CustomOp2 for QuantizedConv2dOp<'_> {
    fn name(&self) -> &'static str {
        "sdrs-conv2d-quantized-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.convolve((s1, l1), Some((s2, l2)))
    }
}

/// A 2-D convolution layer.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Weight,
    bias: Option<Tensor>,
    bias_f32: Option<Vec<f32>>,
    config: Conv2dConfig,
    options: KernelOptions,
}

impl Conv2d {
    /// A layer of `weight` (`[O, C / groups, kh, kw]`, dense or quantized) with the default
    /// kernel options.
    pub fn new(
        weight: impl Into<Weight>,
        bias: Option<Tensor>,
        config: Conv2dConfig,
    ) -> Result<Self> {
        let weight = weight.into();
        if weight.shape().rank() != 4 {
            candle_core::bail!(
                "conv2d: the weight must be [O, C, kh, kw], got {:?}",
                weight.shape()
            );
        }
        Ok(Self {
            bias_f32: bias_values(bias.as_ref())?,
            weight,
            bias,
            config,
            options: KernelOptions::default(),
        })
    }

    /// The same layer computing with `options`.
    pub fn with_options(mut self, options: KernelOptions) -> Self {
        self.options = options;
        self
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }

    /// Where a call on `xs` runs.
    fn route(&self, xs: &Tensor) -> Route {
        self.options
            .route_conv(xs, self.weight.dtype(), self.config.groups)
    }

    fn op(&self, level: Level, bf16_dots: bool) -> Conv2dOp<'_> {
        Conv2dOp {
            bias: self.bias_f32.as_deref(),
            config: self.config,
            level,
            bf16_dots,
        }
    }

    fn quantized_op<'a>(
        &'a self,
        matrix: &'a dyn QuantizedMatrix,
        conv: Conv2dOp<'a>,
    ) -> Result<QuantizedConv2dOp<'a>> {
        Ok(QuantizedConv2dOp {
            conv,
            weight: matrix,
            dims: self.weight.shape().dims4()?,
        })
    }

    /// candle's convolution (other devices, grouped convolutions).
    fn on_candle(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = self.weight.dense(xs.device())?;
        let layer = candle_nn::Conv2d::new(weight, self.bias.clone(), self.config);
        on_candle(xs, self.weight.dtype(), |xs| layer.forward(xs))
    }

    /// Our CUDA implicit GEMM ([`Route::Cuda`]) for a dense weight of the input's dtype, the
    /// residual (the output's shape and dtype) added in its epilogue; quantized weights and
    /// mixed dtypes take candle's convolution, a residual of another dtype or device a plain sum.
    #[cfg(feature = "cuda")]
    fn on_cuda(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let plain = |out: Tensor| match residual {
            Some(residual) => out + residual,
            None => Ok(out),
        };
        let Weight::Dense(weight) = &self.weight else {
            return plain(self.on_candle(xs)?);
        };
        if xs.dtype() != weight.dtype() {
            return plain(self.on_candle(xs)?);
        }
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        let fused =
            residual.filter(|r| r.dtype() == xs.dtype() && r.device().same_device(xs.device()));
        let out = crate::cuda::conv2d(xs, weight, bias.as_ref(), fused, &self.config)?;
        match (residual, fused) {
            (Some(residual), None) => out + residual,
            _ => Ok(out),
        }
    }

    /// `self.forward(xs) + residual` with no tensor for the sum: the residual (a tensor of the
    /// output's shape, as a resnet's skip connection) is added into the convolution's output as
    /// it is finished. On our CPU kernels (f32 residual), bit for bit the plain sum; on our CUDA
    /// kernels (a residual in the output's dtype), in the epilogue before the output is rounded;
    /// other dtypes and devices take the plain sum.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (level, bf16_dots) = match self.route(xs) {
            Route::Cpu { level, bf16_dots } => (level, bf16_dots),
            #[cfg(feature = "cuda")]
            Route::Cuda => return self.on_cuda(xs, Some(residual)),
            _ => return self.forward(xs)? + residual,
        };
        if xs.dtype() != DType::F32
            || residual.dtype() != DType::F32
            || !residual.device().same_device(xs.device())
        {
            return self.forward(xs)? + residual;
        }
        let (xs, residual) = (xs.contiguous()?, residual.contiguous()?);
        let op = self.op(level, bf16_dots);
        match &self.weight {
            Weight::Dense(weight) => xs.apply_op3_no_bwd(weight, &residual, &op),
            Weight::Quantized { matrix, .. } => {
                xs.apply_op2_no_bwd(&residual, &self.quantized_op(matrix.as_ref(), op)?)
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (level, bf16_dots) = match self.route(xs) {
            Route::Cpu { level, bf16_dots } => (level, bf16_dots),
            #[cfg(feature = "cuda")]
            Route::Cuda => return self.on_cuda(xs, None),
            _ => return self.on_candle(xs),
        };
        let xs = xs.contiguous()?;
        let op = self.op(level, bf16_dots);
        match &self.weight {
            Weight::Dense(weight) => xs.apply_op2_no_bwd(weight, &op),
            Weight::Quantized { matrix, .. } => {
                xs.apply_op1_no_bwd(&self.quantized_op(matrix.as_ref(), op)?)
            }
        }
    }
}

/// The `[out, in / groups, k, k]` weight of a convolution under `vb`.
fn conv_weight(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: &Conv2dConfig,
    vb: &VarBuilder,
) -> Result<Weight> {
    let groups = config.groups.max(1);
    vb.get_weight(
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
    Ok(Conv2d::new(weight, Some(bias), config)?.with_options(vb.options()))
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
    Ok(Conv2d::new(weight, None, config)?.with_options(vb.options()))
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
    options: KernelOptions,
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
            options: KernelOptions::default(),
        })
    }

    /// The same layer computing with `options`.
    pub fn with_options(mut self, options: KernelOptions) -> Self {
        self.options = options;
        self
    }
}

impl GroupNorm {
    /// The normalisation followed by SiLU, in one pass over the data on the CPU and with our
    /// CUDA kernels (statistics, then one pass that normalises and applies SiLU): what every
    /// resnet and the output heads do.
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
        let route = self.options.route(xs);
        #[cfg(feature = "cuda")]
        if route == Route::Cuda {
            return crate::cuda::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        if let Route::Cpu { .. } = route {
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
                let group = index % self.groups;
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::detected() >= crate::cpu::Level::Avx512 {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { self.group_avx512(group, group_channels, dst, src, spatial) };
                }
                self.group(group, group_channels, dst, src, spatial)
            });
        out
    }

    /// One (image, group): its statistics, then the normalised (and activated) values.
    #[inline(always)]
    fn group<T: Element>(
        &self,
        group: usize,
        group_channels: usize,
        dst: &mut [f32],
        src: &[T],
        spatial: usize,
    ) {
        let (sum, sq) = sum_and_squares(src);
        let n = src.len().max(1) as f64;
        let mean = sum / n;
        let var = (sq / n - mean * mean).max(0.0);
        let rstd = 1.0 / (var + self.eps).sqrt();
        for (c, (d_row, s_row)) in dst
            .chunks_mut(spatial.max(1))
            .zip(src.chunks(spatial.max(1)))
            .enumerate()
        {
            let channel = group * group_channels + c;
            let scale = (rstd as f32) * self.weight[channel];
            let (mean, shift) = (mean as f32, self.bias[channel]);
            // Centre first: folding the mean into the shift loses digits when the variance is
            // tiny and `scale` huge.
            if self.silu {
                for (d, s) in d_row.iter_mut().zip(s_row) {
                    *d = silu((s.to_f32() - mean) * scale + shift);
                }
            } else {
                for (d, s) in d_row.iter_mut().zip(s_row) {
                    *d = (s.to_f32() - mean) * scale + shift;
                }
            }
        }
    }

    /// [`Self::group`] compiled for AVX-512: the normalisation and SiLU of a 512x512 VAE layer
    /// were a twentieth of a decode in SSE2.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn group_avx512<T: Element>(
        &self,
        group: usize,
        group_channels: usize,
        dst: &mut [f32],
        src: &[T],
        spatial: usize,
    ) {
        self.group(group, group_channels, dst, src, spatial)
    }
}

/// The sum and the sum of squares of `values`, in f64, over 8 interleaved lanes: one running sum
/// is a chain of dependent additions (4 cycles each), which made GroupNorm's statistics a tenth of
/// a VAE decode; 8 independent lanes vectorise.
fn sum_and_squares<T: Element>(values: &[T]) -> (f64, f64) {
    const LANES: usize = 8;
    let (mut sum, mut sq) = ([0f64; LANES], [0f64; LANES]);
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((s, q), v) in sum.iter_mut().zip(sq.iter_mut()).zip(chunk) {
            let v = v.to_f32() as f64;
            *s += v;
            *q += v * v;
        }
    }
    for (i, v) in rest.iter().enumerate() {
        let v = v.to_f32() as f64;
        sum[i] += v;
        sq[i] += v * v;
    }
    (sum.iter().sum(), sq.iter().sum())
}

impl CustomOp1 for GroupNormOp {
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
    Ok(GroupNorm::new(weight, bias, groups, eps)?.with_options(vb.options()))
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
/// One pass over the data on the CPU (no split copies, a vectorisable erf) and one kernel on CUDA
/// with our kernels; candle's ops elsewhere.
pub fn geglu(projected: &Tensor, options: &KernelOptions) -> Result<Tensor> {
    let last = projected.dim(candle_core::D::Minus1)?;
    if last % 2 != 0 {
        candle_core::bail!(
            "geglu: the last dimension of {:?} must be even (value and gate halves)",
            projected.shape()
        );
    }
    let half = last / 2;
    let route = options.route(projected);
    #[cfg(feature = "cuda")]
    if route == Route::Cuda {
        return crate::cuda::geglu(projected);
    }
    if let Route::Cpu { .. } = route {
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

impl CustomOp1 for GegluOp {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_match_a_running_sum() {
        for len in [0, 1, 7, 8, 9, 100, 1027] {
            let values: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let (sum, sq) = sum_and_squares(&values);
            let want_sum: f64 = values.iter().map(|v| *v as f64).sum();
            let want_sq: f64 = values.iter().map(|v| (*v as f64) * (*v as f64)).sum();
            assert!(
                (sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0),
                "{len}"
            );
            assert!((sq - want_sq).abs() <= 1e-9 * want_sq.max(1.0), "{len}");
        }
    }
}
