//! LoRAs end to end on the tiny SD1.5 fixture, with synthetic files of each form (kohya LoCon,
//! LyCORIS LoHa and LoKr): merging changes the image, and a long-lived pipeline changing its
//! LoRAs (base -> A -> base) gives the base image again and the image a fresh load with A gives.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_pipeline::{Error, LoadOptions, LoraFile, Request, StableDiffusion};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random pattern (no generator state shared between tests).
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.5)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// [`randn`] three times larger: a LoHa's delta is a product of four factors.
fn big(shape: &[usize], seed: u64) -> Tensor {
    (randn(shape, seed) * 3.0).unwrap()
}

fn write(path: &Path, tensors: Vec<(String, Tensor)>) {
    safetensors::tensor::serialize_to_file(tensors, None, path).unwrap();
}

/// The three forms, each changing conv_in, one attention projection and a text-encoder layer.
fn lora_files(dir: &Path) -> [PathBuf; 3] {
    let scalar = |v: f32| Tensor::new(v, &Device::Cpu).unwrap();
    let locon = dir.join("locon.safetensors");
    write(
        &locon,
        vec![
            (
                "lora_unet_conv_in.lora_down.weight".into(),
                randn(&[2, 4, 3, 3], 1),
            ),
            (
                "lora_unet_conv_in.lora_up.weight".into(),
                randn(&[32, 2, 1, 1], 2),
            ),
            ("lora_unet_conv_in.alpha".into(), scalar(1.0)),
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(),
                randn(&[2, 32], 3),
            ),
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight".into(),
                randn(&[128, 2], 4),
            ),
        ],
    );
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let loha = dir.join("loha.safetensors");
    write(
        &loha,
        vec![
            (format!("{q}.hada_w1_a"), big(&[32, 2], 5)),
            (format!("{q}.hada_w1_b"), big(&[2, 32], 6)),
            (format!("{q}.hada_w2_a"), big(&[32, 2], 7)),
            (format!("{q}.hada_w2_b"), big(&[2, 32], 8)),
            (format!("{q}.alpha"), scalar(2.0)),
            // Tucker form on a 3x3 convolution.
            ("lora_unet_conv_in.hada_t1".into(), big(&[2, 2, 3, 3], 9)),
            ("lora_unet_conv_in.hada_w1_a".into(), big(&[2, 32], 10)),
            ("lora_unet_conv_in.hada_w1_b".into(), big(&[2, 4], 11)),
            ("lora_unet_conv_in.hada_t2".into(), big(&[2, 2, 3, 3], 12)),
            ("lora_unet_conv_in.hada_w2_a".into(), big(&[2, 32], 13)),
            ("lora_unet_conv_in.hada_w2_b".into(), big(&[2, 4], 14)),
        ],
    );
    let lokr = dir.join("lokr.safetensors");
    write(
        &lokr,
        vec![
            (format!("{q}.lokr_w1"), randn(&[4, 4], 15)),
            (format!("{q}.lokr_w2_a"), randn(&[8, 2], 16)),
            (format!("{q}.lokr_w2_b"), randn(&[2, 8], 17)),
            (format!("{q}.alpha"), scalar(2.0)),
            ("lora_unet_conv_in.lokr_w1".into(), randn(&[4, 2], 18)),
            ("lora_unet_conv_in.lokr_w2".into(), randn(&[8, 2, 3, 3], 19)),
        ],
    );
    [locon, loha, lokr]
}

fn request(pipeline: &StableDiffusion) -> Request {
    let mut request = Request::new(pipeline, "a red cube", pipeline.scheduler_config().clone());
    request.steps = 2;
    request.seed = Some(5);
    request.width = 64;
    request.height = 64;
    request
}

fn image(pipeline: &StableDiffusion) -> Tensor {
    pipeline.generate(&request(pipeline), &mut |_| {}).unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

// Tolerance: bit-identical where the same weights are computed with (reload = fresh load).
#[test]
fn set_loras_goes_from_base_to_each_form_and_back_to_base() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd15");
    let mut pipeline = StableDiffusion::load(&model, &LoadOptions::default()).unwrap();
    let base = image(&pipeline);
    for file in lora_files(dir.path()) {
        let loras = [LoraFile::new(&file, 0.7)];
        pipeline.set_loras(&loras).unwrap();
        assert_eq!(pipeline.loras(), loras);
        let with = image(&pipeline);
        assert!(
            max_difference(&with, &base) > 1e-3,
            "{} changed nothing",
            file.display()
        );
        let fresh = StableDiffusion::load(
            &model,
            &LoadOptions::default().with_loras(loras.to_vec(), false),
        )
        .unwrap();
        assert_eq!(
            max_difference(&image(&fresh), &with),
            0.0,
            "{}",
            file.display()
        );
        pipeline.set_loras(&[]).unwrap();
        assert_eq!(max_difference(&image(&pipeline), &base), 0.0);
    }
}

#[test]
fn a_failed_change_keeps_the_former_loras() {
    let dir = tempfile::tempdir().unwrap();
    let [locon, ..] = lora_files(dir.path());
    let odd = dir.path().join("te2.safetensors");
    write(
        &odd,
        vec![
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(),
                randn(&[2, 32], 1),
            ),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight".into(),
                randn(&[128, 2], 2),
            ),
        ],
    );
    let model = fixtures().join("tiny-sd15");
    let loras = [LoraFile::new(&locon, 1.0)];
    let mut pipeline = StableDiffusion::load(
        &model,
        &LoadOptions::default().with_loras(loras.to_vec(), false),
    )
    .unwrap();
    let before = image(&pipeline);
    // SD1.5 has no second text encoder: its modules match nothing.
    match pipeline.set_loras(&[LoraFile::new(&odd, 1.0)]) {
        Err(Error::Lora { message, .. }) => {
            assert!(message.contains("lora_te2_text_model"), "{message}")
        }
        other => panic!("expected a LoRA error, got {:?}", other.err()),
    }
    assert_eq!(pipeline.loras(), loras);
    assert_eq!(max_difference(&image(&pipeline), &before), 0.0);
    // Loading with it is refused the same way, unless unmatched modules are ignored.
    let options = LoadOptions::default().with_loras(vec![LoraFile::new(&odd, 1.0)], false);
    assert!(matches!(
        StableDiffusion::load(&model, &options),
        Err(Error::Lora { .. })
    ));
    let options = LoadOptions::default().with_loras(vec![LoraFile::new(&odd, 1.0)], true);
    let ignored = StableDiffusion::load(&model, &options).unwrap();
    let base = StableDiffusion::load(&model, &LoadOptions::default()).unwrap();
    assert_eq!(max_difference(&image(&ignored), &image(&base)), 0.0);
}
