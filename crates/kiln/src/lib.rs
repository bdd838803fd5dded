//! Kiln: load an ONNX model, optimize it, run it.
//!
//! ```no_run
//! use kiln::{Device, Level, Session, TensorData};
//! # fn main() -> Result<(), kiln::Error> {
//! let session = Session::builder()
//!     .device(Device::Cpu)
//!     .optimization(Level::Basic)
//!     .build_from_file("model.onnx")?;
//! let x = TensorData::from_values("x", vec![1, 4], &[1.0f32, 2.0, 3.0, 4.0])?;
//! let outputs = session.run(vec![("x".to_string(), x)])?;
//! println!("{:?}", outputs[0].dims);
//! # Ok(()) }
//! ```
//!
//! A [`Session`] is `Send + Sync`; `run(&self, ..)` may be called from many threads at once.

mod calibrate;
mod error;
pub mod quantize;
mod session;

pub use error::{Error, Result};
pub use kiln_graph::passes::Report as OptimizationReport;
pub use kiln_graph::{DType, Dim, Element, Shape, TensorData};
pub use kiln_onnx::LoadLimits;
pub use kiln_runtime::{
    flush_denormals, num_threads, set_flush_denormals, set_num_threads, Device, DeviceMemoryStats, HostFallback,
    OpTime, RunOptions, RunStats,
};
pub use session::{optimize_model, IoInfo, Level, Precision, Session, SessionBuilder, WIDEN_F16_RULE};
// fp16 mode (docs/precision.md).
pub use kiln_graph::passes::float16::Float16Report;
pub use session::convert_model_to_float16;

/// Paged KV-cache attention for LLM serving: the model rewrite ([`SessionBuilder::paged_attention`])
/// and the cache a run reads and writes ([`RunOptions::paged_kv`]).
pub mod paged {
    pub use kiln_graph::passes::paged_attention::{PagedRewrite, PagedRewriteOptions, LOGITS_INDICES};
    /// Vectorized `exp` over a slice (softmax over a vocabulary when sampling).
    pub use kiln_runtime::exp_in_place;
    pub use kiln_runtime::{KvDType, PagedKvCache, PagedKvConfig, PagedKvError, PagedSeq, PagedStep};
}

/// Lower-level pieces for tools (CLI, server, conformance runner).
pub mod internals {
    pub use kiln_graph as graph;
    pub use kiln_onnx as onnx;
    pub use kiln_runtime as runtime;
}
