//! `com.microsoft::GroupQueryAttention` (ONNX Runtime's contrib op, as onnxruntime-genai's LLM exports
//! use it), dense KV cache, on the host in f32 (f16/bf16 inputs are converted and the outputs cast back).
//!
//! Inputs: `query` `[B, S, H*D]` (or packed QKV `[B, S, (H + 2*Hk)*D]` when `key` and `value` are
//! absent), `key`/`value` `[B, S, Hk*D]`, `past_key`/`past_value` `[B, Hk, P, D]`, `seqlens_k` (int
//! `[B]`: each sequence's total length - 1), `total_sequence_length` (int scalar), `cos_cache`/
//! `sin_cache` `[max_position, rotary_dim/2]` (with `do_rotary`), and the optional `position_ids`
//! `[B, S]`, `attention_bias` `[B|1, H|1, S, T]` and `head_sink` `[H]`. Outputs: `output` `[B, S, H*D]`,
//! `present_key`/`present_value` `[B, Hk, max(total_sequence_length, P), D]`.
//!
//! As ONNX Runtime's CPU kernel derives them: a call is the first prompt when `S` equals
//! `total_sequence_length` (its tokens sit at positions 0..S whatever the past holds), a continued
//! prompt when `S > 1` differs from it (batch 1), and a decode step otherwise; batch entry `b` has
//! `T_b = seqlens_k[b] + 1` valid keys and, outside the first prompt, `T_b - S` of them in the past.
//! `present` is the past's first `T_b - S` rows followed by the new keys (zeros after them) or, when
//! the past buffer is already `total_sequence_length` long or more (ONNX Runtime's shared
//! past/present buffer), the whole past with the new rows written at `T_b - S`. Query `s` sees keys
//! `j < min(past_b + s + 1, T_b)`, the last `local_window_size` of them when that is set; scores are
//! `scale * q.k` (default `1/sqrt(D)`), then `softcap * tanh(x / softcap)`, then `+ attention_bias`,
//! then a softmax (with `head_sink[h]`, or 0 under `smooth_softmax`, as an extra logit in the
//! denominator). Rotary embedding rotates q and the new k at each token's position (`position_ids`,
//! else `past_b + s`; the first prompt uses `position_ids[0] + s`), the first `rotary_dim` features,
//! as halves or, with `rotary_interleaved`, as pairs.
//!
//! Not supported (refused with a message): quantized KV caches (`k_quant_type`, `k_scale`, ...),
//! `sliding_window_cache`, `query_seqlens`, `q_norm_weight`/`k_norm_weight`, `qk_output`, `causal`
//! 0, and key/value of another length than the query (ONNX Runtime's shared-KV form).

use candle_core::{CpuStorage, DType as CDType, Storage, StorageRef, Tensor as CT};
use kiln_graph::DType;
use rayon::prelude::*;

use crate::fastmath::{gemv, softmax_row};
use crate::ops::common::{elems, tin, tin_opt};
use crate::ops::{kernel, NodeCtx, OpKernel, RunCx};
use crate::{bail, Result, Tensor, Value};

/// The node's attributes, read once when the kernel is built.
struct Gqa {
    heads: usize,
    kv_heads: usize,
    /// 0 means `1 / sqrt(head_size)`.
    scale: f32,
    /// 0 means none.
    softcap: f32,
    rotary: bool,
    interleaved: bool,
    window: Option<usize>,
    smooth: bool,
}

/// Inputs ONNX Runtime defines that this kernel refuses when given.
const UNSUPPORTED_INPUTS: [(usize, &str); 5] = [
    (12, "k_scale (quantized KV cache)"),
    (13, "v_scale (quantized KV cache)"),
    (14, "q_norm_weight"),
    (15, "k_norm_weight"),
    (16, "query_seqlens"),
];

pub(super) fn group_query_attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let heads = n.attr_i("num_heads", 0)?;
    let kv_heads = n.attr_i("kv_num_heads", 0)?;
    if heads <= 0 || kv_heads <= 0 {
        return Err(n.err(format!(
            "num_heads ({heads}) and kv_num_heads ({kv_heads}) must be positive"
        )));
    }
    if heads % kv_heads != 0 {
        return Err(n.err(format!(
            "num_heads {heads} is not a multiple of kv_num_heads {kv_heads}"
        )));
    }
    let scale = n.attr_f("scale", 0.0)?;
    let softcap = n.attr_f("softcap", 0.0)?;
    if !scale.is_finite() {
        return Err(n.err(format!("scale {scale} is not finite")));
    }
    if !softcap.is_finite() || softcap < 0.0 {
        return Err(n.err(format!("softcap {softcap} must be 0 (none) or positive")));
    }
    let window = match n.attr_i("local_window_size", -1)? {
        -1 => None,
        w if w > 0 => Some(w as usize),
        w => return Err(n.err(format!("local_window_size {w} must be -1 (none) or positive"))),
    };
    let flag = |name: &str| -> Result<bool> {
        match n.attr_i(name, 0)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(n.err(format!("attribute '{name}' must be 0 or 1, got {v}"))),
        }
    };
    let cfg = Gqa {
        heads: heads as usize,
        kv_heads: kv_heads as usize,
        scale,
        softcap,
        rotary: flag("do_rotary")?,
        interleaved: flag("rotary_interleaved")?,
        window,
        smooth: flag("smooth_softmax")?,
    };
    if n.attr_i("causal", 1)? != 1 {
        return Err(n.err("causal = 0 (bidirectional attention) is not supported"));
    }
    if n.attr_i("qk_output", 0)? != 0 || n.node.outputs.get(3).is_some_and(|o| o.is_some()) {
        return Err(n.err("output 3 (output_qk, attribute qk_output) is not supported"));
    }
    if n.attr_i("sliding_window_cache", 0)? != 0 {
        return Err(n.err("sliding_window_cache = 1 (a window-sized KV cache) is not supported"));
    }
    for attr in ["k_quant_type", "v_quant_type"] {
        let q = n.attr_s(attr, "NONE")?;
        if q != "NONE" {
            return Err(n.err(format!("{attr} '{q}': quantized KV caches are not supported")));
        }
    }
    for (i, what) in UNSUPPORTED_INPUTS {
        if n.has_input(i) {
            return Err(n.err(format!("input {i} ({what}) is not supported")));
        }
    }
    Ok(kernel(move |cx, ins| cfg.run(cx, ins)))
}

/// f32 data of a tensor on the host: borrowed from a contiguous f32 CPU tensor, else converted.
enum HostF32<'a> {
    View(StorageRef<'a>, usize, usize),
    Owned(Vec<f32>),
}

impl HostF32<'_> {
    fn slice(&self) -> &[f32] {
        match self {
            HostF32::View(st, a, e) => match &**st {
                Storage::Cpu(CpuStorage::F32(v)) => v.get(*a..*e).unwrap_or(&[]),
                _ => &[],
            },
            HostF32::Owned(v) => v,
        }
    }
}

fn host_f32(t: &Tensor) -> Result<HostF32<'_>> {
    let c = t.candle();
    if c.device().is_cpu() && c.dtype() == CDType::F32 {
        let (st, layout) = c.storage_and_layout();
        if let Some((a, e)) = layout.contiguous_offsets() {
            if matches!(&*st, Storage::Cpu(CpuStorage::F32(v)) if v.len() >= e) {
                return Ok(HostF32::View(st, a, e));
            }
        }
    }
    let v = c
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(CDType::F32)?
        .to_vec1::<f32>()?;
    Ok(HostF32::Owned(v))
}

/// Rotates the first `2 * cos.len()` features of `x` into `out` (the rest copied): halves
/// `(x[i], x[i + half])`, or with `interleaved` pairs `(x[2i], x[2i + 1])`, by the angle whose cosine
/// and sine are `cos[i]`, `sin[i]`.
fn rotate(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x1, x2, c, s) = (x[a], x[b], cos[i], sin[i]);
        out[a] = x1 * c - x2 * s;
        out[b] = x1 * s + x2 * c;
    }
    out[2 * half..].copy_from_slice(&x[2 * half..]);
}

/// The per-call layout derived from the inputs (ONNX Runtime's rules, see the module docs).
struct Layout {
    b: usize,
    s: usize,
    d: usize,
    packed: bool,
    /// Rows of the past buffer.
    past_rows: usize,
    /// Rows of present.
    present_rows: usize,
    /// Valid keys per batch entry (`seqlens_k + 1`).
    total: Vec<usize>,
    /// Row of present where each batch entry's new keys go (also its causal offset).
    past: Vec<usize>,
    /// Present keeps the whole past buffer (ONNX Runtime's shared past/present buffer).
    shared: bool,
    /// The call is a first prompt (`S == total_sequence_length`).
    first: bool,
}

impl Gqa {
    fn layout(&self, ins: &[Option<&Value>]) -> Result<Layout> {
        let q = tin(ins, 0)?;
        let (key, value) = (tin_opt(ins, 1)?, tin_opt(ins, 2)?);
        let (past_k, past_v) = (tin_opt(ins, 3)?, tin_opt(ins, 4)?);
        let dt = q.dtype();
        if !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
            bail!("query must be float, float16 or bfloat16, found {dt}");
        }
        let &[b, s, qhid] = q.dims() else {
            bail!("query must be 3-D [batch, sequence, hidden], got shape {:?}", q.dims());
        };
        let (h, hk) = (self.heads, self.kv_heads);
        let packed = match (key, value) {
            (None, None) => true,
            (Some(_), Some(_)) => false,
            _ => bail!("key and value must both be given, or both be absent (packed QKV in query)"),
        };
        let groups = if packed { h + 2 * hk } else { h };
        if qhid % groups != 0 || qhid == 0 {
            bail!(
                "query hidden size {qhid} is not a positive multiple of {groups} heads ({})",
                if packed {
                    "num_heads + 2 * kv_num_heads, packed QKV"
                } else {
                    "num_heads"
                }
            );
        }
        let d = qhid / groups;
        for (t, what) in [(key, "key"), (value, "value")] {
            let Some(t) = t else { continue };
            if t.dims() != [b, s, hk * d] {
                bail!(
                    "{what} has shape {:?}, expected [{b}, {s}, {}] (batch, sequence_length, kv_num_heads * head_size)",
                    t.dims(),
                    hk * d
                );
            }
            if t.dtype() != dt {
                bail!("{what} has dtype {}, query {dt}", t.dtype());
            }
        }
        let past_rows = match (past_k, past_v) {
            (None, None) => None,
            (Some(pk), Some(pv)) => {
                for (t, what) in [(pk, "past_key"), (pv, "past_value")] {
                    let ok = t.rank() == 4 && t.dims()[0] == b && t.dims()[1] == hk && t.dims()[3] == d;
                    if !ok {
                        bail!(
                            "{what} has shape {:?}, expected [{b}, {hk}, past_length, {d}] (batch, kv_num_heads, past, head_size)",
                            t.dims()
                        );
                    }
                    if t.dtype() != dt {
                        bail!("{what} has dtype {}, query {dt}", t.dtype());
                    }
                }
                if pk.dims() != pv.dims() {
                    bail!(
                        "past_key {:?} and past_value {:?} differ in shape",
                        pk.dims(),
                        pv.dims()
                    );
                }
                Some(pk.dims()[2])
            }
            _ => bail!("past_key and past_value must both be given or both be absent"),
        };
        let seqlens = tin(ins, 5)?;
        let total_t = tin(ins, 6)?;
        for (t, what) in [(seqlens, "seqlens_k"), (total_t, "total_sequence_length")] {
            if !t.dtype().is_int() {
                bail!("{what} must be an integer tensor (int32), found {}", t.dtype());
            }
        }
        if seqlens.dims() != [b] {
            bail!("seqlens_k has shape {:?}, expected [{b}] (batch)", seqlens.dims());
        }
        if total_t.elem_count() != 1 {
            bail!(
                "total_sequence_length must hold one value, got shape {:?}",
                total_t.dims()
            );
        }
        let total_len = total_t.to_i64_vec()?[0];
        if total_len < 1 {
            bail!("total_sequence_length {total_len} must be positive");
        }
        let total_len = total_len as usize;
        let p = past_rows.unwrap_or(0);
        let present_rows = total_len.max(p);
        let subsequent = s > 1 && s != total_len;
        if subsequent && b != 1 {
            bail!(
                "sequence_length {s} > 1 differs from total_sequence_length {total_len} (a continued prompt): batch size must be 1, got {b}"
            );
        }
        let first = !subsequent && s == total_len;
        if !subsequent && !first && s != 1 {
            bail!("sequence_length {s} must be 1 outside a prompt (total_sequence_length {total_len})");
        }
        let lens = seqlens.to_i64_vec()?;
        let mut total = Vec::with_capacity(b);
        let mut past = Vec::with_capacity(b);
        for (bi, &l) in lens.iter().enumerate() {
            let t = l.saturating_add(1);
            if t < 1 || t as usize > present_rows {
                bail!("seqlens_k[{bi}] = {l}: the total length {t} is outside 1..={present_rows} (the present length)");
            }
            let t = t as usize;
            let pb = if past_rows.is_none() || first {
                0
            } else if t < s {
                bail!("seqlens_k[{bi}] + 1 = {t} is less than sequence_length {s} outside the first prompt");
            } else {
                t - s
            };
            if pb > p {
                bail!("seqlens_k[{bi}] + 1 - sequence_length = {pb} past tokens, but the past holds {p}");
            }
            if pb + s > present_rows {
                bail!("batch entry {bi}: {pb} past + {s} new tokens do not fit the present length {present_rows}");
            }
            total.push(t);
            past.push(pb);
        }
        Ok(Layout {
            b,
            s,
            d,
            packed,
            past_rows: p,
            present_rows,
            total,
            past,
            shared: past_rows.is_some() && p >= total_len,
            first,
        })
    }

    /// Per-token rotary positions (`[B * S]`), checked against the cache length.
    fn positions(&self, l: &Layout, ins: &[Option<&Value>], max_pos: usize) -> Result<Vec<usize>> {
        let ids = match tin_opt(ins, 9)? {
            None => None,
            Some(p) => {
                if p.dims() != [l.b, l.s] {
                    bail!("position_ids has shape {:?}, expected [{}, {}]", p.dims(), l.b, l.s);
                }
                Some(p.to_i64_vec()?)
            }
        };
        let mut out = Vec::with_capacity(l.b * l.s);
        for bi in 0..l.b {
            for si in 0..l.s {
                let p = match (&ids, l.first) {
                    (Some(v), true) => v.first().copied().unwrap_or(0).saturating_add(si as i64),
                    (Some(v), false) => v[bi * l.s + si],
                    (None, true) => si as i64,
                    (None, false) => (l.total[bi] + si) as i64 - l.s as i64,
                };
                if p < 0 || p as usize >= max_pos {
                    bail!(
                        "rotary position {p} (batch {bi}, token {si}) is outside the cos/sin cache of {max_pos} rows"
                    );
                }
                out.push(p as usize);
            }
        }
        Ok(out)
    }

    fn run(&self, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
        let l = self.layout(ins)?;
        let q = tin(ins, 0)?;
        let dt = q.dtype();
        let dev = q.device().clone();
        let (b, s, d) = (l.b, l.s, l.d);
        let (h, hk) = (self.heads, self.kv_heads);
        let group = h / hk;
        let pr = l.present_rows;
        cx.check_alloc(elems(&[b, hk, pr, d]).saturating_mul(2), DType::F32)?;
        cx.check_alloc(elems(&[b, s, h, d]).saturating_mul(2), DType::F32)?;

        // Rotary tables.
        let (cos, sin) = (tin_opt(ins, 7)?, tin_opt(ins, 8)?);
        let rot = if self.rotary {
            let (Some(cos), Some(sin)) = (cos, sin) else {
                bail!("do_rotary = 1 needs cos_cache and sin_cache");
            };
            if cos.rank() != 2 || cos.dims() != sin.dims() {
                bail!(
                    "cos_cache {:?} and sin_cache {:?} must be 2-D [max_position, rotary_dim / 2] of one shape",
                    cos.dims(),
                    sin.dims()
                );
            }
            let half = cos.dims()[1];
            if half == 0 || 2 * half > d {
                bail!(
                    "cos_cache has {half} columns: rotary_dim {} must be in 2..={d} (head_size)",
                    2 * half
                );
            }
            let pos = self.positions(&l, ins, cos.dims()[0])?;
            Some((host_f32(cos)?, host_f32(sin)?, half, pos))
        } else {
            None
        };

        let bias = match tin_opt(ins, 10)? {
            None => None,
            Some(t) => {
                let bd = t.dims();
                let need = l.total.iter().copied().max().unwrap_or(0);
                let ok = bd.len() == 4
                    && (bd[0] == 1 || bd[0] == b)
                    && (bd[1] == 1 || bd[1] == h)
                    && bd[2] == s
                    && bd[3] >= need;
                if !ok {
                    bail!(
                        "attention_bias has shape {bd:?}, expected [{b} or 1, {h} or 1, {s}, total_sequence_length (>= {need})]"
                    );
                }
                if !t.dtype().is_float() {
                    bail!("attention_bias must be float, found {}", t.dtype());
                }
                Some((host_f32(t)?, bd[0] != 1, bd[1] != 1, bd[3]))
            }
        };
        let sink = match tin_opt(ins, 11)? {
            None => None,
            Some(t) => {
                if t.dims() != [h] || !t.dtype().is_float() {
                    bail!(
                        "head_sink has shape {:?} ({}), expected float [{h}] (num_heads)",
                        t.dims(),
                        t.dtype()
                    );
                }
                Some(host_f32(t)?.slice().to_vec())
            }
        };

        // New q (rotated) as [B, H, S, D]; new k (rotated) and v written into present [B, Hk, P', D].
        let qh = host_f32(q)?;
        let (kh, vh) = match l.packed {
            true => (None, None),
            false => (Some(host_f32(tin(ins, 1)?)?), Some(host_f32(tin(ins, 2)?)?)),
        };
        let (qs, ks, vs) = (
            qh.slice(),
            kh.as_ref().map(HostF32::slice),
            vh.as_ref().map(HostF32::slice),
        );
        let tok = if l.packed { (h + 2 * hk) * d } else { h * d };
        // Row `head` of token (bi, si) in query (packed: q heads, then k heads, then v heads).
        let q_row = |bi: usize, si: usize, head: usize| &qs[(bi * s + si) * tok + head * d..][..d];
        let kv_row = |which: usize, bi: usize, si: usize, head: usize| -> &[f32] {
            match (which, ks, vs) {
                (0, Some(k), _) => &k[((bi * s + si) * hk + head) * d..][..d],
                (1, _, Some(v)) => &v[((bi * s + si) * hk + head) * d..][..d],
                _ => &qs[(bi * s + si) * tok + (h + which * hk + head) * d..][..d],
            }
        };
        let rotate_into = |x: &[f32], out: &mut [f32], bi: usize, si: usize| match &rot {
            Some((c, sn, half, pos)) => {
                let p = pos[bi * s + si];
                let (c, sn) = (&c.slice()[p * half..][..*half], &sn.slice()[p * half..][..*half]);
                rotate(x, out, c, sn, self.interleaved);
            }
            None => out.copy_from_slice(x),
        };
        let mut qr = vec![0f32; b * h * s * d];
        qr.par_chunks_mut(s * d).enumerate().for_each(|(bh, o)| {
            let (bi, hh) = (bh / h, bh % h);
            for si in 0..s {
                rotate_into(q_row(bi, si, hh), &mut o[si * d..(si + 1) * d], bi, si);
            }
        });

        let past = match (tin_opt(ins, 3)?, tin_opt(ins, 4)?) {
            (Some(pk), Some(pv)) => Some((host_f32(pk)?, host_f32(pv)?)),
            _ => None,
        };
        let build_present = |which: usize| -> Vec<f32> {
            let mut out = vec![0f32; b * hk * pr * d];
            out.par_chunks_mut((pr * d).max(1)).enumerate().for_each(|(bk, o)| {
                let (bi, kvh) = (bk / hk, bk % hk);
                if let Some((pk, pv)) = &past {
                    let src = if which == 0 { pk.slice() } else { pv.slice() };
                    let keep = if l.shared { l.past_rows } else { l.past[bi] };
                    let base = bk * l.past_rows * d;
                    o[..keep * d].copy_from_slice(&src[base..base + keep * d]);
                }
                for si in 0..s {
                    let row = &mut o[(l.past[bi] + si) * d..][..d];
                    let x = kv_row(which, bi, si, kvh);
                    if which == 0 {
                        rotate_into(x, row, bi, si);
                    } else {
                        row.copy_from_slice(x);
                    }
                }
            });
            out
        };
        let (present_k, present_v) = (build_present(0), build_present(1));

        // Attention per (batch, head), one query row at a time.
        let alpha = if self.scale == 0.0 {
            1.0 / (d as f32).sqrt()
        } else {
            self.scale
        };
        let mut out = vec![0f32; b * h * s * d];
        out.par_chunks_mut((s * d).max(1)).enumerate().for_each(|(bh, o)| {
            let (bi, hh) = (bh / h, bh % h);
            let kbase = (bi * hk + hh / group) * pr * d;
            let (keys, vals) = (&present_k[kbase..kbase + pr * d], &present_v[kbase..kbase + pr * d]);
            let mut scores = vec![0f32; l.total[bi]];
            for si in 0..s {
                let eff = (l.past[bi] + si + 1).min(l.total[bi]);
                let start = match self.window {
                    Some(w) if eff > w => eff - w,
                    _ => 0,
                };
                let sc = &mut scores[..eff - start];
                gemv(&keys[start * d..eff * d], d, &qr[(bh * s + si) * d..][..d], sc);
                for (j, x) in sc.iter_mut().enumerate() {
                    *x *= alpha;
                    if self.softcap > 0.0 {
                        *x = self.softcap * (*x / self.softcap).tanh();
                    }
                    if let Some((bv, per_b, per_h, bt)) = &bias {
                        let row = ((if *per_b { bi } else { 0 }) * (if *per_h { h } else { 1 })
                            + if *per_h { hh } else { 0 })
                            * s
                            + si;
                        *x += bv.slice()[row * bt + start + j];
                    }
                }
                match (&sink, self.smooth) {
                    (None, false) => softmax_row(sc),
                    (sk, _) => smooth_softmax(sc, sk.as_ref().map_or(0.0, |v| v[hh])),
                }
                let orow = &mut o[si * d..(si + 1) * d];
                orow.fill(0.0);
                for (j, &p) in sc.iter().enumerate() {
                    let v = &vals[(start + j) * d..][..d];
                    orow.iter_mut().zip(v).for_each(|(a, &x)| *a += p * x);
                }
            }
        });

        // [B, H, S, D] -> [B, S, H*D]
        let y = CT::from_vec(out, (b, h, s, d), &dev)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h * d))?;
        let sd = crate::tensor::storage_dtype(dt)?;
        let to_value = |t: CT| -> Result<Value> { Ok(Value::Tensor(Tensor::new(t.to_dtype(sd)?, dt)?)) };
        Ok(vec![
            to_value(y)?,
            to_value(CT::from_vec(present_k, (b, hk, pr, d), &dev)?)?,
            to_value(CT::from_vec(present_v, (b, hk, pr, d), &dev)?)?,
        ])
    }
}

/// Softmax with an extra logit `sink` in the denominator only (attention sinks; 0 for ONNX
/// Runtime's `smooth_softmax`): `p_j = exp(x_j - m) / (sum_k exp(x_k - m) + exp(sink - m))`,
/// `m = max(max_j x_j, sink)`.
fn smooth_softmax(row: &mut [f32], sink: f32) {
    let m = row.iter().fold(sink, |a, &x| a.max(x));
    let mut sum = (sink - m).exp();
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_halves_and_pairs() {
        // A quarter turn on the first pair of rotated features, none on the second; one feature left.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let (cos, sin) = ([0.0, 1.0], [1.0, 0.0]);
        let mut out = [0.0; 5];
        rotate(&x, &mut out, &cos, &sin, false); // pairs (x0, x2), (x1, x3)
        assert_eq!(out, [-3.0, 2.0, 1.0, 4.0, 5.0]);
        rotate(&x, &mut out, &cos, &sin, true); // pairs (x0, x1), (x2, x3)
        assert_eq!(out, [-2.0, 1.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn smooth_softmax_adds_the_sink_to_the_denominator() {
        let mut row = [0.0f32, 0.0];
        smooth_softmax(&mut row, 0.0);
        assert!(row.iter().all(|&p| (p - 1.0 / 3.0).abs() < 1e-7));
        // A very low sink is a plain softmax; a very high one takes all the mass.
        let mut row = [1.0f32, 2.0];
        smooth_softmax(&mut row, -1e4);
        assert!((row[0] + row[1] - 1.0).abs() < 1e-6);
        let mut row = [1.0f32, 2.0];
        smooth_softmax(&mut row, 1e4);
        assert!(row.iter().all(|&p| p == 0.0));
    }
}
