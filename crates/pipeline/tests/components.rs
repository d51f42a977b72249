//! The pipeline runs against its component traits: another decoder can stand in for the VAE, the
//! components can be driven directly (as `sdrs bench` does), and bad requests to them are errors,
//! not panics.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use sdrs_pipeline::{LatentDecoder, LoadOptions, Request, StableDiffusion};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(name), &LoadOptions::default()).unwrap()
}

fn request(pipeline: &StableDiffusion) -> Request {
    let mut request = Request::new(pipeline, "a red cube", pipeline.scheduler_config().clone());
    request.steps = 2;
    request.seed = Some(5);
    request
}

/// A decoder of any backend: here one that paints every pixel mid-gray.
struct Gray;

impl LatentDecoder for Gray {
    fn decode(&self, latents: &Tensor) -> sdrs_pipeline::Result<Tensor> {
        let (batch, _, h, w) = latents.dims4()?;
        Ok(Tensor::full(
            0.5f32,
            (batch, 3, h * 8, w * 8),
            latents.device(),
        )?)
    }
    fn latent_channels(&self) -> usize {
        4
    }
    fn scale_factor(&self) -> usize {
        8
    }
    fn name(&self) -> String {
        "gray".to_string()
    }
}

#[test]
fn another_decoder_stands_in_for_the_vae() {
    let mut pipeline = load("tiny-sd15");
    pipeline.set_latent_decoder(Box::new(Gray)).unwrap();
    let request = request(&pipeline);
    let image = pipeline.generate(&request, &mut |_| {}).unwrap();
    let size = pipeline.default_size();
    assert_eq!(image.dims(), [1, 3, size, size]);
    let mean: f32 = image.mean_all().unwrap().to_scalar().unwrap();
    assert_eq!(mean, 0.5);
    // Previews go through it too, at full size.
    let latents = Tensor::zeros((1, 4, 2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(pipeline.preview(&latents).unwrap().dims(), [1, 3, 16, 16]);
}

#[test]
fn a_decoder_for_other_latents_is_refused_with_its_channels() {
    struct Wide;
    impl LatentDecoder for Wide {
        fn decode(&self, latents: &Tensor) -> sdrs_pipeline::Result<Tensor> {
            Ok(latents.clone())
        }
        fn latent_channels(&self) -> usize {
            16
        }
        fn scale_factor(&self) -> usize {
            8
        }
        fn name(&self) -> String {
            "TAEF1".to_string()
        }
    }
    let mut pipeline = load("tiny-sd15");
    let message = pipeline
        .set_latent_decoder(Box::new(Wide))
        .unwrap_err()
        .to_string();
    assert!(message.contains("TAEF1 (16 latent channels)"), "{message}");
}

// Tolerance: bit-identical (the same calls the loop makes).
#[test]
fn the_denoiser_and_conditioning_can_be_driven_directly() {
    let pipeline = load("tiny-sdxl");
    let request = request(&pipeline);
    let conditioning = pipeline.encode_prompts(&request).unwrap();
    assert_eq!(
        conditioning.embeddings.dim(0).unwrap(),
        2,
        "negative row, then positive"
    );
    assert!(
        conditioning.added.is_some(),
        "SDXL adds pooled embeddings and time ids"
    );
    let denoiser = pipeline.denoiser().unwrap();
    let latents = Tensor::zeros(
        (2, denoiser.in_channels(), 4, 4),
        denoiser.dtype(),
        denoiser.device(),
    )
    .unwrap();
    let t = Tensor::full(500f32, 2, denoiser.device()).unwrap();
    let run = || {
        pipeline.in_pool(|| {
            denoiser
                .forward(
                    &latents,
                    &t,
                    &conditioning.embeddings,
                    conditioning.added.as_ref(),
                )
                .unwrap()
        })
    };
    let (a, b) = (run(), run());
    assert_eq!(a.dims(), latents.dims());
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

/// The refiner's one encoder is asked for its pooled embedding, which runs every layer; clip skip
/// 0 indexed past the last hidden state there.
#[test]
fn refiner_clip_skip_zero_is_an_error_not_a_panic() {
    let pipeline = load("tiny-sdxl-refiner");
    let mut request = request(&pipeline);
    request.clip_skip = Some(0);
    let message = pipeline.encode_prompts(&request).unwrap_err().to_string();
    assert!(message.contains("clip skip 0"), "{message}");
}

/// `Request::cancel` set from the progress callback (a server's interrupt, from another thread
/// in practice) stops the generation after that step with `Error::Cancelled`; unset, the same
/// request runs to its end.
#[test]
fn a_cancelled_request_stops_after_the_step_it_was_cancelled_at() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let pipeline = load("tiny-sd15");
    let mut request = request(&pipeline);
    request.steps = 5;
    let cancel = Arc::new(AtomicBool::new(false));
    request.cancel = Some(cancel.clone());
    let mut steps = 0;
    let result = pipeline.generate(&request, &mut |p| {
        steps = p.step;
        if p.step == 2 {
            cancel.store(true, Ordering::SeqCst);
        }
    });
    assert!(
        matches!(result, Err(sdrs_pipeline::Error::Cancelled)),
        "{result:?}"
    );
    assert_eq!(steps, 2, "no step ran after the cancel");
    cancel.store(false, Ordering::SeqCst);
    let mut steps = 0;
    pipeline
        .generate(&request, &mut |p| steps = p.step)
        .unwrap();
    // Every step of the schedule (PNDM's has one more than `steps`).
    assert!(steps >= 5, "{steps} steps");
}
