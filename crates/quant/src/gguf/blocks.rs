//! ggml's tensor types and the decoding of their blocks to f32, value for value as gguf-py 0.19.0
//! (`gguf-py/gguf/quants.py`) computes them in float32, with the block layouts of ggml's
//! `ggml/src/ggml-common.h`.
//!
//! Every decoder follows gguf-py's order of float operations exactly (`d * q + m` for Q4_1 and
//! Q5_1, `(d * sc) * q - (dmin * m)` for the K-quants, ...), so the f32 results are bit for bit
//! gguf-py's: Rust never contracts `a * b + c` into a fused multiply-add.

use std::fmt;

use crate::{Error, Result};

/// Values per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// The largest block size of any [`GgmlType`]: a stack buffer this long holds one decoded block.
pub const MAX_BLOCK_SIZE: usize = QK_K;

/// IQ4_NL's 16 non-linear levels (ggml's `kvalues_iq4nl`).
const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// A ggml tensor type this crate decodes. The discriminants are ggml's type ids.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    IQ4NL = 20,
    BF16 = 30,
}

/// ggml's names of the type ids this crate does not decode, for error messages.
const UNSUPPORTED_IDS: [(u32, &str); 15] = [
    (4, "q4_2 (removed from ggml)"),
    (5, "q4_3 (removed from ggml)"),
    (9, "q8_1"),
    (15, "q8_k"),
    (16, "iq2_xxs"),
    (17, "iq2_xs"),
    (18, "iq3_xxs"),
    (19, "iq1_s"),
    (21, "iq3_s"),
    (22, "iq2_s"),
    (23, "iq4_xs"),
    (24, "i8"),
    (25, "i16"),
    (26, "i32"),
    (27, "i64"),
];

impl GgmlType {
    /// Every supported type, in the order of their ids.
    pub const ALL: [GgmlType; 14] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::IQ4NL,
        Self::BF16,
    ];

    /// ggml's type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The type of ggml type id `id`, `None` for ids this crate does not decode.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Why type id `id` cannot be read: its ggml name where it has one, and the accepted types.
    pub(crate) fn unsupported_id_message(id: u32) -> String {
        let known = UNSUPPORTED_IDS
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, name)| format!(" ({name})"))
            .unwrap_or_default();
        format!(
            "ggml type id {id}{known} is not supported; accepted: {}",
            Self::accepted_ids()
        )
    }

    /// `f32 (0), f16 (1), ...`.
    pub(crate) fn accepted_ids() -> String {
        Self::ALL
            .iter()
            .map(|t| format!("{} ({})", t.name(), t.id()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `f32, f16, ...`.
    pub(crate) fn accepted_names() -> String {
        Self::ALL
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::IQ4NL => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            // f16 d, 16 bytes of nibbles.
            Self::Q4_0 | Self::IQ4NL => 18,
            // f16 d, f16 m, 16 bytes of nibbles.
            Self::Q4_1 => 20,
            // f16 d, u32 of high bits, 16 bytes of nibbles.
            Self::Q5_0 => 22,
            // f16 d, f16 m, u32 of high bits, 16 bytes of nibbles.
            Self::Q5_1 => 24,
            // f16 d, 32 i8.
            Self::Q8_0 => 34,
            // 16 scale/min bytes, 64 bytes of 2-bit values, f16 d, f16 dmin.
            Self::Q2K => 84,
            // 32 bytes of high bits, 64 bytes of 2-bit values, 12 bytes of 6-bit scales, f16 d.
            Self::Q3K => 110,
            // f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
            Self::Q4K => 144,
            // As Q4_K with 32 bytes of fifth bits before the nibbles.
            Self::Q5K => 176,
            // 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 i8 scales, f16 d.
            Self::Q6K => 210,
        }
    }

    /// The lowercase name gguf-py and stable-diffusion.cpp use (`q8_0`, `q4_k`, `iq4_nl`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q2K => "q2_k",
            Self::Q3K => "q3_k",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::IQ4NL => "iq4_nl",
        }
    }

    /// The type named `name`, in any case (`q8_0`, `Q8_0`, `Q4_K`).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::InvalidParameter {
                name: "ggml type",
                value: name.to_string(),
                expected: format!("one of {}", Self::accepted_names()),
            })
    }

    /// Whether the type is a block format (not f32, f16 or bf16).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of `n` values, `None` when `n` is not a multiple of the block size or the count
    /// overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes the whole blocks `bytes` of type `ty` into `out`, which holds exactly the values those
/// blocks encode.
pub fn decode(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let bs = ty.block_size();
    if !out.len().is_multiple_of(bs) {
        return Err(Error::InvalidParameter {
            name: "out.len()",
            value: out.len().to_string(),
            expected: format!("a multiple of the {ty} block size {bs}"),
        });
    }
    let want = out.len() / bs * ty.type_size();
    if bytes.len() != want {
        return Err(Error::InvalidParameter {
            name: "bytes.len()",
            value: bytes.len().to_string(),
            expected: format!(
                "{want} ({} {ty} blocks of {} bytes for {} values)",
                out.len() / bs,
                ty.type_size(),
                out.len()
            ),
        });
    }
    decode_blocks(ty, bytes, out);
    Ok(())
}

/// Decodes as many whole blocks as both `bytes` and `out` hold (callers pass matching lengths),
/// dispatching on the CPU's vector width and the type once.
pub(crate) fn decode_blocks(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { decode_blocks_avx2(ty, bytes, out) };
        return;
    }
    decode_blocks_any(ty, bytes, out);
}

/// The same loops compiled for AVX2's 8-wide integer-to-float conversions. Without `fma` among
/// the features (and Rust never contracting on its own) every product and sum stays rounded on
/// its own, so the results are the generic code's, bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn decode_blocks_avx2(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    decode_blocks_any(ty, bytes, out);
}

#[inline(always)]
fn decode_blocks_any(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => decode_f32(bytes, out),
        GgmlType::F16 => decode_f16(bytes, out),
        GgmlType::BF16 => decode_bf16(bytes, out),
        GgmlType::Q4_0 => decode_q4_0(bytes, out),
        GgmlType::Q4_1 => decode_q4_1(bytes, out),
        GgmlType::Q5_0 => decode_q5_0(bytes, out),
        GgmlType::Q5_1 => decode_q5_1(bytes, out),
        GgmlType::Q8_0 => decode_q8_0(bytes, out),
        GgmlType::Q2K => decode_q2_k(bytes, out),
        GgmlType::Q3K => decode_q3_k(bytes, out),
        GgmlType::Q4K => decode_q4_k(bytes, out),
        GgmlType::Q5K => decode_q5_k(bytes, out),
        GgmlType::Q6K => decode_q6_k(bytes, out),
        GgmlType::IQ4NL => decode_iq4_nl(bytes, out),
    }
}

/// The f16 bit pattern `h` as f32, exactly, NaN payloads kept (as numpy's conversion): written
/// as three bit-level cases the compiler turns into vector selects, so a whole f16 tensor
/// converts at vector speed and no subnormal arithmetic is ever done.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // Normal: the exponent rebased from 15 to 127.
    let normal = (em << 13) + ((127 - 15) << 23);
    // Infinity and NaN: all exponent bits set, the mantissa (payload) kept.
    let special = (em << 13) | 0x7F80_0000;
    // Zero and subnormal: the mantissa times 2^-24, both exact in f32.
    let subnormal = (em as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let bits = if em >= 0x7C00 {
        special
    } else if em < 0x0400 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// The little-endian f16 `[lo, hi]` as f32 (exact).
#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([lo, hi]))
}

#[inline(always)]
fn decode_f32(bytes: &[u8], out: &mut [f32]) {
    let (words, _) = bytes.as_chunks::<4>();
    for (o, w) in out.iter_mut().zip(words) {
        *o = f32::from_le_bytes(*w);
    }
}

#[inline(always)]
fn decode_f16(bytes: &[u8], out: &mut [f32]) {
    let (pairs, _) = bytes.as_chunks::<2>();
    for (o, p) in out.iter_mut().zip(pairs) {
        *o = f16_bits_to_f32(u16::from_le_bytes(*p));
    }
}

#[inline(always)]
fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    let (pairs, _) = bytes.as_chunks::<2>();
    for (o, p) in out.iter_mut().zip(pairs) {
        *o = f32::from_bits((u16::from_le_bytes(*p) as u32) << 16);
    }
}

#[inline(always)]
fn decode_q8_0(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<34>();
    let (outs, _) = out.as_chunks_mut::<32>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        for (o, &q) in o.iter_mut().zip(&b[2..]) {
            *o = q as i8 as f32 * d;
        }
    }
}

#[inline(always)]
fn decode_q4_0(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<18>();
    let (outs, _) = out.as_chunks_mut::<32>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let (lo, hi) = o.split_at_mut(16);
        for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
            *lo = d * ((q & 0x0F) as i8 - 8) as f32;
            *hi = d * ((q >> 4) as i8 - 8) as f32;
        }
    }
}

#[inline(always)]
fn decode_q4_1(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<20>();
    let (outs, _) = out.as_chunks_mut::<32>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let (lo, hi) = o.split_at_mut(16);
        for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
            *lo = d * (q & 0x0F) as f32 + m;
            *hi = d * (q >> 4) as f32 + m;
        }
    }
}

#[inline(always)]
fn decode_q5_0(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<22>();
    let (outs, _) = out.as_chunks_mut::<32>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let l = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
            let h = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * (l as i32 - 16) as f32;
            hi[j] = d * (h as i32 - 16) as f32;
        }
    }
}

#[inline(always)]
fn decode_q5_1(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<24>();
    let (outs, _) = out.as_chunks_mut::<32>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let l = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
            let h = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * l as f32 + m;
            hi[j] = d * h as f32 + m;
        }
    }
}

#[inline(always)]
fn decode_iq4_nl(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<18>();
    let (outs, _) = out.as_chunks_mut::<32>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let (lo, hi) = o.split_at_mut(16);
        for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
            *lo = d * IQ4NL_VALUES[(q & 0x0F) as usize] as f32;
            *hi = d * IQ4NL_VALUES[(q >> 4) as usize] as f32;
        }
    }
}

#[inline(always)]
fn decode_q2_k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<84>();
    let (outs, _) = out.as_chunks_mut::<QK_K>();
    for (b, o) in blocks.iter().zip(outs) {
        let scales = &b[0..16];
        let qs = &b[16..80];
        let d = f16_le(b[80], b[81]);
        let dmin = f16_le(b[82], b[83]);
        // Two halves of 128 values, each 4 shifts of the same 32 bytes; 16 values per scale.
        for (half, (qs, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(128)).enumerate() {
            for (j, o) in o.chunks_exact_mut(32).enumerate() {
                let shift = 2 * j;
                for (k, (qs, o)) in qs.chunks_exact(16).zip(o.chunks_exact_mut(16)).enumerate() {
                    let sc = scales[8 * half + 2 * j + k];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    for (o, &q) in o.iter_mut().zip(qs) {
                        *o = dl * ((q >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Q3_K's 16 signed 6-bit scales from its 12 packed bytes: the low 4 bits of scale `i` are a nibble
/// of byte `i % 8` (`i < 8` low, else high), its high 2 bits are bits `2 * (i / 4)` of byte
/// `8 + i % 4`.
#[inline(always)]
fn q3_k_scales(packed: &[u8]) -> [i32; 16] {
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | high << 4) as i32 - 32;
    }
    scales
}

#[inline(always)]
fn decode_q3_k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<110>();
    let (outs, _) = out.as_chunks_mut::<QK_K>();
    for (b, o) in blocks.iter().zip(outs) {
        let hmask = &b[0..32];
        let qs = &b[32..96];
        let scales = q3_k_scales(&b[96..108]);
        let d = f16_le(b[108], b[109]);
        for (half, (qs, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(128)).enumerate() {
            for (j, o) in o.chunks_exact_mut(32).enumerate() {
                let shift = 2 * j;
                // The high bit of value e lives in bit e / 32 of hmask[e % 32]; a clear bit
                // subtracts 4.
                let hbit = 4 * half + j;
                for (k, (qs_k, o)) in qs.chunks_exact(16).zip(o.chunks_exact_mut(16)).enumerate() {
                    let dl = d * scales[8 * half + 2 * j + k] as f32;
                    let hm = &hmask[16 * k..16 * k + 16];
                    for ((o, &q), &h) in o.iter_mut().zip(qs_k).zip(hm) {
                        let low = ((q >> shift) & 3) as i32;
                        let missing = (((h >> hbit) & 1) ^ 1) as i32;
                        *o = dl * (low - 4 * missing) as f32;
                    }
                }
            }
        }
    }
}

/// The 8 6-bit scales and 8 6-bit mins of a Q4_K/Q5_K block from their 12 packed bytes (ggml's
/// `get_scale_min_k4`).
#[inline(always)]
fn k4_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = packed[j] & 0x3F;
        mn[j] = packed[j + 4] & 0x3F;
        sc[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        mn[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

#[inline(always)]
fn decode_q4_k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<144>();
    let (outs, _) = out.as_chunks_mut::<QK_K>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let (sc, mn) = k4_scales_mins(&b[4..16]);
        let qs = &b[16..144];
        // Four groups of 64 values: the low nibbles of 32 bytes, then their high nibbles.
        for (g, (qs, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
            let (lo, hi) = o.split_at_mut(32);
            let d1 = d * sc[2 * g] as f32;
            let m1 = dmin * mn[2 * g] as f32;
            let d2 = d * sc[2 * g + 1] as f32;
            let m2 = dmin * mn[2 * g + 1] as f32;
            for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(qs) {
                *lo = d1 * (q & 0x0F) as f32 - m1;
                *hi = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

#[inline(always)]
fn decode_q5_k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<176>();
    let (outs, _) = out.as_chunks_mut::<QK_K>();
    for (b, o) in blocks.iter().zip(outs) {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let (sc, mn) = k4_scales_mins(&b[4..16]);
        let qh = &b[16..48];
        let qs = &b[48..176];
        for (g, (qs, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
            let (lo, hi) = o.split_at_mut(32);
            let d1 = d * sc[2 * g] as f32;
            let m1 = dmin * mn[2 * g] as f32;
            let d2 = d * sc[2 * g + 1] as f32;
            let m2 = dmin * mn[2 * g + 1] as f32;
            // The fifth bit of value e is bit e / 32 of qh[e % 32].
            let (b1, b2) = (2 * g, 2 * g + 1);
            for (((lo, hi), &q), &h) in lo.iter_mut().zip(hi).zip(qs).zip(qh) {
                let l = (q & 0x0F) | ((h >> b1) & 1) << 4;
                let u = (q >> 4) | ((h >> b2) & 1) << 4;
                *lo = d1 * l as f32 - m1;
                *hi = d2 * u as f32 - m2;
            }
        }
    }
}

#[inline(always)]
fn decode_q6_k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<210>();
    let (outs, _) = out.as_chunks_mut::<QK_K>();
    for (b, o) in blocks.iter().zip(outs) {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let scales = &b[192..208];
        let d = f16_le(b[208], b[209]);
        // Two halves of 128 values, each from 64 low-nibble bytes and 32 high-bit bytes:
        // value 32 * j + l of a half is nibble j / 2 of ql[l + 32 * (j % 2)] with bits 2 * j of
        // qh[l], and 16 values share a scale.
        for (half, o) in o.chunks_exact_mut(128).enumerate() {
            let ql = &ql[64 * half..64 * half + 64];
            let qh = &qh[32 * half..32 * half + 32];
            for (j, o) in o.chunks_exact_mut(32).enumerate() {
                let ql = &ql[32 * (j % 2)..32 * (j % 2) + 32];
                let nibble = 4 * (j / 2);
                let shift = 2 * j;
                for (k, o) in o.chunks_exact_mut(16).enumerate() {
                    let dl = d * scales[8 * half + 2 * j + k] as i8 as f32;
                    let ql = &ql[16 * k..16 * k + 16];
                    let qh = &qh[16 * k..16 * k + 16];
                    for ((o, &l), &h) in o.iter_mut().zip(ql).zip(qh) {
                        let q = ((l >> nibble) & 0x0F) | ((h >> shift) & 3) << 4;
                        *o = dl * (q as i32 - 32) as f32;
                    }
                }
            }
        }
    }
}
