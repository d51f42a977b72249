//! Layout detection and loading errors, on the fixture files (no model is run).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sdrs_taesd::{detect_layout, AutoencoderTiny, BareKeyError, Error, Half, Layout};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

/// A fresh scratch folder under the system temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-taesd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bare_folder_is_detected_by_its_file_suffixes() {
    match detect_layout(&fixture("real-taef2")).unwrap() {
        Layout::Bare { encoder, decoder } => {
            assert!(encoder.unwrap().ends_with("taef2_encoder.safetensors"));
            assert!(decoder.unwrap().ends_with("taef2_decoder.safetensors"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn empty_and_ambiguous_folders_are_errors() {
    let empty = scratch("empty");
    assert!(matches!(
        AutoencoderTiny::from_dir(&empty, DType::F32, &Device::Cpu, Default::default()),
        Err(Error::NoWeights { .. })
    ));
    let two = scratch("two");
    std::fs::copy(
        fixture("taesd/taesd_decoder.safetensors"),
        two.join("taesd_decoder.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture("taef1/taef1_decoder.safetensors"),
        two.join("taef1_decoder.safetensors"),
    )
    .unwrap();
    match detect_layout(&two) {
        Err(Error::AmbiguousDir { prefixes, .. }) => assert_eq!(prefixes, ["taef1", "taesd"]),
        other => panic!("unexpected {other:?}"),
    }
    // A folder holding one decoder alone loads for decoding.
    std::fs::remove_file(two.join("taef1_decoder.safetensors")).unwrap();
    let model =
        AutoencoderTiny::from_dir(&two, DType::F32, &Device::Cpu, Default::default()).unwrap();
    assert!(model.has_decoder() && !model.has_encoder());
    let _ = std::fs::remove_dir_all(&empty);
    let _ = std::fs::remove_dir_all(&two);
}

#[test]
fn wrong_files_are_reported_with_their_keys() {
    let dev = Device::Cpu;
    // A diffusers-layout file is not a bare file.
    let diffusers = fixture("taesd/diffusion_pytorch_model.safetensors");
    match AutoencoderTiny::from_files(Some(&diffusers), None, DType::F32, &dev, Default::default())
    {
        Err(Error::BareKey {
            half: Half::Encoder,
            source: BareKeyError::NotALayerIndex,
            key,
            ..
        }) => assert!(key.starts_with("encoder.") || key.starts_with("decoder.")),
        other => panic!("unexpected {other:?}"),
    }
    // A decoder passed as the encoder does not have an encoder's structure.
    let decoder = fixture("taesd/taesd_decoder.safetensors");
    match AutoencoderTiny::from_files(Some(&decoder), None, DType::F32, &dev, Default::default()) {
        Err(Error::UnknownVariant {
            half: Half::Encoder,
            shapes,
            ..
        }) => assert!(!shapes.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    // Halves of different families disagree on the latent channels.
    match AutoencoderTiny::from_files(
        Some(&fixture("taesd/taesd_encoder.safetensors")),
        Some(&fixture("taef1/taef1_decoder.safetensors")),
        DType::F32,
        &dev,
        Default::default(),
    ) {
        Err(Error::LatentChannelsMismatch {
            encoder: 4,
            decoder: 16,
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        AutoencoderTiny::from_files(None, None, DType::F32, &dev, Default::default()),
        Err(Error::NoHalves)
    ));
}

#[test]
fn diffusers_weights_that_disagree_with_the_config_name_the_file() {
    let dir = scratch("mismatch");
    let cfg = std::fs::read_to_string(fixture("taesd/config.json")).unwrap();
    let cfg = cfg.replace("\"latent_channels\": 4", "\"latent_channels\": 16");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::copy(
        fixture("taesd/diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    match AutoencoderTiny::from_dir(&dir, DType::F32, &Device::Cpu, Default::default()) {
        Err(Error::Weights { path, source }) => {
            assert!(path.ends_with("diffusion_pytorch_model.safetensors"));
            assert!(source.to_string().contains("shape mismatch"), "{source}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
