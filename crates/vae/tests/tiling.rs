//! Tiled decode and encode (`AutoencoderKL::decode_tiled`, `encode_tiled`): an input within one
//! tile is the untiled pass exactly, and, with the extended fixtures (`SDRS_FIXTURES`, default
//! `../shared/fixtures`), each case of `features/reference/tiled_vae.json` has the plan (grid,
//! strides, blends) the JSON records and diffusers' tiled outputs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdrs_kernels::VarBuilder;
use sdrs_tooling::tolerances::{tolerance, CaseKind};
use sdrs_vae::{AutoencoderKL, AutoencoderKLConfig, VaeTiling};

fn model(dir: &Path) -> AutoencoderKL {
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while the test maps them.
    let vb = VarBuilder::from(
        unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)
        }
        .unwrap(),
    );
    let config = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    AutoencoderKL::new(vb, &config).unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn an_input_within_one_tile_is_the_untiled_pass_exactly() {
    let vae = model(&fixtures().join("tiny-sd15/vae"));
    let tiling = VaeTiling::new(64, 8, 0.25).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 8, 6), &Device::Cpu).unwrap();
    let tiled = vae.decode_tiled(&latents, &tiling).unwrap();
    assert_eq!(max_abs_diff(&tiled, &vae.decode(&latents).unwrap()), 0.0);
    let image = Tensor::rand(-1f32, 1.0, (1, 3, 64, 48), &Device::Cpu).unwrap();
    let tiled = vae.encode_tiled(&image, &tiling).unwrap();
    let whole = vae.encode(&image).unwrap();
    assert_eq!(max_abs_diff(&tiled.mean, &whole.mean), 0.0);
    assert_eq!(max_abs_diff(&tiled.logvar, &whole.logvar), 0.0);
}

#[test]
fn a_larger_input_is_tiled_to_the_untiled_size() {
    let vae = model(&fixtures().join("tiny-sd15/vae"));
    let tiling = VaeTiling::new(32, 4, 0.25).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 7, 10), &Device::Cpu).unwrap();
    let tiled = vae.decode_tiled(&latents, &tiling).unwrap();
    let whole = vae.decode(&latents).unwrap();
    assert_eq!(tiled.dims(), whole.dims());
    assert!(
        max_abs_diff(&tiled, &whole) > 0.0,
        "the tiles were not used"
    );
    let image = Tensor::rand(-1f32, 1.0, (1, 3, 56, 80), &Device::Cpu).unwrap();
    let tiled = vae.encode_tiled(&image, &tiling).unwrap();
    assert_eq!(tiled.mean.dims(), [1, 4, 7, 10]);
}

fn extended(name: &str) -> Option<PathBuf> {
    sdrs_fixtures::extended(name)
}

fn usize_at(case: &serde_json::Value, path: &[&str]) -> usize {
    let mut value = case;
    for key in path {
        value = &value[*key];
    }
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{path:?} in {case}")) as usize
}

#[test]
fn tiled_passes_match_diffusers_with_the_plans_the_fixtures_record() {
    let Some(dir) = extended("features") else {
        return;
    };
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference/tiled_vae.json")).unwrap(),
    )
    .unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference/tiled_vae.safetensors"), &Device::Cpu)
            .unwrap();
    let root = dir.parent().unwrap();
    // Tolerance: the table's f32 VAE bound, 1e-3 max |diff|.
    let bound = tolerance(CaseKind::Vae, DType::F32).unwrap() as f32;
    let mut checked = 0;
    for case in json["cases"].as_array().unwrap() {
        let Some(vae_dir) = case["vae"].as_str() else {
            continue;
        };
        let key = case["key"].as_str().unwrap();
        let tiling = VaeTiling::new(
            usize_at(case, &["tile_sample_min_size"]),
            usize_at(case, &["tile_latent_min_size"]),
            case["tile_overlap_factor"].as_f64().unwrap(),
        )
        .unwrap();
        let latents = &reference["latents"];
        let image = &reference["image"];
        let (_, _, lh, lw) = latents.dims4().unwrap();
        let (_, _, h, w) = image.dims4().unwrap();
        let decode = tiling.decode_plan(lh, lw);
        assert_eq!(
            (decode.stride, decode.blend_extent, decode.row_limit),
            (
                usize_at(case, &["decode", "stride_latent"]),
                usize_at(case, &["decode", "blend_extent_px"]),
                usize_at(case, &["decode", "row_limit_px"])
            ),
            "{key} decode"
        );
        let grid = &case["decode"]["grid_rows_x_cols"];
        assert_eq!(
            decode.grid(),
            (
                grid[0].as_u64().unwrap() as usize,
                grid[1].as_u64().unwrap() as usize
            ),
            "{key}"
        );
        let encode = tiling.encode_plan(h, w);
        assert_eq!(
            (encode.stride, encode.blend_extent, encode.row_limit),
            (
                usize_at(case, &["encode", "stride_px"]),
                usize_at(case, &["encode", "blend_extent_latent"]),
                usize_at(case, &["encode", "row_limit_latent"])
            ),
            "{key} encode"
        );
        let grid = &case["encode"]["grid_rows_x_cols"];
        assert_eq!(
            encode.grid(),
            (
                grid[0].as_u64().unwrap() as usize,
                grid[1].as_u64().unwrap() as usize
            ),
            "{key}"
        );

        let vae = model(&root.join(vae_dir));
        let decoded = vae.decode_tiled(latents, &tiling).unwrap();
        let diff = max_abs_diff(&decoded, &reference[&format!("{key}_decoded")]);
        assert!(diff <= bound, "{key} decoded: {diff} > {bound}");
        let dist = vae.encode_tiled(image, &tiling).unwrap();
        for (what, ours) in [("mean", &dist.mean), ("logvar", &dist.logvar)] {
            let diff = max_abs_diff(ours, &reference[&format!("{key}_encoded_{what}")]);
            assert!(diff <= bound, "{key} encoded {what}: {diff} > {bound}");
        }
        checked += 1;
    }
    assert!(checked > 0, "tiled_vae.json has no VAE cases");
}
