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
//! | [`conv2d`] | `im2col.cu` (+ one cuBLAS batched product) | Conv, FusedConv, FusedConvChain (2-D and 1-D, one group) |
//! | [`permute`] | `permute.cu` | Transpose, attention's head merge (any 2- or 4-byte strided copy) |
//! | [`paged_attention`], [`reshape_and_cache`] | `paged_attention.cu` | none yet (ai.kiln PagedAttention on a device-resident cache is the next step) |

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device as CDevice, Tensor as CT};

use crate::paged_kv::PagedSeq;
use crate::{Result, RuntimeError};

#[cfg(feature = "cuda")]
mod launch;
mod permute_plan;
#[cfg(feature = "cuda")]
#[allow(unused_imports)] // no caller until PagedAttention runs on CUDA (tests use them)
pub(crate) use launch::paged_attention::{paged_attention, reshape_and_cache};
#[cfg(feature = "cuda")]
pub(crate) use launch::{
    attention::attention, bias_act::bias_act, im2col::conv2d, int8_gemm::int8_gemm, layer_norm::layer_norm,
    permute::permute, softmax::softmax,
};

#[cfg(not(feature = "cuda"))]
mod stand_in;
#[cfg(not(feature = "cuda"))]
pub(crate) use stand_in::{attention, bias_act, conv2d, int8_gemm, layer_norm, permute, softmax};
#[cfg(not(feature = "cuda"))]
#[allow(unused_imports)] // no caller until PagedAttention runs on CUDA
pub(crate) use stand_in::{paged_attention, reshape_and_cache};

#[cfg(all(test, feature = "cuda"))]
mod tests;

/// `t` made contiguous: on CUDA through [`permute`]'s kernel (dims and strides passed by value),
/// elsewhere (or for a case it declines) through candle.
pub(crate) fn contiguous(t: &CT) -> Result<CT> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    match permute(t, &[])? {
        Some(y) => Ok(y),
        None => Ok(t.contiguous()?),
    }
}

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
    /// `max(x, 0)` (`ai.kiln::MatMulBias` with activation "relu").
    Relu,
    /// The bias alone (`ai.kiln::MatMulBias` without an activation): one pass instead of candle's
    /// broadcast add, which indexes through uploaded strides.
    None,
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

/// One layer's paged K/V cache in device memory for [`paged_attention`] and [`reshape_and_cache`]:
/// K and V `[num_blocks, kv_heads, block_size, head_dim]` (f32 or f16, contiguous, block_size a
/// power of two), the layout of [`crate::paged_kv`]. [`reshape_and_cache`] writes into these
/// tensors' storage in place: they are the caller's mutable state, ordered with every other kernel
/// on candle's stream.
#[derive(Clone, Copy)]
#[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))] // no caller until PagedAttention runs on CUDA
pub(crate) struct PagedLayerKv<'a> {
    pub k_cache: &'a CT,
    pub v_cache: &'a CT,
}

/// A step's flat token batch as the paged kernels read it: int32 tensors on one device, built once
/// per step and shared by every layer. [`PagedMeta::new`] checks every index the kernels follow
/// (block ids below `num_blocks`, tables covering each context), so the kernels need no bounds
/// checks; the fields stay private to keep that true.
#[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))] // no caller until PagedAttention runs on CUDA
pub(crate) struct PagedMeta {
    /// Every sequence's block ids covering its context, concatenated.
    block_tables: CT,
    /// Per token: where its sequence's ids start in `block_tables`.
    table_start: CT,
    /// Per token: the keys it attends to (its position + 1: causal).
    context_lens: CT,
    /// Per token: `block * block_size + offset` of the slot its new K/V go to.
    slot_mapping: CT,
    num_tokens: usize,
    block_size: usize,
    num_blocks: usize,
}

/// The host side of [`PagedMeta`]: (block_tables, table_start, context_lens, slot_mapping).
type PagedMetaHost = (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>);

#[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))] // no caller until PagedAttention runs on CUDA
impl PagedMeta {
    /// The layout of `seqs` (as in [`crate::paged_kv::PagedStep`]: query tokens tiling the batch in
    /// order, each sequence's tokens the last `num_query` positions of its context) for a cache of
    /// `num_blocks` blocks of `block_size` slots, uploaded to `device`.
    pub fn new(seqs: &[PagedSeq], block_size: usize, num_blocks: usize, device: &CDevice) -> Result<PagedMeta> {
        let (tables, start, ctx, slots) = Self::host(seqs, block_size, num_blocks)?;
        let up = |v: &[i32]| CT::from_slice(v, v.len(), device);
        Ok(PagedMeta {
            block_tables: up(&tables)?,
            table_start: up(&start)?,
            context_lens: up(&ctx)?,
            slot_mapping: up(&slots)?,
            num_tokens: ctx.len(),
            block_size,
            num_blocks,
        })
    }

    /// Query tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    fn host(seqs: &[PagedSeq], block_size: usize, num_blocks: usize) -> Result<PagedMetaHost> {
        let bad = |m: String| RuntimeError::Invalid(format!("paged step: {m}"));
        if !block_size.is_power_of_two() {
            return Err(bad(format!("block size {block_size} is not a power of two")));
        }
        if num_blocks.checked_mul(block_size).is_none_or(|n| n > i32::MAX as usize) {
            return Err(bad(format!(
                "{num_blocks} blocks of {block_size} slots exceed the kernels' 32-bit slot index"
            )));
        }
        let (mut tables, mut start, mut ctx, mut slots) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            if s.query_start != ctx.len()
                || s.num_query == 0
                || s.num_query > s.context_len
                || s.context_len > i32::MAX as usize
            {
                return Err(bad(format!(
                    "sequence {i}: query tokens {}..+{} with context {} do not tile the batch",
                    s.query_start, s.num_query, s.context_len
                )));
            }
            let used = s.context_len.div_ceil(block_size);
            let Some(table) = s.block_table.get(..used) else {
                return Err(bad(format!(
                    "sequence {i}: {} blocks cannot hold {} tokens",
                    s.block_table.len(),
                    s.context_len
                )));
            };
            if let Some(&b) = table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(bad(format!("sequence {i}: block {b} of a cache with {num_blocks}")));
            }
            let at = tables.len();
            tables.extend(table.iter().map(|&b| b as i32));
            let first = s.context_len - s.num_query;
            for pos in first..s.context_len {
                start.push(at as i32);
                ctx.push(pos as i32 + 1);
                slots.push((table[pos / block_size] as usize * block_size + pos % block_size) as i32);
            }
        }
        if ctx.is_empty() {
            return Err(bad("no query tokens".into()));
        }
        if tables.len() > i32::MAX as usize {
            return Err(bad("block tables exceed the kernels' 32-bit index".into()));
        }
        Ok((tables, start, ctx, slots))
    }
}

/// A 2-D convolution's geometry for [`conv2d`] (a 1-D conv is one with `h = 1`, `kh = 1`).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Conv2dGeometry {
    /// Output height and width.
    pub out: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Top and left pads (the bottom/right ones follow from `out`).
    pub pad: [usize; 2],
}
