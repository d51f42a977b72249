//! `--lora`, `--lora-model-dir` and the prompt's `<lora:name:weight>` tags, resolved into the
//! LoRA files the model loads with, the prompt without its tags, and the `Lora hashes` field of
//! the PNG's parameters.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sdrs_pipeline::stable_diffusion::extra_networks::{default_lora_dir, extract_loras};
use sdrs_pipeline::{addnet_hash, LoraFile};

/// The LoRAs of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Loras {
    /// `--lora` files, then the prompt's tags, in order.
    pub files: Vec<LoraFile>,
    /// The prompt without its LoRA tags (what the text encoders see).
    pub prompt: String,
    /// The names A1111 records each LoRA under: the tag's name, or the `--lora` file's stem.
    pub names: Vec<String>,
}

/// `prompt`'s tags and the `--lora` flags, resolved: tag names in `lora_dir` (default: `loras`
/// beside the local model `model`, when there is one, else `./loras`).
pub fn resolve(
    prompt: &str,
    flags: &[LoraFile],
    lora_dir: Option<&Path>,
    model: &str,
) -> Result<Loras> {
    let (text, tags) = extract_loras(prompt).context("--prompt")?;
    let mut files = flags.to_vec();
    let mut names: Vec<String> = flags
        .iter()
        .map(|file| {
            file.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    if !tags.is_empty() {
        let dir = match lora_dir {
            Some(dir) => dir.to_path_buf(),
            None if Path::new(model).exists() => default_lora_dir(Path::new(model)),
            None => PathBuf::from("loras"),
        };
        for tag in &tags {
            files.push(
                tag.resolve(&dir)
                    .with_context(|| format!("--lora-model-dir {}", dir.display()))?,
            );
            names.push(tag.name.clone());
        }
    }
    Ok(Loras {
        files,
        prompt: text,
        names,
    })
}

impl Loras {
    /// AUTOMATIC1111's `Lora hashes` value: `"name: hash, ..."` with each file's addnet hash
    /// (12 hex digits), names without `:` and `,`, quoted as A1111 quotes values holding them;
    /// `None` without LoRAs.
    pub fn hashes(&self) -> Result<Option<String>> {
        if self.files.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::new();
        for (file, name) in self.files.iter().zip(&self.names) {
            let hash = addnet_hash(&file.path)?;
            let name: String = name.chars().filter(|c| !matches!(c, ':' | ',')).collect();
            entries.push(format!("{name}: {}", &hash[..12]));
        }
        Ok(Some(format!("\"{}\"", entries.join(", "))))
    }
}

/// `--lora FILE[:WEIGHT]`.
pub fn parse_lora(text: &str) -> std::result::Result<LoraFile, String> {
    LoraFile::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_first_then_the_tags_resolved_in_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ink.safetensors"), b"x").unwrap();
        let flags = [parse_lora("/x/styles/film.safetensors:0.7").unwrap()];
        let loras = resolve("a cat <lora:ink:0.5>", &flags, Some(dir.path()), "sd15").unwrap();
        assert_eq!(loras.prompt, "a cat ");
        assert_eq!(loras.names, ["film", "ink"]);
        assert_eq!(
            loras.files,
            [
                LoraFile::new("/x/styles/film.safetensors", 0.7),
                LoraFile::new(dir.path().join("ink.safetensors"), 0.5)
            ]
        );
        let message = format!(
            "{:#}",
            resolve("<lora:nope>", &[], Some(dir.path()), "sd15").unwrap_err()
        );
        assert!(message.contains("nope.safetensors"), "{message}");
    }

    #[test]
    fn the_hashes_are_the_addnet_hash_of_each_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        // An 8-byte header length of 2, the header "{}", then the data "abc".
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}abc");
        std::fs::write(&path, bytes).unwrap();
        let loras = Loras {
            files: vec![LoraFile::new(&path, 1.0), LoraFile::new(&path, 0.5)],
            prompt: String::new(),
            names: vec!["my:lo,ra".to_string(), "b".to_string()],
        };
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.
        assert_eq!(
            loras.hashes().unwrap().as_deref(),
            Some("\"mylora: ba7816bf8f01, b: ba7816bf8f01\"")
        );
        let none = Loras {
            files: vec![],
            prompt: String::new(),
            names: vec![],
        };
        assert_eq!(none.hashes().unwrap(), None);
    }
}
