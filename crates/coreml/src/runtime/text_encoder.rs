//! The text encoder's boundary as Apple's `TextEncoder.swift` / `TextEncoderXL.swift` cross it:
//! token ids in as floats (`input_ids` Float32 [1, S], coremltools issue 1423's workaround), the
//! hidden state out as `last_hidden_state` (SD: the normalized last layer) or `hidden_embeds`
//! (SDXL: the penultimate layer, not normalized), plus `pooled_outputs`.

use std::collections::HashMap;
use std::sync::Arc;

use super::features::{FeatureInfo, MultiArray};
use super::{take_output, CoreMlModel};
use crate::error::model as model_error;
use crate::Result;

/// Which layer the model's hidden-state output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// `last_hidden_state`: the last layer after the final layer norm.
    Last,
    /// `hidden_embeds`: the penultimate layer's raw output.
    Penultimate,
}

/// One prompt's encoding in the pipeline's layout.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// `[1, S, C]` f32.
    pub hidden: MultiArray,
    /// `[1, D]` f32, when the model has a pooled output.
    pub pooled: Option<MultiArray>,
}

/// A text encoder model with the names of its features.
pub struct TextEncoderGlue {
    model: Arc<dyn CoreMlModel>,
    input: FeatureInfo,
    hidden: String,
    layer: HiddenLayer,
    pooled: Option<String>,
}

impl TextEncoderGlue {
    /// Reads the features from `model`'s description: the single input, the hidden state
    /// (`last_hidden_state` or `hidden_embeds`) and `pooled_outputs` when declared.
    pub fn new(model: Arc<dyn CoreMlModel>) -> Result<Self> {
        let name = model.name().to_string();
        let input = match model.inputs() {
            [only] => only.clone(),
            inputs => inputs
                .iter()
                .find(|f| f.name == "input_ids")
                .cloned()
                .ok_or_else(|| model_error(&name, "no input_ids input"))?,
        };
        if input.shape.len() != 2 || input.shape[0] != 1 {
            return Err(model_error(
                &name,
                format!(
                    "input {} has shape {:?}; expected [1, tokens]",
                    input.name, input.shape
                ),
            ));
        }
        let find = |wanted: &str| model.outputs().iter().find(|f| f.name == wanted);
        let (hidden, layer) = match (find("last_hidden_state"), find("hidden_embeds")) {
            (Some(f), _) => (f.name.clone(), HiddenLayer::Last),
            (None, Some(f)) => (f.name.clone(), HiddenLayer::Penultimate),
            (None, None) => {
                return Err(model_error(
                    &name,
                    "no last_hidden_state or hidden_embeds output",
                ))
            }
        };
        let pooled = find("pooled_outputs").map(|f| f.name.clone());
        Ok(Self {
            model,
            input,
            hidden,
            layer,
            pooled,
        })
    }

    pub fn name(&self) -> &str {
        self.model.name()
    }

    /// The number of tokens the model takes (77).
    pub fn context_length(&self) -> usize {
        self.input.shape[1]
    }

    pub fn hidden_layer(&self) -> HiddenLayer {
        self.layer
    }

    pub fn has_pooled(&self) -> bool {
        self.pooled.is_some()
    }

    /// Encodes one row of exactly [`Self::context_length`] token ids.
    pub fn encode(&self, ids: &[u32]) -> Result<TextOutput> {
        if ids.len() != self.context_length() {
            return Err(model_error(
                self.name(),
                format!(
                    "{} token ids; the model was compiled for exactly {}",
                    ids.len(),
                    self.context_length()
                ),
            ));
        }
        let values: Vec<f32> = ids.iter().map(|&id| id as f32).collect();
        let array = MultiArray::from_f32_as(self.input.dtype, &self.input.shape, &values)?;
        let mut outputs = self
            .model
            .predict(&HashMap::from([(self.input.name.clone(), array)]))?;
        let hidden = take_output(self.name(), &mut outputs, &self.hidden)?;
        if hidden.shape.len() != 3 {
            return Err(model_error(
                self.name(),
                format!(
                    "output {} has shape {:?}; expected [1, S, C]",
                    self.hidden, hidden.shape
                ),
            ));
        }
        let pooled = match &self.pooled {
            Some(name) => {
                let pooled = take_output(self.name(), &mut outputs, name)?;
                Some(MultiArray::from_f32(&pooled.shape, pooled.to_f32())?)
            }
            None => None,
        };
        Ok(TextOutput {
            hidden: MultiArray::from_f32(&hidden.shape, hidden.to_f32())?,
            pooled,
        })
    }
}
