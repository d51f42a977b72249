//! One-shot runs free each model after its last use and give the same image as the reusable
//! pipeline; the base-then-refiner plan runs one model at a time; random-weight pipelines (what
//! `sdrs bench` measures) are seeded and run end to end.

use std::path::PathBuf;

use candle_core::Tensor;
use sdrs_pipeline::{Error, InitImage, LoadOptions, ModelFiles, Refiner, Request, StableDiffusion};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(name), &LoadOptions::default()).unwrap()
}

fn request(pipeline: &StableDiffusion) -> Request {
    let mut request = Request::new(
        pipeline,
        "a red cube on a table",
        pipeline.scheduler_config().clone(),
    );
    request.steps = 3;
    request.seed = Some(11);
    request
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

// Tolerance: bit-identical images (the same computations, only the freeing differs).
#[test]
fn generate_once_gives_the_image_generate_gives() {
    let reusable = load("tiny-sd15");
    let request = request(&reusable);
    let mut steps = 0;
    let expected = reusable.generate(&request, &mut |_| steps += 1).unwrap();
    // The reusable pipeline still works after a generation.
    let again = reusable.generate(&request, &mut |_| {}).unwrap();
    assert_eq!(max_difference(&expected, &again), 0.0);

    let mut once_steps = 0;
    let once = load("tiny-sd15")
        .generate_once(&request, &mut |_| once_steps += 1)
        .unwrap();
    assert_eq!(max_difference(&expected, &once), 0.0);
    // (PNDM's 3 steps are 4 UNet evaluations, each reported.)
    assert!(steps >= 3 && once_steps == steps, "{steps} {once_steps}");
}

/// The SDXL base to 0.6, then the refiner from its latents, handed over by hand.
fn base_then_refiner(once: bool) -> Tensor {
    let base = load("tiny-sdxl");
    let mut request = request(&base);
    request.denoising_end = Some(0.6);
    let latents = if once {
        base.denoise_once(&request, &mut |_| {}).unwrap()
    } else {
        base.denoise(&request, &mut |_| {}).unwrap()
    };
    let refiner = load("tiny-sdxl-refiner");
    let mut refine = request.clone();
    refine.scheduler = refiner.scheduler_config().clone();
    refine.init_image = InitImage::Latents(latents);
    refine.denoising_end = None;
    refine.denoising_start = Some(0.6);
    if once {
        refiner.generate_once(&refine, &mut |_| {}).unwrap()
    } else {
        refiner.generate(&refine, &mut |_| {}).unwrap()
    }
}

// Tolerance: bit-identical images.
#[test]
fn base_then_refiner_one_shot_matches_the_reusable_pipelines() {
    assert_eq!(
        max_difference(&base_then_refiner(false), &base_then_refiner(true)),
        0.0
    );
}

// Tolerance: bit-identical images (the plan runs the same two one-shot pipelines).
#[test]
fn the_refiner_plan_gives_the_image_of_the_hand_off_by_hand() {
    let base = load("tiny-sdxl");
    let request = request(&base);
    let refiner = Refiner::new(
        &fixtures().join("tiny-sdxl-refiner"),
        0.6,
        &LoadOptions::default(),
    )
    .unwrap();
    let mut steps = Vec::new();
    let image = refiner
        .generate_once(base, &request, &mut |p| steps.push((p.step, p.total)))
        .unwrap();
    assert_eq!(max_difference(&image, &base_then_refiner(true)), 0.0);
    // The base's steps, then the refiner's, each counted from 1.
    let restarts = steps.iter().filter(|(step, _)| *step == 1).count();
    assert_eq!(restarts, 2, "{steps:?}");
}

#[test]
fn the_refiner_plan_refuses_models_of_the_wrong_family() {
    let options = LoadOptions::default();
    let not_a_refiner = Refiner::new(&fixtures().join("tiny-sd15"), 0.8, &options);
    assert!(
        matches!(
            not_a_refiner,
            Err(Error::WrongFamily {
                found: "SD1.x/2.x",
                ..
            })
        ),
        "{:?}",
        not_a_refiner.err()
    );
    let refiner = Refiner::new(&fixtures().join("tiny-sdxl-refiner"), 0.8, &options).unwrap();
    let base = load("tiny-sd15");
    let request = request(&base);
    let message = refiner
        .generate_once(base, &request, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("tiny-sd15") && message.contains("SDXL base"),
        "{message}"
    );
}

// Tolerance: bit-identical images for the same seed; a different seed changes them.
#[test]
fn random_weights_run_the_whole_pipeline_reproducibly() {
    let files = ModelFiles::Folder(fixtures().join("tiny-sd15"));
    let options = LoadOptions::default();
    let image = |seed: u64| -> Tensor {
        let pipeline = StableDiffusion::random(&files, seed, &options).unwrap();
        let request = request(&pipeline);
        pipeline.generate_once(&request, &mut |_| {}).unwrap()
    };
    let first = image(1);
    let size = load("tiny-sd15").default_size();
    assert_eq!(first.dims(), [1, 3, size, size]);
    assert_eq!(max_difference(&first, &image(1)), 0.0);
    assert!(max_difference(&first, &image(2)) > 0.0);
    let values: Vec<f32> = first.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values
        .iter()
        .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
}
