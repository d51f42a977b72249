//! GFLOP/s of the sdrs GEMM against candle's matmul on SD1.5 UNet shapes, measured in one run:
//! `cargo run --release -p sdrs-kernels --example gemm_timing`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use sdrs_kernels::gemm::{gemm, gemm_bf16, Strided};

fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let runs = 3;
    for _ in 0..runs {
        f();
    }
    start.elapsed().as_secs_f64() / runs as f64
}

fn main() -> candle_core::Result<()> {
    let level = sdrs_kernels::KernelOptions::from_env(Default::default())
        .unwrap_or_default()
        .cpu_level();
    println!("kernels: {}", level.name());
    println!("| M x K x N | candle f32 | sdrs f32 | sdrs bf16 |");
    println!("|---|---|---|---|");
    for (m, k, n) in [
        (8192, 320, 320),
        (8192, 320, 2560),
        (2048, 640, 5120),
        (154, 768, 320),
        (2048, 2048, 2048),
    ] {
        let flop = 2.0 * (m * k * n) as f64 / 1e9;
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let wt = w.t()?;
        let candle = seconds(|| {
            x.matmul(&wt).unwrap();
        });
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let mut c = vec![0f32; m * n];
        let ours = seconds(|| {
            c.fill(0.0);
            let b = Strided::row_major(&ws, n, k).t();
            gemm(level, &Strided::row_major(&xs, m, k), &b, &mut c, n);
        });
        let xb: Vec<bf16> = x.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
        let wb: Vec<bf16> = w.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
        let ours_bf16 = seconds(|| {
            c.fill(0.0);
            let b = Strided::row_major(&wb, n, k).t();
            gemm_bf16(level, &Strided::row_major(&xb, m, k), &b, &mut c, n);
        });
        println!(
            "| {m} x {k} x {n} | {:.1} GFLOP/s | {:.1} GFLOP/s | {:.1} GFLOP/s |",
            flop / candle,
            flop / ours,
            flop / ours_bf16
        );
    }
    Ok(())
}
