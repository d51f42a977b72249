//! Matrix multiplication `C += A · B` on the CPU for f32, bf16 and f16 operands, accumulating in
//! f32: the BLIS scheme (pack a block of B and of A into the order the micro-kernel reads, then
//! run a register-blocked micro-kernel over the packed panels), parallel over blocks of C.
//!
//! Operands are read through [`Operand`], so that a convolution can feed its input as an implicit
//! im2col matrix (see `conv.rs`) that is never materialised. Micro-kernels: AVX512-BF16 or NEON
//! BFDOT dot products for bf16 inputs where the CPU has them, and f32 FMA kernels that the compiler
//! vectorises for AVX-512, AVX2+FMA, NEON and plain targets.

use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::OnceLock;

use crate::cpu::Level;

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays a quiet NaN), as the low 16 bits:
/// the same bits as `half::bf16::from_f32`, without branches, so packing loops vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        (bits >> 16) | 0x40
    } else {
        rounded
    }
}

/// bf16 pairs `(x[2p], x[2p + 1])` as one 32-bit lane, low half first, as `vdpbf16ps` reads.
#[inline(always)]
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// `out[j] = pair(even[j], odd[j])` over the shortest of the three: two rows of B as the bf16
/// kernels' packed pairs, vectorised for the CPU (the same bits everywhere).
pub(crate) fn pair_rows(even: &[f32], odd: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::detected() >= Level::Avx512 {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { x86_64::pair_rows_avx512(even, odd, out) };
    }
    for ((o, lo), hi) in out.iter_mut().zip(even).zip(odd) {
        *o = pair(*lo, *hi);
    }
}

/// `out[p] = pair(line[2p], line[2p + 1])` for the whole pairs of `line` that fit `out`: one line
/// of K as pairs of neighbours, vectorised for the CPU (the same bits everywhere).
pub(crate) fn pair_adjacent(line: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::detected() >= Level::Avx512 {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { x86_64::pair_adjacent_avx512(line, out) };
    }
    for (o, two) in out.iter_mut().zip(line.chunks_exact(2)) {
        *o = pair(two[0], two[1]);
    }
}

/// An element type the kernels read.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The values themselves when they are f32 already.
    #[inline(always)]
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        let _ = values;
        None
    }
    /// The values' bits when they are bf16 already.
    #[inline(always)]
    fn as_bf16_bits(values: &[Self]) -> Option<&[u16]> {
        let _ = values;
        None
    }
    /// The value rounded to bf16, as the low 16 bits (exact for bf16 itself).
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        bf16_bits(self.to_f32())
    }
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        self.to_bits() as u32
    }

    #[inline(always)]
    fn as_bf16_bits(values: &[bf16]) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        Some(values.reinterpret_cast())
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// A `rows x cols` matrix the packing routines read row segment by row segment.
pub trait Operand: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Writes the elements `(row, col0 .. col0 + out.len())` as f32.
    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]);

    /// Writes rows `row` and `row + 1` (zero when `!two_rows`) for columns `col0 ..` as bf16
    /// pairs, `row` in the low half: the bf16 kernel's packed B.
    fn read_pairs(&self, row: usize, two_rows: bool, col0: usize, out: &mut [u32]) {
        read_pairs_by_rows(self, row, two_rows, col0, out)
    }

    /// Writes the `len` elements `(row, col0 ..)` as bf16 pairs of neighbours, `out[p]` holding
    /// columns `col0 + 2p` (low half) and `col0 + 2p + 1`, zero past `len`: a row of the bf16
    /// kernel's packed A. `scratch` holds at least `2 * out.len()` values.
    fn read_row_pairs(
        &self,
        row: usize,
        col0: usize,
        len: usize,
        scratch: &mut [f32],
        out: &mut [u32],
    ) {
        read_row_pairs_by_row(self, row, col0, len, scratch, out)
    }
}

/// [`Operand::read_row_pairs`] through [`Operand::read_row`]: the row in f32 (zero-padded in
/// `scratch`), then paired.
pub(crate) fn read_row_pairs_by_row<O: Operand + ?Sized>(
    op: &O,
    row: usize,
    col0: usize,
    len: usize,
    scratch: &mut [f32],
    out: &mut [u32],
) {
    let line = &mut scratch[..2 * out.len()];
    op.read_row(row, col0, &mut line[..len]);
    line[len..].fill(0.0);
    pair_adjacent(line, out);
}

/// [`Operand::read_pairs`] through [`Operand::read_row`]: both rows in f32, then paired.
pub(crate) fn read_pairs_by_rows<O: Operand + ?Sized>(
    op: &O,
    row: usize,
    two_rows: bool,
    col0: usize,
    out: &mut [u32],
) {
    const CHUNK: usize = 128;
    let (mut even, mut odd) = ([0f32; CHUNK], [0f32; CHUNK]);
    for (index, out) in out.chunks_mut(CHUNK).enumerate() {
        let (col, width) = (col0 + index * CHUNK, out.len());
        op.read_row(row, col, &mut even[..width]);
        if two_rows {
            op.read_row(row + 1, col, &mut odd[..width]);
        }
        pair_rows(&even[..width], &odd[..width], out);
    }
}

/// A matrix stored with arbitrary element strides (a transposed view has `col_stride > 1`).
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T: Element> Strided<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this matrix, without moving data.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

impl<T: Element> Operand for Strided<'_, T> {
    fn rows(&self) -> usize {
        self.rows
    }

    /// Straight from the stored elements, with no f32 round trip: for a transposed row-major
    /// matrix (a linear layer's weight as B) the two rows of a pair are neighbours in memory.
    fn read_pairs(&self, row: usize, two_rows: bool, col0: usize, out: &mut [u32]) {
        let start = row * self.row_stride + col0 * self.col_stride;
        let n = out.len();
        if n == 0 {
            return;
        }
        // bf16 rows that are neighbours (a weight as B): each pair is one 32-bit word as stored.
        let neighbours = self.row_stride == 1 && self.col_stride >= 2;
        if let (Some(bits), true, true) = (T::as_bf16_bits(self.data), neighbours, two_rows) {
            let words = &bits[start..=start + (n - 1) * self.col_stride + 1];
            for (o, pair) in out.iter_mut().zip(words.chunks(self.col_stride)) {
                *o = pair[0] as u32 | (pair[1] as u32) << 16;
            }
            return;
        }
        // Two contiguous f32 rows: the vector pairing.
        if let (Some(data), 1, true) = (T::as_f32(self.data), self.col_stride, two_rows) {
            let odd = &data[start + self.row_stride..][..n];
            pair_rows(&data[start..start + n], odd, out);
            return;
        }
        for (j, o) in out.iter_mut().enumerate() {
            let index = start + j * self.col_stride;
            let lo = self.data[index].bf16_bits();
            let hi = if two_rows {
                self.data[index + self.row_stride].bf16_bits()
            } else {
                0
            };
            *o = lo | (hi << 16);
        }
    }

    fn cols(&self) -> usize {
        self.cols
    }

    /// Contiguous rows are paired where they lie, with no copy: f32 rows (activations as A)
    /// through the vector pairing, bf16 rows (weights as A) as they are, since neighbouring bf16
    /// values are already a pair's halves.
    fn read_row_pairs(
        &self,
        row: usize,
        col0: usize,
        len: usize,
        scratch: &mut [f32],
        out: &mut [u32],
    ) {
        let start = row * self.row_stride + col0 * self.col_stride;
        if self.col_stride == 1 {
            if let Some(data) = T::as_f32(self.data) {
                let whole = len / 2;
                pair_adjacent(&data[start..start + 2 * whole], &mut out[..whole]);
                if len % 2 == 1 {
                    out[whole] = pair(data[start + len - 1], 0.0);
                }
                out[len.div_ceil(2)..].fill(0);
                return;
            }
            if let Some(bits) = T::as_bf16_bits(self.data) {
                let src = &bits[start..start + len];
                let whole = len / 2;
                for (o, two) in out[..whole].iter_mut().zip(src.chunks_exact(2)) {
                    *o = u32::from(two[0]) | (u32::from(two[1]) << 16);
                }
                if len % 2 == 1 {
                    out[whole] = u32::from(src[len - 1]);
                }
                out[len.div_ceil(2)..].fill(0);
                return;
            }
        }
        read_row_pairs_by_row(self, row, col0, len, scratch, out)
    }

    #[inline]
    fn read_row(&self, row: usize, col0: usize, out: &mut [f32]) {
        let start = row * self.row_stride + col0 * self.col_stride;
        if self.col_stride == 1 {
            let src = &self.data[start..start + out.len()];
            for (o, s) in out.iter_mut().zip(src) {
                *o = s.to_f32();
            }
        } else {
            for (j, o) in out.iter_mut().enumerate() {
                *o = self.data[start + j * self.col_stride].to_f32();
            }
        }
    }
}

/// Depth of the packed blocks: a packed B panel (`KC x NR`) stays in L1, an A block in L2.
const KC: usize = 256;
/// Rows of C one task computes (a multiple of every MR).
const MC: usize = 96;
/// Columns of C one task computes (a multiple of every NR).
const NC: usize = 512;

/// `c[i * ldc + j] += sum_k a[i, k] * b[k, j]` for the `a.rows() x b.cols()` matrix `c`.
///
/// # Panics
/// If the inner dimensions differ or `c` is too short: callers check shapes first (the candle
/// operations in `nn.rs` return errors naming both shapes).
pub fn gemm(level: Level, a: &dyn Operand, b: &dyn Operand, c: &mut [f32], ldc: usize) {
    if is_empty_product(a, b, c, ldc) {
        return;
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Amx | Level::Avx512Bf16 | Level::Avx512 => {
            run::<Values, 8, 32>(a, b, c, ldc, x86_64::kernel_avx512 as Kernel<f32, 8, 32>)
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            run::<Values, 6, 16>(a, b, c, ldc, x86_64::kernel_avx2 as Kernel<f32, 6, 16>)
        }
        #[cfg(target_arch = "aarch64")]
        Level::Neon | Level::NeonBf16 => {
            run::<Values, 6, 16>(a, b, c, ldc, kernel_fma::<6, 16> as Kernel<f32, 6, 16>)
        }
        _ => run::<Values, 4, 8>(a, b, c, ldc, kernel_plain::<4, 8> as Kernel<f32, 4, 8>),
    }
}

/// Checks the shapes of `c += a · b` (panicking as [`gemm`] documents) and tells whether there is
/// nothing to compute.
fn is_empty_product(a: &dyn Operand, b: &dyn Operand, c: &[f32], ldc: usize) -> bool {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert_eq!(k, b.rows(), "gemm: inner dimensions differ");
    assert!(
        m == 0 || c.len() >= (m - 1) * ldc + n,
        "gemm: output too short"
    );
    m == 0 || n == 0 || k == 0
}

/// `c += a · b` with bf16 dot products (AVX512-BF16, or BFDOT on aarch64): the operands are rounded to bf16 while
/// packing (exact when they are bf16 already), products accumulate in f32. Falls back to [`gemm`]
/// on CPUs without the instructions.
pub fn gemm_bf16(level: Level, a: &dyn Operand, b: &dyn Operand, c: &mut [f32], ldc: usize) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Amx && amx::amx_kernel_verified() {
        return run_bf16_checked::<amx::AmxPairs, { amx::MR }, { amx::NR }>(
            a,
            b,
            c,
            ldc,
            amx::kernel_amx,
        );
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx512Bf16 && x86_64::bf16_kernel_verified() {
        return run_bf16_checked::<Bf16Pairs, 8, 32>(a, b, c, ldc, x86_64::kernel_bf16);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::NeonBf16 && aarch64::bf16_kernel_verified() {
        return run_bf16_checked::<Bf16Pairs, { aarch64::MR }, { aarch64::NR }>(
            a,
            b,
            c,
            ldc,
            aarch64::kernel_bf16,
        );
    }
    gemm(level, a, b, c, ldc)
}

/// How much faster [`gemm_bf16`] is than [`gemm`] at `level` on this CPU, for a product of f32
/// activations with bf16 weights (a linear layer of the UNet's size, `256 x 640 x 640`): the
/// best of several timings of each, measured once per level and process (a few milliseconds).
/// `None` where the level has no bf16 dot products.
///
/// bf16 dot products are not faster everywhere: on Intel Sapphire Rapids `vdpbf16ps` (AVX512-BF16)
/// ran slower than the AVX-512 f32 kernel, while on AMD Zen 4/5 it runs about twice as fast.
pub fn bf16_speedup(level: Level) -> Option<f64> {
    const LEVELS: usize = 8;
    static MEASURED: [OnceLock<f64>; LEVELS] = [const { OnceLock::new() }; LEVELS];
    if !level.has_bf16_dots() {
        return None;
    }
    let slot = MEASURED.get(level as usize)?;
    Some(*slot.get_or_init(|| measure_bf16_speedup(level)))
}

/// Whether products with bf16 weights should take the bf16 dot products at `level`: where they
/// exist and measure at least [`BF16_MARGIN`] times as fast as the f32 kernels.
pub fn bf16_dots_pay(level: Level) -> bool {
    bf16_speedup(level).is_some_and(prefer_bf16)
}

/// The speed-up the bf16 dot products must show over the f32 kernels to be chosen: above 1, so
/// that timing noise on a CPU where both run alike does not flip the choice between runs.
pub const BF16_MARGIN: f64 = 1.05;

fn prefer_bf16(speedup: f64) -> bool {
    speedup >= BF16_MARGIN
}

fn measure_bf16_speedup(level: Level) -> f64 {
    let (m, k, n) = (256, 640, 640);
    let value = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 16.0;
    let a: Vec<f32> = (0..m * k).map(value).collect();
    let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(value(i + 3))).collect();
    let (a, b) = (
        Strided::row_major(&a, m, k),
        Strided::row_major(&w, n, k).t(),
    );
    let mut c = vec![0f32; m * n];
    let time = |c: &mut [f32], dots: bool| {
        let start = std::time::Instant::now();
        if dots {
            gemm_bf16(level, &a, &b, c, n);
        } else {
            gemm(level, &a, &b, c, n);
        }
        start.elapsed().as_secs_f64()
    };
    let (mut best_dots, mut best_f32) = (f64::INFINITY, f64::INFINITY);
    // Alternate, so that a burst of load from elsewhere hits both; the first round warms up.
    for round in 0..6 {
        let (dots, f32s) = (time(&mut c, true), time(&mut c, false));
        if round > 0 {
            best_dots = best_dots.min(dots);
            best_f32 = best_f32.min(f32s);
        }
    }
    best_f32 / best_dots.max(f64::MIN_POSITIVE)
}

/// The bf16 [`run`] after `gemm`'s shape checks.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn run_bf16_checked<P: Packing<Elem = u32>, const MR: usize, const NR: usize>(
    a: &dyn Operand,
    b: &dyn Operand,
    c: &mut [f32],
    ldc: usize,
    kernel: Kernel<u32, MR, NR>,
) {
    if !is_empty_product(a, b, c, ldc) {
        run::<P, MR, NR>(a, b, c, ldc, kernel);
    }
}

/// K pairs per packed block of the bf16 products (512 values of K).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const KP: usize = 256;

/// Whether the bf16 dot-product `kernel` gives the f32 kernels' result on this CPU, checked on a
/// small product of bf16-exact values (the two must agree to rounding). Guards users against an
/// instruction path the development machines could only emulate: if it ever disagreed, the f32
/// kernels would be used instead. The shape has whole and partial micro-tiles of every kernel.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn bf16_agrees_with_f32<P: Packing<Elem = u32>, const MR: usize, const NR: usize>(
    kernel: Kernel<u32, MR, NR>,
) -> bool {
    let (m, k, n) = (45, 77, 70);
    let value = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 8.0;
    let a: Vec<f32> = (0..m * k).map(value).collect();
    let b: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
    let (a, b) = (Strided::row_major(&a, m, k), Strided::row_major(&b, k, n));
    let mut want = vec![0f32; m * n];
    run::<Values, 4, 8>(
        &a,
        &b,
        &mut want,
        n,
        kernel_plain::<4, 8> as Kernel<f32, 4, 8>,
    );
    let mut got = vec![0f32; m * n];
    run::<P, MR, NR>(&a, &b, &mut got, n, kernel);
    got.iter()
        .zip(&want)
        .all(|(g, w)| (g - w).abs() <= 1e-4 * w.abs().max(1.0))
}

/// Packs `count` lines of `2 * kp` values (K padded with zeros) as `[panel][p][width]` pairs.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn pack_pairs(
    width: usize,
    count: usize,
    kp: usize,
    read: impl Fn(usize, &mut [f32], &mut [u32]) + Sync,
    out: &mut [u32],
) {
    let panels = count.div_ceil(width);
    out[..panels * kp * width]
        .par_chunks_mut(kp * width)
        .enumerate()
        .for_each_init(
            || (vec![0f32; 2 * kp], vec![0u32; kp]),
            |(line, pairs), (panel, dst)| {
                for w in 0..width {
                    let index = panel * width + w;
                    if index < count {
                        read(index, line, pairs);
                    } else {
                        pairs.fill(0);
                    }
                    // The whole line is paired first (a vector loop), then dealt out.
                    for (p, value) in pairs.iter().enumerate() {
                        dst[p * width + w] = *value;
                    }
                }
            },
        );
}

/// A micro-kernel: `c[MR x NR] += packed_a[depth][MR] · packed_b[depth][NR]`, storing `mr x nr`
/// of it. `E` is what the packing holds: f32 values, or `u32` pairs of bf16.
type Kernel<E, const MR: usize, const NR: usize> =
    unsafe fn(usize, &[E], &[E], *mut f32, usize, usize, usize);

/// How one kind of product packs its operands: f32 values ([`Values`]) or bf16 pairs of
/// neighbouring K ([`Bf16Pairs`]).
trait Packing {
    type Elem: Copy + Default + Send + Sync;
    /// K values per depth block.
    const BLOCK: usize;
    /// Packed depth of a block of `kc` K values.
    fn depth(kc: usize) -> usize;
    /// Packs every row of `a` (K from `pc`, `kc` values) as `[panel][depth][width]`.
    fn pack_a(width: usize, a: &dyn Operand, pc: usize, kc: usize, out: &mut [Self::Elem]);
    /// Packed depth `p` of B (K from `pc`, `kc` values in the block), columns from `jc`.
    fn read_b(b: &dyn Operand, pc: usize, kc: usize, p: usize, jc: usize, out: &mut [Self::Elem]);
}

/// f32 products: values as they are.
struct Values;

impl Packing for Values {
    type Elem = f32;
    const BLOCK: usize = KC;

    fn depth(kc: usize) -> usize {
        kc
    }

    fn pack_a(width: usize, a: &dyn Operand, pc: usize, kc: usize, out: &mut [f32]) {
        pack_panels(
            width,
            a.rows(),
            kc,
            |row, line| a.read_row(row, pc, line),
            out,
        );
    }

    fn read_b(b: &dyn Operand, pc: usize, _: usize, p: usize, jc: usize, out: &mut [f32]) {
        b.read_row(pc + p, jc, out);
    }
}

/// bf16 dot products: values rounded to bf16 and paired along K (a zero pads an odd end).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Bf16Pairs;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Packing for Bf16Pairs {
    type Elem = u32;
    const BLOCK: usize = 2 * KP;

    fn depth(kc: usize) -> usize {
        kc.div_ceil(2)
    }

    fn pack_a(width: usize, a: &dyn Operand, pc: usize, kc: usize, out: &mut [u32]) {
        let read = |row: usize, scratch: &mut [f32], pairs: &mut [u32]| {
            a.read_row_pairs(row, pc, kc, scratch, pairs)
        };
        pack_pairs(width, a.rows(), kc.div_ceil(2), read, out);
    }

    fn read_b(b: &dyn Operand, pc: usize, kc: usize, p: usize, jc: usize, out: &mut [u32]) {
        b.read_pairs(pc + 2 * p, 2 * p + 1 < kc, jc, out);
    }
}

/// A zeroed buffer whose first value starts a 64-byte cache line: AMX tile rows and AVX-512
/// vectors that straddle two lines load at about half speed (measured on Intel: a tile product
/// over L1-resident operands ran at 0.86 TFLOP/s a core from unaligned buffers, 1.9 aligned).
pub(crate) struct Aligned<T> {
    data: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    const LINE: usize = 64;

    pub(crate) fn new(len: usize) -> Self {
        let extra = Self::LINE.div_ceil(std::mem::size_of::<T>().max(1));
        let data = vec![T::default(); len + extra];
        // Within `extra` values for the 4-byte values the kernels pack; 0 if it cannot be met.
        let start = data.as_ptr().align_offset(Self::LINE);
        let start = if start <= extra { start } else { 0 };
        Self { data, start, len }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.data[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data[self.start..self.start + self.len]
    }
}

/// The output pointer shared by the tasks; each task writes its own disjoint tile of C.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint regions of the buffer the caller lent for the whole call.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element at `offset` (a method, so closures capture the whole `Send` wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Packs rows `row0..row0+rows` of `op` (or, for B, columns via `read_row` of its rows) into
/// panels of `width` interleaved lines: `out[panel][p][w]` = `line (panel*width + w), depth p`.
/// `lines` yields one line (`depth` values) at a time into the scratch buffer.
fn pack_panels(
    width: usize,
    count: usize,
    depth: usize,
    read: impl Fn(usize, &mut [f32]) + Sync,
    out: &mut [f32],
) {
    let panels = count.div_ceil(width);
    out[..panels * depth * width]
        .par_chunks_mut(depth * width)
        .enumerate()
        .for_each_init(
            || vec![0f32; depth],
            |line, (panel, dst)| {
                for w in 0..width {
                    let index = panel * width + w;
                    if index < count {
                        read(index, line);
                        for (p, value) in line.iter().enumerate() {
                            dst[p * width + w] = *value;
                        }
                    } else {
                        for p in 0..depth {
                            dst[p * width + w] = 0.0;
                        }
                    }
                }
            },
        );
}

/// One depth block of a wide product, one task per block of `NC` columns: each task packs its
/// block of B a whole row at a time (`fill_row(p, jc, line)` writes depth `p` of the columns from
/// `jc`; an im2col row is read in long runs), deals the rows out to panels, then runs
/// `tile(packed_b, row_panel, column_panel, jc)` for all its tiles. One fork-join per depth block.
fn wide_blocks<const NR: usize, T: Copy + Default + Send>(
    n: usize,
    depth: usize,
    m_panels: usize,
    fill_row: impl Fn(usize, usize, &mut [T]) + Sync,
    tile: impl Fn(&[T], usize, usize, usize) + Sync,
) {
    (0..n.div_ceil(NC)).into_par_iter().for_each_init(
        || {
            (
                Aligned::<T>::new(NC.div_ceil(NR) * NR * depth),
                vec![T::default(); NC],
            )
        },
        |(packed_b, line), block| {
            let jc = block * NC;
            let nc = NC.min(n - jc);
            for p in 0..depth {
                fill_row(p, jc, &mut line[..nc]);
                scatter_row::<NR, T>(&line[..nc], p, depth, packed_b);
            }
            for jp in 0..nc.div_ceil(NR) {
                for ip in 0..m_panels {
                    tile(packed_b, ip, jp, jc);
                }
            }
        },
    );
}

/// Deals depth `p` of a row of B (`line`, the block's columns) out to the block's panels
/// (`[panel][depth][NR]`, `depth` deep), zero-padding the last panel.
fn scatter_row<const NR: usize, T: Copy + Default>(
    line: &[T],
    p: usize,
    depth: usize,
    packed: &mut [T],
) {
    for (jp, chunk) in line.chunks(NR).enumerate() {
        let dst = &mut packed[(jp * depth + p) * NR..(jp * depth + p + 1) * NR];
        dst[..chunk.len()].copy_from_slice(chunk);
        dst[chunk.len()..].fill(T::default());
    }
}

/// The product driver: for each depth block, pack A, then B by column blocks, and run `kernel`
/// on every tile in parallel.
fn run<P: Packing, const MR: usize, const NR: usize>(
    a: &dyn Operand,
    b: &dyn Operand,
    c: &mut [f32],
    ldc: usize,
    kernel: Kernel<P::Elem, MR, NR>,
) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    let m_panels = m.div_ceil(MR);
    let depth_max = P::depth(P::BLOCK.min(k));
    let mut packed_a = Aligned::<P::Elem>::new(m_panels * MR * depth_max);
    let mut packed_b = Aligned::<P::Elem>::new(NC.min(n).div_ceil(NR) * NR * depth_max);
    let out = SharedOut(c.as_mut_ptr());
    for pc in (0..k).step_by(P::BLOCK) {
        let kc = P::BLOCK.min(k - pc);
        let depth = P::depth(kc);
        P::pack_a(MR, a, pc, kc, &mut packed_a);
        let tile = |packed_a: &[P::Elem], packed_b: &[P::Elem], ip: usize, jp: usize, jc: usize| {
            let (i0, j0) = (ip * MR, jc + jp * NR);
            let (mr, nr) = (MR.min(m - i0), NR.min(n - j0));
            let ap = &packed_a[ip * depth * MR..(ip + 1) * depth * MR];
            let bp = &packed_b[jp * depth * NR..(jp + 1) * depth * NR];
            // SAFETY: the caller checked the CPU features of `kernel`; the tile (i0.., j0..) of
            // mr x nr lies inside c (checked by `gemm`) and no other task writes it.
            unsafe { kernel(depth, ap, bp, out.at(i0 * ldc + j0), ldc, mr, nr) };
        };
        if wide_n(n) {
            // Many column blocks (a convolution's pixels): whole blocks per task.
            let packed_a = &packed_a;
            wide_blocks::<NR, P::Elem>(
                n,
                depth,
                m_panels,
                |p, jc, line| P::read_b(b, pc, kc, p, jc, line),
                |packed_b, ip, jp, jc| tile(packed_a, packed_b, ip, jp, jc),
            );
            continue;
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let n_panels = nc.div_ceil(NR);
            // B is read by rows of K (a pair of rows for bf16), one panel per task.
            packed_b[..n_panels * depth * NR]
                .par_chunks_mut(depth * NR)
                .enumerate()
                .for_each(|(panel, dst)| {
                    let j0 = jc + panel * NR;
                    let width = NR.min(jc + nc - j0);
                    for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
                        P::read_b(b, pc, kc, p, j0, &mut row[..width]);
                        row[width..].fill(P::Elem::default());
                    }
                });
            let (packed_a, packed_b) = (&packed_a, &packed_b);
            for_each_tile(m, n_panels, MR, |ip, jp| {
                tile(packed_a, packed_b, ip, jp, jc)
            });
        }
    }
}

/// Whether `n` columns make enough blocks of `NC` to give every thread several: then each task
/// packs and computes whole column blocks on its own.
fn wide_n(n: usize) -> bool {
    n.div_ceil(NC) >= 4 * rayon::current_num_threads().max(1)
}

/// Calls `tile(row_panel, column_panel)` for every micro-tile of an `m`-row block, in parallel
/// tasks of up to `MC` rows by a group of column panels: the column groups give every thread work
/// even when `m` is small (cross-attention keys, the time embedding).
fn for_each_tile(m: usize, n_panels: usize, mr: usize, tile: impl Fn(usize, usize) + Sync) {
    let m_panels = m.div_ceil(mr);
    let m_blocks = m.div_ceil(MC);
    let groups = n_panels.min(rayon::current_num_threads().max(1) * 2).max(1);
    let per_group = n_panels.div_ceil(groups);
    (0..m_blocks * groups).into_par_iter().for_each(|task| {
        let (mb, g) = (task / groups, task % groups);
        for jp in g * per_group..((g + 1) * per_group).min(n_panels) {
            for ip in mb * MC / mr..((mb + 1) * MC / mr).min(m_panels) {
                tile(ip, jp);
            }
        }
    });
}

/// The register tile, computed with fused multiply-adds; the compiler vectorises the `NR` loop
/// for whatever target features the caller was compiled with.
#[inline(always)]
pub(crate) fn tile_fma<const MR: usize, const NR: usize>(
    kc: usize,
    a: &[f32],
    b: &[f32],
) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] = ap[i].mul_add(bp[j], acc[i][j]);
            }
        }
    }
    acc
}

/// The same without FMA instructions (a separate multiply and add), for plain targets where
/// `mul_add` would be a library call.
#[inline(always)]
pub(crate) fn tile_plain<const MR: usize, const NR: usize>(
    kc: usize,
    a: &[f32],
    b: &[f32],
) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += ap[i] * bp[j];
            }
        }
    }
    acc
}

/// Adds the `mr x nr` corner of `acc` to C.
///
/// # Safety
/// `c` must point to an `mr x nr` tile of a row-major matrix with leading dimension `ldc`.
#[inline(always)]
unsafe fn store<const MR: usize, const NR: usize>(
    acc: &[[f32; NR]; MR],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    for (i, row) in acc.iter().enumerate().take(mr) {
        let dst = std::slice::from_raw_parts_mut(c.add(i * ldc), nr);
        for (d, v) in dst.iter_mut().zip(row) {
            *d += v;
        }
    }
}

/// # Safety
/// See [`store`].
#[allow(dead_code)]
unsafe fn kernel_fma<const MR: usize, const NR: usize>(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    store(&tile_fma::<MR, NR>(kc, a, b), c, ldc, mr, nr)
}

/// # Safety
/// See [`store`].
unsafe fn kernel_plain<const MR: usize, const NR: usize>(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    store(&tile_plain::<MR, NR>(kc, a, b), c, ldc, mr, nr)
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::tile_avx512;

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose bf16 rounding has a special case: ties both ways, the largest values that
    /// round up to infinity, NaNs (quiet, signalling, negative), infinities, zeros, subnormals.
    fn awkward_values() -> Vec<f32> {
        let mut bits = vec![
            0x3f80_8000u32, // a tie, rounds down to even
            0x3f81_8000,    // a tie, rounds up to even
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff, // f32::MAX: rounds to infinity
            0xff7f_ffff,
            0x7fc0_0000, // quiet NaN
            0x7f80_0001, // signalling NaN
            0xffa0_0000, // negative signalling NaN
            0x7f80_0000,
            0xff80_0000,
            0x0000_0000,
            0x8000_0000,
            0x0000_0001, // subnormals
            0x807f_ffff,
            0x0040_8000,
        ];
        // And a spread of ordinary values, so that every lane of a vector sees each kind.
        bits.extend((0..200u32).map(|i| i.wrapping_mul(0x9e37_79b9) ^ (i << 7)));
        bits.into_iter().map(f32::from_bits).collect()
    }

    /// A row of A as pairs, straight from contiguous f32 rows and through the f32 copy (bf16
    /// storage, a transposed view): the same pairs, a zero after an odd end, zeros past it.
    #[test]
    fn row_pairs_are_neighbours_padded_with_zeros() {
        let (rows, cols) = (3, 37);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 50.0) / 3.0).collect();
        let halves: Vec<bf16> = values.iter().map(|v| bf16::from_f32(*v)).collect();
        let transposed: Vec<f32> = (0..rows * cols)
            .map(|i| values[(i % rows) * cols + i / rows])
            .collect();
        let direct = Strided::row_major(&values, rows, cols);
        let widened = Strided::row_major(&halves, rows, cols);
        let strided = Strided::row_major(&transposed, cols, rows).t();
        let mut scratch = vec![0f32; 64];
        for (row, col0, len, pairs) in [(0, 0, 37, 19), (1, 3, 20, 10), (2, 5, 7, 6), (1, 36, 1, 1)]
        {
            let want: Vec<u32> = (0..pairs)
                .map(|p| {
                    let at = |i: usize| {
                        if i < len {
                            values[row * cols + col0 + i]
                        } else {
                            0.0
                        }
                    };
                    pair(at(2 * p), at(2 * p + 1))
                })
                .collect();
            for (name, op) in [
                ("f32", &direct as &dyn Operand),
                ("bf16", &widened),
                ("transposed", &strided),
            ] {
                let mut got = vec![u32::MAX; pairs];
                op.read_row_pairs(row, col0, len, &mut scratch, &mut got);
                assert_eq!(got, want, "{name} row {row} from {col0}, {len} values");
            }
        }
    }

    /// Pairs of rows of B from every storage the fast paths take (contiguous f32 rows, a
    /// transposed bf16 weight whose pairs are neighbours) and the general path: the pairs of
    /// the rounded values, the second half zero for a lone last row.
    #[test]
    fn row_pairs_of_b_are_the_same_on_every_path() {
        let (rows, cols) = (5, 43);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 70.0) / 7.0).collect();
        let halves: Vec<bf16> = values.iter().map(|v| bf16::from_f32(*v)).collect();
        // The same matrix stored transposed (as a linear layer's weight is), in both dtypes.
        let at = |i: usize| (i % rows) * cols + i / rows;
        let t_values: Vec<f32> = (0..rows * cols).map(|i| values[at(i)]).collect();
        let t_halves: Vec<bf16> = (0..rows * cols).map(|i| halves[at(i)]).collect();
        let operands = [
            (
                "f32 rows",
                &Strided::row_major(&values, rows, cols) as &dyn Operand,
            ),
            ("bf16 rows", &Strided::row_major(&halves, rows, cols)),
            (
                "f32 transposed",
                &Strided::row_major(&t_values, cols, rows).t(),
            ),
            (
                "bf16 transposed",
                &Strided::row_major(&t_halves, cols, rows).t(),
            ),
        ];
        for (row, two_rows, col0, n) in [
            (0, true, 0, 43),
            (1, true, 5, 30),
            (3, true, 42, 1),
            (4, false, 2, 17),
        ] {
            let want: Vec<u32> = (0..n)
                .map(|j| {
                    let hi = if two_rows {
                        values[(row + 1) * cols + col0 + j]
                    } else {
                        0.0
                    };
                    pair(values[row * cols + col0 + j], hi)
                })
                .collect();
            for (name, op) in operands {
                let mut got = vec![u32::MAX; n];
                op.read_pairs(row, two_rows, col0, &mut got);
                assert_eq!(got, want, "{name}: rows {row}, {two_rows}, from {col0}");
            }
        }
    }

    #[test]
    fn vector_pairing_gives_the_scalar_bits() {
        let values = awkward_values();
        let n = values.len();
        let odd: Vec<f32> = values.iter().rev().copied().collect();
        for len in [0, 1, 15, 16, 17, 47, n] {
            let mut got = vec![0u32; len];
            pair_rows(&values[..len], &odd[..len], &mut got);
            let want: Vec<u32> = (0..len).map(|j| pair(values[j], odd[j])).collect();
            assert_eq!(got, want, "pair_rows over {len}");
        }
        for len in [0, 2, 30, 32, 34, 66, n] {
            let mut got = vec![0u32; len / 2];
            pair_adjacent(&values[..len], &mut got);
            let want: Vec<u32> = (0..len / 2)
                .map(|p| pair(values[2 * p], values[2 * p + 1]))
                .collect();
            assert_eq!(got, want, "pair_adjacent over {len}");
        }
    }

    /// Where the CPU has bf16 dot products, the run-time self-check must accept them (else the
    /// bf16 kernel would be silently skipped and the parity tests would test the f32 one), and
    /// `gemm_bf16` must round its f32 inputs, which shows the bf16 kernel ran.
    #[test]
    fn the_bf16_kernel_is_verified_and_used_where_the_cpu_has_it() {
        let (m, k, n) = (9, 40, 13);
        // 1 + 2^-10 is not a bf16 value: rounded it is 1.
        let a = vec![1.0 + 2f32.powi(-10); m * k];
        let b = vec![1.0f32; k * n];
        let (a, b) = (Strided::row_major(&a, m, k), Strided::row_major(&b, k, n));
        for level in Level::available() {
            let native = level.has_bf16_dots();
            #[cfg(target_arch = "x86_64")]
            if native {
                assert!(x86_64::bf16_kernel_verified(), "{level:?}");
            }
            #[cfg(target_arch = "x86_64")]
            if level == Level::Amx {
                assert!(
                    amx::amx_kernel_verified(),
                    "the AMX tiles disagree with f32"
                );
            }
            #[cfg(target_arch = "aarch64")]
            if native {
                assert!(aarch64::bf16_kernel_verified(), "{level:?}");
            }
            let mut c = vec![0f32; m * n];
            gemm_bf16(level, &a, &b, &mut c, n);
            let want = if native {
                k as f32
            } else {
                k as f32 * (1.0 + 2f32.powi(-10))
            };
            assert!(
                c.iter().all(|&v| v == want),
                "{level:?}: {} vs {want}",
                c[0]
            );
        }
    }

    #[test]
    fn bf16_dots_are_chosen_only_where_they_measure_faster() {
        assert!(prefer_bf16(2.0));
        assert!(prefer_bf16(BF16_MARGIN));
        assert!(!prefer_bf16(1.0));
        assert!(!prefer_bf16(0.8));
        for level in Level::available() {
            let speedup = bf16_speedup(level);
            assert_eq!(speedup.is_some(), level.has_bf16_dots(), "{level:?}");
            if let Some(speedup) = speedup {
                assert!(speedup.is_finite() && speedup > 0.0, "{level:?}: {speedup}");
                assert_eq!(bf16_dots_pay(level), speedup >= BF16_MARGIN);
            } else {
                assert!(!bf16_dots_pay(level));
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate_bit_for_bit() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_8001),
        ];
        let mut state = 0x1234_5678u32;
        for _ in 0..100_000 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            values.push(f32::from_bits(state));
        }
        for x in values {
            let want = half::bf16::from_f32(x).to_bits() as u32;
            assert_eq!(super::bf16_bits(x), want, "{x:e} ({:#010x})", x.to_bits());
        }
    }
}
