//! The GGUF reader: the header (metadata and tensor infos) of a GGUF v2/v3 file as ggml's
//! `gguf.cpp` lays it out, parsed with positioned reads and checked against the file size before
//! anything is allocated, and tensor data read on demand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::blocks::{decode_blocks, GgmlType};
use super::value::{Value, ValueType};
use crate::{Error, Result};

/// The first four bytes of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The alignment of tensor data when a file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's `GGML_MAX_DIMS`: a tensor has at most this many dimensions.
pub const MAX_DIMS: usize = 4;

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// numpy/PyTorch order: ggml's `ne` reversed, so the last dimension is the contiguous one.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the tensor's data in the file.
    pub offset: u64,
    /// Bytes of the tensor's data.
    pub bytes: usize,
}

impl TensorInfo {
    /// The number of values.
    pub fn elements(&self) -> usize {
        // Checked for overflow when the file was opened; saturating for hand-made infos.
        self.shape.iter().fold(1usize, |a, &n| a.saturating_mul(n))
    }
}

/// An open GGUF file: its header, and its file handle for reading tensor data.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: Mutex<File>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    /// Tensor index by name.
    index: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens `path` and parses its header; no tensor data is read.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut reader = HeaderReader {
            inner: BufReader::new(&file),
            pos: 0,
            len,
            path,
            context: String::new(),
        };
        let header = reader.header()?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensors: header.tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The raw bytes of `info`'s data.
    pub fn read_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        self.check_own(info)?;
        let mut bytes = vec![0u8; info.bytes];
        self.read_into(info, &mut bytes)?;
        Ok(bytes)
    }

    /// Reads `info`'s data into `out`, which must be `info.bytes` long.
    pub fn read_into(&self, info: &TensorInfo, out: &mut [u8]) -> Result<()> {
        self.check_own(info)?;
        if out.len() != info.bytes {
            return Err(Error::Tensor {
                tensor: info.name.clone(),
                reason: format!(
                    "its data is {} bytes, the buffer {} bytes",
                    info.bytes,
                    out.len()
                ),
            });
        }
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        // A poisoned lock only means another reader panicked mid-read; the seek below resets the
        // position, so the handle is still usable.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::Start(info.offset)).map_err(io)?;
        file.read_exact(out).map_err(io)
    }

    /// Fails unless `info` is one of this file's tensors, as read (its sizes were checked).
    fn check_own(&self, info: &TensorInfo) -> Result<()> {
        if self.tensor(&info.name) != Some(info) {
            return Err(Error::Tensor {
                tensor: info.name.clone(),
                reason: format!("not a tensor of {} as read", self.path.display()),
            });
        }
        Ok(())
    }

    /// `info`'s values decoded to f32 (as gguf-py's `dequantize`), in `info.shape`'s order.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(info)?;
        let mut out = vec![0f32; info.elements()];
        decode_blocks(info.ggml_type, &bytes, &mut out);
        Ok(out)
    }
}

struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

/// Sequential reads through the header that know how many bytes the file has left.
struct HeaderReader<'a, R> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'a Path,
    /// What is being read, for messages ("metadata key #3 `general.name`").
    context: String,
}

impl<R: Read> HeaderReader<'_, R> {
    fn error(&self, reason: String) -> Error {
        let reason = if self.context.is_empty() {
            reason
        } else {
            format!("{}: {reason}", self.context)
        };
        Error::Format {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes exist.
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "truncated file: {what} needs {n} bytes at offset {}, but only {} remain \
                 (file size {})",
                self.pos,
                self.remaining(),
                self.len
            )));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.need(buf.len() as u64, what)?;
        self.inner.read_exact(buf).map_err(|source| Error::Io {
            path: self.path.to_path_buf(),
            source,
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: a u64 byte length and UTF-8 bytes, the length checked against the file
    /// before the bytes are allocated.
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(self.error(format!(
                "{what} claims {len} bytes at offset {}, but only {} remain (file size {})",
                self.pos,
                self.remaining(),
                self.len
            )));
        }
        // Fits: the file has that many bytes left.
        let mut bytes = vec![0u8; len as usize];
        let start = self.pos;
        self.fill(&mut bytes, what)?;
        String::from_utf8(bytes)
            .map_err(|e| self.error(format!("{what} at offset {start} is not UTF-8: {e}")))
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let id = self.u32(what)?;
        ValueType::from_id(id)
            .ok_or_else(|| self.error(format!("{what} is {id}, not a GGUF value type (0 to 12)")))
    }

    fn value(&mut self, ty: ValueType) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("a u8")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("an i8")?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("a u16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("an i16")?)),
            ValueType::U32 => Value::U32(self.u32("a u32")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("an i32")?)),
            ValueType::U64 => Value::U64(self.u64("a u64")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("an i64")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("an f32")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("an f64")?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>("a bool")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(
                            self.error(format!("bool at offset {at} is {b}, expected 0 or 1"))
                        );
                    }
                }
            }
            ValueType::String => Value::String(self.string("a string")?),
            ValueType::Array => {
                let elem = self.value_type("the array's element type")?;
                if elem == ValueType::Array {
                    return Err(self.error(
                        "nested arrays are not supported (nor are they by ggml)".to_string(),
                    ));
                }
                let count = self.u64("the array's length")?;
                let fits = count
                    .checked_mul(elem.min_size())
                    .is_some_and(|n| n <= self.remaining());
                if !fits {
                    return Err(self.error(format!(
                        "an array of {count} {elem} values at offset {} cannot fit in the {} \
                         bytes that remain",
                        self.pos,
                        self.remaining()
                    )));
                }
                // Grows with what is actually read, not with what the count claims.
                let mut items = Vec::with_capacity(count.min(4096) as usize);
                for _ in 0..count {
                    items.push(self.value(elem)?);
                }
                Value::Array(elem, items)
            }
        })
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in the rest of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        if count
            .checked_mul(min_size)
            .is_none_or(|n| n > self.remaining())
        {
            return Err(self.error(format!(
                "{count} {what} (at least {min_size} bytes each) cannot fit in the {} bytes \
                 after offset {}",
                self.remaining(),
                self.pos
            )));
        }
        Ok(())
    }

    fn header(&mut self) -> Result<Header> {
        let magic: [u8; 4] = self.array("the magic")?;
        if magic != GGUF_MAGIC {
            return Err(self.error(format!(
                "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
            )));
        }
        let version = self.u32("the version")?;
        if version != 2 && version != 3 {
            let reason = if matches!(version.swap_bytes(), 2 | 3) {
                format!(
                    "a big-endian GGUF file (version {}) is not supported",
                    version.swap_bytes()
                )
            } else {
                format!("GGUF version {version} is not supported (expected 2 or 3)")
            };
            return Err(self.error(reason));
        }
        let tensor_count = self.u64("the tensor count")?;
        let kv_count = self.u64("the metadata count")?;
        // A key/value pair is at least a key length, a type and a one-byte value; a tensor info a
        // name length, a dimension count, a type and an offset.
        self.check_count(kv_count, 8 + 4 + 1, "metadata key/value pairs")?;
        self.check_count(tensor_count, 8 + 4 + 4 + 8, "tensor infos")?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            self.context = format!("metadata key #{i}");
            let key = self.string("the key")?;
            self.context = format!("metadata key #{i} `{key}`");
            let ty = self.value_type("the value type")?;
            let value = self.value(ty)?;
            if metadata.insert(key, value).is_some() {
                return Err(self.error("the key appears twice".to_string()));
            }
        }
        self.context.clear();

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(self.error(format!(
                    "general.alignment is {other:?}, expected a u32 power of two"
                )));
            }
        };

        let mut raw = Vec::new();
        let mut names = HashSet::new();
        for i in 0..tensor_count {
            self.context = format!("tensor info #{i}");
            let name = self.string("the name")?;
            self.context = format!("tensor info #{i} `{name}`");
            if !names.insert(name.clone()) {
                return Err(self.error("the name appears twice".to_string()));
            }
            let n_dims = self.u32("the dimension count")?;
            if n_dims as usize > MAX_DIMS {
                return Err(self.error(format!(
                    "{n_dims} dimensions, ggml allows at most {MAX_DIMS}"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(self.u64("a dimension")?);
            }
            let type_id = self.u32("the type")?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| self.error(GgmlType::unsupported_id_message(type_id)))?;
            let offset = self.u64("the offset")?;
            raw.push((name, ne, ggml_type, offset));
        }
        self.context.clear();

        let data_offset = self.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        // ggml's own reader (`gguf.cpp`) requires the data in info order, each tensor padded to
        // the alignment: no overlaps, no gaps, no data shared between two tensors.
        let mut expected = 0u64;
        for (name, ne, ggml_type, offset) in raw {
            self.context = format!("tensor `{name}`");
            let info = self.tensor_info(name, &ne, ggml_type, offset, data_offset, alignment)?;
            if offset != expected {
                return Err(self.error(format!(
                    "data offset {offset}, expected {expected}: GGUF tensor data follows the \
                     tensor infos' order, each tensor padded to the alignment {alignment}, so \
                     this tensor {}",
                    if offset < expected {
                        "overlaps the one before it"
                    } else {
                        "leaves a gap after the one before it"
                    }
                )));
            }
            // Cannot overflow: `tensor_info` checked that the data ends inside the file.
            expected = (offset + info.bytes as u64).next_multiple_of(alignment);
            tensors.push(info);
        }
        self.context.clear();
        // Writers (gguf-py, ggml) pad after the last tensor too; anything beyond is not GGUF.
        let data_end = data_offset.saturating_add(expected);
        if self.len > data_end.max(self.pos) {
            return Err(self.error(format!(
                "{} bytes follow the last tensor's data (the data section ends at offset \
                 {data_end}, the file is {} bytes): a damaged or concatenated file",
                self.len - data_end.max(self.pos),
                self.len
            )));
        }

        Ok(Header {
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }

    /// A tensor's info with its sizes checked: dimensions that multiply without overflow, a first
    /// (ggml `ne[0]`) dimension that holds whole blocks, aligned data inside the file.
    fn tensor_info(
        &self,
        name: String,
        ne: &[u64],
        ggml_type: GgmlType,
        offset: u64,
        data_offset: u64,
        alignment: u64,
    ) -> Result<TensorInfo> {
        let mut shape = Vec::with_capacity(ne.len());
        for &n in ne.iter().rev() {
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| i64::try_from(n).is_ok())
                .ok_or_else(|| self.error(format!("dimension {n} is too large")))?;
            shape.push(n);
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| self.error(format!("the shape {shape:?} overflows")))?;
        let row = ne.first().copied().unwrap_or(1);
        let bs = ggml_type.block_size() as u64;
        if !row.is_multiple_of(bs) {
            return Err(self.error(format!(
                "its rows (ne[0] = {row}, shape {shape:?}) are not a multiple of the \
                 {ggml_type} block size {bs}"
            )));
        }
        let bytes = ggml_type
            .bytes_for(elements)
            .ok_or_else(|| self.error(format!("the data of shape {shape:?} overflows")))?;
        if !offset.is_multiple_of(alignment) {
            return Err(self.error(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(bytes as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.len => Ok(TensorInfo {
                name,
                shape,
                ggml_type,
                offset: start,
                bytes,
            }),
            _ => Err(self.error(format!(
                "its {bytes} bytes of {ggml_type} data at offset {offset} past the data \
                 section (offset {data_offset}) run past the end of the file ({} bytes)",
                self.len
            ))),
        }
    }
}
