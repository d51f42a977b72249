//! Palettized weight matrices: each weight an n-bit index into a float16 lookup table shared by
//! the whole matrix or by a group of output channels, as coremltools' `palettize_weights` makes
//! them (`granularity="per_tensor"` or `"per_grouped_channel"` with `channel_axis=0`,
//! `optimize/coreml/_quantization_passes.py`), decoded row segment by row segment for the CPU
//! GEMM.

use std::fmt;

use candle_core::DType;
use half::f16;
use rayon::prelude::*;
use sdrs_kernels::QuantizedMatrix;

use crate::kmeans::palettize_f16;
use crate::{Error, Result};

/// The index widths coremltools palettizes to (its `_SUPPORTED_NBITS`).
pub const SUPPORTED_NBITS: [u32; 6] = [1, 2, 3, 4, 6, 8];

/// A `rows x cols` matrix of n-bit indices into float16 lookup tables.
///
/// Layout:
/// - `group` consecutive rows share one lookup table of `2^nbits` entries (`group == rows`: one
///   table for the matrix, coremltools' per-tensor palettization; otherwise its
///   `per_grouped_channel` with `group_size = group` along the output channels). `rows` must be
///   a multiple of `group`, as coremltools requires.
/// - `luts`: the tables one after the other, `rows / group * 2^nbits` float16 values.
/// - `packed`: the indices row by row, each row starting on a byte boundary and taking
///   `row_bytes = ceil(cols * nbits / 8)` bytes; within a row the indices are one bit stream,
///   least significant bit first (index `c` occupies bits `c * nbits ..` of the row, counting
///   from bit 0 of the row's first byte). The unused high bits of a row's last byte are
///   ignored. (Core ML's iOS16 blobs pack the whole tensor as one stream; for `cols * nbits` a
///   multiple of 8 the two layouts are the same bytes.)
#[derive(Clone)]
pub struct PalettizedMatrix {
    nbits: u32,
    group: usize,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    luts: Vec<f16>,
    /// `luts` widened to f32 once, so decoding a row segment is a table lookup per element.
    luts_f32: Vec<f32>,
    packed: Vec<u8>,
    dtype: DType,
    format: String,
}

impl fmt::Debug for PalettizedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PalettizedMatrix({}, {}x{}, {:?})",
            self.format, self.rows, self.cols, self.dtype
        )
    }
}

fn check_nbits(nbits: u32) -> Result<()> {
    if SUPPORTED_NBITS.contains(&nbits) {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name: "nbits",
            value: nbits.to_string(),
            expected: format!("one of {SUPPORTED_NBITS:?}"),
        })
    }
}

/// Rows per lookup table: `rows` for `None`, else `group`, which must divide `rows`.
fn resolve_group(rows: usize, cols: usize, group: Option<usize>) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidParameter {
            name: "rows x cols",
            value: format!("{rows}x{cols}"),
            expected: "a matrix with at least one row and one column".into(),
        });
    }
    let group = group.unwrap_or(rows);
    if group == 0 || !rows.is_multiple_of(group) {
        return Err(Error::InvalidParameter {
            name: "group",
            value: group.to_string(),
            expected: format!("a divisor of the {rows} rows (output channels)"),
        });
    }
    Ok(group)
}

/// Bytes of one packed row.
fn row_bytes(cols: usize, nbits: u32) -> usize {
    (cols * nbits as usize).div_ceil(8)
}

/// Writes `indices` (each below `2^nbits`) into the zeroed row `dst`, LSB first.
fn pack_row(indices: &[u8], nbits: u32, dst: &mut [u8]) {
    let nbits = nbits as usize;
    for (col, &index) in indices.iter().enumerate() {
        let bit = col * nbits;
        let (byte, shift) = (bit / 8, bit % 8);
        let v = (index as u16) << shift;
        dst[byte] |= v as u8;
        if shift + nbits > 8 {
            dst[byte + 1] |= (v >> 8) as u8;
        }
    }
}

/// The index at column `col` of a packed row (any column, any alignment).
#[inline(always)]
fn index_at<const NBITS: usize>(row: &[u8], col: usize) -> usize {
    let bit = col * NBITS;
    let (byte, shift) = (bit / 8, bit % 8);
    let lo = row[byte] as u16;
    let hi = if shift + NBITS > 8 {
        row[byte + 1] as u16
    } else {
        0
    };
    ((((hi << 8) | lo) >> shift) as usize) & ((1 << NBITS) - 1)
}

/// Decodes columns `col0 .. col0 + out.len()` of the packed `row` through `lut`: one index at a
/// time up to a whole `PER`-column chunk (`BYTES` bytes), then chunk by chunk (read as one
/// little-endian word and split), then the remainder one at a time. `LUT = 2^NBITS`, so a
/// masked index needs no bounds check.
#[inline(always)]
fn decode<const NBITS: usize, const PER: usize, const BYTES: usize, const LUT: usize>(
    row: &[u8],
    col0: usize,
    out: &mut [f32],
    lut: &[f32],
) {
    let Ok(lut) = <&[f32; LUT]>::try_from(lut) else {
        // Tables are 2^nbits long by construction.
        out.fill(f32::NAN);
        return;
    };
    let mask = LUT - 1;
    let end = col0 + out.len();
    let body_start = col0.next_multiple_of(PER).min(end);
    let chunks = (end - body_start) / PER;
    let body_end = body_start + chunks * PER;

    let (head, rest) = out.split_at_mut(body_start - col0);
    let (body, tail) = rest.split_at_mut(chunks * PER);
    for (o, col) in head.iter_mut().zip(col0..) {
        *o = lut[index_at::<NBITS>(row, col)];
    }
    let first = body_start / PER * BYTES;
    let bytes = &row[first..first + chunks * BYTES];
    for (o, b) in body.chunks_exact_mut(PER).zip(bytes.chunks_exact(BYTES)) {
        let mut word = 0u32;
        for (i, &byte) in b.iter().enumerate() {
            word |= (byte as u32) << (8 * i);
        }
        for (k, slot) in o.iter_mut().enumerate() {
            *slot = lut[(word >> (k * NBITS)) as usize & mask];
        }
    }
    for (o, col) in tail.iter_mut().zip(body_end..) {
        *o = lut[index_at::<NBITS>(row, col)];
    }
}

impl PalettizedMatrix {
    /// The k-means palettization of the float16 `rows x cols` matrix `weight` (row-major; a
    /// convolution's `[O, C, kh, kw]` weight is `O x C*kh*kw`): per lookup table (the whole
    /// matrix for `group == None`, else each `group` of consecutive rows),
    /// [`crate::kmeans::palettize_f16`] on its elements, as coremltools'
    /// `palettize_weights(mode="kmeans")` does. Groups are clustered in parallel. `dtype` is the
    /// dtype the layer computes in ([`QuantizedMatrix::dtype`]).
    pub fn kmeans(
        weight: &[f16],
        rows: usize,
        cols: usize,
        nbits: u32,
        group: Option<usize>,
        dtype: DType,
    ) -> Result<Self> {
        check_nbits(nbits)?;
        let group = resolve_group(rows, cols, group)?;
        if rows.checked_mul(cols) != Some(weight.len()) {
            return Err(Error::Tensor {
                tensor: "weight".into(),
                reason: format!("{} elements for a {rows}x{cols} matrix", weight.len()),
            });
        }
        let parts: Vec<(Vec<f16>, Vec<u8>)> = weight
            .par_chunks(group * cols)
            .map(|elements| palettize_f16(elements, nbits))
            .collect::<Result<_>>()?;
        let rb = row_bytes(cols, nbits);
        let mut luts = Vec::with_capacity(parts.len() << nbits);
        let mut packed = vec![0u8; rows * rb];
        let mut dst_rows = packed.chunks_exact_mut(rb);
        for (lut, indices) in &parts {
            luts.extend_from_slice(lut);
            for (src, dst) in indices.chunks_exact(cols).zip(dst_rows.by_ref()) {
                pack_row(src, nbits, dst);
            }
        }
        Self::from_parts(nbits, Some(group), rows, cols, luts, packed, dtype)
    }

    /// A matrix from its stored parts (laid out as the type's documentation says), as read back
    /// from a file: checks every size against `nbits`, `group`, `rows` and `cols`.
    pub fn from_parts(
        nbits: u32,
        group: Option<usize>,
        rows: usize,
        cols: usize,
        luts: Vec<f16>,
        packed: Vec<u8>,
        dtype: DType,
    ) -> Result<Self> {
        check_nbits(nbits)?;
        let group = resolve_group(rows, cols, group)?;
        let lut_len = 1usize << nbits;
        let want_luts = rows / group * lut_len;
        if luts.len() != want_luts {
            return Err(Error::Tensor {
                tensor: "lookup tables".into(),
                reason: format!(
                    "{} entries, expected {} tables of {lut_len} = {want_luts}",
                    luts.len(),
                    rows / group
                ),
            });
        }
        let rb = row_bytes(cols, nbits);
        if rows.checked_mul(rb) != Some(packed.len()) {
            return Err(Error::Tensor {
                tensor: "indices".into(),
                reason: format!(
                    "{} bytes, expected {rows} rows of ceil({cols} x {nbits} / 8) = {rb} bytes",
                    packed.len()
                ),
            });
        }
        if let Some(i) = luts.iter().position(|v| !v.is_finite()) {
            return Err(Error::Tensor {
                tensor: "lookup tables".into(),
                reason: format!("entry {i} is {}", luts[i]),
            });
        }
        let luts_f32 = luts.iter().map(|v| v.to_f32()).collect();
        let format = if group == rows {
            format!("kmeans{nbits}")
        } else {
            format!("kmeans{nbits}:grouped{group}")
        };
        Ok(Self {
            nbits,
            group,
            rows,
            cols,
            row_bytes: rb,
            luts,
            luts_f32,
            packed,
            dtype,
            format,
        })
    }

    /// A matrix from unpacked indices (`rows * cols` of them, row-major, each below
    /// `2^nbits`), e.g. decoded from a Core ML blob: packs them.
    pub fn from_indices(
        nbits: u32,
        group: Option<usize>,
        rows: usize,
        cols: usize,
        luts: Vec<f16>,
        indices: &[u8],
        dtype: DType,
    ) -> Result<Self> {
        check_nbits(nbits)?;
        resolve_group(rows, cols, group)?;
        if rows.checked_mul(cols) != Some(indices.len()) {
            return Err(Error::Tensor {
                tensor: "indices".into(),
                reason: format!("{} indices for a {rows}x{cols} matrix", indices.len()),
            });
        }
        if let Some(i) = indices.iter().position(|&ix| (ix as usize) >> nbits != 0) {
            return Err(Error::Tensor {
                tensor: "indices".into(),
                reason: format!("index {i} is {}, beyond a {nbits}-bit table", indices[i]),
            });
        }
        let rb = row_bytes(cols, nbits);
        let mut packed = vec![0u8; rows * rb];
        for (src, dst) in indices.chunks_exact(cols).zip(packed.chunks_exact_mut(rb)) {
            pack_row(src, nbits, dst);
        }
        Self::from_parts(nbits, group, rows, cols, luts, packed, dtype)
    }

    /// Bits per index.
    pub fn nbits(&self) -> u32 {
        self.nbits
    }

    /// Rows per lookup table (`rows` for one table).
    pub fn group(&self) -> usize {
        self.group
    }

    /// The lookup tables, `2^nbits` entries each, one per group of rows.
    pub fn luts(&self) -> &[f16] {
        &self.luts
    }

    /// The packed indices (rows byte-aligned, LSB first).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// Every index, row-major (`rows * cols`).
    pub fn unpacked_indices(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for row in self.packed.chunks_exact(self.row_bytes) {
            for col in 0..self.cols {
                let index = match self.nbits {
                    1 => index_at::<1>(row, col),
                    2 => index_at::<2>(row, col),
                    3 => index_at::<3>(row, col),
                    4 => index_at::<4>(row, col),
                    6 => index_at::<6>(row, col),
                    _ => index_at::<8>(row, col),
                };
                out.push(index as u8);
            }
        }
        out
    }
}

impl QuantizedMatrix for PalettizedMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn storage_bytes(&self) -> usize {
        self.packed.len() + self.luts.len() * 2 + self.luts_f32.len() * 4
    }

    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let lut_len = 1usize << self.nbits;
        let table = row / self.group * lut_len;
        let lut = &self.luts_f32[table..table + lut_len];
        let bytes = &self.packed[row * self.row_bytes..(row + 1) * self.row_bytes];
        match self.nbits {
            1 => decode::<1, 8, 1, 2>(bytes, col0, out, lut),
            2 => decode::<2, 4, 1, 4>(bytes, col0, out, lut),
            3 => decode::<3, 8, 3, 8>(bytes, col0, out, lut),
            4 => decode::<4, 2, 1, 16>(bytes, col0, out, lut),
            6 => decode::<6, 4, 3, 64>(bytes, col0, out, lut),
            // nbits is one of SUPPORTED_NBITS, checked at construction.
            _ => {
                let Ok(lut) = <&[f32; 256]>::try_from(lut) else {
                    out.fill(f32::NAN);
                    return;
                };
                let len = out.len();
                for (o, &b) in out.iter_mut().zip(&bytes[col0..col0 + len]) {
                    *o = lut[b as usize];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::tests::{as_f16, fixture_dir, kmeans_fixtures, Rng, FIXTURE_NBITS};

    fn random_matrix(
        rows: usize,
        cols: usize,
        nbits: u32,
        group: Option<usize>,
        seed: u64,
    ) -> PalettizedMatrix {
        let mut rng = Rng(seed);
        let groups = rows / group.unwrap_or(rows);
        let luts: Vec<f16> = (0..groups << nbits)
            .map(|_| f16::from_f64(rng.next_f64() * 2.0 - 1.0))
            .collect();
        let indices: Vec<u8> = (0..rows * cols)
            .map(|_| (rng.next_f64() * (1u32 << nbits) as f64) as u8)
            .collect();
        PalettizedMatrix::from_indices(nbits, group, rows, cols, luts, &indices, DType::F32)
            .expect("valid parts")
    }

    fn expected(m: &PalettizedMatrix, row: usize, col: usize, indices: &[u8]) -> f32 {
        let table = (row / m.group()) << m.nbits();
        m.luts()[table + indices[row * m.cols + col] as usize].to_f32()
    }

    #[test]
    fn read_row_over_odd_ranges_is_the_table_lookup() {
        for nbits in SUPPORTED_NBITS {
            for (rows, cols, group) in [(4, 37, None), (6, 64, Some(2)), (3, 515, Some(1))] {
                let m = random_matrix(rows, cols, nbits, group, 7 + nbits as u64);
                let indices = m.unpacked_indices();
                let ranges = [
                    (0, cols),
                    (1, cols - 1),
                    (3, 11),
                    (5, 1),
                    (cols - 1, 1),
                    (7, 0),
                ];
                for row in 0..rows {
                    for &(col0, len) in &ranges {
                        let len = len.min(cols - col0);
                        let mut out = vec![0f32; len];
                        m.read_row(row, col0, &mut out);
                        for (i, &v) in out.iter().enumerate() {
                            let want = expected(&m, row, col0 + i, &indices);
                            assert_eq!(
                                v,
                                want,
                                "nbits {nbits} {rows}x{cols} row {row} col {}",
                                col0 + i
                            );
                        }
                    }
                }
                // Every start and length on one row.
                for col0 in 0..cols.min(40) {
                    for len in 0..(cols - col0).min(40) {
                        let mut out = vec![0f32; len];
                        m.read_row(rows - 1, col0, &mut out);
                        for (i, &v) in out.iter().enumerate() {
                            assert_eq!(v, expected(&m, rows - 1, col0 + i, &indices));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn indices_round_trip_through_the_packing() {
        for nbits in SUPPORTED_NBITS {
            let mut rng = Rng(99);
            let (rows, cols) = (5, 29);
            let indices: Vec<u8> = (0..rows * cols)
                .map(|_| (rng.next_f64() * (1u32 << nbits) as f64) as u8)
                .collect();
            let luts = vec![f16::ZERO; 1 << nbits];
            let m =
                PalettizedMatrix::from_indices(nbits, None, rows, cols, luts, &indices, DType::F16)
                    .expect("parts");
            assert_eq!(m.unpacked_indices(), indices);
            assert_eq!(m.packed().len(), rows * (cols * nbits as usize).div_ceil(8));
            let again = PalettizedMatrix::from_parts(
                nbits,
                Some(m.group()),
                rows,
                cols,
                m.luts().to_vec(),
                m.packed().to_vec(),
                DType::F16,
            )
            .expect("parts");
            assert_eq!(again.unpacked_indices(), indices);
            assert_eq!(again.dtype(), DType::F16);
            assert_eq!(again.format(), format!("kmeans{nbits}"));
        }
        // LSB first: indices 1, 2, 3 at 2 bits are 0b11_10_01.
        let m = PalettizedMatrix::from_indices(
            2,
            None,
            1,
            3,
            vec![f16::ZERO; 4],
            &[1, 2, 3],
            DType::F32,
        )
        .expect("parts");
        assert_eq!(m.packed(), [0b0011_1001]);
    }

    #[test]
    fn grouped_kmeans_gives_each_group_its_table() {
        let mut rng = Rng(5);
        let (rows, cols) = (8, 50);
        let w: Vec<f16> = (0..rows * cols)
            .map(|i| f16::from_f64(rng.next_f64() + (i / (2 * cols)) as f64 * 10.0))
            .collect();
        let m = PalettizedMatrix::kmeans(&w, rows, cols, 4, Some(2), DType::F32).expect("kmeans");
        assert_eq!(m.format(), "kmeans4:grouped2");
        assert_eq!(m.luts().len(), 4 * 16);
        for g in 0..4 {
            let (lut, indices) =
                palettize_f16(&w[g * 2 * cols..(g + 1) * 2 * cols], 4).expect("palettize");
            assert_eq!(&m.luts()[g * 16..(g + 1) * 16], &lut[..]);
            let all = m.unpacked_indices();
            assert_eq!(&all[g * 2 * cols..(g + 1) * 2 * cols], &indices[..]);
        }
        let mut row = vec![0f32; cols];
        m.read_row(7, 0, &mut row);
        assert!(row.iter().all(|v| (30.0..=31.0).contains(v)), "{row:?}");
    }

    #[test]
    fn invalid_parts_are_errors() {
        let w = vec![f16::ONE; 12];
        let e = PalettizedMatrix::kmeans(&w, 4, 3, 5, None, DType::F32).expect_err("nbits 5");
        assert!(e.to_string().contains("nbits = 5"), "{e}");
        let e = PalettizedMatrix::kmeans(&w, 4, 3, 4, Some(3), DType::F32).expect_err("group 3");
        assert!(e.to_string().contains("group = 3"), "{e}");
        assert!(PalettizedMatrix::kmeans(&w, 4, 4, 4, None, DType::F32).is_err());
        assert!(PalettizedMatrix::from_parts(
            4,
            None,
            4,
            3,
            vec![f16::ZERO; 15],
            vec![0; 8],
            DType::F32
        )
        .is_err());
        assert!(PalettizedMatrix::from_parts(
            4,
            None,
            4,
            3,
            vec![f16::ZERO; 16],
            vec![0; 7],
            DType::F32
        )
        .is_err());
        assert!(PalettizedMatrix::from_parts(
            4,
            None,
            4,
            3,
            vec![f16::ZERO; 16],
            vec![0; 8],
            DType::F32
        )
        .is_ok());
        assert!(PalettizedMatrix::from_indices(
            2,
            None,
            1,
            2,
            vec![f16::ZERO; 4],
            &[0, 4],
            DType::F32
        )
        .is_err());
        assert!(PalettizedMatrix::from_parts(4, None, 0, 3, vec![], vec![], DType::F32).is_err());
    }

    /// The dense f16 values of a matrix, row by row through `read_row`.
    fn decoded_bits(m: &PalettizedMatrix) -> Vec<u16> {
        let (rows, cols) = m.dims();
        let mut out = vec![0f32; rows * cols];
        for (r, chunk) in out.chunks_exact_mut(cols).enumerate() {
            m.read_row(r, 0, chunk);
        }
        out.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
    }

    #[test]
    fn kmeans_on_the_fixture_tensors_reconstructs_as_coremltools() {
        for (name, tensors) in &kmeans_fixtures() {
            let (_, shape, _) = &tensors["weight"];
            let w = as_f16(&tensors["weight"]);
            if w.len() < 10_000 {
                continue;
            }
            let (rows, cols) = (shape[0], w.len() / shape[0]);
            for nbits in FIXTURE_NBITS {
                let m = PalettizedMatrix::kmeans(&w, rows, cols, nbits, None, DType::F16)
                    .expect("kmeans");
                let lut = as_f16(&tensors[&format!("lut{nbits}")]);
                let indices = &tensors[&format!("indices{nbits}")].2;
                let want: Vec<u16> = indices.iter().map(|&i| lut[i as usize].to_bits()).collect();
                assert!(decoded_bits(&m) == want, "{name} nbits {nbits}");
                assert_eq!(&m.unpacked_indices(), indices, "{name} nbits {nbits}");
            }
        }
    }

    /// The diffusers key of a Core ML const name (`up_blocks_0_resnets_2_conv1_weight_to_fp16_...`
    /// is `up_blocks.0.resnets.2.conv1.weight`), among `keys`.
    pub(crate) fn diffusers_key<'a>(const_name: &str, keys: &'a [String]) -> Option<&'a String> {
        let stem = const_name.split("_to_fp16").next()?;
        keys.iter().find(|k| k.replace('.', "_") == stem)
    }

    #[test]
    fn kmeans_matches_the_decoded_core_ml_packages() {
        let (Some(compressed), Some(unet)) = (
            fixture_dir("coreml/compressed"),
            fixture_dir("tiny-sd15/unet"),
        ) else {
            return;
        };
        let originals = crate::kmeans::tests::read_safetensors(
            &unet.join("diffusion_pytorch_model.safetensors"),
        );
        let keys: Vec<String> = originals.keys().cloned().collect();
        // (package, nbits, group): coremltools used kmeans1d where a table's elements are >= 10,000.
        for (package, nbits, group) in [
            ("Unet_pal6_pertensor_ios16", 6, None),
            ("Unet_pal2_pertensor_ios16", 2, None),
            ("Unet_pal4_group16_ios18", 4, Some(16)),
        ] {
            let decoded = crate::kmeans::tests::read_safetensors(
                &compressed.join(format!("{package}.decoded.safetensors")),
            );
            let mut names: Vec<&String> = decoded.keys().collect();
            names.sort();
            let mut compared = 0;
            for name in names {
                let Some(key) = diffusers_key(name, &keys) else {
                    panic!("{package}: no diffusers weight for {name}");
                };
                let w = as_f16(&originals[key]);
                let rows = decoded[name].1[0];
                let cols = w.len() / rows;
                let per_table = group.unwrap_or(rows) * cols;
                if per_table < 10_000 {
                    continue;
                }
                let m = PalettizedMatrix::kmeans(&w, rows, cols, nbits, group, DType::F16)
                    .expect("kmeans");
                let want: Vec<u16> = as_f16(&decoded[name]).iter().map(|v| v.to_bits()).collect();
                assert!(decoded_bits(&m) == want, "{package}: {name}");
                compared += 1;
            }
            println!("{package}: {compared} tensors identical to the Core ML decode");
            assert!(compared > 0, "{package}");
        }
    }
}
