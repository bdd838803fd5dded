//! Operator family `attention`: Attention (opset 23+), RotaryEmbedding, Swish, SwiGLU, LinearAttention,
//! ONNX Runtime's `com.microsoft::GroupQueryAttention` and Kiln's `ai.kiln::PagedAttention`.
//!
//! Everything runs on whole candle tensors. Half-precision inputs are computed in f32 and cast back.
//! One file per concern: the ONNX Attention op and its general path (`onnx_attention`), the route it
//! takes on CUDA (`cuda_route`), the fused f32 CPU path (`fused_cpu`), RotaryEmbedding (`rotary`),
//! LinearAttention (`linear`), the Swish/SwiGLU activations (`swish`), GroupQueryAttention
//! (`gqa`) and PagedAttention over the LLM engine's paged KV cache (`paged`).

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;

use super::Registry;
use crate::{bail, Result, Tensor};

mod cuda_route;
mod fused_cpu;
mod gqa;
mod linear;
mod onnx_attention;
mod paged;
mod rotary;
mod swish;

// The CUDA kernel tests run both routes (`cuda_kernels/tests.rs`).
#[cfg_attr(not(all(test, feature = "cuda")), allow(unused_imports))]
pub(crate) use cuda_route::{with_cuda_attention_route, CudaAttentionRoute};

pub fn register(r: &mut Registry) {
    r.add("Attention", onnx_attention::attention);
    r.add("RotaryEmbedding", rotary::rotary);
    r.add("LinearAttention", linear::linear_attention);
    r.add("Swish", swish::swish_op);
    r.add("SwiGLU", swish::swiglu_op);
    r.add_domain("com.microsoft", "GroupQueryAttention", gqa::group_query_attention);
    paged::register(r);
}

/// Converts a float tensor to the dtype used for computing (f32, or f64 for f64 inputs).
fn to_compute(t: &Tensor) -> Result<(CT, DType)> {
    let dt = t.dtype();
    let c = match dt {
        DType::F32 | DType::F64 => t.candle().clone(),
        DType::F16 | DType::BF16 => t.candle().to_dtype(CDType::F32)?,
        other => bail!("expected a float tensor, found {other}"),
    };
    Ok((c, dt))
}

/// Casts a computed tensor back to the node's dtype `dt`.
fn from_compute(c: CT, dt: DType) -> Result<Tensor> {
    Tensor::new(c.to_dtype(crate::tensor::storage_dtype(dt)?)?, dt)
}
