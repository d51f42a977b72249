//! The Intel AMX-BF16 micro-kernel: a 32 x 32 block of C in four 16 x 16 f32 tile accumulators,
//! fed by two A tiles (16 rows x 16 K pairs) and two B tiles (16 K pairs x 16 columns) per step
//! of 16 K pairs, with `tdpbf16ps`.
//!
//! B is packed as the other bf16 kernels pack it (`[depth][NR]` pairs of neighbouring K), which is
//! the tile layout of B; A is packed row-major within a panel (`[MR][depth]` pairs), so that
//! each A tile is 16 rows of 64 contiguous bytes. The packed depth is padded to a multiple of 16
//! pairs with zeros.
//!
//! The kernel is written once over [`Tiles`]: [`Hardware`] issues the tile instructions through
//! inline assembly; [`Model`] computes what the instructions compute in plain Rust (Intel's
//! pseudo-code for `tdpbf16ps`), so the packing, the tile addressing and the driver are tested on
//! every machine (in the unit tests), and the hardware path is checked against the f32 kernels at
//! first use.

use super::{bf16_agrees_with_f32, store, Operand, Packing};

/// Rows of C per micro-tile (two A tiles).
pub(crate) const MR: usize = 32;
/// Columns of C per micro-tile (two B tiles).
pub(crate) const NR: usize = 32;
/// K pairs per tile step: a tile row of 64 bytes.
pub(crate) const STEP: usize = 16;
/// Rows of a tile.
const ROWS: usize = 16;

/// The tile operations the kernel uses, on tile registers 0..8 by number.
///
/// # Safety
/// Implementations read and write raw memory: callers pass pointers to `ROWS` rows of 64 bytes
/// at `stride` bytes apart.
pub(crate) trait Tiles {
    /// Sets every tile to 16 rows of 64 bytes (palette 1), unless they are set already.
    unsafe fn configure(&mut self);
    unsafe fn zero<const T: usize>(&mut self);
    /// Loads 16 rows of 64 bytes (16 lanes of 32 bits), `stride` bytes apart.
    unsafe fn load<const T: usize>(&mut self, src: *const u32, stride: usize);
    /// `tile C += A · B` (f32 accumulators, bf16 pairs in A and B).
    unsafe fn dot<const C: usize, const A: usize, const B: usize>(&mut self);
    unsafe fn store<const T: usize>(&mut self, dst: *mut f32, stride: usize);
}

/// A 32 x 32 block of f32 results on a cache-line boundary, for tile stores (see
/// [`super::Aligned`]).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TileBlock(pub [[f32; NR]; MR]);

const _: () = assert!(std::mem::size_of::<TileBlock>() == std::mem::size_of::<[[f32; NR]; MR]>());

impl TileBlock {
    /// The blocks as plain arrays (the same bytes: one field, no padding).
    pub(crate) fn arrays(blocks: &[TileBlock]) -> &[[[f32; NR]; MR]] {
        // SAFETY: `TileBlock` is `repr(C)` around one `[[f32; NR]; MR]` of the same size.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len()) }
    }

    /// See [`Self::arrays`].
    pub(crate) fn arrays_mut(blocks: &mut [TileBlock]) -> &mut [[[f32; NR]; MR]] {
        // SAFETY: as in `arrays`.
        unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast(), blocks.len()) }
    }
}

impl Default for TileBlock {
    fn default() -> Self {
        Self([[0.0; NR]; MR])
    }
}

impl std::ops::Deref for TileBlock {
    type Target = [[f32; NR]; MR];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for TileBlock {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `c[32 x 32] += a · b[0] + a · b[1] + ...` over `kp` K pairs (a multiple of [`STEP`]) in the
/// four accumulator tiles: `a` is 32 rows of `kp` pairs, `a_stride` pairs apart; each `b` is `kp`
/// rows of [`NR`] pairs (the A tiles are loaded once for all of them); `c` holds 32 rows of 32 f32
/// values, `c_stride` values apart (loaded into the tiles first, or, with `ZERO`, written without
/// being read).
///
/// # Safety
/// `T` must be usable on this CPU (for [`Hardware`]: AMX-BF16 with the permission granted);
/// `a`, `b` and `c` must be valid for those reads and writes.
#[inline(always)]
unsafe fn accumulate<T: Tiles + Default, const ZERO: bool, const PARTS: usize>(
    kp: usize,
    a: *const u32,
    a_stride: usize,
    b: [*const u32; PARTS],
    c: *mut f32,
    c_stride: usize,
) {
    debug_assert!(kp.is_multiple_of(STEP));
    let tiles = &mut T::default();
    let (a_bytes, b_bytes, c_bytes) = (a_stride * 4, NR * 4, c_stride * 4);
    let corner = |row: usize, col: usize| c.add(row * c_stride + col);
    tiles.configure();
    if ZERO {
        tiles.zero::<0>();
        tiles.zero::<1>();
        tiles.zero::<2>();
        tiles.zero::<3>();
    } else {
        tiles.load::<0>(corner(0, 0).cast(), c_bytes);
        tiles.load::<1>(corner(0, ROWS).cast(), c_bytes);
        tiles.load::<2>(corner(ROWS, 0).cast(), c_bytes);
        tiles.load::<3>(corner(ROWS, ROWS).cast(), c_bytes);
    }
    for p in (0..kp).step_by(STEP) {
        // Each product follows the loads it needs, so that it starts while the others load.
        tiles.load::<4>(a.add(p), a_bytes);
        for (part, b) in b.iter().enumerate() {
            tiles.load::<6>(b.add(p * NR), b_bytes);
            tiles.dot::<0, 4, 6>();
            tiles.load::<7>(b.add(p * NR + ROWS), b_bytes);
            tiles.dot::<1, 4, 7>();
            if part == 0 {
                tiles.load::<5>(a.add(ROWS * a_stride + p), a_bytes);
            }
            tiles.dot::<2, 5, 6>();
            tiles.dot::<3, 5, 7>();
        }
    }
    tiles.store::<0>(corner(0, 0), c_bytes);
    tiles.store::<1>(corner(0, ROWS), c_bytes);
    tiles.store::<2>(corner(ROWS, 0), c_bytes);
    tiles.store::<3>(corner(ROWS, ROWS), c_bytes);
}

/// `acc[32 x 32] += a · b[0] + a · b[1]` over `kp` K pairs (a multiple of [`STEP`]), `a` and
/// `b` as for [`product_on`].
///
/// # Safety
/// See [`accumulate`].
#[inline(always)]
pub(crate) unsafe fn accumulate_two_on<T: Tiles + Default>(
    kp: usize,
    a: *const u32,
    a_stride: usize,
    b: [*const u32; 2],
    acc: &mut TileBlock,
) {
    accumulate::<T, false, 2>(kp, a, a_stride, b, acc.0.as_mut_ptr().cast(), NR)
}

/// `acc[32 x 32] = a · b` over `kp` K pairs (a multiple of [`STEP`]): `a` is 32 rows of `kp`
/// pairs, `a_stride` pairs apart; `b` is `kp` rows of [`NR`] pairs.
///
/// # Safety
/// See [`accumulate`]; `a` and `b` must be valid for those reads.
#[inline(always)]
pub(crate) unsafe fn product_on<T: Tiles + Default>(
    kp: usize,
    a: *const u32,
    a_stride: usize,
    b: *const u32,
    acc: &mut [[f32; NR]; MR],
) {
    accumulate::<T, true, 1>(kp, a, a_stride, [b], acc.as_mut_ptr().cast(), NR)
}

/// `c[mr x nr] += a · b` over `kp` K pairs (a multiple of [`STEP`]): a whole 32 x 32 tile of C
/// accumulates in the tiles where it is (no copy, no second pass), a partial one through a
/// buffer.
///
/// # Safety
/// See [`product_on`]; `a` and `b` hold `kp * MR` and `kp * NR` pairs; see [`store`] for `c`.
#[inline(always)]
unsafe fn kernel_on<T: Tiles + Default>(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    debug_assert!(a.len() >= kp * MR && b.len() >= kp * NR);
    if mr == MR && nr == NR {
        accumulate::<T, false, 1>(kp, a.as_ptr(), kp, [b.as_ptr()], c, ldc);
    } else {
        let mut acc = TileBlock::default();
        product_on::<T>(kp, a.as_ptr(), kp, b.as_ptr(), &mut acc);
        store(&acc, c, ldc, mr, nr)
    }
}

/// The micro-kernel on the CPU's tiles.
///
/// # Safety
/// The CPU must have AMX-BF16 and the process the permission to use it ([`crate::cpu`] asks for
/// it when it detects the level); see [`kernel_on`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn kernel_amx(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    kernel_on::<Hardware>(kp, a, b, c, ldc, mr, nr)
}

/// The micro-kernel on [`Model`] tiles (any CPU).
#[cfg(test)]
///
/// # Safety
/// See [`kernel_on`].
pub(crate) unsafe fn kernel_model(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    kernel_on::<Model>(kp, a, b, c, ldc, mr, nr)
}

/// Whether the AMX path gives the f32 kernels' result on this CPU (checked once, only where
/// the level was detected).
pub(crate) fn amx_kernel_verified() -> bool {
    static VERIFIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERIFIED.get_or_init(|| bf16_agrees_with_f32::<AmxPairs, MR, NR>(kernel_amx))
}

/// The tile registers through inline assembly.
#[derive(Default)]
pub(crate) struct Hardware;

thread_local! {
    /// Whether this thread's tiles hold [`Hardware::configure`]'s configuration.
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Tiles for Hardware {
    /// Configures the tiles once per thread and leaves them configured (the operating system
    /// saves and restores them with the thread): an `ldtilecfg` and a `tilerelease` around
    /// every product cost more than the product itself for attention's small ones.
    unsafe fn configure(&mut self) {
        if CONFIGURED.get() {
            return;
        }
        let mut config = [0u8; 64];
        config[0] = 1;
        for tile in 0..8 {
            config[16 + 2 * tile] = 64;
            config[48 + tile] = ROWS as u8;
        }
        std::arch::asm!("ldtilecfg [{0}]", in(reg) config.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(true);
    }

    unsafe fn zero<const T: usize>(&mut self) {
        std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem));
    }

    unsafe fn load<const T: usize>(&mut self, src: *const u32, stride: usize) {
        std::arch::asm!(
            "tileloadd tmm{t}, [{src} + {stride}*1]",
            t = const T,
            src = in(reg) src,
            stride = in(reg) stride,
            options(nostack, readonly),
        );
    }

    unsafe fn dot<const C: usize, const A: usize, const B: usize>(&mut self) {
        std::arch::asm!(
            "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem),
        );
    }

    unsafe fn store<const T: usize>(&mut self, dst: *mut f32, stride: usize) {
        std::arch::asm!(
            "tilestored [{dst} + {stride}*1], tmm{t}",
            t = const T,
            dst = in(reg) dst,
            stride = in(reg) stride,
            options(nostack),
        );
    }
}

/// Eight tiles of 16 rows x 16 lanes of 32 bits, and what the instructions do to them.
#[cfg(test)]
pub(crate) struct Model {
    tiles: [[[u32; 16]; ROWS]; 8],
    configured: bool,
}

#[cfg(test)]
impl Default for Model {
    fn default() -> Self {
        Self {
            tiles: [[[0; 16]; ROWS]; 8],
            configured: false,
        }
    }
}

/// A bf16 as f32, with denormals flushed to zero as `tdpbf16ps` reads them.
#[cfg(test)]
fn bf16_operand(bits: u32) -> f32 {
    let value = f32::from_bits((bits & 0xffff) << 16);
    if value.is_subnormal() {
        0.0f32.copysign(value)
    } else {
        value
    }
}

/// An f32 result with denormals flushed to zero, as `tdpbf16ps` writes them.
#[cfg(test)]
fn flush(value: f32) -> f32 {
    if value.is_subnormal() {
        0.0f32.copysign(value)
    } else {
        value
    }
}

#[cfg(test)]
impl Tiles for Model {
    unsafe fn configure(&mut self) {
        self.configured = true;
    }

    unsafe fn zero<const T: usize>(&mut self) {
        assert!(self.configured, "tilezero before ldtilecfg");
        self.tiles[T] = [[0; 16]; ROWS];
    }

    unsafe fn load<const T: usize>(&mut self, src: *const u32, stride: usize) {
        assert!(self.configured, "tileloadd before ldtilecfg");
        assert_eq!(stride % 4, 0, "the kernels' strides are whole lanes");
        for (row, lanes) in self.tiles[T].iter_mut().enumerate() {
            let line = src.cast::<u8>().add(row * stride).cast::<u32>();
            for (lane, value) in lanes.iter_mut().enumerate() {
                *value = line.add(lane).read_unaligned();
            }
        }
    }

    /// Intel's pseudo-code: for each row m and column n of C, over the 16 K pairs k,
    /// `c += a[m][k].lo * b[k][n].lo`, then `c += a[m][k].hi * b[k][n].hi`, each product and sum
    /// rounded to f32 (no fused multiply-add), denormals flushed.
    unsafe fn dot<const C: usize, const A: usize, const B: usize>(&mut self) {
        let (a, b) = (self.tiles[A], self.tiles[B]);
        for (m, row) in self.tiles[C].iter_mut().enumerate() {
            for (n, lane) in row.iter_mut().enumerate() {
                let mut acc = f32::from_bits(*lane);
                for k in 0..STEP {
                    let (x, y) = (a[m][k], b[k][n]);
                    acc = flush(acc + bf16_operand(x) * bf16_operand(y));
                    acc = flush(acc + bf16_operand(x >> 16) * bf16_operand(y >> 16));
                }
                *lane = acc.to_bits();
            }
        }
    }

    unsafe fn store<const T: usize>(&mut self, dst: *mut f32, stride: usize) {
        for (row, lanes) in self.tiles[T].iter().enumerate() {
            let line = dst.cast::<u8>().add(row * stride).cast::<u32>();
            for (lane, value) in lanes.iter().enumerate() {
                line.add(lane).write_unaligned(*value);
            }
        }
    }
}

/// The AMX packing: bf16 pairs along K, the depth padded to a multiple of [`STEP`] pairs; A
/// row-major within a panel (`[panel][MR][depth]`), B as [`super::Bf16Pairs`] packs it.
pub(crate) struct AmxPairs;

impl Packing for AmxPairs {
    type Elem = u32;
    /// Deeper than the dot-product kernels' blocks: every block costs a load and a store of the
    /// C tiles, and A and B panels of 1,024 pairs stay in L2 (2,048 measured fastest on Intel,
    /// against 512, 1,024 and 4,096).
    const BLOCK: usize = 2048;

    fn depth(kc: usize) -> usize {
        kc.div_ceil(2).next_multiple_of(STEP)
    }

    fn pack_a(width: usize, a: &dyn Operand, pc: usize, kc: usize, out: &mut [u32]) {
        use rayon::prelude::*;
        let depth = Self::depth(kc);
        out[..a.rows().div_ceil(width) * width * depth]
            .par_chunks_mut(depth)
            .enumerate()
            .for_each_init(
                || vec![0f32; 2 * depth],
                |line, (row, dst)| {
                    if row < a.rows() {
                        a.read_row_pairs(row, pc, kc, line, dst);
                    } else {
                        dst.fill(0);
                    }
                },
            );
    }

    fn read_b(b: &dyn Operand, pc: usize, kc: usize, p: usize, jc: usize, out: &mut [u32]) {
        if 2 * p < kc {
            b.read_pairs(pc + 2 * p, 2 * p + 1 < kc, jc, out);
        } else {
            out.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{run, Strided, Values};
    use super::*;

    /// A product on the model tiles against the f32 kernels, over shapes that cover partial
    /// tiles, whole tiles accumulated in place, an odd K, K beyond one depth block, and column
    /// counts on both driver paths.
    #[test]
    fn the_tile_kernel_on_model_tiles_matches_the_f32_kernels() {
        matches_the_f32_kernels(kernel_model);
    }

    /// The same on the CPU's tiles, where this CPU has them.
    #[test]
    fn the_tile_kernel_on_hardware_matches_the_f32_kernels() {
        if crate::cpu::detected() == crate::cpu::Level::Amx {
            matches_the_f32_kernels(kernel_amx);
        } else {
            eprintln!("skipped: this CPU has no usable AMX-BF16 tiles");
        }
    }

    fn matches_the_f32_kernels(kernel: super::super::Kernel<u32, MR, NR>) {
        let value = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 8.0;
        for (m, k, n) in [
            (1, 1, 1),
            (16, 32, 16),
            (32, 32, 32),
            (33, 31, 47),
            (7, 600, 5),
            (40, 513, 70),
            (64, 1100, 96),
            (64, 64, 4200),
        ] {
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
            let (a, b) = (Strided::row_major(&a, m, k), Strided::row_major(&b, k, n));
            let mut want = vec![1f32; m * n];
            run::<Values, 4, 8>(&a, &b, &mut want, n, super::super::kernel_plain::<4, 8>);
            let mut got = vec![1f32; m * n];
            run::<AmxPairs, MR, NR>(&a, &b, &mut got, n, kernel);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{m}x{k}x{n} at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// Operands are rounded to bf16 (1 + 2^-10 becomes 1) and products of pairs accumulate.
    #[test]
    fn model_tiles_round_operands_to_bf16() {
        let (m, k, n) = (3, 40, 5);
        let a = vec![1.0 + 2f32.powi(-10); m * k];
        let b = vec![1.0f32; k * n];
        let (a, b) = (Strided::row_major(&a, m, k), Strided::row_major(&b, k, n));
        let mut c = vec![0f32; m * n];
        run::<AmxPairs, MR, NR>(&a, &b, &mut c, n, kernel_model);
        assert!(c.iter().all(|&v| v == k as f32), "{c:?}");
    }

    #[test]
    fn denormal_operands_read_as_zero() {
        assert_eq!(bf16_operand(0x0001), 0.0);
        assert_eq!(bf16_operand(0x3f80), 1.0);
        assert_eq!(bf16_operand(0x3f80_0000 >> 16), 1.0);
        assert_eq!(flush(f32::MIN_POSITIVE / 2.0), 0.0);
    }
}
