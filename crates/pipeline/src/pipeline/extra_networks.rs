//! AUTOMATIC1111's extra-network tags in a prompt (`modules/extra_networks.py`): `<lora:name>`
//! and `<lora:name:weight>` (and the `<lyco:...>` alias), taken out of the prompt text and
//! resolved to files of a LoRA folder (`name.safetensors`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::loading::lora::LoraFile;

/// One `<lora:...>` tag: the network's name and its multiplier (1 when not given).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLora {
    pub name: String,
    pub multiplier: f64,
}

impl PromptLora {
    /// The file `name.safetensors` in `dir` with this tag's multiplier; an error naming the
    /// file when it is not there.
    pub fn resolve(&self, dir: &Path) -> Result<LoraFile> {
        let path = dir.join(format!("{}.safetensors", self.name));
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: format!(
                    "the LoRA <lora:{}> of the prompt (its file name without .safetensors)",
                    self.name
                ),
            });
        }
        Ok(LoraFile::new(path, self.multiplier))
    }
}

/// The prompt without its `<lora:...>` / `<lyco:...>` tags, and the tags in order. Other
/// `<kind:...>` tags (and any other text) stay. As in A1111, a tag is `<` + a word + `:` + text
/// up to the next `>`; its text is `name` or `name:weight`.
pub fn extract_loras(prompt: &str) -> Result<(String, Vec<PromptLora>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        text.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_tag(tag)? {
            Some((lora, len)) => {
                loras.push(lora);
                rest = &tag[len..];
            }
            None => {
                text.push('<');
                rest = &tag[1..];
            }
        }
    }
    text.push_str(rest);
    Ok((text, loras))
}

/// A LoRA tag at the start of `text` (which starts with `<`) and its length in bytes; `None` when
/// it is not one (another kind, or no tag at all).
fn parse_tag(text: &str) -> Result<Option<(PromptLora, usize)>> {
    let Some(end) = text.find('>') else {
        return Ok(None);
    };
    let inner = &text[1..end];
    let Some((kind, items)) = inner.split_once(':') else {
        return Ok(None);
    };
    let word = !kind.is_empty() && kind.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !word || items.is_empty() || !matches!(kind, "lora" | "lyco") {
        return Ok(None);
    }
    let bad = |expected: &str| Error::InvalidParameter {
        name: "prompt LoRA tag",
        value: format!("<{inner}>"),
        expected: expected.to_string(),
    };
    let parts: Vec<&str> = items.split(':').collect();
    let name = parts[0].trim();
    if name.is_empty() {
        return Err(bad("a LoRA name: <lora:name> or <lora:name:weight>"));
    }
    let multiplier =
        match parts.as_slice() {
            [_] => 1.0,
            [_, weight] => weight
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| bad("a number as the weight: <lora:name:0.8>"))?,
            _ => return Err(bad(
                "<lora:name> or <lora:name:weight> (separate text-encoder and UNet weights are \
                 not supported)",
            )),
        };
    Ok(Some((
        PromptLora {
            name: name.to_string(),
            multiplier,
        },
        end + 1,
    )))
}

/// The folder prompt LoRAs are looked up in when none is given: `loras` beside the model (the
/// folder or checkpoint file `model`).
pub fn default_lora_dir(model: &Path) -> PathBuf {
    match model.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join("loras"),
        _ => PathBuf::from("loras"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(name: &str, multiplier: f64) -> PromptLora {
        PromptLora {
            name: name.to_string(),
            multiplier,
        }
    }

    #[test]
    fn lora_tags_are_taken_out_with_their_weights() {
        let (text, loras) =
            extract_loras("a cat <lora:style_a:0.8>, sitting <lyco:b> <lora:c: 1.5 >").unwrap();
        assert_eq!(text, "a cat , sitting  ");
        assert_eq!(
            loras,
            vec![lora("style_a", 0.8), lora("b", 1.0), lora("c", 1.5)]
        );
    }

    #[test]
    fn other_angle_brackets_and_other_networks_stay() {
        let prompt = "x < y, <hypernet:h:1>, <lora>, <:a>, <lora:a";
        let (text, loras) = extract_loras(prompt).unwrap();
        assert_eq!(text, prompt);
        assert!(loras.is_empty());
    }

    #[test]
    fn bad_tags_are_refused_with_the_accepted_forms() {
        for (prompt, expected) in [
            ("<lora:a:heavy>", "a number"),
            ("<lora::1>", "a LoRA name"),
            ("<lora:a:1:0.5>", "not supported"),
            ("<lora:a:inf>", "a number"),
        ] {
            let message = extract_loras(prompt).unwrap_err().to_string();
            assert!(message.contains(expected), "{prompt}: {message}");
            assert!(message.contains(&prompt[1..prompt.len() - 1]), "{message}");
        }
    }

    #[test]
    fn names_resolve_to_safetensors_files_of_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("style.safetensors"), b"x").unwrap();
        let file = lora("style", 0.5).resolve(dir.path()).unwrap();
        assert_eq!(
            file,
            LoraFile::new(dir.path().join("style.safetensors"), 0.5)
        );
        let message = lora("other", 1.0)
            .resolve(dir.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("other.safetensors"), "{message}");
    }

    #[test]
    fn the_default_folder_is_loras_beside_the_model() {
        assert_eq!(
            default_lora_dir(Path::new("/models/sd15")),
            PathBuf::from("/models/loras")
        );
        assert_eq!(
            default_lora_dir(Path::new("model.safetensors")),
            PathBuf::from("loras")
        );
    }
}
