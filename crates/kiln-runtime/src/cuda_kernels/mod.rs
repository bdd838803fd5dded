//! Kiln's fused CUDA kernels (`kernels/*.cu` at the workspace root, compiled to PTX by this
//! crate's build script with the `cuda` feature) and the entry points the operator kernels call.
//!
//! Every entry point takes candle tensors and returns `Ok(Some(result))` when it ran on the GPU,
//! `Ok(None)` when the case is not one of its kernels' (CPU tensors, another dtype, a shape or
//! option the kernel does not cover) so the caller takes its regular path, and `Err` for a real
//! failure (launch error, out of device memory). Without the `cuda` feature the same functions
//! exist and always return `Ok(None)`: call sites carry no `#[cfg]`.
//!
//! | entry point | kernels | used by |
//! |---|---|---|
//! | [`layer_norm`] | `layer_norm.cu` | LayerNormalization, RMSNormalization |
//! | [`bias_act`] | `bias_act.cu` | com.microsoft Gelu, BiasGelu, FastGelu |
//! | [`softmax`] | `softmax.cu` | Softmax (last axis, or opset < 13 flattened) |
//! | [`attention`] | `attention.cu` | Attention (4-D, from `attention_fusion`, or 3-D with heads) |
//! | [`int8_gemm`] | `int8_gemm.cu` | ai.kiln MatMulInt8Weight |

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor as CT;

use crate::Result;

#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(crate) use launch::{
    attention::attention, bias_act::bias_act, int8_gemm::int8_gemm, layer_norm::layer_norm, softmax::softmax,
};

#[cfg(not(feature = "cuda"))]
mod stand_in;
#[cfg(not(feature = "cuda"))]
pub(crate) use stand_in::{attention, bias_act, int8_gemm, layer_norm, softmax};

#[cfg(all(test, feature = "cuda"))]
mod tests;

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Fused CUDA kernel launches since the process started (tests use it to tell a fused-kernel run
/// from the generic candle path).
pub fn fused_kernel_launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn count_launch() {
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
}

/// The activation of [`bias_act`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    GeluErf,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `max(x, 0)`: no fused node maps to it yet (Conv + Relu has its own fusion); tested directly.
    #[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))]
    Relu,
}

/// Options of [`softmax`]: `x` is `[rows, cols]` (its last axis, or its trailing axes flattened)
/// with rows ordered `[batch, heads, seq]`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxSpec<'a> {
    /// Elements normalized together (the product of the trailing axes).
    pub cols: usize,
    pub heads: usize,
    pub seq: usize,
    /// Multiplies `x` before the mask is added.
    pub scale: f32,
    /// Additive bias broadcastable to `[batch, heads, seq, cols]`.
    pub mask: Option<&'a CT>,
    /// Keys `j > s + causal_offset` are masked.
    pub causal: bool,
    pub causal_offset: i64,
}

impl SoftmaxSpec<'_> {
    /// Plain softmax over groups of `cols` elements.
    pub fn plain(cols: usize) -> SoftmaxSpec<'static> {
        SoftmaxSpec {
            cols,
            heads: 1,
            seq: 1,
            scale: 1.0,
            mask: None,
            causal: false,
            causal_offset: 0,
        }
    }
}

/// Inputs and options of [`attention`]: Q `[B, Hq, S, D]`, K and V `[B, Hk, T, D]`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy)]
pub(crate) struct AttentionSpec<'a> {
    pub q: &'a CT,
    pub k: &'a CT,
    pub v: &'a CT,
    /// Additive (float) or boolean (true = attend) mask broadcastable to `[B, Hq, S, T]`; a last
    /// dimension shorter than T is padded with -inf as the ONNX reference does.
    pub mask: Option<&'a CT>,
    /// Valid key count per batch (ONNX `nonpad_kv_seqlen`); it also moves the causal frontier.
    pub kv_len: Option<&'a [i64]>,
    pub scale: f32,
    pub causal: bool,
}

/// The constant operand of [`int8_gemm`]: int8 codes (as bytes) `[K, N]`, or `[N, K]` with
/// `trans_b`, and one f32 scale per output channel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct WeightArgs<'a> {
    pub codes: &'a [u8],
    pub scale: &'a [f32],
    pub k: usize,
    pub n: usize,
    pub trans_b: bool,
    pub cache: &'a WeightCache,
}

/// Device copies of a constant int8 weight (codes as u8 storage, bit for bit) and its f32 scales,
/// uploaded on first use and kept for the life of the plan, for [`int8_gemm`].
#[derive(Default)]
pub(crate) struct WeightCache {
    slot: std::sync::Mutex<Option<(candle_core::Device, CT, CT)>>,
}

impl WeightCache {
    /// The (codes, scale) pair on `device`, uploading it once.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn get(&self, device: &candle_core::Device, codes: &[u8], scale: &[f32]) -> Result<(CT, CT)> {
        let mut slot = self
            .slot
            .lock()
            .map_err(|_| crate::RuntimeError::msg("int8 weight cache poisoned by a panicked thread"))?;
        if let Some((d, c, s)) = slot.as_ref() {
            if d.same_device(device) {
                return Ok((c.clone(), s.clone()));
            }
        }
        let c = CT::from_slice(codes, codes.len(), device)?;
        let s = CT::from_slice(scale, scale.len(), device)?;
        *slot = Some((device.clone(), c.clone(), s.clone()));
        Ok((c, s))
    }
}
