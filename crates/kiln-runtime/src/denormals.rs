//! Subnormal floats on the CPU threads that run kernels.
//!
//! An x86 core that reads or writes a subnormal f32 (magnitude below 1.18e-38) in SSE/AVX code
//! takes a microcode assist of a hundred cycles or more for that instruction. Real activations
//! reach that range: a sigmoid of a large negative input (a squeeze-excite gate) is about 1e-39,
//! and every GEMM that then reads the gated tensor slows down by its share of such values. On the
//! model zoo's EfficientNet-B0 with N(0, 1) input, 1 thread, `kiln bench` took 44-49 ms with
//! subnormals kept against 26 ms flushed (Xeon, 2026-12-05).
//!
//! So by default Kiln runs its kernels with flush-to-zero and denormals-are-zero set (MXCSR FTZ
//! and DAZ, as TensorFlow does for its kernels): a subnormal result becomes 0 and a subnormal
//! input reads as 0. That changes a value by less than 1.2e-38, far inside every tolerance Kiln
//! states. [`set_flush_denormals`]`(false)` keeps IEEE subnormals instead.
//!
//! The mode is a property of each thread. A run sets it on the thread that walks the plan for the
//! run's duration and restores that thread's previous mode afterwards; the workers of rayon's
//! global pool (where Kiln's parallel kernels run) are switched once, the first time a run needs
//! the process-wide mode there, and keep it. On other architectures this is a no-op.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The process-wide choice: flush subnormals (true, the default) or keep them.
static FLUSH: AtomicBool = AtomicBool::new(true);

/// The mode rayon's global pool workers are in: 0 unknown (never set), 1 flushing, 2 keeping.
static POOL_MODE: AtomicU8 = AtomicU8::new(0);

/// Chooses, process-wide, whether kernels treat subnormal floats as zero (the default) or keep
/// them (IEEE behaviour, slower when they occur). Takes effect at the next run.
pub fn set_flush_denormals(flush: bool) {
    FLUSH.store(flush, Ordering::Relaxed);
}

/// Whether kernels treat subnormal floats as zero (see [`set_flush_denormals`]).
pub fn flush_denormals() -> bool {
    FLUSH.load(Ordering::Relaxed)
}

/// The calling thread's mode, set for a run and restored when dropped.
pub(crate) struct RunMode {
    previous: Option<u32>,
}

impl RunMode {
    /// Puts the calling thread (and, the first time, rayon's global pool) in the process-wide mode.
    pub(crate) fn enter() -> RunMode {
        let flush = flush_denormals();
        let want = if flush { 1 } else { 2 };
        if POOL_MODE.load(Ordering::Acquire) != want {
            rayon::broadcast(|_| {
                arch::set(flush);
            });
            POOL_MODE.store(want, Ordering::Release);
        }
        RunMode {
            previous: arch::set(flush),
        }
    }
}

impl Drop for RunMode {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            arch::restore(previous);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod arch {
    /// MXCSR flush-to-zero (bit 15) and denormals-are-zero (bit 6).
    const FTZ_DAZ: u32 = 0x8040;

    fn read() -> u32 {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the 32-bit MXCSR register into the given, valid location.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
        csr
    }

    fn write(csr: u32) {
        // SAFETY: ldmxcsr loads MXCSR from a valid location; only the FTZ/DAZ bits of a value read
        // from the register itself differ, and those bits cannot raise an exception.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
    }

    /// Sets the calling thread's mode; returns the previous MXCSR when it changed.
    pub(super) fn set(flush: bool) -> Option<u32> {
        let csr = read();
        let next = if flush { csr | FTZ_DAZ } else { csr & !FTZ_DAZ };
        (next != csr).then(|| {
            write(next);
            csr
        })
    }

    pub(super) fn restore(csr: u32) {
        write(csr);
    }

    /// Whether the calling thread flushes subnormals (both bits set).
    #[cfg(test)]
    pub(super) fn flushing() -> bool {
        read() & FTZ_DAZ == FTZ_DAZ
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod arch {
    pub(super) fn set(_flush: bool) -> Option<u32> {
        None
    }

    pub(super) fn restore(_csr: u32) {}
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn a_run_flushes_subnormals_and_restores_the_callers_mode() {
        let tiny = std::hint::black_box(1.0e-39f32);
        assert!(tiny.is_subnormal());
        let before = arch::flushing();
        {
            let _mode = RunMode::enter();
            assert!(arch::flushing());
            // DAZ: the subnormal input reads as zero.
            assert_eq!(std::hint::black_box(tiny) * std::hint::black_box(1.0f32), 0.0);
            // FTZ: a subnormal result of normal inputs becomes zero.
            assert_eq!(std::hint::black_box(1.0e-20f32) * std::hint::black_box(1.0e-19f32), 0.0);
            // The pool's workers were switched too.
            let workers: Vec<bool> = rayon::broadcast(|_| arch::flushing());
            assert!(workers.iter().all(|&f| f), "{workers:?}");
        }
        assert_eq!(arch::flushing(), before);
        assert!((std::hint::black_box(tiny) * std::hint::black_box(1.0f32)).is_subnormal() || before);
    }
}
