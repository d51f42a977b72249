//! Reading the starting picture for image-to-image and the mask for inpainting (PNG, JPEG or
//! WebP) and resizing them to the output size with a Lanczos filter, as diffusers' image and mask
//! processors do with PIL (the mask converted to grayscale as PIL's `convert("L")` does).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};

/// A decoded 8-bit RGB picture.
pub struct InitPicture {
    pub width: usize,
    pub height: usize,
    rgb: RgbImage,
}

/// The widest and tallest picture read: the largest output size a request may ask for.
pub const MAX_PICTURE_SIDE: u32 = sdrs_pipeline::stable_diffusion::MAX_SIDE as u32;

/// Decodes the init image `path`, naming it in the error.
pub fn read_init_image(path: &Path) -> Result<InitPicture> {
    read_picture(path, "the init image")
}

/// Decodes the picture `path` into 8-bit RGB; `what` names it in errors (`the init image`,
/// `the input image`). Pictures over [`MAX_PICTURE_SIDE`] pixels a side, and files cut short
/// (which the decoders may fill with gray instead of failing), are refused before decoding.
pub fn read_picture(path: &Path, what: &str) -> Result<InitPicture> {
    let decoded = decoder(path, what)?.decode().with_context(|| {
        format!(
            "cannot decode {what} {} (PNG, JPEG and WebP are supported)",
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

/// A reader of `path` with its format guessed, after the size and completeness checks.
fn decoder(
    path: &Path,
    what: &str,
) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    check_complete(path, what)?;
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {what} {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    let (width, height) = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(anyhow::Error::from)
        .and_then(|r| Ok(r.into_dimensions()?))
        .with_context(|| {
            format!(
                "cannot decode {what} {} (PNG, JPEG and WebP are supported)",
                path.display()
            )
        })?;
    if width > MAX_PICTURE_SIDE || height > MAX_PICTURE_SIDE {
        anyhow::bail!(
            "{what} {} is {width}x{height}; at most {MAX_PICTURE_SIDE} pixels a side are accepted",
            path.display()
        );
    }
    Ok(reader)
}

/// Refuses a PNG without its closing `IEND` chunk and a JPEG without its end-of-image marker:
/// the image crate decodes what is there of a truncated file and fills the rest.
fn check_complete(path: &Path, what: &str) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let ends = || -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        // Only the first and the last bytes: the file may be large.
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut head = Vec::new();
        (&mut file).take(8).read_to_end(&mut head)?;
        file.seek(SeekFrom::Start(len.saturating_sub(1024)))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        Ok((head, tail))
    };
    let (head, tail) = ends().with_context(|| format!("cannot open {what} {}", path.display()))?;
    let truncated = if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        !tail.windows(4).any(|w| w == b"IEND")
    } else if head.starts_with(&[0xFF, 0xD8]) {
        !tail.windows(2).any(|w| w == [0xFF, 0xD9])
    } else {
        false
    };
    if truncated {
        anyhow::bail!(
            "{what} {} is cut short (its end marker is missing): the file is incomplete",
            path.display()
        );
    }
    Ok(())
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

/// A decoded 8-bit grayscale mask (white: repaint).
pub struct MaskPicture {
    pub width: usize,
    pub height: usize,
    luma: GrayImage,
}

/// Decodes the mask `path` into grayscale, naming it in the error. Colour pictures become
/// PIL's `L` (ITU-R 601-2 luma, `(19595 R + 38470 G + 7471 B + 2^15) >> 16`), alpha ignored.
pub fn read_mask(path: &Path) -> Result<MaskPicture> {
    let decoded = decoder(path, "the mask")?.decode().with_context(|| {
        format!(
            "cannot decode the mask {} (PNG, JPEG and WebP are supported)",
            path.display()
        )
    })?;
    let luma = match decoded {
        DynamicImage::ImageLuma8(luma) => luma,
        DynamicImage::ImageLumaA8(luma_alpha) => {
            GrayImage::from_fn(luma_alpha.width(), luma_alpha.height(), |x, y| {
                image::Luma([luma_alpha.get_pixel(x, y).0[0]])
            })
        }
        other => pil_luma(&other.to_rgb8()),
    };
    Ok(MaskPicture {
        width: luma.width() as usize,
        height: luma.height() as usize,
        luma,
    })
}

/// PIL's RGB to `L` conversion, in its fixed point.
fn pil_luma(rgb: &RgbImage) -> GrayImage {
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0.map(u32::from);
        image::Luma([((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8])
    })
}

impl MaskPicture {
    /// The mask at `width` x `height` (unchanged when it already has that size).
    pub fn resized(self, width: usize, height: usize) -> Result<Self> {
        if (self.width, self.height) == (width, height) {
            return Ok(self);
        }
        let luma = image::imageops::resize(
            &self.luma,
            width as u32,
            height as u32,
            FilterType::Lanczos3,
        );
        Ok(Self {
            width,
            height,
            luma,
        })
    }

    /// `[1, 1, H, W]` in `[0, 1]`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> = self
            .luma
            .as_raw()
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect();
        Ok(Tensor::from_vec(
            data,
            (1, 1, self.height, self.width),
            device,
        )?)
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
    fn jpeg_or_png_truncated_at_half_is_refused_not_decoded() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["in.png", "in.jpg"] {
            let path = dir.path().join(name);
            let image = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
            image.save(&path).unwrap();
            read_init_image(&path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            let message = format!("{:#}", read_init_image(&path).err().unwrap());
            assert!(
                message.contains(name) && message.contains("cut short"),
                "{message}"
            );
        }
    }

    #[test]
    fn init_image_over_the_size_cap_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        // A picture one pixel wider than the cap: only its header is read.
        let mut bytes = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut bytes, MAX_PICTURE_SIDE + 1, 1);
            encoder.set_color(png::ColorType::Grayscale);
            let mut writer = encoder.write_header().unwrap();
            writer
                .write_image_data(&vec![0; MAX_PICTURE_SIDE as usize + 1])
                .unwrap();
        }
        std::fs::write(&path, bytes).unwrap();
        let message = format!(
            "{:#}",
            read_picture(&path, "the input image").err().unwrap()
        );
        assert!(
            message.contains("the input image") && message.contains("16384"),
            "{message}"
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

    #[test]
    fn masks_become_grayscale_as_pil_converts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.png");
        let colours = [[255u8, 255, 255], [0, 0, 0], [255, 0, 0], [10, 200, 30]];
        RgbImage::from_fn(4, 1, |x, _| image::Rgb(colours[x as usize]))
            .save(&path)
            .unwrap();
        let mask = read_mask(&path).unwrap();
        assert_eq!((mask.width, mask.height), (4, 1));
        let tensor = mask.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(tensor.dims(), &[1, 1, 1, 4]);
        let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // PIL: L = (19595 R + 38470 G + 7471 B + 32768) >> 16: 76 for pure red, 124 for the green.
        let expected = [255.0, 0.0, 76.0, 124.0].map(|v: f32| v / 255.0);
        assert_eq!(values, expected);
        // A grayscale file is read as it is.
        let gray = dir.path().join("gray.png");
        GrayImage::from_fn(2, 2, |x, y| image::Luma([(x * 100 + y * 20) as u8]))
            .save(&gray)
            .unwrap();
        let values = read_mask(&gray)
            .unwrap()
            .to_tensor(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(values, [0.0, 100.0, 20.0, 120.0].map(|v: f32| v / 255.0));
    }

    #[test]
    fn masks_are_resized_only_when_needed_and_unreadable_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.png");
        write_png(&path, 20, 12);
        let mask = read_mask(&path).unwrap().resized(16, 8).unwrap();
        assert_eq!(mask.to_tensor(&Device::Cpu).unwrap().dims(), &[1, 1, 8, 16]);
        let broken = dir.path().join("broken-mask.png");
        std::fs::write(&broken, b"not an image").unwrap();
        let message = format!("{:#}", read_mask(&broken).err().unwrap());
        assert!(
            message.contains("broken-mask.png") && message.contains("mask"),
            "{message}"
        );
    }
}
