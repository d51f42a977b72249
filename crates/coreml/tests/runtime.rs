//! The Core ML runtime's glue on Linux, through stand-ins answering from the recorded reference
//! pairs of `../shared/fixtures/coreml/reference/` (the traced PyTorch modules torch2coreml
//! converted): resource discovery, the text encoder's, UNet's (BC1S, dtypes, chunk chaining,
//! batches) and VAE's conventions as Apple's Swift pipeline feeds the models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sdrs_coreml::runtime::features::read_safetensors;
use sdrs_coreml::runtime::unet::{from_bc1s, to_bc1s};
use sdrs_coreml::runtime::{
    default_scaling_factor, ArrayDtype, BundleKind, CoreMlModel, FeatureInfo, ModelFormat,
    MultiArray, Resources, StandIn, TextEncoderGlue, UnetGlue, UnetInputs, VaeGlue,
};

fn fixture_dir(sub: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(sub)
}

/// The stand-in of `reference/<kind>/<name>`, declaring what the package in `<kind>/` declares.
fn standin(coreml: &Path, kind: &str, name: &str, tolerance: f32) -> StandIn {
    let reference = coreml.join("reference").join(kind);
    let model = StandIn::from_files(
        name,
        &reference.join(format!("{name}.inputs.safetensors")),
        &reference.join(format!("{name}.outputs.safetensors")),
        tolerance,
    )
    .unwrap();
    let described = sdrs_coreml::runtime::ModelFile {
        name: name.to_string(),
        path: coreml.join(kind).join(format!("{name}.mlpackage")),
        format: ModelFormat::Package,
    }
    .describe()
    .unwrap();
    model.with_description(described.inputs, described.outputs)
}

fn recorded(coreml: &Path, kind: &str, file: &str) -> HashMap<String, MultiArray> {
    read_safetensors(&coreml.join("reference").join(kind).join(file)).unwrap()
}

fn max_diff(a: &MultiArray, b: &MultiArray) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.to_f32()
        .iter()
        .zip(b.to_f32())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn as_f32(a: &MultiArray) -> MultiArray {
    MultiArray::from_f32(&a.shape, a.to_f32()).unwrap()
}

#[test]
fn each_fixture_folder_is_discovered_with_its_kind_and_pieces() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    let sd15 = Resources::discover(&coreml.join("sd15")).unwrap();
    assert_eq!(sd15.kind, BundleKind::Sd);
    assert!(sd15.text_encoder.is_some() && sd15.text_encoder_2.is_none());
    assert_eq!(sd15.unet.len(), 1);
    assert_eq!(sd15.unet[0].name, "Unet");
    assert_eq!(sd15.unet[0].format, ModelFormat::Package);
    assert!(sd15.vae_encoder.is_some());
    assert_eq!(sd15.models().len(), 4);

    let sdxl = Resources::discover(&coreml.join("sdxl")).unwrap();
    assert_eq!(sdxl.kind, BundleKind::Sdxl);
    assert!(sdxl.text_encoder_2.is_some() && sdxl.vae_encoder.is_none());
    assert!(!sdxl.is_chunked());
    assert_eq!(default_scaling_factor(sdxl.kind), 0.13025);
    assert_eq!(default_scaling_factor(sd15.kind), 0.18215);

    // The chunked folders hold only the two UNet halves: no text encoder.
    for chunked in ["sd15-chunked", "sdxl-chunked"] {
        let message = Resources::discover(&coreml.join(chunked))
            .unwrap_err()
            .to_string();
        assert!(message.contains("TextEncoder.mlmodelc"), "{message}");
    }
}

/// A folder of `.mlmodelc` bundles holding only the synthetic `metadata.json` of `metadata/`.
fn compiled_folder(coreml: &Path, models: &[(&str, &str)], tokenizer: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in models {
        let bundle = dir.path().join(format!("{name}.mlmodelc"));
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::copy(
            coreml
                .join("metadata")
                .join(format!("{source}.metadata.json")),
            bundle.join("metadata.json"),
        )
        .unwrap();
    }
    if tokenizer {
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(coreml.join("sd15").join(file), dir.path().join(file)).unwrap();
        }
    }
    dir
}

#[test]
fn compiled_bundles_are_described_by_their_metadata_and_chunks_win() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    let dir = compiled_folder(
        &coreml,
        &[
            ("TextEncoder", "sd15__TextEncoder"),
            ("Unet", "sd15__Unet"),
            ("UnetChunk1", "sd15-chunked__UnetChunk1"),
            ("UnetChunk2", "sd15-chunked__UnetChunk2"),
            ("VAEDecoder", "sd15__VAEDecoder"),
        ],
        true,
    );
    let found = Resources::discover(dir.path()).unwrap();
    assert_eq!(found.kind, BundleKind::Sd);
    let names: Vec<_> = found.unet.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["UnetChunk1", "UnetChunk2"]);
    assert!(found.unet.iter().all(|m| m.format == ModelFormat::Compiled));
    assert!(found.vae_encoder.is_none());
    // metadata.json describes what the package's spec describes.
    for (model, package) in [
        (
            &found.unet[0],
            coreml.join("sd15-chunked/UnetChunk1.mlpackage"),
        ),
        (
            &found.unet[1],
            coreml.join("sd15-chunked/UnetChunk2.mlpackage"),
        ),
        (
            found.text_encoder.as_ref().unwrap(),
            coreml.join("sd15/TextEncoder.mlpackage"),
        ),
        (&found.vae_decoder, coreml.join("sd15/VAEDecoder.mlpackage")),
    ] {
        let from_metadata = model.describe().unwrap();
        let from_spec = sdrs_coreml::runtime::ModelFile {
            name: model.name.clone(),
            path: package,
            format: ModelFormat::Package,
        }
        .describe()
        .unwrap();
        let sorted = |mut v: Vec<FeatureInfo>| {
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        assert_eq!(
            sorted(from_metadata.inputs),
            sorted(from_spec.inputs),
            "{}",
            model.name
        );
        assert_eq!(
            sorted(from_metadata.outputs),
            sorted(from_spec.outputs),
            "{}",
            model.name
        );
    }
    let unet = found.unet[0].describe().unwrap();
    let sample = unet.input("sample").unwrap();
    assert_eq!((sample.dtype, sample.shape.len()), (ArrayDtype::F16, 4));

    // SDXL: both encoders; the refiner: only the second.
    let sdxl = compiled_folder(
        &coreml,
        &[
            ("TextEncoder", "sdxl__TextEncoder"),
            ("TextEncoder2", "sdxl__TextEncoder2"),
            ("Unet", "sdxl__Unet"),
            ("VAEDecoder", "sdxl__VAEDecoder"),
        ],
        true,
    );
    assert_eq!(
        Resources::discover(sdxl.path()).unwrap().kind,
        BundleKind::Sdxl
    );
    std::fs::remove_dir_all(sdxl.path().join("TextEncoder.mlmodelc")).unwrap();
    assert_eq!(
        Resources::discover(sdxl.path()).unwrap().kind,
        BundleKind::SdxlRefiner
    );
    // A UNet conditioned on 5 time ids (the aesthetic score) is a refiner's.
    let refiner = compiled_folder(
        &coreml,
        &[
            ("TextEncoder2", "sdxl__TextEncoder2"),
            ("TextEncoder", "sdxl__TextEncoder"),
            ("Unet", "sdxl__Unet"),
            ("VAEDecoder", "sdxl__VAEDecoder"),
        ],
        true,
    );
    let metadata = refiner.path().join("Unet.mlmodelc/metadata.json");
    let text = std::fs::read_to_string(&metadata).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for input in json[0]["inputSchema"].as_array_mut().unwrap() {
        if input["name"] == "time_ids" {
            let shape = input["shape"].as_str().unwrap().replace(", 6]", ", 5]");
            assert!(shape.ends_with(", 5]"), "{shape}");
            input["shape"] = serde_json::Value::String(shape);
        }
    }
    std::fs::write(&metadata, serde_json::to_string(&json).unwrap()).unwrap();
    let found = Resources::discover(refiner.path()).unwrap();
    assert_eq!(found.kind, BundleKind::SdxlRefiner);
    assert_eq!(
        found.unet[0]
            .describe()
            .unwrap()
            .input("time_ids")
            .unwrap()
            .shape[1],
        5
    );
}

/// The models a folder has, whether it has the tokenizer files, the file its error must name.
type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a str);

#[test]
fn missing_pieces_are_errors_naming_the_file_expected() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    let full = [
        ("TextEncoder", "sd15__TextEncoder"),
        ("Unet", "sd15__Unet"),
        ("VAEDecoder", "sd15__VAEDecoder"),
    ];
    let cases: [Case; 5] = [
        (&full[1..], true, "TextEncoder.mlmodelc"),
        (&[full[0], full[2]], true, "Unet.mlmodelc"),
        (&full[..2], true, "VAEDecoder.mlmodelc"),
        (&full, false, "vocab.json"),
        (
            &[full[0], ("UnetChunk1", "sd15-chunked__UnetChunk1"), full[2]],
            true,
            "UnetChunk2.mlmodelc",
        ),
    ];
    for (models, tokenizer, expected) in cases {
        let dir = compiled_folder(&coreml, models, tokenizer);
        let message = Resources::discover(dir.path()).unwrap_err().to_string();
        assert!(message.contains(expected), "{expected}: {message}");
    }
    let dir = compiled_folder(&coreml, &full, true);
    assert!(Resources::discover(dir.path()).is_ok());
    let message = Resources::discover(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("absent"), "{message}");
}

#[test]
fn the_text_encoder_glue_feeds_float_ids_and_returns_the_recorded_states() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    for (kind, name, hidden) in [
        ("sd15", "TextEncoder", "last_hidden_state"),
        ("sdxl", "TextEncoder", "hidden_embeds"),
        ("sdxl", "TextEncoder2", "hidden_embeds"),
    ] {
        let glue = TextEncoderGlue::new(Arc::new(standin(&coreml, kind, name, 0.0))).unwrap();
        let inputs = recorded(&coreml, kind, &format!("{name}.inputs.safetensors"));
        let ids: Vec<u32> = inputs["input_ids"]
            .to_f32()
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(glue.context_length(), ids.len());
        let out = glue.encode(&ids).unwrap();
        let want = recorded(&coreml, kind, &format!("{name}.outputs.safetensors"));
        assert_eq!(out.hidden, as_f32(&want[hidden]));
        assert_eq!(out.pooled.unwrap(), as_f32(&want["pooled_outputs"]));
        // One id off: the stand-in names the input and the difference.
        let mut wrong = ids.clone();
        wrong[3] += 1;
        let message = glue.encode(&wrong).unwrap_err().to_string();
        assert!(
            message.contains("input_ids") && message.contains("largest difference 1"),
            "{message}"
        );
        assert!(glue.encode(&ids[..10]).is_err());
    }
}

fn unet_inputs(coreml: &Path, kind: &str) -> UnetInputs {
    let inputs = recorded(coreml, kind, "Unet.inputs.safetensors");
    UnetInputs {
        sample: as_f32(&inputs["sample"]),
        timestep: as_f32(&inputs["timestep"]),
        encoder_hidden_states: from_bc1s(&inputs["encoder_hidden_states"]).unwrap(),
        time_ids: inputs.get("time_ids").map(as_f32),
        text_embeds: inputs.get("text_embeds").map(as_f32),
    }
}

#[test]
fn the_unet_glue_feeds_bc1s_in_the_declared_dtypes() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    for kind in ["sd15", "sdxl"] {
        let model = standin(&coreml, kind, "Unet", 0.0);
        assert_eq!(
            model
                .inputs()
                .iter()
                .find(|f| f.name == "sample")
                .unwrap()
                .dtype,
            ArrayDtype::F16
        );
        let glue = UnetGlue::new(vec![Arc::new(model)]).unwrap();
        let inputs = unet_inputs(&coreml, kind);
        let want = &recorded(&coreml, kind, "Unet.outputs.safetensors")["noise_pred"];
        assert_eq!(&glue.predict(&inputs).unwrap(), want);

        // Our layout really is the transpose: the recorded BC1S goes back and forth unchanged.
        let bc1s = &recorded(&coreml, kind, "Unet.inputs.safetensors")["encoder_hidden_states"];
        assert_eq!(to_bc1s(&from_bc1s(bc1s).unwrap()).unwrap(), as_f32(bc1s));
        assert_eq!(inputs.encoder_hidden_states.shape[1], bc1s.shape[3]);

        // Twice the compiled batch runs as two slices; one row is padded to the pair.
        let twice = UnetInputs {
            sample: MultiArray::concat_rows(&[inputs.sample.clone(), inputs.sample.clone()])
                .unwrap(),
            timestep: MultiArray::concat_rows(&[inputs.timestep.clone(), inputs.timestep.clone()])
                .unwrap(),
            encoder_hidden_states: MultiArray::concat_rows(&[
                inputs.encoder_hidden_states.clone(),
                inputs.encoder_hidden_states.clone(),
            ])
            .unwrap(),
            time_ids: inputs
                .time_ids
                .as_ref()
                .map(|t| MultiArray::concat_rows(&[t.clone(), t.clone()]).unwrap()),
            text_embeds: inputs
                .text_embeds
                .as_ref()
                .map(|t| MultiArray::concat_rows(&[t.clone(), t.clone()]).unwrap()),
        };
        let out = glue.predict(&twice).unwrap();
        assert_eq!(
            out,
            MultiArray::concat_rows(&[want.clone(), want.clone()]).unwrap()
        );
        // A lone row is not the recorded pair: the stand-in says which input differs.
        let one = UnetInputs {
            sample: inputs.sample.rows(1, 1).unwrap(),
            timestep: inputs.timestep.rows(1, 1).unwrap(),
            encoder_hidden_states: inputs.encoder_hidden_states.rows(1, 1).unwrap(),
            time_ids: inputs.time_ids.as_ref().map(|t| t.rows(1, 1).unwrap()),
            text_embeds: inputs.text_embeds.as_ref().map(|t| t.rows(1, 1).unwrap()),
        };
        let message = glue.predict(&one).unwrap_err().to_string();
        assert!(
            message.contains("differs from the recorded one"),
            "{message}"
        );

        // Another latent size than the compiled one is refused, naming the compiled size.
        let mut big = inputs.clone();
        let mut shape = inputs.sample.shape.clone();
        shape[2] *= 2;
        big.sample = MultiArray::from_f32(&shape, vec![0.0; shape.iter().product()]).unwrap();
        let message = glue.predict(&big).unwrap_err().to_string();
        assert!(message.contains("compiled for"), "{message}");

        // SDXL's extra inputs: required by the SDXL model, refused by the SD one.
        let mut other = inputs.clone();
        if kind == "sdxl" {
            other.time_ids = None;
            assert!(glue
                .predict(&other)
                .unwrap_err()
                .to_string()
                .contains("time_ids"));
        } else {
            other.time_ids = Some(MultiArray::from_f32(&[2, 6], vec![0.0; 12]).unwrap());
            assert!(glue
                .predict(&other)
                .unwrap_err()
                .to_string()
                .contains("time_ids"));
        }
    }
}

/// Deterministic values for a chunk 1 output the fixtures did not record.
fn synthetic(feature: &FeatureInfo, seed: usize) -> MultiArray {
    let n: usize = feature.shape.iter().product();
    let values = (0..n)
        .map(|i| ((i * 31 + seed * 17) % 97) as f32 / 97.0 - 0.5)
        .collect::<Vec<_>>();
    MultiArray::from_f32_as(feature.dtype, &feature.shape, &values).unwrap()
}

#[test]
fn chunks_chain_by_name_over_the_original_inputs() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    for kind in ["sd15", "sdxl"] {
        let chunked = coreml.join(format!("{kind}-chunked"));
        let describe = |name: &str| {
            sdrs_coreml::runtime::ModelFile {
                name: name.to_string(),
                path: chunked.join(format!("{name}.mlpackage")),
                format: ModelFormat::Package,
            }
            .describe()
            .unwrap()
        };
        let (first, second) = (describe("UnetChunk1"), describe("UnetChunk2"));
        let inputs = recorded(&coreml, kind, "Unet.inputs.safetensors");
        let crossing: HashMap<String, MultiArray> = first
            .outputs
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), synthetic(f, i)))
            .collect();
        let chunk1 = StandIn::new("UnetChunk1", inputs.clone(), crossing.clone(), 0.0)
            .with_description(first.inputs.clone(), first.outputs.clone());
        // Chunk 2 must get chunk 1's outputs and the original inputs it declares.
        let mut expected2 = crossing.clone();
        for f in &second.inputs {
            if let Some(original) = inputs.get(&f.name) {
                expected2.insert(f.name.clone(), original.clone());
            }
        }
        assert!(second
            .inputs
            .iter()
            .all(|f| expected2.contains_key(&f.name)));
        assert!(second.inputs.iter().any(|f| inputs.contains_key(&f.name)));
        let answers = recorded(&coreml, kind, "Unet.outputs.safetensors");
        let chunk2 = StandIn::new("UnetChunk2", expected2, answers.clone(), 0.0)
            .with_description(second.inputs.clone(), second.outputs.clone());
        let glue = UnetGlue::new(vec![Arc::new(chunk1), Arc::new(chunk2)]).unwrap();
        let out = glue.predict(&unet_inputs(&coreml, kind)).unwrap();
        assert_eq!(out, answers["noise_pred"]);

        // Chunk 2 alone cannot run: its cut tensors come from nowhere.
        let chunk2_alone = StandIn::new("UnetChunk2", HashMap::new(), answers, 0.0)
            .with_description(second.inputs, second.outputs);
        assert!(UnetGlue::new(vec![Arc::new(chunk2_alone)]).is_err());
    }
}

#[test]
fn the_vae_glue_scales_latents_and_maps_pixel_ranges() {
    let Some(coreml) = fixture_dir("coreml") else {
        return;
    };
    for kind in ["sd15", "sdxl"] {
        let scale = default_scaling_factor(if kind == "sd15" {
            BundleKind::Sd
        } else {
            BundleKind::Sdxl
        });
        // The decoder gets z = latents / scale: a latent rounding back to the recorded z.
        let decoder = standin(&coreml, kind, "VAEDecoder", 1e-6);
        let z = &recorded(&coreml, kind, "VAEDecoder.inputs.safetensors")["z"];
        let latents: Vec<f32> = z.to_f32().iter().map(|v| v * scale as f32).collect();
        let latents = MultiArray::from_f32(&z.shape, latents).unwrap();
        let encoder = (kind == "sd15")
            .then(|| Arc::new(standin(&coreml, kind, "VAEEncoder", 0.0)) as Arc<dyn CoreMlModel>);
        let glue = VaeGlue::new(Arc::new(decoder), encoder, scale).unwrap();
        let image = glue.decode(&latents).unwrap();
        let want = &recorded(&coreml, kind, "VAEDecoder.outputs.safetensors")["image"];
        let expected: Vec<f32> = want
            .to_f32()
            .iter()
            .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect();
        assert_eq!(image, MultiArray::from_f32(&want.shape, expected).unwrap());
        // Latents not divided by the scale are not what the model was recorded with.
        let unscaled = VaeGlue::new(
            Arc::new(standin(&coreml, kind, "VAEDecoder", 1e-6)),
            None,
            1.0,
        )
        .unwrap();
        assert!(unscaled.decode(&latents).is_err());

        if kind == "sd15" {
            let x = &recorded(&coreml, kind, "VAEEncoder.inputs.safetensors")["x"];
            let pixels: Vec<f32> = x.to_f32().iter().map(|v| (v + 1.0) / 2.0).collect();
            let moments = glue
                .encode_moments(&MultiArray::from_f32(&x.shape, pixels).unwrap())
                .unwrap();
            let latent = &recorded(&coreml, kind, "VAEEncoder.outputs.safetensors")["latent"];
            assert_eq!(&moments, latent);
            // With zero noise the sample is the mean times the scale.
            let c = latent.shape[1] / 2;
            let plane: usize = latent.shape[2..].iter().product();
            let zeros = MultiArray::from_f32(
                &[1, c, latent.shape[2], latent.shape[3]],
                vec![0.0; c * plane],
            )
            .unwrap();
            let sampled = glue.sample(&moments, &zeros).unwrap();
            let mean: Vec<f32> = latent.to_f32()[..c * plane]
                .iter()
                .map(|v| v * scale as f32)
                .collect();
            assert!(
                max_diff(
                    &sampled,
                    &MultiArray::from_f32(&sampled.shape, mean).unwrap()
                ) < 1e-6
            );
            // Unit noise adds exp(logvar / 2) * scale.
            let ones = MultiArray::from_f32(&zeros.shape, vec![1.0; c * plane]).unwrap();
            let moved = glue.sample(&moments, &ones).unwrap().to_f32();
            let logvar = latent.to_f32()[c * plane];
            let expect =
                (latent.to_f32()[0] + (0.5 * logvar.clamp(-30.0, 20.0)).exp()) * scale as f32;
            assert!((moved[0] - expect).abs() < 1e-5, "{} {expect}", moved[0]);
        } else {
            let message = glue.encode_moments(&image).unwrap_err().to_string();
            assert!(message.contains("VAEEncoder"), "{message}");
        }
    }
}
