//! The GGUF writer: a little-endian GGUF v3 file (ggml's `gguf.cpp` layout), written to a
//! temporary file beside the target and renamed into place, so an error leaves no partial file.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read as _, Write};
use std::path::{Path, PathBuf};

use super::blocks::GgmlType;
use super::file::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use super::value::{Value, ValueType};
use crate::{Error, Result};

/// One tensor to write.
#[derive(Debug, Clone, Copy)]
pub struct WriteTensor<'a> {
    pub name: &'a str,
    /// numpy/PyTorch order (the last dimension is ggml's contiguous `ne[0]`).
    pub shape: &'a [usize],
    pub ggml_type: GgmlType,
    /// The encoded data: `shape`'s values as `ggml_type` blocks.
    pub data: &'a [u8],
}

/// Writes a GGUF v3 file at `path` holding `metadata` and `tensors`. Tensor data is aligned to
/// `general.alignment` when `metadata` sets it (a u32 power of two), else to 32 bytes.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
) -> Result<()> {
    let alignment = check(metadata, tensors)?;
    let tmp = temp_path(path);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let written = File::create(&tmp)
        .map_err(io(&tmp))
        .and_then(|file| {
            let mut w = BufWriter::new(file);
            write_all(&mut w, metadata, tensors, alignment).map_err(io(&tmp))?;
            let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
            file.sync_all().map_err(io(&tmp))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        // The write's error is what matters; a temporary file that cannot be removed either is
        // left behind under its hidden name.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `.<name>.<pid>.tmp` in `path`'s folder.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gguf".to_string());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn invalid(name: &'static str, value: String, expected: String) -> Error {
    Error::InvalidParameter {
        name,
        value,
        expected,
    }
}

/// Checks what ggml's reader would refuse, before anything is written; returns the alignment.
fn check(metadata: &[(String, Value)], tensors: &[WriteTensor]) -> Result<u64> {
    let mut keys = HashSet::new();
    for (key, value) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(invalid(
                "metadata key",
                key.clone(),
                "each key once".to_string(),
            ));
        }
        if let Value::Array(elem, items) = value {
            if *elem == ValueType::Array {
                return Err(invalid(
                    "metadata array",
                    key.clone(),
                    "no nested arrays (ggml reads none)".to_string(),
                ));
            }
            if let Some(bad) = items.iter().find(|v| v.value_type() != *elem) {
                return Err(invalid(
                    "metadata array",
                    key.clone(),
                    format!("all elements {elem}, but one is {}", bad.value_type()),
                ));
            }
        }
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, other)) => {
            return Err(invalid(
                "general.alignment",
                format!("{other:?}"),
                "a u32 power of two".to_string(),
            ));
        }
    };
    let mut names = HashSet::new();
    for t in tensors {
        let tensor_err = |reason: String| Error::Tensor {
            tensor: t.name.to_string(),
            reason,
        };
        if !names.insert(t.name) {
            return Err(tensor_err("the name appears twice".to_string()));
        }
        if t.shape.len() > MAX_DIMS {
            return Err(tensor_err(format!(
                "shape {:?} has more than ggml's {MAX_DIMS} dimensions",
                t.shape
            )));
        }
        let bs = t.ggml_type.block_size();
        let row = t.shape.last().copied().unwrap_or(1);
        if !row.is_multiple_of(bs) {
            return Err(tensor_err(format!(
                "shape {:?}: the last dimension {row} is not a multiple of the {} block size {bs}",
                t.shape, t.ggml_type
            )));
        }
        let want = t
            .shape
            .iter()
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .and_then(|n| t.ggml_type.bytes_for(n));
        if want != Some(t.data.len()) {
            return Err(tensor_err(format!(
                "shape {:?} as {} needs {} bytes, the data has {}",
                t.shape,
                t.ggml_type,
                want.map_or("too many".to_string(), |n| n.to_string()),
                t.data.len()
            )));
        }
    }
    Ok(alignment)
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, value: &Value) -> std::io::Result<()> {
    match value {
        Value::U8(v) => w.write_all(&v.to_le_bytes()),
        Value::I8(v) => w.write_all(&v.to_le_bytes()),
        Value::U16(v) => w.write_all(&v.to_le_bytes()),
        Value::I16(v) => w.write_all(&v.to_le_bytes()),
        Value::U32(v) => w.write_all(&v.to_le_bytes()),
        Value::I32(v) => w.write_all(&v.to_le_bytes()),
        Value::U64(v) => w.write_all(&v.to_le_bytes()),
        Value::I64(v) => w.write_all(&v.to_le_bytes()),
        Value::F32(v) => w.write_all(&v.to_le_bytes()),
        Value::F64(v) => w.write_all(&v.to_le_bytes()),
        Value::Bool(v) => w.write_all(&[u8::from(*v)]),
        Value::String(s) => write_string(w, s),
        Value::Array(elem, items) => {
            w.write_all(&elem.id().to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|v| write_value(w, v))
        }
    }
}

/// Zero bytes from `pos` to the next multiple of `alignment`; returns the new position.
fn pad(w: &mut impl Write, pos: u64, alignment: u64) -> std::io::Result<u64> {
    let end = pos.next_multiple_of(alignment);
    std::io::copy(&mut std::io::repeat(0).take(end - pos), w)?;
    Ok(end)
}

fn write_all(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
    alignment: u64,
) -> std::io::Result<()> {
    // Counts the header's bytes to know where the data section's padding ends.
    let mut header = Vec::new();
    header.extend_from_slice(&GGUF_MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut header, key)?;
        header.extend_from_slice(&value.value_type().id().to_le_bytes());
        write_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_string(&mut header, t.name)?;
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &n in t.shape.iter().rev() {
            header.extend_from_slice(&(n as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
    }
    w.write_all(&header)?;
    let mut pos = pad(w, header.len() as u64, alignment)?;
    for t in tensors {
        w.write_all(t.data)?;
        pos = pad(w, pos + t.data.len() as u64, alignment)?;
    }
    w.flush()
}
