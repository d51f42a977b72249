//! The MLP activations CLIP text encoders use, named as transformers' `activations.py` (`ACT2FN`)
//! names them.

use std::str::FromStr;

use candle_core::{Result as CandleResult, Tensor};

use crate::error::Error;

/// A `hidden_act` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)`, OpenAI CLIP's approximation (SD1.x, CLIP-L).
    QuickGelu,
    /// `gelu`: the exact, erf-based GELU (OpenCLIP ViT-H and ViT-bigG, SDXL's second encoder).
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation of GELU.
    GeluTanh,
    Relu,
    /// `silu` / `swish`: `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The `hidden_act` names accepted, for error messages.
    pub const ACCEPTED: &'static str =
        "quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish";

    pub fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

impl FromStr for Activation {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(Error::UnsupportedActivation {
                found: other.to_string(),
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
    fn activations_match_their_formulas() {
        let xs = Tensor::new(&[-2.0f32, -0.5, 0.0, 0.7, 3.0], &Device::Cpu).unwrap();
        let out = |a: Activation| a.forward(&xs).unwrap().to_vec1::<f32>().unwrap();
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let inputs = [-2.0f32, -0.5, 0.0, 0.7, 3.0];
        for (got, x) in out(Activation::QuickGelu).iter().zip(inputs) {
            assert!((got - x * sigmoid(1.702 * x)).abs() < 1e-6);
        }
        // Exact GELU at x = -0.5: x * Phi(x) with Phi(-0.5) = 0.30853754.
        assert!((out(Activation::Gelu)[1] - (-0.5 * 0.308_537_55)).abs() < 1e-6);
        for (got, x) in out(Activation::Silu).iter().zip(inputs) {
            assert!((got - x * sigmoid(x)).abs() < 1e-6);
        }
        assert_eq!(out(Activation::Relu), vec![0.0, 0.0, 0.0, 0.7, 3.0]);
    }

    #[test]
    fn names_parse_and_unknown_names_list_the_accepted_ones() {
        assert_eq!("gelu".parse::<Activation>().unwrap(), Activation::Gelu);
        assert_eq!(
            "gelu_pytorch_tanh".parse::<Activation>().unwrap(),
            Activation::GeluTanh
        );
        let err = "tanh".parse::<Activation>().unwrap_err().to_string();
        assert!(
            err.contains("\"tanh\"") && err.contains("quick_gelu"),
            "{err}"
        );
    }
}
