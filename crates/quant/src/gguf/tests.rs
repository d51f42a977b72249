//! Tests of the GGUF module: bit-exact decoding against gguf-py's fixtures, hostile headers,
//! quantizers, the writer's round trip and the matrix's row segments.

use std::path::{Path, PathBuf};

use candle_core::DType;
use half::f16;
use safetensors::SafeTensors;
use sdrs_kernels::QuantizedMatrix;

use super::quantize::{f32_to_bf16, QUANTIZE_TYPES};
use super::*;
use crate::Error;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// `$SDRS_FIXTURES/gguf` (default `<workspace>/../shared/fixtures/gguf`), `None` (after saying
/// so) when absent, except under `CI=true`, where a missing fixture fails the test.
fn fixtures() -> Option<PathBuf> {
    sdrs_fixtures::extended("gguf")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The f32 tensor `name` of reference.safetensors.
fn reference<'a>(st: &SafeTensors<'a>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("reference {name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "reference {name}");
    let (words, _) = view.data().as_chunks::<4>();
    let values = words.iter().map(|w| f32::from_le_bytes(*w)).collect();
    (view.shape().to_vec(), values)
}

/// Bit-for-bit equality of f32 values (tolerance: none), naming the first difference.
fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad = got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits());
    if let Some(i) = bad {
        let n = got
            .iter()
            .zip(want)
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        panic!(
            "{what}: {n} of {} values differ; first at {i}: got {} ({:#010x}), want {} ({:#010x})",
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// blocks.gguf's tensor `name` decoded, against gguf-py's decode in reference.safetensors.
fn check_block_format(name: &str) {
    let Some(dir) = fixtures() else { return };
    let file = GgufFile::open(&dir.join("blocks.gguf")).unwrap();
    let info = file
        .tensor(name)
        .unwrap_or_else(|| panic!("blocks.gguf has no tensor {name}"));
    assert_eq!(info.ggml_type, GgmlType::from_name(name).unwrap());
    assert_eq!(info.shape, [3, 512]);
    let bytes = read(&dir.join("reference.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, want) = reference(&st, &format!("blocks:{name}"));
    assert_eq!(shape, info.shape);
    let got = file.dequantize(info).unwrap();
    assert_bits_eq(&format!("blocks.gguf {name}"), &got, &want);

    // The public `decode` and the matrix's row reads give the same bits.
    let raw = file.read_bytes(info).unwrap();
    let mut out = vec![0f32; want.len()];
    decode(info.ggml_type, &raw, &mut out).unwrap();
    assert_bits_eq(&format!("decode {name}"), &out, &want);
    let m = GgufMatrix::from_file(&file, info, DType::F32).unwrap();
    let mut row = vec![0f32; 512];
    for r in 0..3 {
        m.read_row(r, 0, &mut row);
        assert_bits_eq(
            &format!("read_row {name}"),
            &row,
            &want[r * 512..(r + 1) * 512],
        );
    }
}

macro_rules! block_format_tests {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check_block_format($name);
        }
    )*};
}

block_format_tests! {
    decode_bit_exact_q2_k => "q2_k",
    decode_bit_exact_q3_k => "q3_k",
    decode_bit_exact_q4_k => "q4_k",
    decode_bit_exact_q5_k => "q5_k",
    decode_bit_exact_q6_k => "q6_k",
    decode_bit_exact_q8_0 => "q8_0",
    decode_bit_exact_q4_0 => "q4_0",
    decode_bit_exact_q4_1 => "q4_1",
    decode_bit_exact_q5_0 => "q5_0",
    decode_bit_exact_q5_1 => "q5_1",
    decode_bit_exact_iq4_nl => "iq4_nl",
    decode_bit_exact_bf16 => "bf16",
}

/// Every `blocks:` reference has a test above, so a format added to the fixtures is not silently
/// unchecked.
#[test]
fn every_block_reference_is_tested() {
    let Some(dir) = fixtures() else { return };
    let tested = [
        "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
        "bf16",
    ];
    let bytes = read(&dir.join("reference.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in st.names() {
        if let Some(format) = name.strip_prefix("blocks:") {
            assert!(tested.contains(&format), "blocks:{format} has no test");
        }
    }
    let file = GgufFile::open(&dir.join("blocks.gguf")).unwrap();
    assert_eq!(file.tensors().len(), tested.len());
}

/// Every `<stem>:<tensor>` reference of model file `file_name` (but the image) against our
/// dequantization; every tensor of the file decodes; the counts of quantized and kept tensors
/// are reference.json's.
fn check_model_file(file_name: &str) {
    let Some(dir) = fixtures() else { return };
    let file = GgufFile::open(&dir.join(file_name)).unwrap();
    let stem = file_name.trim_end_matches(".gguf");
    let bytes = read(&dir.join("reference.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for name in st.names() {
        let Some(tensor) = name.strip_prefix(stem).and_then(|n| n.strip_prefix(':')) else {
            continue;
        };
        if tensor == "image" {
            continue;
        }
        let info = file
            .tensor(tensor)
            .unwrap_or_else(|| panic!("{file_name} has no tensor {tensor}"));
        let (shape, want) = reference(&st, name);
        assert_eq!(shape, info.shape, "{name}");
        let got = file.dequantize(info).unwrap();
        assert_bits_eq(name, &got, &want);
        checked += 1;
    }
    assert!(checked > 0, "no reference tensors for {stem}");

    let json: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("reference.json"))).unwrap();
    let entry = &json["files"][file_name];
    let ty = GgmlType::from_name(entry["type"].as_str().unwrap()).unwrap();
    let quantized = file.tensors().iter().filter(|t| t.ggml_type == ty).count();
    assert_eq!(Some(quantized as u64), entry["quantized_tensors"].as_u64());
    let kept = file.tensors().len() - quantized;
    assert_eq!(Some(kept as u64), entry["kept_tensors"].as_u64());
    for info in file.tensors() {
        let values = file.dequantize(info).unwrap();
        assert_eq!(values.len(), info.elements(), "{}", info.name);
    }
    assert_eq!(
        file.metadata().get("general.architecture"),
        Some(&Value::String("sd".to_string()))
    );
}

#[test]
fn model_tensors_bit_exact_tiny_sd15_q8_0() {
    check_model_file("tiny-sd15-q8_0.gguf");
}

#[test]
fn model_tensors_bit_exact_tiny_sd15_q5_1() {
    check_model_file("tiny-sd15-q5_1.gguf");
}

#[test]
fn model_tensors_bit_exact_tiny_sdxl_q4_0() {
    check_model_file("tiny-sdxl-q4_0.gguf");
}

// ---------------------------------------------------------------------------------------------
// Hand-made headers

fn push_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn push_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn push_str(b: &mut Vec<u8>, s: &str) {
    push_u64(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

fn start(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    push_u32(&mut b, 3);
    push_u64(&mut b, tensors);
    push_u64(&mut b, kvs);
    b
}

/// One tensor info: name, `ne` (ggml order), type id, relative offset.
fn push_tensor(b: &mut Vec<u8>, name: &str, ne: &[u64], type_id: u32, offset: u64) {
    push_str(b, name);
    push_u32(b, ne.len() as u32);
    for &n in ne {
        push_u64(b, n);
    }
    push_u32(b, type_id);
    push_u64(b, offset);
}

fn pad_to(b: &mut Vec<u8>, alignment: usize) {
    b.resize(b.len().next_multiple_of(alignment), 0);
}

/// Opens `bytes` as a file; the error's message.
fn open_bytes(bytes: &[u8]) -> Result<GgufFile, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path).map_err(|e| {
        assert!(matches!(e, Error::Format { .. }), "{e:?}");
        e.to_string()
    })
}

fn open_err(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    }
}

/// A valid file of one 2x32 f32 tensor and one key.
fn small_file() -> Vec<u8> {
    let mut b = start(1, 1);
    push_str(&mut b, "general.name");
    push_u32(&mut b, ValueType::String.id());
    push_str(&mut b, "tiny");
    push_tensor(&mut b, "w", &[32, 2], 0, 0);
    pad_to(&mut b, 32);
    b.extend((0..64).flat_map(|i| (i as f32).to_le_bytes()));
    b
}

#[test]
fn hand_made_file_opens() {
    let file = open_bytes(&small_file()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    let info = &file.tensors()[0];
    assert_eq!(info.shape, [2, 32]);
    assert_eq!(info.bytes, 256);
    assert_eq!(info.offset, file.data_offset());
    assert_eq!(
        file.dequantize(info).unwrap(),
        (0..64).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(file.metadata()["general.name"].as_str(), Some("tiny"));
    // An info that is not the file's is refused, not read.
    let mut forged = info.clone();
    forged.bytes = usize::MAX;
    let e = file.read_bytes(&forged).unwrap_err().to_string();
    assert!(e.contains("tensor w: not a tensor of"), "{e}");
}

#[test]
fn truncated_file_is_an_error_at_every_length() {
    let full = small_file();
    for len in 0..full.len() {
        let e = open_err(&full[..len]);
        let clear = ["truncated", "past the end", "cannot fit", "claims"];
        assert!(clear.iter().any(|c| e.contains(c)), "{len}: {e}");
    }
}

#[test]
fn huge_string_length_is_an_error_not_an_allocation() {
    let mut b = start(0, 1);
    push_u64(&mut b, u64::MAX / 2);
    b.extend_from_slice(b"key and a few more bytes");
    let e = open_err(&b);
    assert!(e.contains("claims 9223372036854775807 bytes"), "{e}");

    let mut b = start(0, 1);
    push_str(&mut b, "k");
    push_u32(&mut b, ValueType::String.id());
    push_u64(&mut b, 1 << 40);
    let e = open_err(&b);
    assert!(e.contains("metadata key #0 `k`"), "{e}");
}

#[test]
fn huge_array_and_counts_are_errors() {
    let mut b = start(0, 1);
    push_str(&mut b, "a");
    push_u32(&mut b, ValueType::Array.id());
    push_u32(&mut b, ValueType::U64.id());
    push_u64(&mut b, u64::MAX / 4);
    let e = open_err(&b);
    assert!(e.contains("cannot fit"), "{e}");

    let e = open_err(&start(u64::MAX, 0));
    assert!(
        e.contains("tensor infos") && e.contains("cannot fit"),
        "{e}"
    );
    let e = open_err(&start(0, 1 << 50));
    assert!(e.contains("metadata key/value pairs"), "{e}");
}

#[test]
fn tensor_past_the_end_is_an_error() {
    let mut b = small_file();
    b.truncate(b.len() - 4);
    let e = open_err(&b);
    assert!(
        e.contains("tensor `w`") && e.contains("past the end"),
        "{e}"
    );

    // An offset near u64::MAX does not wrap around.
    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[32], 0, u64::MAX - 31);
    pad_to(&mut b, 32);
    let e = open_err(&b);
    assert!(e.contains("past the end"), "{e}");
}

/// Two 32-value f32 tensors (128 bytes each) at relative offsets `a` and `b`, `data` bytes of data.
fn two_tensors(a: u64, b: u64, data: usize) -> Vec<u8> {
    let mut f = start(2, 0);
    push_tensor(&mut f, "a", &[32], 0, a);
    push_tensor(&mut f, "b", &[32], 0, b);
    pad_to(&mut f, 32);
    f.resize(f.len() + data, 0);
    f
}

#[test]
fn overlapping_out_of_order_gapped_and_trailing_data_are_refused() {
    // The layout ggml writes: in order, each padded to the alignment.
    open_bytes(&two_tensors(0, 128, 256)).unwrap();
    let e = open_err(&two_tensors(0, 64, 256));
    assert!(
        e.contains("tensor `b`") && e.contains("data offset 64, expected 128"),
        "{e}"
    );
    assert!(e.contains("overlaps"), "{e}");
    // Both tensors on the same bytes.
    let e = open_err(&two_tensors(0, 0, 256));
    assert!(e.contains("overlaps"), "{e}");
    let e = open_err(&two_tensors(128, 0, 256));
    assert!(e.contains("tensor `a`") && e.contains("gap"), "{e}");
    let e = open_err(&two_tensors(0, 160, 288));
    assert!(e.contains("tensor `b`") && e.contains("gap"), "{e}");
    let e = open_err(&two_tensors(0, 128, 257));
    assert!(e.contains("1 bytes follow the last tensor"), "{e}");
    // The padding after the last tensor is optional.
    let mut f = start(1, 0);
    push_tensor(&mut f, "w", &[4], 0, 0);
    pad_to(&mut f, 32);
    f.resize(f.len() + 32, 0);
    open_bytes(&f).unwrap();
    f.truncate(f.len() - 16);
    open_bytes(&f).unwrap();
}

#[test]
fn unknown_type_id_is_an_error_naming_it() {
    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[32], 99, 0);
    let e = open_err(&b);
    assert!(e.contains("ggml type id 99 is not supported"), "{e}");
    assert!(e.contains("q8_0 (8)") && e.contains("bf16 (30)"), "{e}");

    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[256], 16, 0);
    let e = open_err(&b);
    assert!(e.contains("16 (iq2_xxs)"), "{e}");
}

#[test]
fn bad_headers_are_errors() {
    let mut b = small_file();
    b[0] = b'X';
    assert!(open_err(&b).contains("not a GGUF file"));

    let mut b = small_file();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open_err(&b).contains("version 1 is not supported"));
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err(&b).contains("big-endian"));

    // ne[0] not a multiple of the block size.
    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[48, 2], GgmlType::Q8_0.id(), 0);
    let e = open_err(&b);
    assert!(
        e.contains("ne[0] = 48") && e.contains("q8_0 block size 32"),
        "{e}"
    );

    // A product of dimensions that overflows.
    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[1 << 40, 1 << 40], 0, 0);
    assert!(open_err(&b).contains("overflows"));

    // Five dimensions.
    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[1, 1, 1, 1, 1], 0, 0);
    assert!(open_err(&b).contains("at most 4"));

    // A misaligned offset.
    let mut b = start(1, 0);
    push_tensor(&mut b, "w", &[1], 0, 4);
    pad_to(&mut b, 32);
    b.extend_from_slice(&[0; 64]);
    assert!(open_err(&b).contains("not a multiple of the alignment 32"));

    // Duplicate names and keys.
    let mut b = start(2, 0);
    push_tensor(&mut b, "w", &[1], 0, 0);
    push_tensor(&mut b, "w", &[1], 0, 32);
    assert!(open_err(&b).contains("appears twice"));
    let mut b = start(0, 2);
    for _ in 0..2 {
        push_str(&mut b, "k");
        push_u32(&mut b, ValueType::U8.id());
        b.push(1);
    }
    assert!(open_err(&b).contains("appears twice"));

    // A bad value type, a bool that is neither 0 nor 1, a nested array, a bad alignment.
    let mut b = start(0, 1);
    push_str(&mut b, "k");
    push_u32(&mut b, 13);
    assert!(open_err(&b).contains("not a GGUF value type"));
    let mut b = start(0, 1);
    push_str(&mut b, "k");
    push_u32(&mut b, ValueType::Bool.id());
    b.push(2);
    assert!(open_err(&b).contains("expected 0 or 1"));
    let mut b = start(0, 1);
    push_str(&mut b, "k");
    push_u32(&mut b, ValueType::Array.id());
    push_u32(&mut b, ValueType::Array.id());
    push_u64(&mut b, 0);
    assert!(open_err(&b).contains("nested arrays"));
    let mut b = start(0, 1);
    push_str(&mut b, "general.alignment");
    push_u32(&mut b, ValueType::U32.id());
    push_u32(&mut b, 24);
    assert!(open_err(&b).contains("power of two"));

    // A key that is not UTF-8.
    let mut b = start(0, 1);
    push_u64(&mut b, 2);
    b.extend_from_slice(&[0xFF, 0xFE]);
    push_u32(&mut b, ValueType::U8.id());
    b.push(0);
    assert!(open_err(&b).contains("not UTF-8"));
}

/// Every f16 bit pattern converts as half's exact conversion does (NaNs: as NaNs with the same
/// sign and payload, made quiet by neither).
#[test]
fn f16_decode_is_exact_for_every_bit_pattern() {
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let mut out = vec![0f32; 1 << 16];
    decode(GgmlType::F16, &bytes, &mut out).unwrap();
    for (h, v) in (0..=u16::MAX).zip(&out) {
        let want = f16::from_bits(h).to_f32();
        if want.is_nan() {
            let payload = (h as u32 & 0x3FF) << 13;
            assert_eq!(
                v.to_bits(),
                (h as u32 & 0x8000) << 16 | 0x7F80_0000 | payload,
                "{h:#06x}"
            );
        } else {
            assert_eq!(v.to_bits(), want.to_bits(), "{h:#06x}");
        }
    }
}

#[test]
fn decode_checks_its_lengths() {
    let mut out = [0f32; 32];
    let e = decode(GgmlType::Q8_0, &[0; 33], &mut out).unwrap_err();
    assert!(
        e.to_string().contains("bytes.len() = 33: expected 34"),
        "{e}"
    );
    let e = decode(GgmlType::Q8_0, &[0; 34], &mut out[..31]).unwrap_err();
    assert!(e.to_string().contains("block size 32"), "{e}");
}

#[test]
fn type_ids_names_and_sizes() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        assert_eq!(GgmlType::from_name(ty.name()).unwrap(), ty);
        assert_eq!(GgmlType::from_name(&ty.name().to_uppercase()).unwrap(), ty);
    }
    let ids: Vec<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 30]);
    // ggml's GGML_QUANT_SIZES.
    let sizes: Vec<(usize, usize)> = GgmlType::ALL
        .iter()
        .map(|t| (t.block_size(), t.type_size()))
        .collect();
    assert_eq!(
        sizes,
        [
            (1, 4),
            (1, 2),
            (32, 18),
            (32, 20),
            (32, 22),
            (32, 24),
            (32, 34),
            (256, 84),
            (256, 110),
            (256, 144),
            (256, 176),
            (256, 210),
            (32, 18),
            (1, 2)
        ]
    );
    let e = GgmlType::from_name("q7_0").unwrap_err().to_string();
    assert!(e.contains("q7_0") && e.contains("iq4_nl"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Quantizers

/// A deterministic pseudo-random stream (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

fn quantized(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    quantize(ty, values, &mut out).unwrap();
    assert_eq!(out.len(), ty.bytes_for(values.len()).unwrap());
    out
}

fn decoded(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.type_size() * ty.block_size();
    let mut out = vec![0f32; n];
    decode(ty, bytes, &mut out).unwrap();
    out
}

#[test]
fn q8_0_quantize_by_hand() {
    // amax 127 gives d = 1 exactly; halves round away from zero.
    let mut x = [0f32; 32];
    x[0] = 127.0;
    x[1] = -2.5;
    x[2] = 2.5;
    x[3] = 0.49;
    x[4] = -126.5;
    let b = quantized(GgmlType::Q8_0, &x);
    assert_eq!(&b[..2], &f16::ONE.to_bits().to_le_bytes());
    assert_eq!(&b[2..7], &[127, (-3i8) as u8, 3, 0, (-127i8) as u8]);
    assert!(b[7..].iter().all(|&q| q == 0));
    // An all-zero block: d = 0 and every level 0.
    assert_eq!(quantized(GgmlType::Q8_0, &[0.0; 32]), [0u8; 34]);
}

#[test]
fn q4_0_quantize_by_hand() {
    // The value of largest magnitude is -8: d = -8 / -8 = 1, so levels are x + 8 (+ 0.5,
    // truncated), clamped to 15.
    let mut x = [0f32; 32];
    x[0] = -8.0;
    x[1] = 7.0;
    x[2] = 7.6; // 16.1 -> 15
    x[3] = -0.5; // 8.0 -> 8
    x[16] = 1.4; // 9.9 -> 9
    x[17] = -3.0; // 5.5 -> 5
    let b = quantized(GgmlType::Q4_0, &x);
    assert_eq!(&b[..2], &f16::ONE.to_bits().to_le_bytes());
    assert_eq!(b[2], 9 << 4);
    assert_eq!(b[3], 15 | 5 << 4);
    assert_eq!(b[4], 15 | 8 << 4);
    assert_eq!(b[5], 8 | 8 << 4);
    // A positive extreme flips the scale's sign: d = 8 / -8 = -1.
    let mut y = [0f32; 32];
    y[5] = 8.0;
    let b = quantized(GgmlType::Q4_0, &y);
    assert_eq!(&b[..2], &f16::NEG_ONE.to_bits().to_le_bytes());
    assert_eq!(b[7], 0x80);
    let back = decoded(GgmlType::Q4_0, &b);
    assert_eq!(back[5], 8.0);
}

/// decode(quantize(x)) is within each format's step of x: half a step of the f16-rounded scale
/// (plus the scale's own rounding) for the rounding formats, a whole step for the truncating
/// ones (Q4_0/Q5_0's extreme level is clamped, so their bound is a step).
#[test]
fn quantize_round_trip_error_bounds() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let x = rng.values(32 * 64, 3.0);
    for ty in QUANTIZE_TYPES {
        let back = decoded(ty, &quantized(ty, &x));
        for (block, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (lo, hi) = xs
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            // Tolerance per element: the format's quantization step (relative rounding for the
            // float types).
            let bound = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => amax * 2f32.powi(-11),
                GgmlType::BF16 => amax * 2f32.powi(-8),
                GgmlType::Q8_0 => amax / 127.0 * (0.5 + 127.0 * 2f32.powi(-11)),
                GgmlType::Q4_0 => amax / 8.0 * 1.01,
                GgmlType::Q5_0 => amax / 16.0 * 1.01,
                GgmlType::Q4_1 => (hi - lo) / 15.0 * 0.52 + lo.abs() * 2f32.powi(-11),
                GgmlType::Q5_1 => (hi - lo) / 31.0 * 0.53 + lo.abs() * 2f32.powi(-11),
                // The K-quants: checked by `k_quants_round_trip_error`.
                _ => continue,
            };
            for (a, b) in xs.iter().zip(ys) {
                assert!(
                    (a - b).abs() <= bound,
                    "{ty} block {block}: {a} -> {b} (bound {bound})"
                );
            }
        }
    }
}

/// K-quant round trips: the RMS error (over uniform values in [-1, 1)) below that of an ideal
/// uniform quantizer of the format's level count over the sub-block's range, and no value off by
/// more than one such step (the levels span [-1, 1)); all-zero blocks come back zero.
#[test]
fn k_quants_round_trip_error() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let x = rng.values(QK_K * 32, 1.0);
    // Levels per sub-block.
    for (ty, levels) in [
        (GgmlType::Q2K, 4.0),
        (GgmlType::Q3K, 8.0),
        (GgmlType::Q4K, 16.0),
        (GgmlType::Q5K, 32.0),
        (GgmlType::Q6K, 64.0),
    ] {
        let back = decoded(ty, &quantized(ty, &x));
        let step = 2.0f32 / (levels - 1.0);
        let ideal = step / 12f32.sqrt();
        let mse = x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / x.len() as f32;
        let worst = x
            .iter()
            .zip(&back)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            mse.sqrt() < ideal,
            "{ty}: rms error {} (ideal quantizer {ideal})",
            mse.sqrt()
        );
        assert!(worst <= step, "{ty}: worst error {worst} (step {step})");
        assert!(
            decoded(ty, &quantized(ty, &[0.0; QK_K]))
                .iter()
                .all(|&v| v == 0.0),
            "{ty}"
        );
        // Scaled inputs stay proportionate, within two steps: at 1e-3 the super-block scales
        // (`d = max_scale / 63`) are f16 subnormals with a few bits of precision.
        for scale in [1e-3f32, 300.0] {
            let xs: Vec<f32> = x[..QK_K * 4].iter().map(|v| v * scale).collect();
            let back = decoded(ty, &quantized(ty, &xs));
            let worst = xs
                .iter()
                .zip(&back)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 2.0 * step * scale,
                "{ty} x{scale}: worst error {worst}"
            );
        }
    }
}

#[test]
fn quantize_refuses_bad_lengths_and_types() {
    let mut out = Vec::new();
    let e = quantize(GgmlType::Q8_0, &[0.0; 33], &mut out).unwrap_err();
    assert!(e.to_string().contains("values.len() = 33"), "{e}");
    let e = quantize(GgmlType::IQ4NL, &[0.0; 32], &mut out).unwrap_err();
    assert!(e.to_string().contains("iq4_nl"), "{e}");
    let e = quantize(GgmlType::Q4K, &[0.0; 32], &mut out).unwrap_err();
    assert!(e.to_string().contains("block size 256"), "{e}");
    assert!(out.is_empty());
}

#[test]
fn bf16_rounds_to_nearest_even_and_keeps_nan_quiet() {
    assert_eq!(f32_to_bf16(1.0), 0x3F80);
    // Exactly halfway: to the even neighbour, down then up.
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
    assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xFF80);
    // The largest finite f32 rounds to infinity, as ggml's.
    assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
    // A signalling NaN whose payload is all in the low half stays a (quiet) NaN.
    assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
    assert_eq!(f32_to_bf16(f32::from_bits(0xFFC1_2345)), 0xFFC1);
}

/// Quantizing gguf-py's decode of blocks.gguf gives back the file's bytes, for the blocks where
/// that must hold: Q4_0/Q5_0 blocks holding level 0 (value -8d / -16d, the unique extreme, so the
/// scale comes back exactly) and Q8_0 blocks with a positive scale whose largest |level| is 127
/// (and no -128, which the quantizer never makes).
#[test]
fn requantized_reference_blocks_give_back_the_file_bytes() {
    let Some(dir) = fixtures() else { return };
    let file = GgufFile::open(&dir.join("blocks.gguf")).unwrap();
    let bytes = read(&dir.join("reference.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0] {
        let info = file.tensor(ty.name()).unwrap();
        let raw = file.read_bytes(info).unwrap();
        let (_, values) = reference(&st, &format!("blocks:{}", ty.name()));
        let ts = ty.type_size();
        let mut checked = 0;
        for (block, (b, x)) in raw.chunks(ts).zip(values.chunks(32)).enumerate() {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let levels = decoded_levels(ty, b);
            let exact = d != 0.0
                && match ty {
                    GgmlType::Q8_0 => {
                        d > 0.0
                            && levels.iter().map(|q| q.abs()).max() == Some(127)
                            && !levels.contains(&-128)
                    }
                    // Level 0 is -8 (Q4_0) or -16 (Q5_0) after the offset.
                    GgmlType::Q4_0 => levels.contains(&-8),
                    _ => levels.contains(&-16),
                };
            if !exact {
                continue;
            }
            assert_eq!(quantized(ty, x), b, "{ty} block {block}");
            checked += 1;
        }
        assert!(checked >= 4, "{ty}: only {checked} blocks could be checked");
    }
}

/// A Q4_0/Q5_0/Q8_0 block's signed levels (q - 8, q - 16, q).
fn decoded_levels(ty: GgmlType, b: &[u8]) -> Vec<i32> {
    match ty {
        GgmlType::Q8_0 => b[2..34].iter().map(|&q| q as i8 as i32).collect(),
        GgmlType::Q4_0 => {
            let lo = b[2..18].iter().map(|&q| (q & 15) as i32 - 8);
            let hi = b[2..18].iter().map(|&q| (q >> 4) as i32 - 8);
            lo.chain(hi).collect()
        }
        GgmlType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            (0..32)
                .map(|j| {
                    let nib = if j < 16 {
                        b[6 + j] & 15
                    } else {
                        b[6 + j - 16] >> 4
                    };
                    (nib as u32 | ((qh >> j) & 1) << 4) as i32 - 16
                })
                .collect()
        }
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

#[test]
fn write_then_open_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.gguf");
    let mut rng = Rng(7);
    let x = rng.values(64 * 8, 1.0);
    let q8 = quantized(GgmlType::Q8_0, &x);
    let q4 = quantized(GgmlType::Q4_1, &x[..64 * 3]);
    let f16s = quantized(GgmlType::F16, &x[..10]);
    let tensors = [
        WriteTensor {
            name: "a.weight",
            shape: &[8, 64],
            ggml_type: GgmlType::Q8_0,
            data: &q8,
        },
        WriteTensor {
            name: "b.weight",
            shape: &[3, 1, 64],
            ggml_type: GgmlType::Q4_1,
            data: &q4,
        },
        WriteTensor {
            name: "c.bias",
            shape: &[10],
            ggml_type: GgmlType::F16,
            data: &f16s,
        },
    ];
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("sd".into()),
        ),
        ("u8".to_string(), Value::U8(1)),
        ("i8".to_string(), Value::I8(-2)),
        ("u16".to_string(), Value::U16(3)),
        ("i16".to_string(), Value::I16(-4)),
        ("u32".to_string(), Value::U32(5)),
        ("i32".to_string(), Value::I32(-6)),
        ("u64".to_string(), Value::U64(7)),
        ("i64".to_string(), Value::I64(-8)),
        ("f32".to_string(), Value::F32(0.5)),
        ("f64".to_string(), Value::F64(-0.25)),
        ("bool".to_string(), Value::Bool(true)),
        (
            "strings".to_string(),
            Value::Array(
                ValueType::String,
                vec![Value::String("x".into()), Value::String(String::new())],
            ),
        ),
        ("empty".to_string(), Value::Array(ValueType::F32, vec![])),
    ];
    write_gguf(&path, &metadata, &tensors).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out.gguf"], "no temporary file is left");

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.metadata().len(), metadata.len());
    for (key, value) in &metadata {
        assert_eq!(file.metadata().get(key), Some(value), "{key}");
    }
    assert_eq!(file.tensors().len(), 3);
    for (info, t) in file.tensors().iter().zip(&tensors) {
        assert_eq!(info.name, t.name);
        assert_eq!(info.shape, t.shape);
        assert_eq!(info.ggml_type, t.ggml_type);
        assert_eq!(info.bytes, t.data.len());
        assert_eq!((info.offset - file.data_offset()) % 32, 0);
        assert_eq!(file.read_bytes(info).unwrap(), t.data);
    }
    let back = file.dequantize(&file.tensors()[0]).unwrap();
    assert_eq!(back, decoded(GgmlType::Q8_0, &q8));
}

#[test]
fn write_refuses_bad_tensors_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.gguf");
    let short = [0u8; 33];
    let bad = [WriteTensor {
        name: "w",
        shape: &[1, 32],
        ggml_type: GgmlType::Q8_0,
        data: &short,
    }];
    let e = write_gguf(&path, &[], &bad).unwrap_err().to_string();
    assert!(e.contains("needs 34 bytes, the data has 33"), "{e}");
    let rows = [WriteTensor {
        name: "w",
        shape: &[2, 16],
        ggml_type: GgmlType::Q8_0,
        data: &short,
    }];
    let e = write_gguf(&path, &[], &rows).unwrap_err().to_string();
    assert!(
        e.contains("not a multiple of the q8_0 block size 32"),
        "{e}"
    );
    let nested = [(
        "k".to_string(),
        Value::Array(ValueType::U8, vec![Value::I8(1)]),
    )];
    let e = write_gguf(&path, &nested, &[]).unwrap_err().to_string();
    assert!(e.contains("all elements u8, but one is i8"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A folder that does not exist: an I/O error naming the temporary file.
    let e = write_gguf(&dir.path().join("no/such/out.gguf"), &[], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("out.gguf"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Matrix

/// Random blocks of `ty` whose f16 scale fields hold finite values.
fn random_blocks(ty: GgmlType, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut data: Vec<u8> = (0..blocks * ty.type_size())
        .map(|_| rng.next() as u8)
        .collect();
    let scales: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4NL => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
    };
    for block in data.chunks_mut(ty.type_size()) {
        for &at in scales {
            let d = f16::from_f32(rng.f32() * 0.01);
            block[at..at + 2].copy_from_slice(&d.to_bits().to_le_bytes());
        }
    }
    data
}

#[test]
fn matrix_read_row_over_odd_ranges_matches_the_full_decode() {
    let mut rng = Rng(42);
    for ty in GgmlType::ALL {
        let rows = 3;
        let cols = 2 * QK_K.max(ty.block_size());
        let blocks = rows * cols / ty.block_size();
        let data = random_blocks(ty, blocks, &mut rng);
        let full = {
            let mut out = vec![0f32; rows * cols];
            decode(ty, &data, &mut out).unwrap();
            out
        };
        let m = GgufMatrix::new(ty, rows, cols, data, DType::F32).unwrap();
        assert_eq!(m.dims(), (rows, cols));
        assert_eq!(m.format(), ty.name());
        assert_eq!(m.storage_bytes(), blocks * ty.type_size());
        let ranges = [
            (0, cols),
            (0, 1),
            (1, 31),
            (5, 300),
            (31, 2),
            (32, 32),
            (33, 250),
            (255, 2),
            (256, 256),
            (100, cols - 100),
            (cols - 1, 1),
            (7, 0),
        ];
        for row in 0..rows {
            for &(col0, len) in &ranges {
                let mut out = vec![f32::NAN; len];
                m.read_row(row, col0, &mut out);
                let want = &full[row * cols + col0..row * cols + col0 + len];
                assert_bits_eq(&format!("{ty} row {row} cols {col0}+{len}"), &out, want);
            }
        }
        let dense = m.dequantize(&candle_core::Device::Cpu).unwrap();
        let dense = dense.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_bits_eq(&format!("{ty} dequantize"), &dense, &full);

        let s = m.slice_rows(1, 2).unwrap();
        assert_eq!(s.dims(), (2, cols));
        let mut out = vec![0f32; cols];
        s.read_row(1, 0, &mut out);
        assert_bits_eq(&format!("{ty} slice"), &out, &full[2 * cols..3 * cols]);
    }
}

#[test]
fn matrix_constructors_check_sizes() {
    let e = GgufMatrix::new(GgmlType::Q8_0, 2, 48, vec![0; 68], DType::F32).unwrap_err();
    assert!(e.to_string().contains("cols = 48"), "{e}");
    let e = GgufMatrix::new(GgmlType::Q8_0, 2, 32, vec![0; 67], DType::F32).unwrap_err();
    assert!(
        e.to_string().contains("data.len() = 67: expected 68"),
        "{e}"
    );
    let e = GgufMatrix::new(GgmlType::Q8_0, 2, 32, vec![0; 68], DType::U8).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    let m = GgufMatrix::new(GgmlType::Q8_0, 2, 32, vec![0; 68], DType::BF16).unwrap();
    assert_eq!(m.dtype(), DType::BF16);
    let e = m.slice_rows(1, 2).unwrap_err();
    assert!(e.to_string().contains("2 rows"), "{e}");
    assert!(m.slice_rows(2, 0).is_ok());
    // Outside the matrix: NaNs, not a panic.
    let mut out = [0f32; 4];
    m.read_row(2, 0, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
    m.read_row(0, 30, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
}

#[test]
fn matrix_from_model_file_flattens_trailing_dims() {
    let Some(dir) = fixtures() else { return };
    let file = GgufFile::open(&dir.join("tiny-sd15-q8_0.gguf")).unwrap();
    let name = "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight";
    let info = file.tensor(name).unwrap();
    let m = GgufMatrix::from_file(&file, info, DType::F32).unwrap();
    assert_eq!(m.dims(), (info.shape[0], info.shape[1..].iter().product()));
    let full = file.dequantize(info).unwrap();
    let (rows, cols) = m.dims();
    let mut out = vec![0f32; cols - 3];
    m.read_row(rows - 1, 3, &mut out);
    assert_bits_eq("last row", &out, &full[(rows - 1) * cols + 3..rows * cols]);
    // A 4-D kernel kept f16 is a matrix too; a 1-D tensor is not.
    let conv = file.tensors().iter().find(|t| t.shape.len() == 4).unwrap();
    let m = GgufMatrix::from_file(&file, conv, DType::F32).unwrap();
    assert_eq!(m.dims().1, conv.shape[1..].iter().product::<usize>());
    let norm = file.tensors().iter().find(|t| t.shape.len() == 1).unwrap();
    let e = GgufMatrix::from_file(&file, norm, DType::F32).unwrap_err();
    assert!(e.to_string().contains("at least 2 dimensions"), "{e}");
}

/// 400 super-blocks of assorted shapes (uniform, cubed, outliers, positive only, all zero,
/// negative only, bell-shaped) at scales from 1e-4 to 100.
fn ggml_check_input() -> Vec<f32> {
    let mut rng = Rng(123);
    let mut x = Vec::with_capacity(400 * QK_K);
    for b in 0..400 {
        let scale = [1.0f32, 0.01, 100.0, 1e-4, 3.0][b % 5];
        for i in 0..QK_K {
            let u = rng.f32();
            let v = match b % 7 {
                0 => u,
                1 => u * u * u,
                2 if i % 37 == 0 => u * 20.0,
                2 => u,
                3 => (u + 1.0) * 0.5,
                4 => 0.0,
                5 => -u.abs() - 0.5,
                _ => (rng.f32() + rng.f32() + rng.f32()) / 3.0,
            };
            x.push(v * scale);
        }
    }
    x
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The quantizers' bytes for [`ggml_check_input`] are those of ggml's `quantize_row_*_ref`
/// (ggml-org/ggml d99724f2, `src/ggml-quants.c` built with `gcc -O2 -ffp-contract=off`), held
/// here as FNV-1a hashes of the outputs. Q4_0 to Q8_0 also match a build with FMA contraction;
/// the K-quants then differ in a few bytes (ggml's own output depends on its compiler).
#[test]
fn quantize_matches_ggml_reference_output() {
    let x = ggml_check_input();
    let want = [
        (GgmlType::Q4_0, 0xf87a_bc4f_6704_6db6u64),
        (GgmlType::Q4_1, 0xd59c_bb85_451f_1421),
        (GgmlType::Q5_0, 0xfa31_4a17_13a2_0740),
        (GgmlType::Q5_1, 0xa5b4_8157_eb36_5c05),
        (GgmlType::Q8_0, 0xfcad_91b8_6186_5aee),
        (GgmlType::Q2K, 0xfd3c_983f_c970_7d67),
        (GgmlType::Q3K, 0x1dcf_6b8a_8ff6_ab4c),
        (GgmlType::Q4K, 0xc664_02e6_cc70_3d49),
        (GgmlType::Q5K, 0x2af5_571f_5aec_19e4),
        (GgmlType::Q6K, 0xd645_dfce_1d3b_58eb),
    ];
    for (ty, hash) in want {
        let bytes = quantized(ty, &x);
        assert_eq!(fnv1a(&bytes), hash, "{ty}: output differs from ggml's");
    }
}

#[test]
fn write_honours_general_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    let data = [7u8; 12];
    let t = |name| WriteTensor {
        name,
        shape: &[3],
        ggml_type: GgmlType::F32,
        data: &data,
    };
    let metadata = [("general.alignment".to_string(), Value::U32(64))];
    write_gguf(&path, &metadata, &[t("a"), t("b")]).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    for info in file.tensors() {
        assert_eq!(info.offset % 64, 0);
        assert_eq!(file.read_bytes(info).unwrap(), data);
    }
    let bad = [("general.alignment".to_string(), Value::U64(64))];
    let e = write_gguf(&path, &bad, &[]).unwrap_err().to_string();
    assert!(e.contains("a u32 power of two"), "{e}");
}
