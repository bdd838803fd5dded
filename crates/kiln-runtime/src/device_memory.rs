//! Device memory for CUDA sessions: a caching, stream-ordered pool under every allocation, its
//! statistics, and an optional limit.
//!
//! candle allocates device memory through cudarc's `CudaStream::alloc`, which uses the driver's
//! stream-ordered allocator (`cuMemAllocAsync`) on the device's *current memory pool*. Kiln gives each
//! device it runs on its own pool (`cuMemPoolCreate`) and makes it the current one, so every tensor
//! of every session on that device comes from it:
//! - caching: the release threshold is set to "never", so freed blocks stay reserved in the pool and
//!   are handed out again without a driver allocation (the size classes, block splitting and
//!   coalescing are the driver's);
//! - stream-ordered reuse: a block freed on a stream is reused by later work on that stream with no
//!   synchronization;
//! - a limit: the pool's `maxSize`; an allocation past it fails with `CUDA_ERROR_OUT_OF_MEMORY`,
//!   which the run reports as [`crate::RuntimeError::DeviceOutOfMemory`]; the failed run's tensors go
//!   back to the pool, so the session keeps serving;
//! - statistics: reserved and used bytes, current and peak (`cuMemPoolGetAttribute`).
//!
//! The pool is per device and per process (the driver keeps one current pool per device), so the
//! first session to open a device fixes its limit; a later session asking for another limit gets an
//! error. The plan's slot release (each value freed after its last reader) applies on the GPU as on
//! the CPU; the pool is what turns those frees into reuse.
//!
//! Not exercised on a GPU yet (no device in the session that wrote it): built and type-checked
//! with `--features cuda` only.

use crate::Result;

/// A device pool's state, from the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemoryStats {
    /// Bytes the pool holds from the device (in use or cached for reuse).
    pub reserved_bytes: u64,
    /// The most bytes the pool has held.
    pub reserved_peak_bytes: u64,
    /// Bytes handed out to live tensors.
    pub allocated_bytes: u64,
    /// The most bytes handed out at once.
    pub allocated_peak_bytes: u64,
    /// The pool's limit, when one was set.
    pub limit_bytes: Option<u64>,
}

impl DeviceMemoryStats {
    /// Share of the reserved bytes not in use: cached blocks and their fragments (0 when nothing is
    /// reserved).
    pub fn fragmentation(&self) -> f64 {
        if self.reserved_bytes == 0 {
            0.0
        } else {
            1.0 - self.allocated_bytes.min(self.reserved_bytes) as f64 / self.reserved_bytes as f64
        }
    }
}

/// Puts Kiln's caching pool (with `limit_bytes`, if any) under every allocation on `device`, once
/// per process and device. A no-op on the CPU.
pub fn configure_pool(device: &candle_core::Device, limit_bytes: Option<u64>) -> Result<()> {
    imp::configure(device, limit_bytes)
}

/// The current pool statistics of a CUDA device; `None` on the CPU.
pub fn pool_stats(device: &candle_core::Device) -> Result<Option<DeviceMemoryStats>> {
    imp::stats(device)
}

/// Whether a candle error is the device running out of memory.
pub(crate) fn is_out_of_memory(message: &str) -> bool {
    message.contains("CUDA_ERROR_OUT_OF_MEMORY") || message.contains("out of memory")
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::DeviceMemoryStats;
    use crate::Result;

    pub fn configure(_device: &candle_core::Device, _limit: Option<u64>) -> Result<()> {
        Ok(())
    }

    pub fn stats(_device: &candle_core::Device) -> Result<Option<DeviceMemoryStats>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::{result, sys, DriverError};

    use super::DeviceMemoryStats;
    use crate::{Result, RuntimeError};

    /// The pool Kiln created for a device, and its limit.
    struct Pool {
        handle: sys::CUmemoryPool,
        limit: Option<u64>,
    }
    // SAFETY: a CUmemoryPool is a process-wide driver handle, valid from any thread.
    unsafe impl Send for Pool {}

    fn pools() -> &'static Mutex<BTreeMap<usize, Pool>> {
        static POOLS: OnceLock<Mutex<BTreeMap<usize, Pool>>> = OnceLock::new();
        POOLS.get_or_init(|| Mutex::new(BTreeMap::new()))
    }

    fn driver(ordinal: usize, what: &str, e: DriverError) -> RuntimeError {
        RuntimeError::Device(format!("cuda:{ordinal}: {what}: {e:?}"))
    }

    pub fn configure(device: &candle_core::Device, limit: Option<u64>) -> Result<()> {
        let candle_core::Device::Cuda(cd) = device else {
            return Ok(());
        };
        let stream = cd.cuda_stream();
        let ctx = stream.context();
        let ordinal = ctx.ordinal();
        let mut pools = pools()
            .lock()
            .map_err(|_| RuntimeError::Device("device pool registry poisoned".into()))?;
        if let Some(p) = pools.get(&ordinal) {
            if p.limit != limit {
                return Err(RuntimeError::Device(format!(
                    "cuda:{ordinal}: the device memory pool already has limit {:?} bytes; one limit per device and process",
                    p.limit
                )));
            }
            return Ok(());
        }
        ctx.bind_to_thread().map_err(|e| driver(ordinal, "bind context", e))?;
        // SAFETY: zero is a valid bit pattern for this plain C struct; the fields that matter are set below.
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.location = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal as i32,
        };
        // 0 = no limit beyond the device's memory.
        props.maxSize = limit.map_or(0, |l| l as usize);
        // SAFETY: props is a valid, fully initialized CUmemPoolProps.
        let handle = unsafe { result::mem_pool::create(&props) }.map_err(|e| driver(ordinal, "create pool", e))?;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the release threshold attribute is a cuuint64_t; the pool was just created.
        unsafe {
            result::mem_pool::set_attribute(
                handle,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .map_err(|e| driver(ordinal, "set release threshold", e))?;
        // SAFETY: the device handle comes from candle's live context, the pool is valid.
        unsafe { result::device::set_mem_pool(ctx.cu_device(), handle) }
            .map_err(|e| driver(ordinal, "set current pool", e))?;
        pools.insert(ordinal, Pool { handle, limit });
        Ok(())
    }

    pub fn stats(device: &candle_core::Device) -> Result<Option<DeviceMemoryStats>> {
        let candle_core::Device::Cuda(cd) = device else {
            return Ok(None);
        };
        let stream = cd.cuda_stream();
        let ctx = stream.context();
        let ordinal = ctx.ordinal();
        // SAFETY: the device handle comes from candle's live context.
        let pool =
            unsafe { result::device::get_mem_pool(ctx.cu_device()) }.map_err(|e| driver(ordinal, "current pool", e))?;
        let get = |attr: sys::CUmemPool_attribute| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: the four attributes read here are cuuint64_t; the pool is the device's current one.
            unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
                .map_err(|e| driver(ordinal, "pool attribute", e))?;
            Ok(v)
        };
        use sys::CUmemPool_attribute as A;
        let limit = pools()
            .lock()
            .ok()
            .and_then(|p| p.get(&ordinal).filter(|p| p.handle == pool).and_then(|p| p.limit));
        Ok(Some(DeviceMemoryStats {
            reserved_bytes: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_peak_bytes: get(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            allocated_bytes: get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            allocated_peak_bytes: get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            limit_bytes: limit,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragmentation_is_the_unused_share_of_reserved_bytes() {
        let s = DeviceMemoryStats {
            reserved_bytes: 1000,
            allocated_bytes: 250,
            ..Default::default()
        };
        assert!((s.fragmentation() - 0.75).abs() < 1e-12);
        assert_eq!(DeviceMemoryStats::default().fragmentation(), 0.0);
    }

    #[test]
    fn cpu_has_no_pool() {
        configure_pool(&candle_core::Device::Cpu, Some(1 << 20)).expect("no-op");
        assert_eq!(pool_stats(&candle_core::Device::Cpu).expect("ok"), None);
    }

    /// On a GPU (skipped with a reason elsewhere): a 256 MiB pool refuses a 512 MiB tensor with an
    /// out-of-memory error, keeps working afterwards, and reports what it holds.
    #[cfg(feature = "cuda")]
    #[test]
    fn pool_limit_refuses_then_recovers_on_a_gpu() {
        let dev = match candle_core::Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: no CUDA device ({e})");
                return;
            }
        };
        let limit = 256u64 << 20;
        configure_pool(&dev, Some(limit)).expect("pool");
        let big = candle_core::Tensor::zeros((128usize << 20,), candle_core::DType::F32, &dev);
        let err = big.expect_err("512 MiB must not fit a 256 MiB pool");
        assert!(is_out_of_memory(&crate::error::candle_message(&err)), "{err}");
        let small = candle_core::Tensor::ones((16usize << 20,), candle_core::DType::F32, &dev).expect("64 MiB fits");
        let sum = small.sum_all().and_then(|t| t.to_scalar::<f32>()).expect("sum");
        assert_eq!(sum, (16u64 << 20) as f32);
        let s = pool_stats(&dev).expect("stats").expect("a CUDA pool");
        assert_eq!(s.limit_bytes, Some(limit));
        assert!(s.allocated_bytes >= 64 << 20 && s.reserved_bytes <= limit, "{s:?}");
        assert!(
            configure_pool(&dev, Some(limit / 2)).is_err(),
            "a second limit must be refused"
        );
    }

    #[test]
    fn out_of_memory_messages_are_recognized() {
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(!is_out_of_memory("shape mismatch"));
    }
}
