//! Text-to-image through the library API, without the CLI.
//!
//! `cargo run --release --example txt2img -- [model folder] [prompt]` (default: the tiny SD1.5
//! fixture, which runs offline in seconds); writes `txt2img.png` as an 8-bit RGB PNG.

use anyhow::Result;
use candle_core::DType;
use sdrs_pipeline::{LoadOptions, Request, StableDiffusion};
use sdrs_schedulers::{Sampler, SigmaSchedule};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd15").into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "a lighthouse on a cliff at dusk".into());

    let pipeline = StableDiffusion::load(model.as_ref(), &LoadOptions::default())?;
    let scheduler = Sampler::Dpmpp2m.config(pipeline.scheduler_config(), SigmaSchedule::Karras)?;
    let mut request = Request::new(&pipeline, &prompt, scheduler);
    request.negative_prompt = Some("blurry, low quality".into());
    request.steps = 20;
    request.seed = Some(42);
    let image = pipeline.generate(&request, &mut |p| {
        eprintln!("step {}/{} (t = {:.1})", p.step, p.total, p.timestep);
    })?;

    // [1, 3, H, W] in [0, 1] -> interleaved 8-bit RGB.
    let (_, _, height, width) = image.dims4()?;
    let rgb: Vec<u8> = (image.get(0)?.permute((1, 2, 0))? * 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let file = std::io::BufWriter::new(std::fs::File::create("txt2img.png")?);
    let mut encoder = png::Encoder::new(file, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.write_header()?.write_image_data(&rgb)?;
    eprintln!("saved txt2img.png ({width}x{height})");
    Ok(())
}
