//! The CPU thread count. candle sizes its thread pools (the gemm rayon pool and the barrier pool
//! its element-wise kernels use) from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` when it first
//! runs an op, so Kiln sets both, plus rayon's global pool (Kiln's own parallel kernels).

use crate::{Result, RuntimeError};

/// Sets how many CPU threads kernels use, process-wide. Call it once, before the first session
/// runs: candle reads the count when it starts its pools and keeps them for the process.
pub fn set_num_threads(n: usize) -> Result<()> {
    let n = n.max(1);
    // Safe in edition 2021; this runs before any kernel thread reads the environment.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| RuntimeError::msg(format!("cannot set the thread count to {n}: {e}")))
}

/// The thread count candle's kernels use now.
pub fn num_threads() -> usize {
    candle_core::utils::get_num_threads()
}
