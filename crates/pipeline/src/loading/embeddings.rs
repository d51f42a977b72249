//! Textual-inversion embedding files: the layouts AUTOMATIC1111 and diffusers write, read into
//! the vectors of each text encoder (follows A1111's `create_embedding_from_data` in
//! `modules/textual_inversion/textual_inversion.py` and diffusers' `load_textual_inversion` in
//! `loaders/textual_inversion.py`).
//!
//! - one tensor `[n, dim]` or `[dim]`, whatever its key: A1111's `.safetensors` (`emb_params`)
//!   and diffusers' files (`<token>`, as `learned_embeds.safetensors` or `.bin`);
//! - A1111's `.pt`: a pickled dict whose `string_to_param` dict holds one tensor;
//! - SDXL's two-encoder files: `clip_l` (for `text_encoder`) and `clip_g` (for `text_encoder_2`).
//!
//! `.pt` and `.bin` files are torch's zip pickles, read with candle's pickle reader, which only
//! interprets the data (no code is run). It reads nested dicts of tensors; a `string_to_param`
//! that is a pickled `torch.nn.ParameterDict` module (as A1111 wrote it under torch 1.11) is not
//! a dict it can read, and is reported as such.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The file extensions of embedding files, as AUTOMATIC1111 loads them from its `embeddings`
/// folder (compared without case).
pub const EMBEDDING_EXTENSIONS: [&str; 3] = ["safetensors", "pt", "bin"];

/// The vectors of one embedding, f32 on the CPU, each `[n_vectors, dim]`.
#[derive(Debug, Clone)]
pub enum EmbeddingVectors {
    /// One set, for a model with one text encoder (or diffusers' `text_encoder`).
    Single(Tensor),
    /// SDXL: `clip_l` for `text_encoder` (CLIP ViT-L), `clip_g` for `text_encoder_2`
    /// (OpenCLIP bigG).
    Sdxl { clip_l: Tensor, clip_g: Tensor },
}

impl EmbeddingVectors {
    /// The number of vectors (tokens) the embedding takes in a prompt: the first set's, or
    /// `clip_g`'s for SDXL as A1111 counts them.
    pub fn num_vectors(&self) -> usize {
        match self {
            EmbeddingVectors::Single(v) => v.dim(0).unwrap_or(0),
            EmbeddingVectors::Sdxl { clip_g, .. } => clip_g.dim(0).unwrap_or(0),
        }
    }
}

/// What an embedding file holds.
#[derive(Debug, Clone)]
pub struct EmbeddingFile {
    pub path: PathBuf,
    pub vectors: EmbeddingVectors,
    /// The token the file names, when its one tensor's key is one (diffusers' files are keyed by
    /// their token); `None` for A1111's `emb_params`, `*` and the SDXL layout.
    pub token_in_file: Option<String>,
    /// The SHA-256 of the whole file, lowercase hex: A1111 records its first 12 digits as the
    /// embedding's hash (`TI hashes` in the infotext).
    pub sha256: String,
}

impl EmbeddingFile {
    /// A1111's short hash: the first 12 hex digits of the file's SHA-256.
    pub fn short_hash(&self) -> &str {
        &self.sha256[..12.min(self.sha256.len())]
    }
}

/// An embedding loaded into a pipeline.
#[derive(Debug, Clone)]
pub struct LoadedEmbedding {
    /// The name it is used by in prompts.
    pub token: String,
    pub path: PathBuf,
    /// The number of vectors (tokens) it takes in a prompt.
    pub num_vectors: usize,
    /// The token ids it was given, per text encoder in the pipeline's order (`text_encoder`,
    /// then `text_encoder_2`).
    pub ids: Vec<Vec<u32>>,
    /// The file's SHA-256, lowercase hex.
    pub sha256: String,
}

impl LoadedEmbedding {
    /// A1111's short hash: the first 12 hex digits of the file's SHA-256.
    pub fn short_hash(&self) -> &str {
        &self.sha256[..12.min(self.sha256.len())]
    }
}

fn embedding_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Embedding {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether `path` has one of [`EMBEDDING_EXTENSIONS`].
pub fn is_embedding_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        EMBEDDING_EXTENSIONS
            .iter()
            .any(|x| x.eq_ignore_ascii_case(e))
    })
}

/// Reads an embedding file of any of the layouts of this module's documentation.
pub fn read_embedding_file(path: &Path) -> Result<EmbeddingFile> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = hex(&Sha256::digest(&bytes));
    let tensors = match extension.as_str() {
        "safetensors" => candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| embedding_error(path, format!("not a readable .safetensors file: {e}")))?
            .into_iter()
            .collect(),
        "pt" | "bin" => read_torch_file(path, &bytes)?,
        other => {
            return Err(embedding_error(
                path,
                format!(
                    "unknown extension {other:?}: expected one of {}",
                    EMBEDDING_EXTENSIONS.join(", ")
                ),
            ))
        }
    };
    let (vectors, token_in_file) = embedding_from_tensors(path, tensors)?;
    Ok(EmbeddingFile {
        path: path.to_path_buf(),
        vectors,
        token_in_file,
        sha256,
    })
}

/// The tensors of a torch zip pickle: those at its top level (diffusers' `{token: tensor}`, SDXL's
/// `{clip_l, clip_g}`), else those of its `string_to_param` dict (A1111), keyed
/// `string_to_param.<key>`.
fn read_torch_file(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    if !bytes.starts_with(b"PK") {
        return Err(embedding_error(
            path,
            "not a torch zip archive (torch.save has written zip archives since torch 1.6; \
             older pickles are not read)",
        ));
    }
    let read = |key: Option<&str>| candle_core::pickle::read_all_with_key(path, key);
    let top = read(None)
        .map_err(|e| embedding_error(path, format!("cannot read the torch pickle: {e}")))?;
    if !top.is_empty() {
        return Ok(top);
    }
    let nested = read(Some("string_to_param")).map_err(|e| {
        embedding_error(
            path,
            format!(
                "the pickle holds no tensor at its top level, and no A1111 string_to_param \
                 dict of tensors: {e}"
            ),
        )
    })?;
    if nested.is_empty() {
        return Err(embedding_error(
            path,
            "its string_to_param holds no tensor that candle's pickle reader can read: it is \
             not a plain dict of tensors (A1111 under torch 1.11 pickled a ParameterDict module \
             there); save it again as .safetensors",
        ));
    }
    Ok(nested
        .into_iter()
        .map(|(k, t)| (format!("string_to_param.{k}"), t))
        .collect())
}

/// Picks the embedding out of a file's tensors (see the module documentation).
fn embedding_from_tensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
) -> Result<(EmbeddingVectors, Option<String>)> {
    let mut map: HashMap<String, Tensor> = tensors.into_iter().collect();
    if map.contains_key("clip_l") || map.contains_key("clip_g") {
        let mut take = |key: &str| -> Result<Tensor> {
            let tensor = map.remove(key).ok_or_else(|| {
                embedding_error(
                    path,
                    format!("it has clip_l or clip_g but not {key}: an SDXL embedding has both"),
                )
            })?;
            as_vectors(path, key, &tensor)
        };
        let clip_l = take("clip_l")?;
        let clip_g = take("clip_g")?;
        let (nl, ng) = (clip_l.dim(0)?, clip_g.dim(0)?);
        if nl != ng {
            return Err(embedding_error(
                path,
                format!("clip_l has {nl} vectors and clip_g {ng}: both must have the same number"),
            ));
        }
        return Ok((EmbeddingVectors::Sdxl { clip_l, clip_g }, None));
    }
    if map.len() != 1 {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        return Err(embedding_error(
            path,
            format!(
                "expected one tensor (an embedding [n, dim] or [dim]) or clip_l and clip_g, \
                 found {} tensors: {keys:?}",
                keys.len()
            ),
        ));
    }
    let (key, tensor) = map
        .into_iter()
        .next()
        .ok_or_else(|| embedding_error(path, "the file holds no tensor".to_string()))?;
    let vectors = as_vectors(path, &key, &tensor)?;
    let bare = key.strip_prefix("string_to_param.").unwrap_or(&key);
    let token = (!key.starts_with("string_to_param.") && bare != "emb_params" && bare != "*")
        .then(|| bare.to_string());
    Ok((EmbeddingVectors::Single(vectors), token))
}

/// `tensor` as f32 vectors `[n, dim]` (a `[dim]` tensor is one vector).
fn as_vectors(path: &Path, key: &str, tensor: &Tensor) -> Result<Tensor> {
    let tensor = match tensor.dims() {
        [n, dim] if *n > 0 && *dim > 0 => tensor.clone(),
        [dim] if *dim > 0 => tensor.unsqueeze(0)?,
        dims => {
            return Err(embedding_error(
                path,
                format!("tensor {key:?} has shape {dims:?}: expected [n_vectors, dim] or [dim]"),
            ))
        }
    };
    if !tensor.dtype().is_float() {
        return Err(embedding_error(
            path,
            format!("tensor {key:?} is {:?}: expected floats", tensor.dtype()),
        ));
    }
    Ok(tensor.to_dtype(DType::F32)?)
}

/// The embedding files directly in `dir` (A1111 also walks sub-folders; so do we), sorted by
/// path so the ids they get do not depend on the file system's order.
pub fn embedding_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).map_err(|source| Error::Io {
            path: folder.clone(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| Error::Io {
                    path: folder.clone(),
                    source,
                })?
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if is_embedding_file(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The name A1111 gives the embedding of `path`: its file stem.
pub fn embedding_name(path: &Path) -> Result<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .ok_or_else(|| embedding_error(path, "its file name is not valid UTF-8"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal pickle writer: the opcodes torch's `torch.save` uses for dicts of tensors.
    #[derive(Default)]
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn op(&mut self, bytes: &[u8]) -> &mut Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn text(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.op(s.as_bytes())
        }
        fn int(&mut self, v: u16) -> &mut Self {
            self.0.push(b'M');
            self.op(&v.to_le_bytes())
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(format!("c{module}\n{name}\n").as_bytes())
        }
        fn ordered_dict(&mut self) -> &mut Self {
            self.global("collections", "OrderedDict").op(b")R")
        }
        /// `torch._utils._rebuild_tensor_v2` of the float storage `key`, `[rows, cols]`.
        fn tensor(&mut self, key: &str, rows: u16, cols: u16) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
            self.text("storage").global("torch", "FloatStorage");
            self.text(key).text("cpu").int(rows * cols).op(b"tQ");
            self.int(0).op(b"(").int(rows).int(cols).op(b"t(");
            self.int(cols).int(1).op(b"t\x89").ordered_dict().op(b"tR")
        }
        /// A `torch.nn.Parameter` of that tensor, as A1111 saves `string_to_param`'s values.
        fn parameter(&mut self, key: &str, rows: u16, cols: u16) -> &mut Self {
            self.global("torch._utils", "_rebuild_parameter").op(b"(");
            self.tensor(key, rows, cols)
                .op(b"\x89")
                .ordered_dict()
                .op(b"tR")
        }
    }

    /// A torch zip archive of `pickle` with the float storages `storages`.
    fn torch_zip(path: &Path, pickle: &[u8], storages: &[(&str, &[f32])]) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(pickle).unwrap();
        for (key, values) in storages {
            zip.start_file(format!("archive/data/{key}"), options)
                .unwrap();
            for v in *values {
                zip.write_all(&v.to_le_bytes()).unwrap();
            }
        }
        zip.start_file("archive/version", options).unwrap();
        zip.write_all(b"3\n").unwrap();
        zip.finish().unwrap();
    }

    fn values(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn a1111_pt_files_are_read_from_string_to_param() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my-style.pt");
        let mut p = Pickle::default();
        p.op(b"\x80\x02}(")
            .text("string_to_token")
            .op(b"}(")
            .text("*")
            .int(265)
            .op(b"u");
        p.text("string_to_param")
            .op(b"}(")
            .text("*")
            .parameter("0", 2, 3)
            .op(b"u");
        p.text("name")
            .text("my-style")
            .text("step")
            .int(500)
            .op(b"u.");
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        torch_zip(&path, &p.0, &[("0", &data)]);

        let file = read_embedding_file(&path).unwrap();
        let EmbeddingVectors::Single(v) = &file.vectors else {
            panic!("{:?}", file.vectors)
        };
        assert_eq!(values(v), vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
        assert_eq!(file.token_in_file, None);
        assert_eq!(file.vectors.num_vectors(), 2);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(file.sha256, hex(&Sha256::digest(&bytes)));
        assert_eq!(file.short_hash().len(), 12);
        assert_eq!(embedding_name(&path).unwrap(), "my-style");
    }

    #[test]
    fn diffusers_bin_files_name_their_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("learned_embeds.bin");
        let mut p = Pickle::default();
        p.op(b"\x80\x02}(")
            .text("<cat-toy>")
            .tensor("0", 1, 2)
            .op(b"u.");
        torch_zip(&path, &p.0, &[("0", &[0.5, -0.5])]);
        let file = read_embedding_file(&path).unwrap();
        assert_eq!(file.token_in_file.as_deref(), Some("<cat-toy>"));
        assert_eq!(file.vectors.num_vectors(), 1);
    }

    #[test]
    fn a_pickled_parameter_dict_is_reported_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.pt");
        let mut p = Pickle::default();
        p.op(b"\x80\x02}(").text("string_to_param");
        p.global("torch.nn.modules.container", "ParameterDict")
            .op(b")\x81}(");
        p.text("_parameters")
            .op(b"}(")
            .text("*")
            .parameter("0", 1, 2)
            .op(b"uub");
        p.op(b"u.");
        torch_zip(&path, &p.0, &[("0", &[1.0, 2.0])]);
        let err = read_embedding_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("ParameterDict") && err.contains("old.pt"),
            "{err}"
        );

        let legacy = dir.path().join("legacy.pt");
        std::fs::write(&legacy, b"\x80\x02}q\x00.").unwrap();
        let err = read_embedding_file(&legacy).unwrap_err().to_string();
        assert!(err.contains("zip"), "{err}");
    }

    #[test]
    fn safetensors_layouts_a1111_diffusers_and_sdxl() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = Device::Cpu;
        let a1111 = dir.path().join("a.safetensors");
        let rows = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &cpu).unwrap();
        save(
            &a1111,
            &[("emb_params", rows.to_dtype(DType::F16).unwrap())],
        );
        let file = read_embedding_file(&a1111).unwrap();
        assert_eq!(file.token_in_file, None);
        let EmbeddingVectors::Single(v) = &file.vectors else {
            panic!()
        };
        assert_eq!(v.dtype(), DType::F32);
        assert_eq!(values(v), values(&rows));

        let diffusers = dir.path().join("d.safetensors");
        save(
            &diffusers,
            &[("<tok>", Tensor::new(&[7f32, 8.0], &cpu).unwrap())],
        );
        let file = read_embedding_file(&diffusers).unwrap();
        assert_eq!(file.token_in_file.as_deref(), Some("<tok>"));
        assert_eq!(
            file.vectors.num_vectors(),
            1,
            "a [dim] tensor is one vector"
        );

        let sdxl = dir.path().join("x.safetensors");
        let g = Tensor::zeros((2, 3), DType::F32, &cpu).unwrap();
        save(
            &sdxl,
            &[
                ("clip_l", rows.narrow(0, 0, 2).unwrap()),
                ("clip_g", g.clone()),
            ],
        );
        let file = read_embedding_file(&sdxl).unwrap();
        let EmbeddingVectors::Sdxl { clip_l, clip_g } = &file.vectors else {
            panic!()
        };
        assert_eq!((clip_l.dims(), clip_g.dims()), (&[2, 2][..], &[2, 3][..]));

        let uneven = dir.path().join("u.safetensors");
        save(&uneven, &[("clip_l", rows.clone()), ("clip_g", g.clone())]);
        let err = read_embedding_file(&uneven).unwrap_err().to_string();
        assert!(err.contains("3 vectors and clip_g 2"), "{err}");
        let half = dir.path().join("h.safetensors");
        save(&half, &[("clip_g", g.clone())]);
        let err = read_embedding_file(&half).unwrap_err().to_string();
        assert!(err.contains("not clip_l"), "{err}");
        let two = dir.path().join("two.safetensors");
        save(&two, &[("a", g.clone()), ("b", g.clone())]);
        let err = read_embedding_file(&two).unwrap_err().to_string();
        assert!(err.contains("found 2 tensors"), "{err}");
        let cube = dir.path().join("cube.safetensors");
        save(&cube, &[("emb_params", g.unsqueeze(0).unwrap())]);
        let err = read_embedding_file(&cube).unwrap_err().to_string();
        assert!(err.contains("[1, 2, 3]"), "{err}");
        let other = dir.path().join("e.ckpt");
        std::fs::write(&other, b"x").unwrap();
        assert!(read_embedding_file(&other).is_err());
    }

    #[test]
    fn a_folder_lists_its_embedding_files_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for name in [
            "b.pt",
            "a.SafeTensors",
            "notes.txt",
            "sub/c.bin",
            "preview.png",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let found: Vec<String> = embedding_files_in(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(found, ["a.SafeTensors", "b.pt", "sub/c.bin"]);
    }
}
