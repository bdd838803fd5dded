//! The AMX kernel of the integer GEMM (Intel Advanced Matrix Extensions, Sapphire Rapids and
//! later): `tdpbusd` multiplies a 16 x 64 u8 tile by a 64 x 16 s8 tile into a 16 x 16 i32 tile,
//! 16 384 multiply-adds per instruction against 1 024 for sixteen `vpdpbusd`.
//!
//! B is read straight from [`PackedQB`](super::PackedQB)'s panels: a panel row `[NR][4]` (one K
//! quad of 32 columns, 128 bytes) is two 64-byte tile rows, so a B tile is 16 consecutive quads
//! of one half panel at a 128-byte stride. The panels are padded to a multiple of 64 in K when
//! this kernel is available ([`K_STEP`]). A is copied into blocks of [`MA`] rows at the padded
//! K (the copy also flips i8 to u8 and sums the rows, as the VNNI path's packing does).
//!
//! Linux keeps the 8 KiB tile state off until a process asks for it (`arch_prctl
//! ARCH_REQ_XCOMP_PERM`); [`available`] asks once. Tile registers belong to the thread: each
//! block loads its configuration and releases the tiles when it is done, so no tile state is
//! live outside this module's calls.

use std::sync::OnceLock;

/// Rows of A per block (two tiles of 16).
pub(super) const MA: usize = 32;
/// K bytes per tile row; B panels are padded to a multiple of this when AMX runs.
pub(super) const K_STEP: usize = 64;

/// Whether the CPU has AMX-INT8 and the OS granted this process the tile state.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    if std::env::var_os("KILN_NO_AMX").is_some() {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (tile, int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
    // AVX-512 is needed for the epilogue; xgetbv needs OSXSAVE (cpuid 1, ecx bit 27).
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if !(tile && int8 && osxsave && super::has_vnni()) {
        return false;
    }
    // SAFETY: OSXSAVE is set, so xgetbv(0) is allowed. Bits 17 and 18: XTILECFG and XTILEDATA
    // enabled by the OS.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave
    // features; it reads and writes no memory of ours.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0;
    if !granted {
        tracing::debug!("AMX present but the kernel refused the tile state; integer GEMM uses VNNI");
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tile configuration: palette 1, tiles 0-7 all 16 rows of 64 bytes (C tiles: 16 x 16 i32,
/// A tiles: 16 x 64 u8, B tiles: 16 quads x 16 columns x 4 s8).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn uniform() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        Config(c)
    }
}

/// The tile registers configured for [`Tiles::panel_product`] on this thread (tile state is per
/// thread, so this is neither `Send` nor `Sync`); released on drop.
pub(super) struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Loads the tile configuration.
    ///
    /// # Safety
    /// The CPU must have AMX-INT8 with the tile state granted ([`available`]).
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn configure() -> Tiles {
        let cfg = Config::uniform();
        // SAFETY: the tile state is granted (caller); ldtilecfg reads the 64-byte config.
        unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Tiles(std::marker::PhantomData)
    }

    /// `acc = A_block · B_panel` for one panel: `a` is [`MA`] rows of `kq` bytes (rows past
    /// `rows` may hold anything), `panel` is `[kq/4][32][4]` bytes, `acc` receives `[MA][32]` i32
    /// (rows past `rows` are left as they were when `rows <= 16`, undefined otherwise). `kq` is a
    /// positive multiple of [`K_STEP`].
    #[cfg(target_arch = "x86_64")]
    pub(super) fn panel_product(&self, a: &[u8], kq: usize, rows: usize, panel: &[i8], acc: &mut [i32; MA * 32]) {
        use std::arch::asm;
        assert!(kq > 0 && kq.is_multiple_of(K_STEP) && a.len() >= MA * kq && panel.len() >= kq * 32);
        assert!(rows > 0 && rows <= MA);
        let steps = kq / K_STEP;
        let (ap, bp, cp) = (a.as_ptr(), panel.as_ptr(), acc.as_mut_ptr());
        // SAFETY: `self` proves the tiles are configured (16 rows of 64 bytes each). Every tile
        // load reads 16 rows of 64 bytes: A rows 0..32 at stride kq from column 64*s < kq
        // (inside `a`, asserted), B quads 16*s..16*s+16 of one half panel at stride 128 (inside
        // `panel`, asserted). The stores write 16 rows of 64 bytes at stride 128 into `acc`
        // (32 x 32 i32 = 32 rows of 128 bytes).
        unsafe {
            if rows > 16 {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "2:",
                    "tileloadd tmm4, [{a} + {lda}*1]",
                    "tileloadd tmm6, [{b} + {ldb}*1]",
                    "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a2} + {lda}*1]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    "tdpbusd tmm3, tmm5, tmm7",
                    "add {a}, 64",
                    "add {a2}, 64",
                    "add {b}, 2048",
                    "dec {n}",
                    "jnz 2b",
                    "tilestored [{c} + {ldb}*1], tmm0",
                    "tilestored [{c} + {ldb}*1 + 64], tmm1",
                    "tilestored [{c2} + {ldb}*1], tmm2",
                    "tilestored [{c2} + {ldb}*1 + 64], tmm3",
                    a = inout(reg) ap => _,
                    a2 = inout(reg) ap.add(16 * kq) => _,
                    b = inout(reg) bp => _,
                    n = inout(reg) steps => _,
                    lda = in(reg) kq,
                    ldb = in(reg) 128usize,
                    c = in(reg) cp,
                    c2 = in(reg) cp.add(16 * 32),
                    options(nostack),
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "2:",
                    "tileloadd tmm4, [{a} + {lda}*1]",
                    "tileloadd tmm6, [{b} + {ldb}*1]",
                    "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "add {a}, 64",
                    "add {b}, 2048",
                    "dec {n}",
                    "jnz 2b",
                    "tilestored [{c} + {ldb}*1], tmm0",
                    "tilestored [{c} + {ldb}*1 + 64], tmm1",
                    a = inout(reg) ap => _,
                    b = inout(reg) bp => _,
                    n = inout(reg) steps => _,
                    lda = in(reg) kq,
                    ldb = in(reg) 128usize,
                    c = in(reg) cp,
                    options(nostack),
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure`; tilerelease returns them to the
        // init state.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}
