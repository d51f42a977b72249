//! The `act_fn` activations of diffusers' `models/activations.py` (`get_activation`), shared by
//! the UNet and the VAE.

use std::str::FromStr;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// An `act_fn` value (diffusers' `get_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: `x * sigmoid(x)`, what every Stable Diffusion UNet and VAE uses.
    Silu,
    /// `mish`: `x * tanh(softplus(x))`.
    Mish,
    /// `gelu`: torch's `nn.GELU()`, the exact erf form.
    Gelu,
    Relu,
}

impl Activation {
    /// The `act_fn` names accepted, for error messages.
    pub const ACCEPTED: &'static str = "silu, swish, mish, gelu, relu";

    /// Parses the value of config key `key`, naming the key in the error.
    pub fn from_config(key: &str, name: &str) -> Result<Self> {
        name.parse().map_err(|_: Error| Error::Unsupported {
            key: key.to_string(),
            value: format!("{name:?}"),
            accepted: Self::ACCEPTED.to_string(),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => xs.silu()?,
            Self::Mish => {
                // softplus(x) = max(x, 0) + ln(1 + e^-|x|), which does not overflow for large x.
                let softplus = (xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                (xs * softplus.tanh()?)?
            }
            Self::Gelu => xs.gelu_erf()?,
            Self::Relu => xs.relu()?,
        })
    }
}

impl FromStr for Activation {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "mish" => Ok(Self::Mish),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(Error::Unsupported {
                key: "act_fn".to_string(),
                value: format!("{other:?}"),
                accepted: Self::ACCEPTED.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_follow_get_activation() {
        assert_eq!("swish".parse::<Activation>().unwrap(), Activation::Silu);
        assert_eq!("silu".parse::<Activation>().unwrap(), Activation::Silu);
        assert_eq!("gelu".parse::<Activation>().unwrap(), Activation::Gelu);
        let err = Activation::from_config("act_fn", "tanh").unwrap_err();
        assert!(err.to_string().contains("act_fn"), "{err}");
        assert!(err.to_string().contains("tanh"), "{err}");
    }

    #[test]
    fn mish_matches_its_definition() {
        let xs = Tensor::new(&[-30f32, -1.0, 0.0, 0.5, 3.0, 40.0], &Device::Cpu).unwrap();
        let got: Vec<f32> = Activation::Mish.forward(&xs).unwrap().to_vec1().unwrap();
        for (x, y) in [-30f32, -1.0, 0.0, 0.5, 3.0, 40.0].iter().zip(got) {
            let expected = x * (x.exp().ln_1p()).tanh();
            // Tolerance: f32 rounding of a handful of elementwise ops.
            assert!(
                (expected - y).abs() < 1e-5,
                "mish({x}) = {y}, expected {expected}"
            );
        }
    }
}
