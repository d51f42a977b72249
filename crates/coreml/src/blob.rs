//! `weights/weight.bin`: MIL blob storage, version 2.
//!
//! A 64-byte header {u32 count, u32 version = 2, 7 x u64 reserved}, then per blob a 64-byte
//! metadata record {u32 sentinel 0xDEADBEEF, u32 dtype, u64 size in bytes, u64 absolute offset of
//! the data, u64 unused bits in the last byte (sub-byte types), 4 x u64 reserved} followed by the
//! data. Every record and every data start is 64-byte aligned. The program refers to a blob by the
//! offset of its metadata record.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use coreml_proto::proto::mil_spec::DataType;

use crate::error::{format, io, Result};

pub const SENTINEL: u32 = 0xDEAD_BEEF;
pub const VERSION: u32 = 2;
const ALIGN: u64 = 64;
const RECORD: u64 = 64;

/// The dtype codes of blob metadata records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlobDtype {
    F16,
    F32,
    U8,
    I8,
    BF16,
    I16,
    U16,
    I4,
    U1,
    U2,
    U4,
    U3,
    U6,
    I32,
    U32,
}

impl BlobDtype {
    pub fn from_code(code: u32) -> Option<Self> {
        use BlobDtype::*;
        Some(match code {
            1 => F16,
            2 => F32,
            3 => U8,
            4 => I8,
            5 => BF16,
            6 => I16,
            7 => U16,
            8 => I4,
            9 => U1,
            10 => U2,
            11 => U4,
            12 => U3,
            13 => U6,
            14 => I32,
            15 => U32,
            _ => return None,
        })
    }

    pub fn code(self) -> u32 {
        use BlobDtype::*;
        match self {
            F16 => 1,
            F32 => 2,
            U8 => 3,
            I8 => 4,
            BF16 => 5,
            I16 => 6,
            U16 => 7,
            I4 => 8,
            U1 => 9,
            U2 => 10,
            U4 => 11,
            U3 => 12,
            U6 => 13,
            I32 => 14,
            U32 => 15,
        }
    }

    /// The MIL dtype a blob of this kind holds.
    pub fn mil(self) -> DataType {
        use BlobDtype::*;
        match self {
            F16 => DataType::Float16,
            F32 => DataType::Float32,
            U8 => DataType::Uint8,
            I8 => DataType::Int8,
            BF16 => DataType::Bfloat16,
            I16 => DataType::Int16,
            U16 => DataType::Uint16,
            I4 => DataType::Int4,
            U1 => DataType::Uint1,
            U2 => DataType::Uint2,
            U4 => DataType::Uint4,
            U3 => DataType::Uint3,
            U6 => DataType::Uint6,
            I32 => DataType::Int32,
            U32 => DataType::Uint32,
        }
    }

    /// The blob kind for a MIL dtype that weight.bin can hold.
    pub fn from_mil(dtype: DataType) -> Option<Self> {
        use BlobDtype::*;
        Some(match dtype {
            DataType::Float16 => F16,
            DataType::Float32 => F32,
            DataType::Uint8 => U8,
            DataType::Int8 => I8,
            DataType::Bfloat16 => BF16,
            DataType::Int16 => I16,
            DataType::Uint16 => U16,
            DataType::Int4 => I4,
            DataType::Uint1 => U1,
            DataType::Uint2 => U2,
            DataType::Uint4 => U4,
            DataType::Uint3 => U3,
            DataType::Uint6 => U6,
            DataType::Int32 => I32,
            DataType::Uint32 => U32,
            _ => return None,
        })
    }
}

/// One blob: its kind, its bytes and the unused bits at the end of its last byte.
#[derive(Clone, Copy, Debug)]
pub struct Blob<'a> {
    pub dtype: BlobDtype,
    pub data: &'a [u8],
    pub padding_bits: u64,
    /// Where its metadata record starts: the offset the program refers to.
    pub metadata_offset: u64,
}

/// A weight.bin file read into memory and checked record by record.
pub struct BlobFile {
    path: PathBuf,
    bytes: Vec<u8>,
    count: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl BlobFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        Self::from_bytes(path, bytes)
    }

    /// Checks the header; blobs are checked when they are read.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < RECORD as usize {
            return Err(format(
                path,
                format!(
                    "{} bytes: shorter than the 64-byte blob storage header",
                    bytes.len()
                ),
            ));
        }
        let count = u32_at(&bytes, 0);
        let version = u32_at(&bytes, 4);
        if version != VERSION {
            return Err(format(
                path,
                format!("blob storage version {version}: expected {VERSION}"),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            count,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of blobs the header announces.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn len_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The blob whose metadata record starts at `offset`, checked against the format's rules.
    pub fn blob(&self, offset: u64) -> Result<Blob<'_>> {
        let len = self.bytes.len() as u64;
        let bad = |reason: String| format(&self.path, format!("blob at offset {offset}: {reason}"));
        if offset < RECORD || !offset.is_multiple_of(ALIGN) {
            return Err(bad("not a 64-byte aligned offset after the header".into()));
        }
        if offset.checked_add(RECORD).is_none_or(|end| end > len) {
            return Err(bad(format!("past the end of the {len}-byte file")));
        }
        let at = offset as usize;
        let sentinel = u32_at(&self.bytes, at);
        if sentinel != SENTINEL {
            return Err(bad(format!(
                "metadata sentinel {sentinel:#010x}, expected {SENTINEL:#010x}"
            )));
        }
        let code = u32_at(&self.bytes, at + 4);
        let dtype = BlobDtype::from_code(code)
            .ok_or_else(|| bad(format!("unknown dtype code {code} (known: 1 to 15)")))?;
        let size = u64_at(&self.bytes, at + 8);
        let data_offset = u64_at(&self.bytes, at + 16);
        let padding_bits = u64_at(&self.bytes, at + 24);
        if data_offset < offset + RECORD || !data_offset.is_multiple_of(ALIGN) {
            return Err(bad(format!(
                "data offset {data_offset} is not 64-byte aligned after its metadata"
            )));
        }
        let end = data_offset
            .checked_add(size)
            .filter(|&end| end <= len)
            .ok_or_else(|| {
                bad(format!(
                    "{size} bytes at {data_offset} run past the end of the {len}-byte file"
                ))
            })?;
        if padding_bits >= 8 || (padding_bits > 0 && size == 0) {
            return Err(bad(format!(
                "{padding_bits} unused bits in the last byte (expected 0 to 7)"
            )));
        }
        Ok(Blob {
            dtype,
            data: &self.bytes[data_offset as usize..end as usize],
            padding_bits,
            metadata_offset: offset,
        })
    }

    /// Every blob in file order, following the records from the header on.
    pub fn blobs(&self) -> Result<Vec<Blob<'_>>> {
        let mut out = Vec::new();
        let mut offset = RECORD;
        for _ in 0..self.count {
            let blob = self.blob(offset)?;
            let data_start = blob.data.as_ptr() as usize - self.bytes.as_ptr() as usize;
            offset = align(data_start as u64 + blob.data.len() as u64);
            out.push(blob);
        }
        Ok(out)
    }
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Writes a weight.bin file blob by blob; the count in the header is filled in by `finish`.
pub struct BlobWriter {
    path: PathBuf,
    out: BufWriter<File>,
    position: u64,
    count: u32,
}

impl BlobWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(io(path))?;
        let mut w = Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            position: 0,
            count: 0,
        };
        let mut header = [0u8; RECORD as usize];
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(io(&self.path))?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let pad = align(self.position) - self.position;
        self.write(&vec![0u8; pad as usize])
    }

    /// Appends one blob; returns the offset of its metadata record (what the program stores).
    pub fn add(&mut self, dtype: BlobDtype, data: &[u8], padding_bits: u64) -> Result<u64> {
        self.pad()?;
        let offset = self.position;
        let mut record = [0u8; RECORD as usize];
        record[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        record[4..8].copy_from_slice(&dtype.code().to_le_bytes());
        record[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        record[16..24].copy_from_slice(&(offset + RECORD).to_le_bytes());
        record[24..32].copy_from_slice(&padding_bits.to_le_bytes());
        self.write(&record)?;
        self.write(data)?;
        self.count += 1;
        Ok(offset)
    }

    /// Pads the last blob, writes the count and flushes.
    pub fn finish(mut self) -> Result<()> {
        self.pad()?;
        let count = self.count;
        let path = self.path.clone();
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| io(&path)(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        file.write_all(&count.to_le_bytes()).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_blobs_read_back_aligned_with_their_padding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weight.bin");
        let mut w = BlobWriter::create(&path).unwrap();
        let a = w.add(BlobDtype::F16, &[1, 2, 3, 4, 5, 6], 0).unwrap();
        let b = w.add(BlobDtype::U6, &[0xff, 0x0f], 4).unwrap();
        w.finish().unwrap();
        let f = BlobFile::open(&path).unwrap();
        assert_eq!(f.count(), 2);
        assert_eq!(a, 64);
        assert_eq!(b % 64, 0);
        let blobs = f.blobs().unwrap();
        assert_eq!(blobs[0].data, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(blobs[1].dtype, BlobDtype::U6);
        assert_eq!(blobs[1].padding_bits, 4);
        assert_eq!(f.blob(b).unwrap().data, &[0xff, 0x0f]);
        assert_eq!(f.len_bytes() % 64, 0);
    }

    #[test]
    fn a_bad_offset_or_sentinel_is_an_error_naming_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weight.bin");
        let mut w = BlobWriter::create(&path).unwrap();
        w.add(BlobDtype::F32, &[0; 8], 0).unwrap();
        w.finish().unwrap();
        let f = BlobFile::open(&path).unwrap();
        let e = f.blob(128).unwrap_err().to_string();
        assert!(e.contains("offset 128"), "{e}");
        let e = f.blob(4096).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let e = f.blob(65).unwrap_err().to_string();
        assert!(e.contains("aligned"), "{e}");
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let e = BlobFile::from_bytes(Path::new("w.bin"), vec![0; 10])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("shorter than"), "{e}");
    }
}
