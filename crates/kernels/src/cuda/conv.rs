//! 2-D convolution on CUDA (`cuda/conv2d.cu`): an implicit GEMM over NCHW input (the im2col
//! matrix gathered tile by tile, never stored), stride, padding and dilation from the config,
//! `groups == 1`, the f32 bias and an optional residual (the output's shape and dtype) added in
//! the epilogue. f16/bf16 run on tensor cores (wmma) by default, f32 on the SIMT kernel.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use candle_nn::Conv2dConfig;

use super::{contiguous_view, dtype_name, function, grid, int, with_dtype, GRID_X, GRID_YZ};
use crate::conv::ConvGeometry;

const OP: &str = "sdrs-cuda-conv2d";

/// Which kernel computes a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKernel {
    /// f32 FMAs on a 64 x 64 output tile (every dtype).
    Simt,
    /// Tensor cores through wmma m16n16k16 with f32 accumulators (f16 and bf16).
    TensorCores,
}

impl ConvKernel {
    /// The faster kernel for `dtype`: tensor cores for f16/bf16, SIMT for f32.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F16 | DType::BF16 => Self::TensorCores,
            _ => Self::Simt,
        }
    }

    /// (kernel name prefix, threads per block, output tile: channels x pixels).
    fn launch_shape(self) -> (&'static str, u32, usize, usize) {
        match self {
            Self::Simt => ("sdrs_conv2d_simt", 256, 64, 64),
            Self::TensorCores => ("sdrs_conv2d_wmma", 128, 64, 64),
        }
    }
}

/// `x ⊛ w + bias (+ residual)` for x [N, C, H, W] and w [O, C, kh, kw] of one dtype, `bias` f32
/// [O], by [`ConvKernel::for_dtype`]'s kernel.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    config: &Conv2dConfig,
) -> Result<Tensor> {
    conv2d_with(
        ConvKernel::for_dtype(x.dtype()),
        x,
        w,
        bias,
        residual,
        config,
    )
}

/// [`conv2d`] by the given kernel.
pub fn conv2d_with(
    kernel: ConvKernel,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    config: &Conv2dConfig,
) -> Result<Tensor> {
    if config.groups != 1 {
        candle_core::bail!(
            "{OP}: groups {} (the kernel does groups == 1)",
            config.groups
        );
    }
    let op = Conv2dOp {
        bias: bias.map(|b| b.contiguous()).transpose()?,
        config: *config,
        kernel,
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (images, _, _, _) = x.dims4()?;
    let (out_channels, _, _, _) = w.dims4()?;
    let (geometry, shape) = op.geometry(x.layout(), w.layout())?;
    let (out_h, out_w) = geometry.output_size().unwrap_or((0, 0));
    if images * out_channels * out_h * out_w == 0 {
        return Tensor::zeros(shape, x.dtype(), x.device());
    }
    match residual {
        Some(residual) => x.apply_op3_no_bwd(&w, &residual.contiguous()?, &op),
        None => x.apply_op2_no_bwd(&w, &op),
    }
}

struct Conv2dOp {
    /// f32 [O], contiguous, on the input's device.
    bias: Option<Tensor>,
    config: Conv2dConfig,
    kernel: ConvKernel,
}

impl Conv2dOp {
    /// The geometry of input `x` convolved by weight `w`, and the output shape.
    fn geometry(&self, x: &Layout, w: &Layout) -> Result<(ConvGeometry, Shape)> {
        let (images, channels, height, width) = x.shape().dims4()?;
        let (out_channels, c_w, kernel_h, kernel_w) = w.shape().dims4()?;
        if c_w != channels {
            candle_core::bail!(
                "{OP}: input {:?} has {channels} channels, weight {:?} expects {c_w}",
                x.shape(),
                w.shape()
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
                "{OP}: kernel {kernel_h}x{kernel_w} does not fit input {:?} with padding {}",
                x.shape(),
                self.config.padding
            );
        };
        Ok((g, Shape::from((images, out_channels, out_h, out_w))))
    }

    fn run(
        &self,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let (g, shape) = self.geometry(l1, l2)?;
        let dtype = s1.dtype();
        if s2.dtype() != dtype {
            candle_core::bail!(
                "{OP}: input {dtype:?} and weight {:?} must share a dtype",
                s2.dtype()
            );
        }
        if g.stride == 0 || g.dilation == 0 {
            candle_core::bail!("{OP}: stride and dilation must be at least 1");
        }
        if self.kernel == ConvKernel::TensorCores && dtype == DType::F32 {
            candle_core::bail!("{OP}: the tensor-core kernel takes f16 or bf16, not f32");
        }
        if let Some((s3, l3)) = residual {
            if l3.shape() != &shape || s3.dtype() != dtype {
                candle_core::bail!(
                    "{OP}: residual {:?} {:?} is not the output's {shape:?} {dtype:?}",
                    l3.shape(),
                    s3.dtype()
                );
            }
        }
        let images = shape.dims()[0];
        let (out_h, out_w) = (shape.dims()[2], shape.dims()[3]);
        let k = g.channels * g.kernel_h * g.kernel_w;
        int(k, "channels x kernel taps", OP)?;
        let sizes = [
            int(images, "images", OP)?,
            int(g.channels, "channels", OP)?,
            int(g.height, "height", OP)?,
            int(g.width, "width", OP)?,
            int(g.out_channels, "output channels", OP)?,
            int(g.kernel_h, "kernel height", OP)?,
            int(g.kernel_w, "kernel width", OP)?,
            int(g.stride, "stride", OP)?,
            int(g.padding, "padding", OP)?,
            int(g.dilation, "dilation", OP)?,
            int(out_h, "output height", OP)?,
            int(out_w, "output width", OP)?,
        ];
        let (prefix, threads, tile_m, tile_n) = self.kernel.launch_shape();
        let pixels = images * out_h * out_w;
        let config = LaunchConfig {
            grid_dim: (
                grid(pixels.div_ceil(tile_n), GRID_X, "the output pixels", OP)?,
                grid(
                    g.out_channels.div_ceil(tile_m),
                    GRID_YZ,
                    "the output channels",
                    OP,
                )?,
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let device = s1.device();
        let func = function(device, &format!("{prefix}_{}", dtype_name(dtype, OP)?))?;

        // The bias' storage stays read-locked until the launch is queued.
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias_storage = match &bias {
            Some((storage, layout)) => {
                let Storage::Cuda(storage) = &**storage else {
                    candle_core::bail!("{OP}: the bias must be on the input's CUDA device");
                };
                if storage.dtype() != DType::F32 || layout.shape().elem_count() != g.out_channels {
                    candle_core::bail!(
                        "{OP}: the bias must be f32 [{}], got {:?} {:?}",
                        g.out_channels,
                        storage.dtype(),
                        layout.shape()
                    );
                }
                if !storage.device().same_device(device) {
                    candle_core::bail!("{OP}: the bias is on another CUDA device");
                }
                Some((storage, *layout))
            }
            None => None,
        };
        let bias_view = match bias_storage {
            Some((storage, layout)) => Some(contiguous_view::<f32>(storage, layout, OP, "bias")?),
            None => None,
        };
        let null = 0u64;

        with_dtype!(dtype, OP, |T| {
            let x = contiguous_view::<T>(s1, l1, OP, "the input")?;
            let w = contiguous_view::<T>(s2, l2, OP, "the weight")?;
            let residual = match residual {
                Some((s3, l3)) => Some(contiguous_view::<T>(s3, l3, OP, "the residual")?),
                None => None,
            };
            // SAFETY: the epilogue writes every output element (each in-range channel and pixel).
            let mut out = unsafe { device.alloc::<T>(shape.elem_count())? };
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&w);
            match &bias_view {
                Some(bias) => launch.arg(bias),
                None => launch.arg(&null),
            };
            match &residual {
                Some(residual) => launch.arg(residual),
                None => launch.arg(&null),
            };
            launch.arg(&mut out);
            for size in &sizes {
                launch.arg(size);
            }
            // SAFETY: the arguments match `SDRS_CONV_ARGS` in cuda/conv2d.cu (a null pointer
            // for a missing bias or residual, which the kernel checks), every operand is
            // contiguous with the sizes passed, and the block size is the kernel's.
            unsafe { launch.launch(config) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, device.clone()), shape))
        })
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{OP} runs on CUDA devices only (the CPU has `nn::Conv2d`)")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

/// The convolution with a residual added in the epilogue (third operand).
impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sdrs-cuda-conv2d-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{OP} runs on CUDA devices only (the CPU has `nn::Conv2d`)")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}
