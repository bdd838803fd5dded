//! `ai.kiln::PagedAttention(Q, K, V)`: causal attention of a flat token batch from many sequences
//! over a paged KV cache (see [`crate::paged_kv`]). Q is `[1, num_heads, T, D]`, K and V are the
//! step's new keys and values `[1, kv_num_heads, T, D]`; the output is `[1, num_heads, T, D]`.
//! Attributes: `layer` (which layer's cache), `scale` (0 or absent: `1/sqrt(D)`), and optionally
//! `num_heads`, `kv_num_heads` (checked against the inputs when given; required for the 3-D layout
//! `[1, T, heads * D]` that ONNX `Attention` also accepts, kept in the output). Kiln's KV-cache rewrite puts one per decoder layer in place of the dense
//! past/present attention; it runs only when the run carries a paged step
//! ([`RunOptions::paged_kv`](crate::RunOptions)).

use candle_core::DType as CDType;

use crate::ops::common::tin;
use crate::ops::{kernel, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, RuntimeError, Tensor, Value};

pub(crate) fn register(r: &mut Registry) {
    r.add_domain("ai.kiln", "PagedAttention", paged_attention);
}

fn paged_attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let layer = n.attr_i("layer", -1)?;
    let heads = n.attr_i("num_heads", 0)?;
    let kv_heads = n.attr_i("kv_num_heads", 0)?;
    let scale = n.attr_f("scale", 0.0)?;
    if layer < 0 || heads < 0 || kv_heads < 0 {
        return Err(n.err(format!(
            "needs layer >= 0 and head counts >= 0 (layer {layer}, {heads}/{kv_heads} heads)"
        )));
    }
    let layer = layer as usize;
    Ok(kernel(move |cx, ins| {
        let Some(step) = cx.options.paged_kv.as_deref() else {
            bail!("PagedAttention needs a paged KV step: run this model through Kiln's LLM engine");
        };
        let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
        let cfg = step.cache.config();
        let t = step.num_tokens();
        let (hkv, d) = (cfg.num_kv_heads, cfg.head_dim);
        // 4-D [1, H, T, D], or 3-D [1, T, H*D] (ONNX Attention's other layout; needs the head counts).
        let three_d = q.dims().len() == 3;
        let h = if three_d {
            heads.max(0) as usize
        } else {
            q.dims().get(1).copied().unwrap_or(0)
        };
        let bad_attr = (heads > 0 && heads as usize != h) || (kv_heads > 0 && kv_heads as usize != hkv);
        let fits = if three_d {
            h > 0 && q.dims() == [1, t, h * d] && k.dims() == [1, t, hkv * d] && v.dims() == [1, t, hkv * d]
        } else {
            q.dims() == [1, h, t, d] && k.dims() == [1, hkv, t, d] && v.dims() == [1, hkv, t, d]
        };
        if bad_attr || !fits {
            bail!(
                "Q {:?}, K {:?}, V {:?} do not match the step ({t} tokens, KV cache of {hkv} heads of {d}; node heads {heads}/{kv_heads})",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        // As [H, T, D] rows in f32.
        let flat = |x: &Tensor, heads: usize| -> Result<Vec<f32>> {
            let c = x.candle().to_dtype(CDType::F32)?;
            let c = if three_d {
                c.reshape((t, heads, d))?.transpose(0, 1)?.contiguous()?
            } else {
                c
            };
            Ok(c.flatten_all()?.to_vec1()?)
        };
        let (qf, kf, vf) = (flat(q, h)?, flat(k, hkv)?, flat(v, hkv)?);
        let scale = if scale == 0.0 { 1.0 / (d as f32).sqrt() } else { scale };
        let out = step
            .cache
            .attend(layer, &step.seqs, &qf, &kf, &vf, h, scale)
            .map_err(|e| RuntimeError::msg(e.to_string()))?;
        let out = candle_core::Tensor::from_vec(out, (1, h, t, d), cx.device)?;
        let out = if three_d {
            out.transpose(1, 2)?.contiguous()?.reshape((1, t, h * d))?
        } else {
            out
        };
        let out = out.to_dtype(crate::tensor::storage_dtype(q.dtype())?)?;
        Ok(vec![Value::Tensor(Tensor::new(out, q.dtype())?)])
    }))
}
