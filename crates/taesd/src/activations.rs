//! Activation and upsampling choices named by `act_fn` / `upsample_fn`
//! (diffusers `models/activations.py` `get_activation`, and `nn.Upsample` modes).

use candle_core::{Result as CandleResult, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
    Mish,
    /// torch's `nn.GELU()`, i.e. the exact erf form.
    Gelu,
}

impl Activation {
    /// Same names as diffusers' `get_activation`, which lower-cases its argument first.
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_lowercase().as_str() {
            "relu" => Ok(Self::Relu),
            "swish" | "silu" => Ok(Self::Silu),
            "mish" => Ok(Self::Mish),
            "gelu" => Ok(Self::Gelu),
            _ => Err(Error::UnsupportedActivation {
                act_fn: name.to_string(),
            }),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        match self {
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
            Self::Mish => candle_nn::ops::mish(xs),
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsampleMode {
    Nearest,
    /// `nn.Upsample(mode="bilinear")`, whose `align_corners` defaults to false.
    Bilinear,
}

impl UpsampleMode {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nearest" => Ok(Self::Nearest),
            "bilinear" => Ok(Self::Bilinear),
            _ => Err(Error::UnsupportedUpsample {
                upsample_fn: name.to_string(),
            }),
        }
    }

    /// `nn.Upsample(scale_factor=factor, mode=self)` on an NCHW tensor.
    pub fn forward(&self, xs: &Tensor, factor: usize) -> CandleResult<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match self {
            Self::Nearest => xs.upsample_nearest2d(h * factor, w * factor),
            Self::Bilinear => {
                xs.upsample_bilinear2d_with_scale(factor as f64, factor as f64, false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_follow_get_activation() {
        assert_eq!(Activation::from_name("ReLU").unwrap(), Activation::Relu);
        assert_eq!(Activation::from_name("swish").unwrap(), Activation::Silu);
        assert!(Activation::from_name("tanh").is_err());
        assert!(UpsampleMode::from_name("bicubic").is_err());
    }

    #[test]
    fn nearest_upsample_repeats_pixels() {
        let xs = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let ys = UpsampleMode::Nearest.forward(&xs, 2).unwrap();
        let rows = ys
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(rows[0], vec![1., 1., 2., 2.]);
        assert_eq!(rows[3], vec![3., 3., 4., 4.]);
    }
}
