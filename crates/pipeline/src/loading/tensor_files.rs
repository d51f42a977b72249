//! `.safetensors` files read tensor by tensor with positioned reads, instead of memory-mapped.
//!
//! candle's CPU tensors own their memory, so a memory-mapped file is copied tensor by tensor
//! anyway; while the mapping lives, every page of it that was read also counts as resident memory
//! of the process, so loading a 1.7 GB UNet from a mapped file peaks at twice its size. Reading
//! each tensor straight into its own buffer keeps the file in the page cache (shared, and not the
//! process's), and the resident memory of a loaded model is its weights once.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

/// The most header bytes accepted (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Where one tensor lies: its file, dtype, shape and absolute byte range.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// One or more `.safetensors` files (a model's shards) opened for reading tensors by name.
pub struct TensorFiles {
    files: Vec<(PathBuf, Mutex<File>)>,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
}

fn error(path: &Path, message: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {message}", path.display()))
}

/// The candle dtype a safetensors dtype loads as, or `None` for those sdrs has no use for.
fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

impl TensorFiles {
    /// Opens `paths` and reads their headers; every tensor's byte range is checked against the
    /// file's length here, so a truncated or corrupt file is refused before any weight is read.
    pub fn open(paths: &[PathBuf]) -> candle_core::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        let mut metadata = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let mut file =
                File::open(path).map_err(|e| error(path, format_args!("cannot open: {e}")))?;
            let (header, file_metadata) = read_header(path, &mut file)?;
            merge_metadata(&mut metadata, file_metadata, path)?;
            for (name, entry) in header {
                entries.insert(
                    name,
                    Entry {
                        file: index,
                        ..entry
                    },
                );
            }
            files.push((path.clone(), Mutex::new(file)));
        }
        Ok(Self {
            files,
            entries,
            metadata,
        })
    }

    /// The files' `__metadata__` (string keys and values), merged.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.entries
            .iter()
            .map(|(name, entry)| (name.clone(), entry.shape.clone()))
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Reads tensor `name` in the dtype it is stored in, on the CPU.
    pub fn load(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let (path, file) = &self.files[entry.file];
        let mut file = file
            .lock()
            .map_err(|_| error(path, "a previous read failed"))?;
        match entry.dtype {
            DType::U8 => read_values::<u8>(&mut file, entry, path, name),
            DType::U32 => read_values::<u32>(&mut file, entry, path, name),
            DType::I16 => read_values::<i16>(&mut file, entry, path, name),
            DType::I32 => read_values::<i32>(&mut file, entry, path, name),
            DType::I64 => read_values::<i64>(&mut file, entry, path, name),
            DType::F16 => read_values::<half::f16>(&mut file, entry, path, name),
            DType::BF16 => read_values::<half::bf16>(&mut file, entry, path, name),
            DType::F32 => read_values::<f32>(&mut file, entry, path, name),
            DType::F64 => read_values::<f64>(&mut file, entry, path, name),
            other => Err(error(
                path,
                format_args!("tensor {name}: no reader for {other:?}"),
            )),
        }
    }
}

/// Reads one tensor's bytes straight into the buffer its CPU tensor will own (no second copy).
fn read_values<T: candle_core::WithDType + bytemuck::Pod>(
    file: &mut File,
    entry: &Entry,
    path: &Path,
    name: &str,
) -> candle_core::Result<Tensor> {
    let mut values = vec![T::zeroed(); entry.len / std::mem::size_of::<T>()];
    file.seek(SeekFrom::Start(entry.start))
        .and_then(|_| file.read_exact(bytemuck::cast_slice_mut(&mut values)))
        .map_err(|e| error(path, format_args!("cannot read tensor {name}: {e}")))?;
    Tensor::from_vec(values, entry.shape.as_slice(), &Device::Cpu)
}

/// Adds one file's metadata to the shards' merged `metadata`; the quantization entries (a JSON
/// object per file) are merged key by key.
fn merge_metadata(
    metadata: &mut HashMap<String, String>,
    file: HashMap<String, String>,
    path: &Path,
) -> candle_core::Result<()> {
    for (key, value) in file {
        match metadata.get_mut(&key) {
            Some(existing) if key == sdrs_quant::format::METADATA_KEY => {
                let parse = |text: &str| {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                        .map_err(|e| error(path, format_args!("bad {key} metadata: {e}")))
                };
                let mut merged = parse(existing)?;
                merged.extend(parse(&value)?);
                *existing = serde_json::Value::Object(merged).to_string();
            }
            _ => {
                metadata.insert(key, value);
            }
        }
    }
    Ok(())
}

/// The string entries of a header's `__metadata__` object (safetensors allows only strings).
fn metadata_strings(value: serde_json::Value) -> HashMap<String, String> {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
            .collect(),
        _ => HashMap::new(),
    }
}

/// The entries (file index 0) and the metadata of one file's header.
type Header = (Vec<(String, Entry)>, HashMap<String, String>);

/// Parses the header of an open safetensors file into entries (file index 0) and metadata.
fn read_header(path: &Path, file: &mut File) -> candle_core::Result<Header> {
    let file_len = file
        .metadata()
        .map_err(|e| error(path, format_args!("cannot read: {e}")))?
        .len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| {
        error(
            path,
            format_args!(
                "not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
            ),
        )
    })?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER || header_len > file_len - 8 {
        return Err(error(
            path,
            format_args!(
                "not a safetensors file (or truncated): its header claims {header_len} bytes, the file has {file_len}"
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| error(path, format_args!("cannot read the header: {e}")))?;
    if header.first() != Some(&b'{') {
        return Err(error(
            path,
            "not a safetensors file: the header does not start with `{`",
        ));
    }
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| error(path, format_args!("the header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut entries = Vec::with_capacity(header.len());
    let mut metadata = HashMap::new();
    for (name, value) in header {
        if name == "__metadata__" {
            metadata = metadata_strings(value);
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
            error(
                path,
                format_args!("bad header entry for tensor {name}: {e}"),
            )
        })?;
        let dtype = candle_dtype(info.dtype).ok_or_else(|| {
            error(
                path,
                format_args!(
                    "tensor {name} is stored as {:?}; accepted: F32, F16, BF16, F64, U8, U32, I16, I32, I64",
                    info.dtype
                ),
            )
        })?;
        let (begin, end) = info.data_offsets;
        let expected = info
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        if end < begin || expected != Some(end - begin) {
            return Err(error(
                path,
                format_args!(
                    "tensor {name} of shape {:?} ({:?}) has the byte range {begin}..{end}, which does not fit its size",
                    info.shape, info.dtype
                ),
            ));
        }
        if end as u64 > data_len {
            return Err(error(
                path,
                format_args!(
                    "truncated: tensor {name} ends at byte {} of the data, but the file holds {data_len} data bytes",
                    end
                ),
            ));
        }
        entries.push((
            name,
            Entry {
                file: 0,
                dtype,
                shape: info.shape,
                start: data_start + begin as u64,
                len: end - begin,
            },
        ));
    }
    check_layout(path, &entries, data_start, data_len)?;
    Ok((entries, metadata))
}

/// The `safetensors` crate's layout rules (`Metadata::validate`): the tensors, in offset order,
/// tile the data exactly from its first byte to the file's end, so no two overlap, none leaves a
/// gap, and no byte trails; a header length off by one byte shifts the data and fails here.
fn check_layout(
    path: &Path,
    entries: &[(String, Entry)],
    data_start: u64,
    data_len: u64,
) -> candle_core::Result<()> {
    let mut ranges: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|(name, e)| {
            (
                e.start - data_start,
                e.start - data_start + e.len as u64,
                name.as_str(),
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut next = 0u64;
    for (begin, end, name) in ranges {
        if begin != next {
            let what = if begin < next {
                "overlaps the tensor before it"
            } else {
                "leaves a gap after the tensor before it"
            };
            return Err(error(
                path,
                format_args!(
                    "tensor {name} starts at data byte {begin} where {next} was expected: it {what} (the safetensors format allows neither)"
                ),
            ));
        }
        next = end;
    }
    if next != data_len {
        return Err(error(
            path,
            format_args!(
                "the tensors end at data byte {next} but the file holds {data_len} data bytes: trailing bytes, or a header length that does not match the header"
            ),
        ));
    }
    Ok(())
}

/// `tensor` when it has `shape`, else candle's shape-mismatch error for tensor `name`.
pub(crate) fn with_shape(name: &str, tensor: Tensor, shape: Shape) -> candle_core::Result<Tensor> {
    if tensor.shape() != &shape {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: shape,
            got: tensor.shape().clone(),
        }
        .bt());
    }
    Ok(tensor)
}

impl SimpleBackend for TensorFiles {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        // The shape is checked from the header, before anything is read.
        if let Some(entry) = self.entries.get(name) {
            if entry.shape.as_slice() != shape.dims() {
                // The file says which component (unet/, vae/, a single file) the tensor is from.
                let file = self.files.get(entry.file).map(|(path, _)| path.display());
                let file = file.map(|f| format!(" in {f}")).unwrap_or_default();
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}{file}"),
                    expected: shape,
                    got: entry.shape.clone().into(),
                }
                .bt());
            }
        }
        self.get_unchecked(name, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name)?.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Tensor)]) {
        let data: Vec<(&str, Tensor)> = tensors.to_vec();
        candle_core::safetensors::save(&data.into_iter().collect(), path).unwrap();
    }

    #[test]
    fn reads_what_candle_writes_in_every_float_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let values = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        write(
            &path,
            &[
                ("f32", values.clone()),
                ("f16", values.to_dtype(DType::F16).unwrap()),
                ("bf16", values.to_dtype(DType::BF16).unwrap()),
                ("scalar", Tensor::new(&[7u32], &Device::Cpu).unwrap()),
            ],
        );
        let files = TensorFiles::open(std::slice::from_ref(&path)).unwrap();
        for name in ["f32", "f16", "bf16"] {
            let read = files
                .get(
                    (2, 3, 4).into(),
                    name,
                    candle_nn::Init::Const(0.),
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
            let diff = (read - &values).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        assert_eq!(files.load("f16").unwrap().dtype(), DType::F16);
        assert_eq!(files.load("scalar").unwrap().to_vec1::<u32>().unwrap(), [7]);
        assert!(files.contains("bf16") && !files.contains("nope"));
        let mut shapes = files.shapes();
        shapes.sort();
        assert_eq!(shapes[0], ("bf16".to_string(), vec![2, 3, 4]));

        let wrong = files
            .get(
                (4, 3, 2).into(),
                "f32",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("shape mismatch for f32"), "{wrong}");
        let missing = files.load("nope").unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn shards_are_one_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        write(&a, &[("x", Tensor::new(&[1f32], &Device::Cpu).unwrap())]);
        write(
            &b,
            &[("y", Tensor::new(&[2f32, 3.], &Device::Cpu).unwrap())],
        );
        let files = TensorFiles::open(&[a, b]).unwrap();
        assert_eq!(files.load("x").unwrap().to_vec1::<f32>().unwrap(), [1.]);
        assert_eq!(files.load("y").unwrap().to_vec1::<f32>().unwrap(), [2., 3.]);
    }

    #[test]
    fn truncated_short_and_garbage_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let big = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        write(&path, &[("big", big)]);
        let bytes = std::fs::read(&path).unwrap();
        let cases: [(&[u8], &str); 4] = [
            (&bytes[..bytes.len() / 2], "truncated: tensor big"),
            (&bytes[..5], "shorter than the 8-byte header length"),
            (&bytes[..40], "header claims"),
            (b"\x04\0\0\0\0\0\0\0{no}", "not valid JSON"),
        ];
        for (content, expected) in cases {
            std::fs::write(&path, content).unwrap();
            let message = TensorFiles::open(std::slice::from_ref(&path))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("w.safetensors"), "{message}");
        }
        let message = TensorFiles::open(&[dir.path().join("absent.safetensors")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("absent.safetensors"), "{message}");
    }

    #[test]
    fn a_range_that_does_not_match_the_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let header = br#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let mut content = (header.len() as u64).to_le_bytes().to_vec();
        content.extend_from_slice(header);
        content.extend_from_slice(&[0; 12]);
        std::fs::write(&path, content).unwrap();
        let message = TensorFiles::open(std::slice::from_ref(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("does not fit its size"), "{message}");
    }

    /// A file of `tensors` (name, F32 element count, data_offsets), `extra` bytes after the
    /// data, and its header length changed by `shift`.
    fn layout_file(
        dir: &Path,
        tensors: &[(&str, usize, (usize, usize))],
        data: usize,
        shift: i64,
    ) -> PathBuf {
        let entries: Vec<String> = tensors
            .iter()
            .map(|(name, n, (b, e))| {
                format!(r#""{name}":{{"dtype":"F32","shape":[{n}],"data_offsets":[{b},{e}]}}"#)
            })
            .collect();
        let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
        // Padded with spaces as the safetensors writer aligns the data.
        header.extend_from_slice(b"        ");
        let len = (header.len() as i64 + shift) as u64;
        let mut content = len.to_le_bytes().to_vec();
        content.extend_from_slice(&header);
        content.extend(vec![0u8; data]);
        let path = dir.join("w.safetensors");
        std::fs::write(&path, content).unwrap();
        path
    }

    fn open_error(path: &Path) -> String {
        TensorFiles::open(&[path.to_path_buf()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn overlaps_gaps_offset_data_trailing_bytes_and_a_short_header_length_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ok = layout_file(dir.path(), &[("a", 2, (0, 8)), ("b", 1, (8, 12))], 12, 0);
        TensorFiles::open(&[ok]).unwrap();
        for (tensors, data, shift, expected) in [
            (vec![("a", 2, (0, 8)), ("b", 2, (4, 12))], 12, 0, "overlaps"),
            (vec![("a", 1, (0, 4)), ("b", 1, (8, 12))], 12, 0, "gap"),
            (vec![("a", 1, (4, 8))], 8, 0, "gap"),
            (vec![("a", 1, (0, 4))], 5, 0, "trailing"),
            (vec![("a", 1, (0, 4))], 4, -1, "trailing"),
        ] {
            let path = layout_file(dir.path(), &tensors, data, shift);
            let message = open_error(&path);
            assert!(
                message.contains(expected),
                "{tensors:?} {data} {shift}: {message}"
            );
        }
    }
}
