//! Naive, sliced and flash attention on SD1.5 shapes at 512x512, measured in one run:
//! `cargo run --release -p sdrs-kernels --example attention_timing`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::attention::{attention, AttentionMode};

fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let runs = 2;
    for _ in 0..runs {
        f();
    }
    start.elapsed().as_secs_f64() / runs as f64
}

fn main() -> candle_core::Result<()> {
    let options = sdrs_kernels::KernelOptions::from_env(AttentionMode::Auto).unwrap_or_default();
    println!("kernels: {}", options.cpu_level().name());
    println!("| shape (B, H, Lq, Lk, D) | dtype | naive | sliced | flash | flash GFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (lq, lk) in [(4096, 4096), (4096, 77), (1024, 1024)] {
        for dtype in [DType::F32, DType::BF16] {
            let (b, h, d) = (2, 8, 40);
            let q = Tensor::randn(0f32, 1.0, (b, h, lq, d), &Device::Cpu)?.to_dtype(dtype)?;
            let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &Device::Cpu)?.to_dtype(dtype)?;
            let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &Device::Cpu)?.to_dtype(dtype)?;
            let time = |mode| {
                seconds(|| {
                    drop(
                        attention(
                            &q,
                            &k,
                            &v,
                            0.15,
                            &sdrs_kernels::KernelOptions {
                                attention: mode,
                                ..options
                            },
                        )
                        .unwrap(),
                    )
                })
            };
            let naive = time(AttentionMode::Naive);
            let sliced = time(AttentionMode::Sliced(Some(4)));
            let flash = time(AttentionMode::Flash);
            let gflop = 4.0 * (b * h * lq * lk * d) as f64 / 1e9;
            println!(
                "| {b}, {h}, {lq}, {lk}, {d} | {dtype:?} | {naive:.3} s | {sliced:.3} s | {flash:.3} s | {:.1} |",
                gflop / flash
            );
        }
    }
    Ok(())
}
