//! Kiln's executor: compiles a Kiln IR graph into an [`ExecutionPlan`] (topological order, one
//! kernel per node, value slots freed at their last use) and runs it on a candle device.

mod cuda_kernels;
mod denormals;
mod device;
pub mod device_memory;
mod error;
mod executor;
mod fastmath;
mod fold;
pub mod ops;
pub mod paged_kv;
pub mod placement;
mod plan;
pub mod qgemm;
pub mod sgemm;
mod tensor;
mod threads;
mod value;

pub use cuda_kernels::fused_kernel_launches;
pub use denormals::{flush_denormals, set_flush_denormals};
pub use device::Device;
pub use device_memory::DeviceMemoryStats;
pub use error::{catch_panic, panic_message, Result, RuntimeError};
pub use executor::{host_fallback_count, OpTime, RunOptions, RunStats};
pub use fastmath::exp_in_place;
pub use fold::CpuConstEval;
pub use ops::{supported_ops, Registry};
pub use paged_kv::{KvDType, PagedKvCache, PagedKvConfig, PagedKvError, PagedSeq, PagedStep};
pub use plan::{ExecutionPlan, HostFallback, PlanMemory, PlanOptions};
pub use tensor::{storage_dtype, Tensor};
pub use threads::{num_threads, set_num_threads};
pub use value::Value;
