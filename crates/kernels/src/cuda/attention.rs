//! Flash attention on CUDA (`cuda/flash_attention.cu`): `softmax(q kᵀ · scale) v` for
//! q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv], D and Dv up to 256, any Lq and Lk >= 1,
//! f32/f16/bf16 with f32 scores, softmax and accumulation. The inputs may be strided views
//! (SD's heads are transposed views of [B, L, H, D] projections) as long as the last dim is
//! contiguous; the output is contiguous [B, H, Lq, Dv].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUfunction_attribute_enum,
};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{dtype_name, function, grid, int, long, strided_view, with_dtype, GRID_X, GRID_YZ};

const OP: &str = "sdrs-cuda-flash-attention";

/// The compiled head-dim tiles (`SDRS_FLASH_DIMS` in the .cu file): a call takes the smallest
/// that holds `max(D, Dv)`.
const HEAD_TILES: [usize; 5] = [64, 96, 128, 160, 256];
/// Warps per block and keys per tile, as in the kernel.
const WARPS: usize = 4;
const BLOCK_K: usize = 32;

/// Queries per warp for a head tile (`R` in the .cu file's instantiations).
fn queries_per_warp(tile: usize) -> usize {
    if tile <= 96 {
        8
    } else {
        4
    }
}

/// The kernel's dynamic shared memory (`flash::Smem<DP, R>::BYTES`; the kernel traps on less).
fn smem_bytes(tile: usize, rows: usize) -> usize {
    let stride = tile + 4;
    let block_q = WARPS * rows;
    4 * (block_q * stride + BLOCK_K * stride + BLOCK_K * tile + WARPS * rows * BLOCK_K)
}

/// Flash attention by our CUDA kernel, in the dtype of `q` (`k` and `v` must share it).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let dv = v.dim(3)?;
    if b * h * lq * dv == 0 {
        return Tensor::zeros((b, h, lq, dv), q.dtype(), q.device());
    }
    let (q, k, v) = (
        last_dim_contiguous(q)?,
        last_dim_contiguous(k)?,
        last_dim_contiguous(v)?,
    );
    q.apply_op3_no_bwd(
        &k,
        &v,
        &FlashAttention {
            scale: scale as f32,
        },
    )
}

/// `t`, copied when its last dim is strided (the kernel reads whole rows).
fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    match (t.dims().last(), t.stride().last()) {
        (Some(&size), Some(&stride)) if size <= 1 || stride == 1 => Ok(t.clone()),
        _ => t.contiguous(),
    }
}

struct FlashAttention {
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        OP
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
        candle_core::bail!("{OP} runs on CUDA devices only (the CPU has `attention::flash_at`)")
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
        let (b, h, lq, d) = l1.shape().dims4()?;
        let (bk, hk, lk, dk) = l2.shape().dims4()?;
        let (bv, hv, lv, dv) = l3.shape().dims4()?;
        if (bk, hk, dk) != (b, h, d) || (bv, hv, lv) != (b, h, lk) {
            candle_core::bail!(
                "{OP}: q {:?}, k {:?} and v {:?} do not fit together",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        if lk == 0 || d == 0 {
            candle_core::bail!("{OP}: no keys or an empty head dim in k {:?}", l2.shape());
        }
        let dtype = s1.dtype();
        if s2.dtype() != dtype || s3.dtype() != dtype {
            candle_core::bail!(
                "{OP}: q, k and v must share a dtype, got {dtype:?}, {:?}, {:?}",
                s2.dtype(),
                s3.dtype()
            );
        }
        for (layout, what) in [(l1, "q"), (l2, "k"), (l3, "v")] {
            if layout.dims()[3] > 1 && layout.stride()[3] != 1 {
                candle_core::bail!("{OP}: {what}'s last dim must be contiguous, got {layout:?}");
            }
        }
        let Some(tile) = HEAD_TILES.iter().copied().find(|&t| t >= d.max(dv)) else {
            candle_core::bail!("{OP}: head dims {d} and {dv}: the kernel takes at most 256");
        };
        let rows = queries_per_warp(tile);
        let bytes = smem_bytes(tile, rows);
        let device = s1.device();
        let func = function(
            device,
            &format!("sdrs_flash_attention_{}_d{tile}", dtype_name(dtype, OP)?),
        )?;
        if bytes > 48 * 1024 {
            // Above 48 KiB a kernel must opt in (sm_80: up to 163 KiB; sm_86/89/120: 99 KiB).
            let most = device
                .cuda_stream()
                .context()
                .attribute(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .w()?;
            if (most as usize) < bytes {
                candle_core::bail!(
                    "{OP}: head dim {tile} needs {bytes} bytes of shared memory, the GPU has {most}"
                );
            }
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .w()?;
        }
        let config = LaunchConfig {
            grid_dim: (
                grid(lq.div_ceil(WARPS * rows), GRID_X, "the queries", OP)?,
                grid(b * h, GRID_YZ, "batch x heads", OP)?,
                1,
            ),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        let sizes = [
            int(h, "heads", OP)?,
            int(lq, "queries", OP)?,
            int(lk, "keys", OP)?,
            int(d, "head dim", OP)?,
            int(dv, "value head dim", OP)?,
        ];
        let mut strides = [0i64; 9];
        for (i, layout) in [l1, l2, l3].iter().enumerate() {
            for j in 0..3 {
                strides[i * 3 + j] = long(layout.stride()[j], "stride", OP)?;
            }
        }
        let elements = b * h * lq * dv;
        with_dtype!(dtype, OP, |T| {
            let q = strided_view::<T>(s1, l1, OP, "q")?;
            let k = strided_view::<T>(s2, l2, OP, "k")?;
            let v = strided_view::<T>(s3, l3, OP, "v")?;
            // SAFETY: the kernel writes every element (each query row of each head, Dv values).
            let mut out = unsafe { device.alloc::<T>(elements)? };
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&q).arg(&k).arg(&v).arg(&mut out);
            for size in &sizes {
                launch.arg(size);
            }
            for stride in &strides {
                launch.arg(stride);
            }
            launch.arg(&self.scale);
            // SAFETY: the arguments match the kernel's signature in cuda/flash_attention.cu, the
            // views cover every element the strides reach (candle's layouts), and the grid and
            // shared memory are those the kernel expects.
            unsafe { launch.launch(config) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, device.clone()),
                Shape::from((b, h, lq, dv)),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_layout_and_fits_every_gpu() {
        // Smem<64, 8>: q 32 x 68, k 32 x 68, v 32 x 64, p 4 x 8 x 32 floats.
        assert_eq!(
            smem_bytes(64, 8),
            4 * (32 * 68 + 32 * 68 + 32 * 64 + 4 * 8 * 32)
        );
        for tile in HEAD_TILES {
            let bytes = smem_bytes(tile, queries_per_warp(tile));
            // 99 KiB: the opt-in limit of sm_86, sm_89 and sm_120 (sm_80 and sm_90 have more).
            assert!(bytes <= 99 * 1024, "{tile}: {bytes}");
        }
        assert!(smem_bytes(128, queries_per_warp(128)) <= 48 * 1024);
    }
}
