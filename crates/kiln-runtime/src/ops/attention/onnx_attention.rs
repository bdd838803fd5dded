//! ONNX `Attention` (opset 23+): attributes, input checks, the additive bias (mask, causal, sliding
//! window, padding), and the general path on whole candle tensors (every output, every dtype, every
//! device). The CUDA kernels (`cuda_route`) and the fused f32 CPU path (`fused_cpu`) are tried first.

use candle_core::{DType as CDType, Device as CDevice, Tensor as CT, D};
use kiln_graph::DType;

use super::cuda_route::attention_cuda;
use super::from_compute;
use super::fused_cpu::fused_cpu_attention;
use crate::ops::common::{tin, tin_opt};
use crate::ops::{kernel, NodeCtx, OpKernel, RunCx};
use crate::{bail, Result, Tensor, Value};

fn filled(v: f64, dims: &[usize], cd: CDType, dev: &CDevice) -> Result<CT> {
    Ok(CT::full(v, dims, dev)?.to_dtype(cd)?)
}

/// Turns a u8 "allowed" tensor into an additive bias: 0 where allowed, -inf elsewhere.
fn allowed_to_bias(allowed: &CT, cd: CDType) -> Result<CT> {
    let dims = allowed.dims().to_vec();
    let dev = allowed.device();
    let z = filled(0.0, &dims, cd, dev)?;
    let n = filled(f64::NEG_INFINITY, &dims, cd, dev)?;
    Ok(allowed.where_cond(&z, &n)?)
}

/// Causal / window frontier offset: one for all batches, or one per batch.
enum Offset {
    Scalar(i64),
    PerBatch(Vec<i64>),
}

/// `diff[b?, i, j] = i + offset[b] - j` as i64: shape (q, kv) or (batch, 1, q, kv).
fn diff_tensor(q: usize, kv: usize, off: &Offset, dev: &CDevice) -> Result<CT> {
    let i = CT::arange(0i64, q as i64, dev)?.reshape((q, 1))?;
    let j = CT::arange(0i64, kv as i64, dev)?.reshape((1, kv))?;
    Ok(match off {
        Offset::Scalar(o) => {
            let o = CT::from_vec(vec![*o], (1, 1), dev)?;
            i.broadcast_add(&o)?.broadcast_sub(&j)?
        }
        Offset::PerBatch(v) => {
            let b = v.len();
            let o = CT::from_vec(v.clone(), (b, 1, 1), dev)?;
            i.broadcast_add(&o)?.broadcast_sub(&j)?.reshape((b, 1, q, kv))?
        }
    })
}

fn add_bias(bias: Option<CT>, extra: CT) -> Result<Option<CT>> {
    Ok(Some(match bias {
        None => extra,
        Some(b) => b.broadcast_add(&extra)?,
    }))
}

/// The node's attributes, read once when the kernel is built.
pub(super) struct AttnCfg {
    pub(super) is_causal: bool,
    pub(super) scale: Option<f32>,
    pub(super) q_heads: Option<i64>,
    pub(super) kv_heads: Option<i64>,
    pub(super) softcap: Option<f32>,
    pub(super) mode: i64,
    pub(super) left: i64,
    pub(super) right: i64,
    /// Whether the graph reads output 3 (the QK scores), which the fused CPU path does not produce.
    pub(super) wants_scores: bool,
    pub(super) outputs: usize,
}

pub(super) fn attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let cfg = AttnCfg {
        is_causal: n.attr_i("is_causal", 0)? != 0,
        scale: n.attr_f_opt("scale")?,
        q_heads: n.attr_i_opt("q_num_heads")?,
        kv_heads: n.attr_i_opt("kv_num_heads")?,
        softcap: n.attr_f_opt("softcap")?,
        mode: n.attr_i("qk_matmul_output_mode", 0)?,
        left: n.attr_i("left_window_size", -1)?,
        right: n.attr_i("right_window_size", -1)?,
        wants_scores: n.node.outputs.get(3).is_some_and(|o| o.is_some()),
        outputs: n.num_outputs(),
    };
    if !(0..=3).contains(&cfg.mode) {
        return Err(n.err(format!("qk_matmul_output_mode {} is not supported", cfg.mode)));
    }
    if cfg.left < -1 || cfg.right < -1 {
        return Err(n.err("window sizes must be -1 or nonnegative"));
    }
    Ok(kernel(move |cx, ins| run_attention(&cfg, cx, ins)))
}

/// Splits (B, S, H*D) into (B, H, S, D).
pub(super) fn split_heads(t: &CT, heads: i64, what: &str) -> Result<CT> {
    let (b, s, hid) = t.dims3()?;
    if heads <= 0 || hid % heads as usize != 0 {
        bail!("{what} hidden size {hid} is not divisible by the number of heads {heads}");
    }
    let h = heads as usize;
    Ok(t.reshape((b, s, h, hid / h))?.transpose(1, 2)?.contiguous()?)
}

fn run_attention(cfg: &AttnCfg, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    if let Some(y) = attention_cuda(cfg, ins)? {
        return Ok(vec![Value::Tensor(y)]);
    }
    let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    let mask = tin_opt(ins, 3)?;
    let past_k = tin_opt(ins, 4)?;
    let past_v = tin_opt(ins, 5)?;
    let nonpad = tin_opt(ins, 6)?;
    let dt = q.dtype();
    if !dt.is_float() {
        bail!("Attention expects float inputs, found {dt}");
    }
    if k.dtype() != dt || v.dtype() != dt {
        bail!("Q, K and V must share a dtype");
    }
    let rank = q.rank();
    if k.rank() != rank || v.rank() != rank || !(rank == 3 || rank == 4) {
        bail!("Q, K and V must all be 3-D or all be 4-D");
    }
    if past_k.is_some() != past_v.is_some() {
        bail!("past_key and past_value must be provided together");
    }
    if nonpad.is_some() && past_k.is_some() {
        bail!("nonpad_kv_seqlen cannot be combined with past_key/past_value");
    }
    // 4-D (B, H, S, D) views in the input dtype.
    let (q4, k4, v4) = if rank == 3 {
        let (Some(qh), Some(kvh)) = (cfg.q_heads, cfg.kv_heads) else {
            bail!("q_num_heads and kv_num_heads are required for 3-D inputs");
        };
        (
            split_heads(q.candle(), qh, "Q")?,
            split_heads(k.candle(), kvh, "K")?,
            split_heads(v.candle(), kvh, "V")?,
        )
    } else {
        (q.candle().clone(), k.candle().clone(), v.candle().clone())
    };
    let (b, hq, s, dq) = q4.dims4()?;
    let (bk, hk, _, dk) = k4.dims4()?;
    let (bv, hv, _, dv) = v4.dims4()?;
    if bk != b || bv != b {
        bail!("Q, K and V batch sizes differ");
    }
    if dk != dq {
        bail!("Q head size {dq} differs from K head size {dk}");
    }
    let cat_past = |cur: CT, past: Option<&Tensor>, what: &str| -> Result<CT> {
        match past {
            None => Ok(cur),
            Some(p) => {
                if p.dtype() != dt || p.rank() != 4 {
                    bail!("{what} must be a 4-D tensor of the input dtype");
                }
                let (pd, cd) = (p.dims(), cur.dims());
                if pd[0] != cd[0] || pd[1] != cd[1] || pd[3] != cd[3] {
                    bail!("{what} shape {pd:?} does not match {cd:?}");
                }
                Ok(CT::cat(&[p.candle(), &cur], 2)?)
            }
        }
    };
    let present_k = cat_past(k4, past_k, "past_key")?;
    let present_v = cat_past(v4, past_v, "past_value")?;
    let t = present_k.dim(2)?;
    if present_v.dim(2)? != t {
        bail!("K and V sequence lengths differ");
    }
    if hk != hv {
        bail!("K has {hk} heads but V has {hv}");
    }
    if hk == 0 || hq % hk != 0 {
        bail!("q_num_heads {hq} is not a multiple of kv_num_heads {hk}");
    }
    let reps = hq / hk;
    let past_len = past_k.map(|p| p.dims()[2]).unwrap_or(0);

    let cd = if dt == DType::F64 { CDType::F64 } else { CDType::F32 };
    let dev = q.device();
    let scale = cfg.scale.map(f64::from).unwrap_or(1.0 / (dq as f64).sqrt());

    // ---- additive bias, broadcastable to (B, Hq, S, T) ----
    let mask_b = match mask {
        None => None,
        Some(m) => {
            let mut mc = if m.dtype() == DType::Bool {
                allowed_to_bias(m.candle(), cd)?
            } else if m.dtype().is_float() {
                m.candle().to_dtype(cd)?
            } else {
                bail!("attn_mask must be bool or float, found {}", m.dtype());
            };
            if mc.rank() == 0 {
                mc = mc.reshape((1, 1))?;
            }
            let ml = mc.dims()[mc.rank() - 1];
            if ml < t {
                let mut pd = mc.dims().to_vec();
                let last = pd.len() - 1;
                pd[last] = t - ml;
                let pad = filled(f64::NEG_INFINITY, &pd, cd, dev)?;
                mc = CT::cat(&[&mc, &pad], last)?;
            } else if ml > t && ml != 1 {
                bail!("attn_mask last dimension {ml} exceeds the key length {t}");
            }
            Some(mc)
        }
    };
    let nonpad_v = match nonpad {
        None => None,
        Some(np) => {
            let v = np.to_i64_vec()?;
            if v.len() != b {
                bail!("nonpad_kv_seqlen has {} entries for batch size {b}", v.len());
            }
            Some(v)
        }
    };
    let offset = match (&nonpad_v, past_k) {
        (Some(v), None) => Offset::PerBatch(v.iter().map(|&x| x - s as i64).collect()),
        _ => Offset::Scalar(past_len as i64),
    };
    let window = cfg.left >= 0 || cfg.right >= 0;
    let mut bias = mask_b;
    if cfg.is_causal || window {
        let diff = diff_tensor(s, t, &offset, dev)?;
        let mut allowed: Option<CT> = None;
        let mut and = |a: CT| -> Result<()> {
            allowed = Some(match allowed.take() {
                None => a,
                Some(p) => p.mul(&a)?,
            });
            Ok(())
        };
        if cfg.is_causal {
            and(diff.ge(0i64)?)?;
        }
        if cfg.left >= 0 {
            and(diff.le(cfg.left)?)?;
        }
        if cfg.right >= 0 {
            and(diff.ge(-cfg.right)?)?;
        }
        if let Some(a) = allowed {
            bias = add_bias(bias, allowed_to_bias(&a, cd)?)?;
        }
    }
    if let Some(v) = &nonpad_v {
        let j = CT::arange(0i64, t as i64, dev)?.reshape((1, t))?;
        let lim = CT::from_vec(v.clone(), (b, 1), dev)?;
        let allowed = j.broadcast_lt(&lim)?.reshape((b, 1, 1, t))?;
        bias = add_bias(bias, allowed_to_bias(&allowed, cd)?)?;
    }
    if let Some(bb) = &bias {
        if bb.rank() < 2 {
            bias = Some(bb.broadcast_add(&filled(0.0, &[s, t], cd, dev)?)?);
        }
    }

    if b * hq * s * t * dv == 0 {
        // Degenerate shapes (no queries or no keys): the weighted sum is empty, hence zero.
        let y = CT::zeros((b, hq, s, dv), cd, dev)?;
        let y = if rank == 3 {
            y.transpose(1, 2)?.contiguous()?.reshape((b, s, hq * dv))?
        } else {
            y
        };
        return Ok(vec![
            Value::Tensor(from_compute(y, dt)?),
            Value::Tensor(Tensor::new(present_k, dt)?),
            Value::Tensor(Tensor::new(present_v, dt)?),
            Value::Tensor(from_compute(CT::zeros((b, hq, s, t), cd, dev)?, dt)?),
        ]);
    }

    // The output, and the (B, H, S, T) scores the general path below materializes (the fused CPU path
    // holds one head's (S, T) at a time, per thread): refused before allocating when over the limit.
    cx.check_alloc((b * hq * s) as u128 * dv as u128, dt)?;
    cx.check_alloc(s as u128 * t as u128, dt)?;
    let plain = cfg.softcap.is_none_or(|c| c <= 0.0) && !cfg.wants_scores;
    if plain && dt == DType::F32 && dev.is_cpu() && crate::sgemm::available() {
        if let Some(y) = fused_cpu_attention(&q4, &present_k, &present_v, bias.as_ref(), scale, reps)? {
            let y = if rank == 3 {
                y.transpose(1, 2)?.contiguous()?.reshape((b, s, hq * dv))?
            } else {
                y
            };
            return Ok(vec![
                Value::Tensor(Tensor::new(y, dt)?),
                Value::Tensor(Tensor::new(present_k, dt)?),
                Value::Tensor(Tensor::new(present_v, dt)?),
            ]);
        }
    }

    cx.check_alloc((b * hq * s) as u128 * t as u128, dt)?;
    // ---- QK^T ----
    // bf16 results are rounded at the reference's rounding points (it computes in bf16 throughout).
    let emulate = dt == DType::BF16;
    let rnd = |x: CT| -> Result<CT> {
        if emulate {
            Ok(x.to_dtype(CDType::BF16)?.to_dtype(cd)?)
        } else {
            Ok(x)
        }
    };
    let (qc, kc) = if emulate {
        let ss = rnd(CT::new(&[scale.sqrt() as f32], dev)?)?.to_vec1::<f32>()?[0] as f64;
        (
            rnd(q4.to_dtype(cd)?.affine(ss, 0.0)?)?,
            rnd(present_k.to_dtype(cd)?.affine(ss, 0.0)?)?,
        )
    } else {
        (q4.to_dtype(cd)?.affine(scale, 0.0)?, present_k.to_dtype(cd)?)
    };
    let vc = present_v.to_dtype(cd)?.contiguous()?;
    let qg = qc.contiguous()?.reshape((b, hk, reps * s, dq))?;
    let kt = kc.transpose(2, 3)?.contiguous()?;
    let mut qk = if dq == 0 {
        CT::zeros((b, hq, s, t), cd, dev)?
    } else {
        rnd(qg.matmul(&kt)?.reshape((b, hq, s, t))?)?
    };
    if let Some(c) = cfg.softcap {
        if c > 0.0 {
            let c = c as f64;
            qk = rnd(qk.affine(1.0 / c, 0.0)?.tanh()?.affine(c, 0.0)?)?;
        }
    }
    let qk_bias = match &bias {
        None => qk.clone(),
        Some(bb) => {
            let fast = if emulate || cd != CDType::F32 {
                None
            } else {
                crate::ops::binary_cpu::binary_f32(crate::ops::binary_cpu::BinOp::Add, &qk, &bb.contiguous()?)
            };
            match fast {
                Some(r) => r?,
                None => rnd(qk.broadcast_add(bb)?)?,
            }
        }
    };

    // ---- softmax robust to fully masked rows ----
    if !emulate && cd == CDType::F32 && dev.is_cpu() {
        if let Some(p) = softmax_rows_f32(&qk_bias)? {
            return finish(
                cfg,
                (b, hq, hk, reps, s, t, dv, rank),
                p,
                &vc,
                qk,
                qk_bias,
                present_k,
                present_v,
                dt,
            );
        }
    }
    let mx = qk_bias.max_keepdim(D::Minus1)?;
    let safe = mx.eq(f64::NEG_INFINITY)?.where_cond(&mx.zeros_like()?, &mx)?;
    let e = rnd(rnd(qk_bias.broadcast_sub(&safe)?)?.exp()?)?;
    let sum = if emulate && t <= 256 {
        // numpy reduces bf16 sequentially, rounding after each add.
        let mut acc = e.narrow(D::Minus1, 0, 1.min(t))?;
        for j in 1..t {
            acc = rnd(acc.add(&e.narrow(D::Minus1, j, 1)?)?)?;
        }
        acc
    } else {
        rnd(e.sum_keepdim(D::Minus1)?)?
    };
    let sum = sum.eq(0f64)?.where_cond(&sum.ones_like()?, &sum)?;
    let mut p = rnd(e.broadcast_div(&sum)?)?;
    if let Some(bb) = &bias {
        // Rows whose bias is entirely -inf have no attendable key: their probabilities are 0.
        let masked = bb.max_keepdim(D::Minus1)?.eq(f64::NEG_INFINITY)?;
        if masked.flatten_all()?.max(0)?.to_scalar::<u8>()? != 0 {
            let masked = masked.broadcast_as(p.shape())?.contiguous()?;
            p = masked.where_cond(&p.zeros_like()?, &p)?;
        }
    }

    finish(
        cfg,
        (b, hq, hk, reps, s, t, dv, rank),
        p,
        &vc,
        qk,
        qk_bias,
        present_k,
        present_v,
        dt,
    )
}

/// Softmax over the last axis of f32 scores on the CPU, one fused pass per row; rows whose scores
/// are all -inf (no attendable key) give zeros. `None` when the scores are not a contiguous f32
/// CPU tensor.
fn softmax_rows_f32(scores: &CT) -> Result<Option<CT>> {
    use rayon::prelude::*;
    let Some(t) = scores.dims().last().copied() else {
        return Ok(None);
    };
    if t == 0 {
        return Ok(None);
    }
    let out = crate::fastmath::with_f32(scores, |src| {
        let mut v = src.to_vec();
        v.par_chunks_mut(t).with_min_len((16384 / t).max(1)).for_each(|row| {
            if row.iter().all(|&x| x == f32::NEG_INFINITY) {
                row.iter_mut().for_each(|x| *x = 0.0);
            } else {
                crate::fastmath::softmax_row(row);
            }
        });
        v
    });
    Ok(match out {
        Some(v) => Some(CT::from_vec(v, scores.dims(), scores.device())?),
        None => None,
    })
}

/// Probabilities times V, the output layout, and the node's four outputs.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn finish(
    cfg: &AttnCfg,
    (b, hq, hk, reps, s, t, dv, rank): (usize, usize, usize, usize, usize, usize, usize, usize),
    p: CT,
    vc: &CT,
    qk: CT,
    qk_bias: CT,
    present_k: CT,
    present_v: CT,
    dt: DType,
) -> Result<Vec<Value>> {
    let y = p
        .contiguous()?
        .reshape((b, hk, reps * s, t))?
        .matmul(vc)?
        .reshape((b, hq, s, dv))?;
    let y = if rank == 3 {
        y.transpose(1, 2)?.contiguous()?.reshape((b, s, hq * dv))?
    } else {
        y
    };
    let qk_out = match cfg.mode {
        2 => qk_bias,
        3 => p,
        _ => qk,
    };
    Ok(vec![
        Value::Tensor(from_compute(y, dt)?),
        Value::Tensor(Tensor::new(present_k, dt)?),
        Value::Tensor(Tensor::new(present_v, dt)?),
        Value::Tensor(from_compute(qk_out.contiguous()?, dt)?),
    ])
}
