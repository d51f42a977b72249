//! PNG in and out: images encoded with AUTOMATIC1111's `parameters` text chunk (as `sdrs
//! generate` writes them) and base64, and base64 init images decoded into pipeline tensors.

use base64::Engine;
use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;

use crate::{Error, Result};

/// `[3, H, W]` or `[1, 3, H, W]` in `[0, 1]` as 8-bit RGB, rounded as diffusers' `numpy_to_pil`
/// (the same arithmetic as `sdrs generate`, so that a seed gives the same pixels).
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let image = match image.rank() {
        4 => image.get(0)?,
        _ => image.clone(),
    };
    let (channels, height, width) = image.dims3().map_err(sdrs_pipeline::Error::from)?;
    if channels != 3 {
        return Err(Error::Encode(format!(
            "expected 3 colour channels, got {channels}"
        )));
    }
    let pixels = ((image.permute((1, 2, 0))?.to_dtype(DType::F32)? * 255.0)?.round()?)
        .clamp(0f32, 255f32)?
        .flatten_all()?
        .to_vec1::<f32>()
        .map_err(sdrs_pipeline::Error::from)?;
    Ok((width, height, pixels.into_iter().map(|v| v as u8).collect()))
}

/// An 8-bit RGB PNG, with a `parameters` chunk when given: tEXt when the text is Latin-1, iTXt
/// otherwise, as PIL (AUTOMATIC1111's writer) does.
pub fn encode(image: &Tensor, parameters: Option<&str>) -> Result<Vec<u8>> {
    let (width, height, rgb) = to_rgb8(image)?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let bad = |e: png::EncodingError| Error::Encode(e.to_string());
    if let Some(text) = parameters {
        if text.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk("parameters".to_string(), text.to_string())
        } else {
            encoder.add_itxt_chunk("parameters".to_string(), text.to_string())
        }
        .map_err(bad)?;
    }
    let mut writer = encoder.write_header().map_err(bad)?;
    writer.write_image_data(&rgb).map_err(bad)?;
    writer.finish().map_err(bad)?;
    Ok(out)
}

pub fn to_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An init image as clients send it (base64, optionally as a `data:image/...;base64,` URL),
/// decoded (PNG, JPEG or WebP) and resized with Lanczos to `width` x `height`, as `[1, 3, H, W]`
/// in `[0, 1]`.
pub fn decode_init_image(
    text: &str,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let data = match text.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| Error::InvalidField {
            name: "init_images",
            value: format!("({} characters)", text.len()),
            expected: format!("a base64-encoded PNG, JPEG or WebP image ({e})"),
        })?;
    let decoded = image::load_from_memory(&bytes).map_err(|e| Error::InvalidField {
        name: "init_images",
        value: format!("({} bytes)", bytes.len()),
        expected: format!("a PNG, JPEG or WebP image ({e})"),
    })?;
    let mut rgb = decoded.to_rgb8();
    if (rgb.width() as usize, rgb.height() as usize) != (width, height) {
        rgb = image::imageops::resize(&rgb, width as u32, height as u32, FilterType::Lanczos3);
    }
    let data: Vec<f32> = rgb.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let tensor = Tensor::from_vec(data, (height, width, 3), device)
        .and_then(|t| t.permute((2, 0, 1))?.unsqueeze(0)?.contiguous())
        .map_err(sdrs_pipeline::Error::from)?;
    Ok(tensor)
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Error::Pipeline(Box::new(error.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_base64_and_non_images_are_named_errors() {
        let error = decode_init_image("not base64!!", 8, 8, &Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("base64"), "{error}");
        let error = decode_init_image(&to_base64(b"hello"), 8, 8, &Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("PNG"), "{error}");
    }

    #[test]
    fn an_encoded_image_decodes_back_from_a_data_url() {
        let image = Tensor::full(0.5f32, (3, 4, 6), &Device::Cpu).unwrap();
        let png = encode(&image, Some("a cat\nSteps: 1")).unwrap();
        let url = format!("data:image/png;base64,{}", to_base64(&png));
        let back = decode_init_image(&url, 6, 4, &Device::Cpu).unwrap();
        assert_eq!(back.dims(), &[1, 3, 4, 6]);
        let mean = back.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 128.0 / 255.0).abs() < 1e-6, "{mean}");
    }
}
