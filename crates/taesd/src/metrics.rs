//! Image-difference measures (MAE, RMSE, PSNR) for images in [0, 1], as used to judge a tiny
//! autoencoder's round trip. Sums are taken in f64 on the host, whatever the device and dtype.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageMetrics {
    pub mae: f64,
    pub rmse: f64,
    /// `10 log10(1 / MSE)`, infinite for identical images.
    pub psnr_db: f64,
    pub max_abs: f64,
}

/// PSNR in dB for a peak value of 1.
pub fn psnr_from_mse(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

fn host_values(xs: &Tensor) -> Result<Vec<f32>> {
    Ok(xs
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Compares two images of the same shape (values expected in [0, 1]; clamp first if needed).
pub fn compare_images(a: &Tensor, b: &Tensor) -> Result<ImageMetrics> {
    if a.dims() != b.dims() || a.elem_count() == 0 {
        return Err(Error::ShapeMismatch {
            a: a.dims().to_vec(),
            b: b.dims().to_vec(),
        });
    }
    let (a, b) = (host_values(a)?, host_values(b)?);
    let (mut abs_sum, mut sq_sum, mut max_abs) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = (f64::from(*x) - f64::from(*y)).abs();
        abs_sum += d;
        sq_sum += d * d;
        max_abs = max_abs.max(d);
    }
    let n = a.len() as f64;
    let mse = sq_sum / n;
    Ok(ImageMetrics {
        mae: abs_sum / n,
        rmse: mse.sqrt(),
        psnr_db: psnr_from_mse(mse),
        max_abs,
    })
}

pub fn psnr_db(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(compare_images(a, b)?.psnr_db)
}

pub fn mae(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(compare_images(a, b)?.mae)
}

pub fn rmse(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(compare_images(a, b)?.rmse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[0.0f32, 0.5, 1.0, 0.25], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, 0.5, 0.9, 0.25], &dev).unwrap();
        let m = compare_images(&a, &b).unwrap();
        assert!((m.mae - 0.05).abs() < 1e-7);
        assert!((m.rmse - 0.005f64.sqrt()).abs() < 1e-7);
        assert!((m.psnr_db - 23.0103).abs() < 1e-3);
        assert!((m.max_abs - 0.1).abs() < 1e-7);
        assert_eq!(psnr_db(&a, &a).unwrap(), f64::INFINITY);
        let c = Tensor::new(&[0.0f32, 0.5], &dev).unwrap();
        assert!(matches!(
            compare_images(&a, &c),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
