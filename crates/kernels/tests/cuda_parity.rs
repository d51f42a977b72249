//! Our CUDA kernels against our CPU kernels (`sdrs_kernels::cuda::self_check`: flash attention
//! for D = 40, 64, 80, 160, 256 with SD's and odd lengths, conv2d 3x3 / 1x1 / strided / dilated
//! with odd sizes and a fused residual on both kernels, GroupNorm with and without SiLU, GEGLU, and
//! the layers routed to them), f32 within 1e-4, f16 within 1e-3 and bf16 within 8e-3 of the
//! reference's largest magnitude. Without a CUDA device it prints why and skips.
#![cfg(feature = "cuda")]

use candle_core::Device;
use sdrs_kernels::cuda::{self_check, ARCHITECTURES, PTX_COMPUTE_120, PTX_COMPUTE_90};

#[test]
fn cuda_kernels_match_the_cpu_kernels() {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(error) => {
            println!("skipped: no CUDA device ({error})");
            return;
        }
    };
    let results = self_check(&device).expect("every check runs");
    let mut failed = 0;
    for result in &results {
        println!("{result}");
        failed += usize::from(!result.pass);
    }
    println!(
        "{} checks, {failed} failed (SASS for {ARCHITECTURES})",
        results.len()
    );
    assert_eq!(failed, 0, "see the FAIL lines above");
}

#[test]
fn the_ptx_for_sm_90_and_sm_120_is_built() {
    for (path, target) in [(PTX_COMPUTE_90, "sm_90"), (PTX_COMPUTE_120, "sm_120")] {
        let ptx = std::fs::read_to_string(path).expect("build.rs wrote the PTX");
        assert!(ptx.contains(&format!(".target {target}")), "{path}");
        assert!(ptx.contains("sdrs_flash_attention_f16_d64"), "{path}");
    }
}
