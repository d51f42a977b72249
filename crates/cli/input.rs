//! Reading the starting picture for image-to-image (PNG, JPEG or WebP) and resizing it to the
//! output size with a Lanczos filter, as diffusers' image processor does with PIL.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;

/// A decoded 8-bit RGB picture.
pub struct InitPicture {
    pub width: usize,
    pub height: usize,
    rgb: RgbImage,
}

/// Decodes `path`, naming it in the error.
pub fn read_init_image(path: &Path) -> Result<InitPicture> {
    let decoded = image::ImageReader::open(path)
        .with_context(|| format!("cannot open the init image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read the init image {}", path.display()))?
        .decode()
        .with_context(|| {
            format!(
                "cannot decode the init image {} (PNG, JPEG and WebP are supported)",
                path.display()
            )
        })?;
    let rgb = decoded.to_rgb8();
    Ok(InitPicture {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        rgb,
    })
}

impl InitPicture {
    /// The picture at `width` x `height` (unchanged when it already has that size).
    pub fn resized(self, width: usize, height: usize) -> Result<Self> {
        if (self.width, self.height) == (width, height) {
            return Ok(self);
        }
        let rgb =
            image::imageops::resize(&self.rgb, width as u32, height as u32, FilterType::Lanczos3);
        Ok(Self { width, height, rgb })
    }

    /// `[1, 3, H, W]` in `[0, 1]`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> = self
            .rgb
            .as_raw()
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect();
        Ok(
            Tensor::from_vec(data, (self.height, self.width, 3), device)?
                .permute((2, 0, 1))?
                .unsqueeze(0)?
                .contiguous()?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, width: u32, height: u32) {
        let image = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([x as u8 * 10, y as u8 * 20, 255])
        });
        image.save(path).unwrap();
    }

    #[test]
    fn pixels_become_a_unit_range_nchw_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.png");
        write_png(&path, 3, 2);
        let picture = read_init_image(&path).unwrap();
        assert_eq!((picture.width, picture.height), (3, 2));
        let tensor = picture.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(tensor.dims(), &[1, 3, 2, 3]);
        let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // red channel, row 0: x * 10 / 255
        assert!((values[1] - 10.0 / 255.0).abs() < 1e-6);
        // blue channel is all 1
        assert!(values[12..].iter().all(|&v| v == 1.0));
    }

    #[test]
    fn resizing_changes_the_size_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.png");
        write_png(&path, 20, 12);
        let picture = read_init_image(&path).unwrap().resized(16, 8).unwrap();
        assert_eq!((picture.width, picture.height), (16, 8));
        assert_eq!(
            picture.to_tensor(&Device::Cpu).unwrap().dims(),
            &[1, 3, 8, 16]
        );
    }

    #[test]
    fn unreadable_images_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.png");
        std::fs::write(&path, b"not an image").unwrap();
        let message = format!("{:#}", read_init_image(&path).err().unwrap());
        assert!(message.contains("broken.png"), "{message}");
        let message = format!(
            "{:#}",
            read_init_image(&dir.path().join("missing.png"))
                .err()
                .unwrap()
        );
        assert!(message.contains("missing.png"), "{message}");
    }
}
