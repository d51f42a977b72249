//! GroupNorm (+ SiLU) and GEGLU on CUDA (`cuda/group_norm.cu`, `cuda/geglu.cu`), each in the
//! input's dtype with f32 arithmetic.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use super::{contiguous_view, dtype_name, function, grid, int, long, with_dtype, GRID_X, GRID_YZ};

/// Threads per block of every kernel here (`THREADS` in the .cu files).
const THREADS: u32 = 256;
/// Values of one group per statistics block (passed to the kernel, which needs no copy of it).
const CHUNK: usize = 8192;
/// Blocks of the element-wise kernels (grid-stride loops cover the rest).
const MAX_BLOCKS: usize = 1 << 16;

/// `nn.GroupNorm` over x [N, C, ...] with `groups` groups, f32 `weight` and `bias` [C] on the same
/// device, SiLU after it when `silu`; the result in the input's dtype.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.elem_count() == 0 {
        return Tensor::zeros(x.shape(), x.dtype(), x.device());
    }
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    x.contiguous()?.apply_op3_no_bwd(
        &weight.to_dtype(DType::F32)?.contiguous()?,
        &bias.to_dtype(DType::F32)?.contiguous()?,
        &op,
    )
}

const GROUP_NORM: &str = "sdrs-cuda-group-norm";

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        GROUP_NORM
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
        candle_core::bail!("{GROUP_NORM} runs on CUDA devices only (the CPU has `nn::GroupNorm`)")
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
        const OP: &str = GROUP_NORM;
        let dims = l1.dims();
        if dims.len() < 2 {
            candle_core::bail!("{OP}: input {:?} has no channel dim", l1.shape());
        }
        let (images, channels) = (dims[0], dims[1]);
        let groups = self.groups;
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("{OP}: {channels} channels cannot form {groups} groups");
        }
        for (storage, layout, what) in [(s2, l2, "weight"), (s3, l3, "bias")] {
            if storage.dtype() != DType::F32 || layout.shape().elem_count() != channels {
                candle_core::bail!(
                    "{OP}: the {what} must be f32 [{channels}], got {:?} {:?}",
                    storage.dtype(),
                    layout.shape()
                );
            }
        }
        let total = l1.shape().elem_count();
        let spatial = total / (images * channels).max(1);
        let group_elems = channels / groups * spatial;
        let stat_groups = images * groups;
        if total == 0 || group_elems == 0 {
            candle_core::bail!("{OP}: empty input {:?}", l1.shape());
        }
        let chunks = group_elems.div_ceil(CHUNK);
        let dtype = s1.dtype();
        let name = dtype_name(dtype, OP)?;
        let device = s1.device();
        let partial = function(device, &format!("sdrs_group_norm_partial_{name}"))?;
        let finalize = function(device, "sdrs_group_norm_finalize")?;
        let apply = function(device, &format!("sdrs_group_norm_apply_{name}"))?;
        let partial_config = LaunchConfig {
            grid_dim: (
                grid(chunks, GRID_X, "a group's chunks", OP)?,
                grid(stat_groups, GRID_YZ, "images x groups", OP)?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let finalize_config = LaunchConfig {
            grid_dim: (grid(stat_groups, GRID_X, "images x groups", OP)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let apply_config = LaunchConfig {
            grid_dim: (
                grid(
                    total.div_ceil(THREADS as usize).min(MAX_BLOCKS),
                    GRID_X,
                    "the values",
                    OP,
                )?,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_elems_arg, chunk_arg, chunks_arg) = (
            long(group_elems, "group size", OP)?,
            int(CHUNK, "chunk", OP)?,
            int(chunks, "chunks", OP)?,
        );
        let (total_arg, spatial_arg) = (
            long(total, "values", OP)?,
            long(spatial, "spatial size", OP)?,
        );
        let channels_arg = int(channels, "channels", OP)?;
        let per_group_arg = int(channels / groups, "channels per group", OP)?;
        let silu_arg = i32::from(self.silu);
        with_dtype!(dtype, OP, |T| {
            let x = contiguous_view::<T>(s1, l1, OP, "the input")?;
            let weight = contiguous_view::<f32>(s2, l2, OP, "the weight")?;
            let bias = contiguous_view::<f32>(s3, l3, OP, "the bias")?;
            // SAFETY (the three allocations): each kernel writes all of its output before the
            // next reads it: one (count, mean, M2) per chunk, one (mean, rstd) per group, and
            // every output value.
            let mut partials = unsafe { device.alloc::<f32>(stat_groups * chunks * 3)? };
            let mut stats = unsafe { device.alloc::<f32>(stat_groups * 2)? };
            let mut out = unsafe { device.alloc::<T>(total)? };
            let stream = device.cuda_stream();

            let mut launch = stream.launch_builder(&partial);
            launch
                .arg(&x)
                .arg(&mut partials)
                .arg(&group_elems_arg)
                .arg(&chunk_arg)
                .arg(&chunks_arg);
            // SAFETY: the arguments match `sdrs_group_norm_partial_*`; the grid is
            // (chunks, images x groups), the partials hold 3 floats per block.
            unsafe { launch.launch(partial_config) }.w()?;

            let mut launch = stream.launch_builder(&finalize);
            launch
                .arg(&partials)
                .arg(&mut stats)
                .arg(&chunks_arg)
                .arg(&self.eps);
            // SAFETY: the arguments match `sdrs_group_norm_finalize`, one block per group.
            unsafe { launch.launch(finalize_config) }.w()?;

            let mut launch = stream.launch_builder(&apply);
            launch
                .arg(&x)
                .arg(&stats)
                .arg(&weight)
                .arg(&bias)
                .arg(&mut out)
                .arg(&total_arg)
                .arg(&spatial_arg)
                .arg(&channels_arg)
                .arg(&per_group_arg)
                .arg(&silu_arg);
            // SAFETY: the arguments match `sdrs_group_norm_apply_*`; a grid-stride loop covers
            // `total` values, all indices below it.
            unsafe { launch.launch(apply_config) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, device.clone()),
                l1.shape().clone(),
            ))
        })
    }
}

/// GEGLU's gating on CUDA: `[..., 2n]` -> `[..., n]`, `value * gelu_erf(gate)` with `value` the
/// first half of the last dim and `gate` the second.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let last = projected.dim(candle_core::D::Minus1)?;
    if last % 2 != 0 {
        candle_core::bail!(
            "{GEGLU}: the last dimension of {:?} must be even (value and gate halves)",
            projected.shape()
        );
    }
    if projected.elem_count() == 0 {
        let mut dims = projected.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        return Tensor::zeros(dims, projected.dtype(), projected.device());
    }
    projected.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

const GEGLU: &str = "sdrs-cuda-geglu";

struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        GEGLU
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{GEGLU} runs on CUDA devices only (the CPU has `nn::geglu`)")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        const OP: &str = GEGLU;
        let dims = layout.dims();
        let Some(&last) = dims.last() else {
            candle_core::bail!("{OP}: a scalar has no value and gate halves");
        };
        if last % 2 != 0 || last == 0 {
            candle_core::bail!("{OP}: the last dim of {:?} must be even", layout.shape());
        }
        let half = last / 2;
        let rows = layout.shape().elem_count() / last;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = half;
        let dtype = storage.dtype();
        let device = storage.device();
        let func = function(device, &format!("sdrs_geglu_{}", dtype_name(dtype, OP)?))?;
        let config = LaunchConfig {
            grid_dim: (
                grid(
                    (rows * half).div_ceil(THREADS as usize).min(MAX_BLOCKS),
                    GRID_X,
                    "the values",
                    OP,
                )?,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_arg, half_arg) = (long(rows, "rows", OP)?, long(half, "half width", OP)?);
        with_dtype!(dtype, OP, |T| {
            let x = contiguous_view::<T>(storage, layout, OP, "the input")?;
            // SAFETY: the kernel's grid-stride loop writes all rows x half values.
            let mut out = unsafe { device.alloc::<T>(rows * half)? };
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&mut out).arg(&rows_arg).arg(&half_arg);
            // SAFETY: the arguments match `sdrs_geglu_*`; the input holds rows x 2 half values.
            unsafe { launch.launch(config) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, device.clone()),
                Shape::from(out_dims),
            ))
        })
    }
}
