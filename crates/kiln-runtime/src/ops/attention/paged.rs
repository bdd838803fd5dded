//! `ai.kiln::PagedAttention(Q, K, V [, cos_cache, sin_cache])`: causal attention of a flat token
//! batch from many sequences over a paged KV cache (see [`crate::paged_kv`]). Q is
//! `[1, num_heads, T, D]`, K and V are the step's new keys and values `[1, kv_num_heads, T, D]`; the
//! output is `[1, num_heads, T, D]`. Attributes: `layer` (which layer's cache), `scale` (0 or absent:
//! `1/sqrt(D)`), and optionally `num_heads`, `kv_num_heads` (checked against the inputs when given;
//! required for the 3-D layout `[1, T, heads * D]` that ONNX `Attention` and ONNX Runtime's
//! `GroupQueryAttention` use, kept in the output). In the 3-D layout K and V may be absent: Q then
//! packs all three, `[1, T, (num_heads + 2 * kv_num_heads) * D]` (GroupQueryAttention's packed QKV).
//! With `do_rotary = 1` the rotary embedding is applied to Q and K first, at each token's position
//! in its sequence, from `cos_cache`/`sin_cache` `[max_position, rotary_dim / 2]` (the first
//! `rotary_dim` values of each head rotate; halves, or pairs with `rotary_interleaved = 1`), and the
//! cache keeps the rotated keys. Kiln's KV-cache rewrite puts one per decoder layer in place of the
//! dense past/present attention; it runs only when the run carries a paged step
//! ([`RunOptions::paged_kv`](crate::RunOptions)).

use candle_core::DType as CDType;

use crate::ops::common::{tin, tin_opt};
use crate::ops::{kernel, NodeCtx, OpKernel, Registry};
use crate::paged_kv::PagedStep;
use crate::{bail, Result, RuntimeError, Tensor, Value};

pub(crate) fn register(r: &mut Registry) {
    r.add_domain("ai.kiln", "PagedAttention", paged_attention);
}

/// The rotary embedding of one step: each batch token's cos and sin rows (`half` values each).
struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    interleaved: bool,
}

impl Rotary {
    /// The rows of `cos_cache`/`sin_cache` (`[max_position, rotary_dim / 2]`) at `pos`: only those are
    /// read (the caches are usually 8192 positions long, a step needs a few).
    fn at_positions(cos: &Tensor, sin: &Tensor, interleaved: bool, d: usize, pos: &[usize]) -> Result<Rotary> {
        let (cd, sd) = (cos.dims(), sin.dims());
        if cd.len() != 2 || cd != sd || cd[1] == 0 || 2 * cd[1] > d {
            bail!(
                "cos_cache {cd:?} and sin_cache {sd:?} must both be [max_position, rotary_dim / 2] with rotary_dim <= head size {d}"
            );
        }
        let (positions, half) = (cd[0], cd[1]);
        if let Some(&p) = pos.iter().find(|&&p| p >= positions) {
            bail!("position {p} is past the rotary cache's {positions} positions");
        }
        let rows = |t: &Tensor| -> Result<Vec<f32>> {
            let pick = |all: &[f32]| {
                pos.iter()
                    .flat_map(|&p| all[p * half..][..half].iter().copied())
                    .collect()
            };
            if let Some(v) = crate::fastmath::with_f32(t.candle(), pick) {
                return Ok(v);
            }
            let all: Vec<f32> = t.candle().to_dtype(CDType::F32)?.flatten_all()?.to_vec1()?;
            Ok(pick(&all))
        };
        Ok(Rotary {
            cos: rows(cos)?,
            sin: rows(sin)?,
            half,
            interleaved,
        })
    }

    /// Rotates `x` (`[T, heads, D]` rows) in place, token `i` by its own rows.
    fn apply(&self, x: &mut [f32], heads: usize, d: usize) {
        let h = self.half;
        for (i, token) in x.chunks_exact_mut(heads * d).enumerate() {
            let (cos, sin) = (&self.cos[i * h..][..h], &self.sin[i * h..][..h]);
            for row in token.chunks_exact_mut(d) {
                for j in 0..h {
                    let (a, b) = if self.interleaved {
                        (2 * j, 2 * j + 1)
                    } else {
                        (j, j + h)
                    };
                    let (x1, x2) = (row[a], row[b]);
                    row[a] = x1 * cos[j] - x2 * sin[j];
                    row[b] = x2 * cos[j] + x1 * sin[j];
                }
            }
        }
    }
}

/// Each batch token's position in its sequence.
fn positions(step: &PagedStep) -> Result<Vec<usize>> {
    let t = step.num_tokens();
    let mut pos = vec![0; t];
    for s in &step.seqs {
        let (Some(first), true) = (
            s.context_len.checked_sub(s.num_query),
            s.query_start.checked_add(s.num_query).is_some_and(|end| end <= t),
        ) else {
            bail!(
                "bad step layout: {} query tokens from {} with a context of {} in a batch of {t}",
                s.num_query,
                s.query_start,
                s.context_len
            );
        };
        for (i, p) in pos[s.query_start..][..s.num_query].iter_mut().enumerate() {
            *p = first + i;
        }
    }
    Ok(pos)
}

fn paged_attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let layer = n.attr_i("layer", -1)?;
    let heads = n.attr_i("num_heads", 0)?;
    let kv_heads = n.attr_i("kv_num_heads", 0)?;
    let scale = n.attr_f("scale", 0.0)?;
    let do_rotary = n.attr_i("do_rotary", 0)? != 0;
    let interleaved = n.attr_i("rotary_interleaved", 0)? != 0;
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
        let q = tin(ins, 0)?;
        let (k, v) = (tin_opt(ins, 1)?, tin_opt(ins, 2)?);
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
        let fits = match (k, v) {
            (Some(k), Some(v)) if three_d => {
                h > 0 && q.dims() == [1, t, h * d] && k.dims() == [1, t, hkv * d] && v.dims() == [1, t, hkv * d]
            }
            (Some(k), Some(v)) => q.dims() == [1, h, t, d] && k.dims() == [1, hkv, t, d] && v.dims() == [1, hkv, t, d],
            (None, None) => three_d && h > 0 && q.dims() == [1, t, (h + 2 * hkv) * d],
            _ => false,
        };
        if bad_attr || !fits {
            bail!(
                "Q {:?}, K {:?}, V {:?} do not match the step ({t} tokens, KV cache of {hkv} heads of {d}; node heads {heads}/{kv_heads})",
                q.dims(),
                k.map(|k| k.dims().to_vec()),
                v.map(|v| v.dims().to_vec())
            );
        }
        let f32_rows =
            |x: &Tensor| -> Result<Vec<f32>> { Ok(x.candle().to_dtype(CDType::F32)?.flatten_all()?.to_vec1()?) };
        // Q, K, V as [T, heads, D] rows (3-D layouts) or [heads, T, D] (4-D).
        let (mut qf, mut kf, vf) = match (k, v) {
            (Some(k), Some(v)) => (f32_rows(q)?, f32_rows(k)?, f32_rows(v)?),
            _ => {
                let all = f32_rows(q)?;
                let w = (h + 2 * hkv) * d;
                let (mut qf, mut kf, mut vf) = (
                    Vec::with_capacity(t * h * d),
                    Vec::with_capacity(t * hkv * d),
                    Vec::with_capacity(t * hkv * d),
                );
                for row in all.chunks_exact(w) {
                    qf.extend_from_slice(&row[..h * d]);
                    kf.extend_from_slice(&row[h * d..(h + hkv) * d]);
                    vf.extend_from_slice(&row[(h + hkv) * d..]);
                }
                (qf, kf, vf)
            }
        };
        let to_heads_major = |x: Vec<f32>, heads: usize| -> Vec<f32> {
            let mut y = vec![0f32; x.len()];
            for (i, row) in x.chunks_exact(heads * d).enumerate() {
                for (j, head) in row.chunks_exact(d).enumerate() {
                    y[(j * t + i) * d..][..d].copy_from_slice(head);
                }
            }
            y
        };
        if do_rotary {
            if !three_d {
                bail!("do_rotary needs the 3-D layout [1, T, heads * D]");
            }
            let (Some(cos), Some(sin)) = (tin_opt(ins, 3)?, tin_opt(ins, 4)?) else {
                bail!("do_rotary needs cos_cache and sin_cache inputs");
            };
            let rot = Rotary::at_positions(cos, sin, interleaved, d, &positions(step)?)?;
            rot.apply(&mut qf, h, d);
            rot.apply(&mut kf, hkv, d);
        }
        let (qf, kf, vf) = if three_d {
            (to_heads_major(qf, h), to_heads_major(kf, hkv), to_heads_major(vf, hkv))
        } else {
            (qf, kf, vf)
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged_kv::{KvDType, PagedKvCache, PagedKvConfig, PagedSeq};
    use std::sync::Arc;

    /// Caches `[positions, half]` of a RoPE table, as candle tensors.
    fn caches(half: usize, positions: usize) -> (Tensor, Tensor) {
        let theta = |p: usize, j: usize| p as f32 / 10000f32.powf(2.0 * j as f32 / (2 * half) as f32);
        let grid = |f: fn(f32) -> f32| -> Tensor {
            let v: Vec<f32> = (0..positions * half).map(|i| f(theta(i / half, i % half))).collect();
            let t = candle_core::Tensor::from_vec(v, (positions, half), &candle_core::Device::Cpu).unwrap();
            Tensor::new(t, kiln_graph::DType::F32).unwrap()
        };
        (grid(f32::cos), grid(f32::sin))
    }

    #[test]
    fn rotary_rotates_halves_or_pairs_and_leaves_the_rest() {
        // Two tokens at positions 3 and 0, two heads of 6 values, rotary over the first 4.
        let (d, heads) = (6, 2);
        let x: Vec<f32> = (0..2 * heads * d).map(|i| i as f32 * 0.1 + 1.0).collect();
        let (cos, sin) = caches(2, 8);
        let table = |t: &Tensor| -> Vec<f32> { t.candle().flatten_all().unwrap().to_vec1().unwrap() };
        let (ct, st) = (table(&cos), table(&sin));
        for interleaved in [false, true] {
            let r = Rotary::at_positions(&cos, &sin, interleaved, d, &[3, 0]).unwrap();
            let mut y = x.clone();
            r.apply(&mut y, heads, d);
            for (i, p) in [3usize, 0].into_iter().enumerate() {
                for h in 0..heads {
                    let o = (i * heads + h) * d;
                    for j in 0..2 {
                        let (a, b) = if interleaved { (2 * j, 2 * j + 1) } else { (j, j + 2) };
                        let (c, s) = (ct[p * 2 + j], st[p * 2 + j]);
                        let (x1, x2) = (x[o + a], x[o + b]);
                        assert!((y[o + a] - (x1 * c - x2 * s)).abs() < 1e-6);
                        assert!((y[o + b] - (x2 * c + x1 * s)).abs() < 1e-6);
                    }
                    assert_eq!(&y[o + 4..o + 6], &x[o + 4..o + 6], "past rotary_dim nothing moves");
                    if p == 0 {
                        assert_eq!(&y[o..o + d], &x[o..o + d], "position 0 is the identity");
                    }
                }
            }
        }
        let (cos, sin) = caches(2, 3);
        let err = Rotary::at_positions(&cos, &sin, false, d, &[3, 0]).err().unwrap();
        assert!(err.to_string().contains("past the rotary cache"), "{err}");
        let err = Rotary::at_positions(&cos, &sin, false, 2, &[0]).err().unwrap();
        assert!(err.to_string().contains("rotary_dim <= head size"), "{err}");
    }

    #[test]
    fn positions_follow_each_sequence_context() {
        let cache = Arc::new(
            PagedKvCache::new(PagedKvConfig {
                num_layers: 1,
                num_kv_heads: 1,
                head_dim: 2,
                block_size: 4,
                num_blocks: 4,
                dtype: KvDType::F32,
            })
            .unwrap(),
        );
        let step = PagedStep {
            cache,
            seqs: vec![
                PagedSeq {
                    query_start: 0,
                    num_query: 3,
                    context_len: 3,
                    block_table: vec![0],
                },
                PagedSeq {
                    query_start: 3,
                    num_query: 1,
                    context_len: 7,
                    block_table: vec![1, 2],
                },
            ],
        };
        assert_eq!(positions(&step).unwrap(), vec![0, 1, 2, 6]);
        // A layout that contradicts itself is an error, not a panic.
        let mut bad = step.clone();
        bad.seqs[1].context_len = 0;
        assert!(positions(&bad).is_err());
        let mut bad = step;
        bad.seqs[1].query_start = 9;
        assert!(positions(&bad).is_err());
    }
}
