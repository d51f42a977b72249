//! The `act_fn` activations of diffusers' `models/activations.py` (`get_activation`), one for
//! every name a UNet, VAE or tiny-autoencoder config may hold, each computed as the torch module
//! diffusers builds for it.

use std::str::FromStr;

use candle_core::{Result as CandleResult, Tensor};
use candle_nn::Module;

use crate::error::{Error, Result};

/// An `act_fn` value (diffusers' `get_activation`, whose table is `ACT2CLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: torch's `nn.SiLU()`, `x * sigmoid(x)`; what every Stable Diffusion UNet
    /// and VAE uses.
    Silu,
    /// `mish`: torch's `nn.Mish()`, `x * tanh(softplus(x))`.
    Mish,
    /// `gelu`: torch's `nn.GELU()`, the exact erf form (`approximate="none"`).
    Gelu,
    /// `relu`: torch's `nn.ReLU()`; the TAESD family's `act_fn`.
    Relu,
}

impl Activation {
    /// The `act_fn` names accepted (the keys of diffusers' `ACT2CLS`), for error messages.
    pub const ACCEPTED: &'static str = "silu, swish, mish, gelu, relu";

    /// Parses the value of config key `key`, naming the key in the error. Case does not matter:
    /// `get_activation` lower-cases its argument first.
    pub fn from_config(key: &str, name: &str) -> Result<Self> {
        match name.to_lowercase().as_str() {
            "silu" | "swish" => Ok(Self::Silu),
            "mish" => Ok(Self::Mish),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            _ => Err(Error::Unsupported {
                key: key.to_string(),
                value: format!("{name:?}"),
                accepted: Self::ACCEPTED.to_string(),
            }),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        match self {
            Self::Silu => xs.silu(),
            Self::Mish => {
                // softplus(x) = max(x, 0) + ln(1 + e^-|x|), which never forms e^x (infinite in
                // f16 above x = 11, as in candle's `ops::mish`).
                let softplus = (xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                xs * softplus.tanh()?
            }
            Self::Gelu => xs.gelu_erf(),
            Self::Relu => xs.relu(),
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        Activation::forward(self, xs)
    }
}

/// Parses an `act_fn` value; see [`Activation::from_config`] to name another key in the error.
impl FromStr for Activation {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::from_config("act_fn", name)
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
        assert_eq!("mish".parse::<Activation>().unwrap(), Activation::Mish);
        assert_eq!("relu".parse::<Activation>().unwrap(), Activation::Relu);
        // `get_activation` lower-cases first.
        assert_eq!("ReLU".parse::<Activation>().unwrap(), Activation::Relu);
        assert_eq!("SiLU".parse::<Activation>().unwrap(), Activation::Silu);
    }

    #[test]
    fn unknown_names_name_the_key_the_value_and_the_accepted_ones() {
        let err = Activation::from_config("time_embedding_act_fn", "tanh").unwrap_err();
        match &err {
            Error::Unsupported {
                key,
                value,
                accepted,
            } => {
                assert_eq!(key, "time_embedding_act_fn");
                assert_eq!(value, "\"tanh\"");
                assert_eq!(accepted, Activation::ACCEPTED);
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("tanh") && message.contains("swish"),
            "{message}"
        );
    }

    fn values(act: Activation, xs: &[f32]) -> Vec<f32> {
        let t = Tensor::new(xs, &Device::Cpu).unwrap();
        act.forward(&t).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn mish_matches_its_definition() {
        let xs = [-30f32, -1.0, 0.0, 0.5, 3.0, 40.0];
        for (x, y) in xs.iter().zip(values(Activation::Mish, &xs)) {
            let expected = x * (x.exp().ln_1p()).tanh();
            // Tolerance: f32 rounding of a handful of elementwise ops.
            assert!(
                (expected - y).abs() < 1e-5,
                "mish({x}) = {y}, expected {expected}"
            );
        }
    }

    #[test]
    fn mish_stays_finite_in_f16() {
        let xs = Tensor::new(&[-20f32, 12.0, 60000.0], &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F16)
            .unwrap();
        let ys: Vec<f32> = Activation::Mish
            .forward(&xs)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        // mish(x) = x for large x (60000 is exact in f16, a multiple of its spacing 32 there).
        assert_eq!(&ys[1..], &[12.0, 60000.0], "{ys:?}");
        assert!(ys[0].abs() < 1e-6, "{ys:?}");
    }

    #[test]
    fn silu_gelu_relu_match_torch() {
        let xs = [-2.0f32, -0.5, 0.0, 0.7, 3.0];
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        for (got, x) in values(Activation::Silu, &xs).iter().zip(xs) {
            // Tolerance: f32 rounding of exp and a division.
            assert!((got - x * sigmoid(x)).abs() < 1e-6, "silu({x}) = {got}");
        }
        // Exact GELU at x = -0.5: x * Phi(x) with Phi(-0.5) = 0.30853754 (not the tanh form,
        // which gives -0.154286).
        let gelu = values(Activation::Gelu, &xs)[1];
        assert!(
            (gelu - (-0.5 * 0.308_537_55)).abs() < 1e-6,
            "gelu(-0.5) = {gelu}"
        );
        assert_eq!(values(Activation::Relu, &xs), vec![0.0, 0.0, 0.0, 0.7, 3.0]);
    }
}
