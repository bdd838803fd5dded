//! Attention on a CUDA device: the flash-style kernel (`kernels/attention.cu`) or cuBLAS products
//! around the fused softmax kernel, and the choice between them (`KILN_CUDA_ATTENTION`).

use candle_core::Tensor as CT;

use super::onnx_attention::{split_heads, AttnCfg};
use crate::ops::common::{tin, tin_opt};
use crate::{Result, Tensor, Value};

/// The fused CUDA kernel (`kernels/attention.cu`) for a node with only the Y output, on a CUDA
/// device, without past K/V, softcap or sliding window; `None` otherwise (and for shapes the kernel
/// does not cover), so the general path (`onnx_attention::run_attention`) runs and reports any
/// input error.
pub(super) fn attention_cuda(cfg: &AttnCfg, ins: &[Option<&Value>]) -> Result<Option<Tensor>> {
    let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    let plain = cfg.outputs <= 1 && cfg.softcap.is_none_or(|c| c <= 0.0) && cfg.left < 0 && cfg.right < 0;
    if !plain || !q.device().is_cuda() || tin_opt(ins, 4)?.is_some() || tin_opt(ins, 5)?.is_some() {
        return Ok(None);
    }
    let (q4, k4, v4) = match (q.rank(), cfg.q_heads, cfg.kv_heads) {
        (4, _, _) => (q.candle().clone(), k.candle().clone(), v.candle().clone()),
        (3, Some(qh), Some(kvh)) if k.rank() == 3 && v.rank() == 3 => {
            match (
                split_heads(q.candle(), qh, "Q"),
                split_heads(k.candle(), kvh, "K"),
                split_heads(v.candle(), kvh, "V"),
            ) {
                (Ok(q4), Ok(k4), Ok(v4)) => (q4, k4, v4),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let nonpad = tin_opt(ins, 6)?.map(Tensor::to_i64_vec).transpose()?;
    let d = q4.dim(3)?;
    let scale = cfg.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let mask = tin_opt(ins, 3)?.map(Tensor::candle);
    if nonpad.is_none() && use_gemm_route(&q4, &k4, mask) {
        if let Some(y) = attention_cuda_gemm(&q4, &k4, &v4, mask, scale, cfg.is_causal)? {
            return Ok(Some(Tensor::new(merge_heads(y, q.rank())?, q.dtype())?));
        }
    }
    let spec = crate::cuda_kernels::AttentionSpec {
        q: &q4,
        k: &k4,
        v: &v4,
        mask,
        kv_len: nonpad.as_deref(),
        scale,
        causal: cfg.is_causal,
    };
    let Some(y) = crate::cuda_kernels::attention(&spec)? else {
        return Ok(None);
    };
    Ok(Some(Tensor::new(merge_heads(y, q.rank())?, q.dtype())?))
}

/// (B, H, S, D) back to (B, S, H*D) when the node's inputs were 3-D.
fn merge_heads(y: CT, rank: usize) -> Result<CT> {
    if rank != 3 {
        return Ok(y);
    }
    let (b, h, s, dv) = y.dims4()?;
    Ok(crate::cuda_kernels::contiguous(&y.transpose(1, 2)?)?.reshape((b, s, h * dv))?)
}

/// How attention runs on CUDA: the flash-style kernel (`kernels/attention.cu`, CUDA cores, no
/// (B, H, S, T) tensor) or two cuBLAS products around the fused softmax kernel (tensor cores for
/// f16, the scores tensor in device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CudaAttentionRoute {
    /// GEMMs while the scores tensor stays under [`GEMM_ROUTE_MAX_SCORES_BYTES`], else flash.
    Auto,
    Flash,
    Gemm,
}

/// Largest (B, Hq, S, T) scores tensor the automatic route computes with GEMMs.
pub(crate) const GEMM_ROUTE_MAX_SCORES_BYTES: usize = 256 << 20;

thread_local! {
    static ROUTE_OVERRIDE: std::cell::Cell<Option<CudaAttentionRoute>> = const { std::cell::Cell::new(None) };
}

/// The route: a test's override, else `KILN_CUDA_ATTENTION` (flash, gemm, auto), else auto.
fn cuda_attention_route() -> CudaAttentionRoute {
    static ENV: std::sync::OnceLock<CudaAttentionRoute> = std::sync::OnceLock::new();
    ROUTE_OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        *ENV.get_or_init(|| match std::env::var("KILN_CUDA_ATTENTION").as_deref() {
            Ok("flash") => CudaAttentionRoute::Flash,
            Ok("gemm") => CudaAttentionRoute::Gemm,
            _ => CudaAttentionRoute::Auto,
        })
    })
}

/// Runs `f` with attention on this thread forced to `route` (tests of both CUDA routes).
#[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn with_cuda_attention_route<R>(route: CudaAttentionRoute, f: impl FnOnce() -> R) -> R {
    let previous = ROUTE_OVERRIDE.with(|o| o.replace(Some(route)));
    let r = f();
    ROUTE_OVERRIDE.with(|o| o.set(previous));
    r
}

/// Whether this call takes the GEMM route: a float mask whose last dim is T (the softmax kernel
/// reads float masks through strides; boolean or short masks go to the flash kernel), and under
/// the automatic route a scores tensor of at most [`GEMM_ROUTE_MAX_SCORES_BYTES`].
///
/// In f16 the GEMM route stores the scores in f16 before the softmax (a relative rounding of 2^-11
/// on each logit, as an unfused fp16 graph does): on an H200 the node test
/// `test_attention_4d_causal_fp16` misses the suite's tolerance by it (2.4e-4 on 0.223), where the
/// flash kernel, which keeps the logits in f32, passes. The GEMM route stays the default because it
/// is the faster one where speed matters: 0.18 ms against 0.30 ms per layer on the BERT-base-shaped
/// encoder at batch 64, seq 128 (`KILN_CUDA_ATTENTION=flash` picks accuracy).
fn use_gemm_route(q4: &CT, k4: &CT, mask: Option<&CT>) -> bool {
    let (Ok((b, hq, s, _)), Ok((_, _, t, _))) = (q4.dims4(), k4.dims4()) else {
        return false;
    };
    let mask_ok = mask.is_none_or(|m| m.dtype().is_float() && m.dims().last() == Some(&t));
    let scores_bytes = b * hq * s * t * q4.dtype().size_in_bytes();
    match cuda_attention_route() {
        CudaAttentionRoute::Flash => false,
        CudaAttentionRoute::Gemm => mask_ok,
        CudaAttentionRoute::Auto => mask_ok && scores_bytes <= GEMM_ROUTE_MAX_SCORES_BYTES,
    }
}

/// softmax(scale * Q K^T + mask, causal) V with K/V heads shared by groups of query heads:
/// cuBLAS batched products (f16 on tensor cores with f32 accumulation) and the fused softmax
/// kernel (f32 accumulation; rows with no attendable key give zeros). `None` when the softmax
/// kernel does not take the shape.
fn attention_cuda_gemm(q4: &CT, k4: &CT, v4: &CT, mask: Option<&CT>, scale: f32, causal: bool) -> Result<Option<CT>> {
    let (b, hq, s, d) = q4.dims4()?;
    let (_, hk, t, _) = k4.dims4()?;
    let dv = v4.dim(3)?;
    if hk == 0 || hq % hk != 0 || d == 0 || t == 0 {
        return Ok(None);
    }
    let reps = hq / hk;
    let qg = q4.contiguous()?.reshape((b, hk, reps * s, d))?;
    let kt = k4.transpose(2, 3)?.contiguous()?;
    let scores = qg.matmul(&kt)?.reshape((b, hq, s, t))?;
    let spec = crate::cuda_kernels::SoftmaxSpec {
        cols: t,
        heads: hq,
        seq: s,
        scale,
        mask,
        causal,
        causal_offset: 0,
    };
    let Some(p) = crate::cuda_kernels::softmax(&scores, &spec)? else {
        return Ok(None);
    };
    let y = p.reshape((b, hk, reps * s, t))?.matmul(&v4.contiguous()?)?;
    Ok(Some(y.reshape((b, hq, s, dv))?))
}
