//! aarch64 micro-kernels. The aarch64 BF16 kernel (FEAT_BF16). `BFDOT` has the pair semantics of `vdpbf16ps`: each f32
//! lane adds the products of two neighbouring bf16, so it reads the same packed pairs.

use super::*;
use std::arch::aarch64::*;
use std::arch::asm;

/// 8 rows x 12 columns: 24 accumulators, 2 A and 3 B registers of the 32.
pub const MR: usize = 8;
pub const NR: usize = 12;

/// Whether the NEON BF16 path gives the f32 kernels' result on this CPU (checked once).
pub fn bf16_kernel_verified() -> bool {
    static VERIFIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERIFIED.get_or_init(|| bf16_agrees_with_f32::<Bf16Pairs, MR, NR>(kernel_bf16))
}

/// `acc.4s += b.8h · a.2h[LANE]` (BFDOT by element): four columns, one row's K pair.
/// Written as assembly: the BF16 intrinsics are not stable Rust.
macro_rules! bfdot {
    ($acc:expr, $b:expr, $a:expr, $lane:literal) => {
        asm!(
            concat!("bfdot {acc:v}.4s, {b:v}.8h, {a:v}.2h[", $lane, "]"),
            acc = inout(vreg) $acc,
            b = in(vreg) $b,
            a = in(vreg) $a,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
}

/// `c[8 x 12] += a · b` over `kp` K pairs with `BFDOT`.
///
/// # Safety
/// The CPU must have FEAT_BF16; see [`store`] for `c`.
#[target_feature(enable = "neon,bf16")]
pub unsafe fn kernel_bf16(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    let mut acc = [[vdupq_n_f32(0.0); 3]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kp) {
        let (a0, a1) = (vld1q_u32(ap.as_ptr()), vld1q_u32(ap.as_ptr().add(4)));
        let bv = [
            vld1q_u32(bp.as_ptr()),
            vld1q_u32(bp.as_ptr().add(4)),
            vld1q_u32(bp.as_ptr().add(8)),
        ];
        for (j, b) in bv.into_iter().enumerate() {
            bfdot!(acc[0][j], b, a0, "0");
            bfdot!(acc[1][j], b, a0, "1");
            bfdot!(acc[2][j], b, a0, "2");
            bfdot!(acc[3][j], b, a0, "3");
            bfdot!(acc[4][j], b, a1, "0");
            bfdot!(acc[5][j], b, a1, "1");
            bfdot!(acc[6][j], b, a1, "2");
            bfdot!(acc[7][j], b, a1, "3");
        }
    }
    let mut tile = [[0f32; NR]; MR];
    for (row, sums) in tile.iter_mut().zip(&acc) {
        for (j, sum) in sums.iter().enumerate() {
            vst1q_f32(row.as_mut_ptr().add(4 * j), *sum);
        }
    }
    store(&tile, c, ldc, mr, nr)
}
