//! x86-64 level detection: AVX2+FMA, AVX-512F, AVX512-BF16 (with AVX512BW for its loads), and
//! AMX-BF16 tiles where the operating system lets this process use them.

use super::Level;

/// The best level of this CPU.
pub(super) fn detect() -> Level {
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    let avx512 = avx2 && std::is_x86_feature_detected!("avx512f");
    let bf16 = avx512
        && std::is_x86_feature_detected!("avx512bf16")
        && std::is_x86_feature_detected!("avx512bw");
    if bf16 && amx_usable() {
        Level::Amx
    } else if bf16 {
        Level::Avx512Bf16
    } else if avx512 {
        Level::Avx512
    } else if avx2 {
        Level::Avx2
    } else {
        Level::Portable
    }
}

/// CPUID.(EAX=7, ECX=0):EDX bits of AMX-BF16 and AMX-TILE.
const AMX_BF16: u32 = 1 << 22;
const AMX_TILE: u32 = 1 << 24;
/// XCR0 bits of the tile configuration and tile data state.
const XTILE_STATE: u64 = (1 << 17) | (1 << 18);

/// Whether the CPU has AMX-BF16 tiles, the OS enables their state, and this process may use them.
fn amx_usable() -> bool {
    // SAFETY: CPUID leaves 0, 1 and 7 exist on every x86-64 CPU (leaf 7 is checked against the
    // highest leaf); XGETBV is only executed when CPUID says the OS enabled it (OSXSAVE).
    let (cpu, os) = unsafe {
        use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
        if __cpuid(0).eax < 7 {
            return false;
        }
        let cpu = __cpuid_count(7, 0).edx & (AMX_BF16 | AMX_TILE) == AMX_BF16 | AMX_TILE;
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        let os = cpu && osxsave && _xgetbv(0) & XTILE_STATE == XTILE_STATE;
        (cpu, os)
    };
    cpu && os && tile_permission()
}

/// Asks Linux for the tile data state, once per process, before any tile instruction runs
/// (without it the first one ends the process with SIGILL).
#[cfg(target_os = "linux")]
fn tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// Other systems: AMX is not used (Windows grants tiles without a request, but sdrs has not
/// been checked there; macOS has no AMX CPU).
#[cfg(not(target_os = "linux"))]
fn tile_permission() -> bool {
    false
}
