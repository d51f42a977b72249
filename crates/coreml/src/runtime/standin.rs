//! A stand-in for a Core ML model where there is no Core ML (Linux, CI): it answers from one
//! recorded input/output pair (e.g. the traced PyTorch module's, as the fixtures record it),
//! after checking that what it was given is what was recorded.

use std::collections::HashMap;
use std::path::Path;

use super::features::{read_safetensors, FeatureInfo, MultiArray};
use super::CoreMlModel;
use crate::error::model as model_error;
use crate::Result;

/// A model that expects exactly the recorded inputs (names, dtypes, shapes, values within
/// `tolerance`) and returns the recorded outputs.
#[derive(Debug, Clone)]
pub struct StandIn {
    name: String,
    inputs: Vec<FeatureInfo>,
    outputs: Vec<FeatureInfo>,
    expected: HashMap<String, MultiArray>,
    answers: HashMap<String, MultiArray>,
    tolerance: f32,
}

fn describe(arrays: &HashMap<String, MultiArray>) -> Vec<FeatureInfo> {
    let mut features: Vec<FeatureInfo> = arrays
        .iter()
        .map(|(name, a)| FeatureInfo {
            name: name.clone(),
            dtype: a.dtype(),
            shape: a.shape.clone(),
        })
        .collect();
    features.sort_by(|a, b| a.name.cmp(&b.name));
    features
}

impl StandIn {
    /// A stand-in declaring the recorded arrays' names, dtypes and shapes.
    pub fn new(
        name: &str,
        expected: HashMap<String, MultiArray>,
        answers: HashMap<String, MultiArray>,
        tolerance: f32,
    ) -> Self {
        Self {
            name: name.to_string(),
            inputs: describe(&expected),
            outputs: describe(&answers),
            expected,
            answers,
            tolerance,
        }
    }

    /// The pair recorded in `inputs` and `outputs` (safetensors files keyed by feature name).
    pub fn from_files(name: &str, inputs: &Path, outputs: &Path, tolerance: f32) -> Result<Self> {
        Ok(Self::new(
            name,
            read_safetensors(inputs)?,
            read_safetensors(outputs)?,
            tolerance,
        ))
    }

    /// Declares `inputs` and `outputs` instead of the recorded arrays' own description (a
    /// model's description read from its files), in that order.
    pub fn with_description(mut self, inputs: Vec<FeatureInfo>, outputs: Vec<FeatureInfo>) -> Self {
        self.inputs = inputs;
        self.outputs = outputs;
        self
    }
}

impl CoreMlModel for StandIn {
    fn name(&self) -> &str {
        &self.name
    }

    fn inputs(&self) -> &[FeatureInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[FeatureInfo] {
        &self.outputs
    }

    fn predict(&self, inputs: &HashMap<String, MultiArray>) -> Result<HashMap<String, MultiArray>> {
        let mut unexpected: Vec<&String> = inputs
            .keys()
            .filter(|name| !self.inputs.iter().any(|f| &f.name == *name))
            .collect();
        unexpected.sort();
        if let Some(name) = unexpected.first() {
            return Err(model_error(
                &self.name,
                format!("input {name} is not one the model declares"),
            ));
        }
        for feature in &self.inputs {
            let got = inputs.get(&feature.name).ok_or_else(|| {
                model_error(&self.name, format!("input {} is missing", feature.name))
            })?;
            if got.dtype() != feature.dtype {
                return Err(model_error(
                    &self.name,
                    format!(
                        "input {} is {}; the model declares {}",
                        feature.name,
                        got.dtype().name(),
                        feature.dtype.name()
                    ),
                ));
            }
            feature.check_shape(&self.name, got)?;
            let Some(want) = self.expected.get(&feature.name) else {
                return Err(model_error(
                    &self.name,
                    format!("input {} has no recorded value", feature.name),
                ));
            };
            let (got, want) = (got.to_f32(), want.to_f32());
            let (worst, at) = got
                .iter()
                .zip(&want)
                .enumerate()
                .map(|(i, (g, w))| ((g - w).abs(), i))
                .fold((0f32, 0), |acc, (d, i)| {
                    // NaN differs from everything: it must not hide behind `>`.
                    if d > acc.0 || (d.is_nan() && !acc.0.is_nan()) {
                        (d, i)
                    } else {
                        acc
                    }
                });
            if got.len() != want.len() || worst.is_nan() || worst > self.tolerance {
                return Err(model_error(
                    &self.name,
                    format!(
                        "input {} differs from the recorded one: largest difference {worst} at \
                         element {at} (got {}, recorded {}; tolerance {})",
                        feature.name,
                        got.get(at).copied().unwrap_or(f32::NAN),
                        want.get(at).copied().unwrap_or(f32::NAN),
                        self.tolerance
                    ),
                ));
            }
        }
        self.outputs
            .iter()
            .map(|feature| {
                let answer = self.answers.get(&feature.name).ok_or_else(|| {
                    model_error(
                        &self.name,
                        format!("output {} has no recorded value", feature.name),
                    )
                })?;
                Ok((feature.name.clone(), answer.to_dtype(feature.dtype)))
            })
            .collect()
    }
}
