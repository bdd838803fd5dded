//! ONNX `LinearAttention` (opset 27): recurrent linear attention with linear / gated / delta /
//! gated_delta update rules, GQA/MQA, optional past state.

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;

use super::from_compute;
use crate::ops::common::{tin, tin_opt};
use crate::ops::{kernel, NodeCtx, OpKernel, RunCx};
use crate::{bail, Result, Tensor, Value};

struct LinAttnCfg {
    q_heads: usize,
    kv_heads: usize,
    /// 0 means 1/sqrt(d_k).
    scale: f32,
    gating: bool,
    delta: bool,
}

pub(super) fn linear_attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let (Some(qh), Some(kvh)) = (n.attr_i_opt("q_num_heads")?, n.attr_i_opt("kv_num_heads")?) else {
        return Err(n.err("q_num_heads and kv_num_heads are required"));
    };
    if qh <= 0 || kvh <= 0 || qh % kvh != 0 {
        return Err(n.err(format!(
            "q_num_heads ({qh}) must be a positive multiple of kv_num_heads ({kvh})"
        )));
    }
    let rule = n.attr_s("update_rule", "gated_delta")?;
    let (gating, delta) = match rule.as_str() {
        "linear" => (false, false),
        "gated" => (true, false),
        "delta" => (false, true),
        "gated_delta" => (true, true),
        other => return Err(n.err(format!("unsupported update_rule '{other}'"))),
    };
    let cfg = LinAttnCfg {
        q_heads: usize::try_from(qh).map_err(|_| n.err("q_num_heads is too large"))?,
        kv_heads: usize::try_from(kvh).map_err(|_| n.err("kv_num_heads is too large"))?,
        scale: n.attr_f("scale", 0.0)?,
        gating,
        delta,
    };
    Ok(kernel(move |cx, ins| run_linear_attention(&cfg, cx, ins)))
}

/// (B, T, H*D) -> (T, B*H, D, 1) or (T, B*H, 1, D) (same memory), in the compute dtype.
fn time_major(c: &CT, h: usize, d: usize, column: bool) -> Result<CT> {
    let (b, t, _) = c.dims3()?;
    let x = c.reshape((b, t, h, d))?.transpose(0, 1)?;
    Ok(if column {
        x.reshape((t, b * h, d, 1))?
    } else {
        x.reshape((t, b * h, 1, d))?
    })
}

fn run_linear_attention(cfg: &LinAttnCfg, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    let past = tin_opt(ins, 3)?;
    let decay = tin_opt(ins, 4)?;
    let beta = tin_opt(ins, 5)?;
    let dt = q.dtype();
    if !matches!(dt, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        bail!("LinearAttention expects float inputs, found {dt}");
    }
    for (name, x) in [("key", Some(k)), ("value", Some(v)), ("decay", decay), ("beta", beta)] {
        if let Some(x) = x {
            if x.dtype() != dt {
                bail!("{name} has dtype {} but query has {dt}", x.dtype());
            }
            if x.rank() != 3 {
                bail!("{name} must be rank 3 (B, T, H*D), got shape {:?}", x.dims());
            }
        }
    }
    if q.rank() != 3 {
        bail!("query must be rank 3 (B, T, H*D), got shape {:?}", q.dims());
    }
    if cfg.gating != decay.is_some() {
        bail!("the decay input must be given exactly for the gated update rules");
    }
    if cfg.delta != beta.is_some() {
        bail!("the beta input must be given exactly for the delta update rules");
    }
    let (hq, hkv) = (cfg.q_heads, cfg.kv_heads);
    let qd = q.dims();
    let (b, t, qhid) = (qd[0], qd[1], qd[2]);
    for (name, x) in [("key", Some(k)), ("value", Some(v)), ("decay", decay), ("beta", beta)] {
        if let Some(x) = x {
            if x.dims()[..2] != [b, t] {
                bail!(
                    "{name} shape {:?} does not match query batch/sequence ({b}, {t})",
                    x.dims()
                );
            }
        }
    }
    if qhid % hq != 0 {
        bail!("query hidden size {qhid} is not divisible by q_num_heads {hq}");
    }
    let dk = qhid / hq;
    if hkv.checked_mul(dk) != Some(k.dims()[2]) {
        bail!("key hidden size {} is not kv_num_heads {hkv} * d_k {dk}", k.dims()[2]);
    }
    let vhid = v.dims()[2];
    if vhid % hkv != 0 {
        bail!("value hidden size {vhid} is not divisible by kv_num_heads {hkv}");
    }
    let dv = vhid / hkv;
    let group = hq / hkv;
    let state_dims = [b, hkv, dk, dv];
    let state_dt = match past {
        Some(p) => {
            if !matches!(p.dtype(), DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
                bail!("past_state must be a float tensor, found {}", p.dtype());
            }
            if p.dims() != state_dims {
                bail!("past_state shape {:?} does not match {state_dims:?}", p.dims());
            }
            p.dtype()
        }
        None => dt,
    };
    let out_elems = crate::ops::common::elems(&[b, t, hq, dv]);
    cx.check_alloc(out_elems, DType::F32)?;
    cx.check_alloc(crate::ops::common::elems(&state_dims), DType::F32)?;
    let cd = if dt == DType::F64 { CDType::F64 } else { CDType::F32 };
    let dev = q.device();
    // Head counts come from attributes: keep the products overflow-free even for empty tensors.
    let (Some(bh), Some(out_hid)) = (b.checked_mul(hkv), hq.checked_mul(dv)) else {
        bail!("LinearAttention sizes overflow");
    };
    let mut state = match past {
        Some(p) => p.candle().to_dtype(cd)?.reshape((bh, dk, dv))?,
        None => CT::zeros((bh, dk, dv), cd, dev)?,
    };
    if bh == 0 || t == 0 || dk == 0 || dv == 0 {
        // Nothing to accumulate: the state passes through and every output is an empty sum.
        let out = CT::zeros((b, t, out_hid), cd, dev)?;
        return Ok(vec![
            Value::Tensor(from_compute(out, dt)?),
            Value::Tensor(from_compute(state.reshape((b, hkv, dk, dv))?, state_dt)?),
        ]);
    }
    let scale = if cfg.scale == 0.0 {
        1.0 / (dk as f64).sqrt()
    } else {
        f64::from(cfg.scale)
    };
    let to_cd = |x: &Tensor| -> Result<CT> { Ok(x.candle().to_dtype(cd)?) };
    // Time-major per-step views: q (T, B*Hkv, G, d_k), k (T, B*Hkv, d_k, 1), v (T, B*Hkv, 1, d_v).
    let qc = to_cd(q)?
        .reshape((b, t, hkv, group * dk))?
        .transpose(0, 1)?
        .reshape((t, bh, group, dk))?;
    let kc = time_major(&to_cd(k)?, hkv, dk, true)?;
    let vc = time_major(&to_cd(v)?, hkv, dv, false)?;
    // exp(decay): (T, B*Hkv, 1, 1) per head or (T, B*Hkv, d_k, 1) per key dimension.
    let edecay = match decay {
        None => None,
        Some(g) => {
            let last = g.dims()[2];
            let e = to_cd(g)?.exp()?;
            Some(if last == hkv {
                time_major(&e, hkv, 1, true)?
            } else if last == hkv * dk {
                time_major(&e, hkv, dk, true)?
            } else {
                bail!(
                    "decay last dim {last} must be kv_num_heads ({hkv}) or kv_num_heads*d_k ({})",
                    hkv * dk
                );
            })
        }
    };
    // beta: (T, B*Hkv, 1, 1), a per-token scalar shared by all heads when its last dim is 1.
    let betac = match beta {
        None => None,
        Some(bt) => {
            let last = bt.dims()[2];
            if last != hkv && last != 1 {
                bail!("beta last dim {last} must be kv_num_heads ({hkv}) or 1");
            }
            let x = to_cd(bt)?.broadcast_as((b, t, hkv))?.contiguous()?;
            Some(time_major(&x, hkv, 1, true)?)
        }
    };
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        if cx.options.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Err(crate::RuntimeError::DeadlineExceeded { node: String::new() });
        }
        if let Some(ed) = &edecay {
            state = state.broadcast_mul(&ed.get(i)?)?;
        }
        let kt = kc.get(i)?;
        let mut vt = vc.get(i)?;
        if let Some(bc) = &betac {
            // v_t <- beta_t * (v_t - S^T k_t)
            let retrieved = kt.reshape((bh, 1, dk))?.matmul(&state)?;
            vt = vt.sub(&retrieved)?.broadcast_mul(&bc.get(i)?)?;
        }
        state = state.add(&kt.broadcast_mul(&vt)?)?;
        outs.push(qc.get(i)?.matmul(&state)?);
    }
    let out = CT::stack(&outs, 0)?
        .affine(scale, 0.0)?
        .reshape((t, b, out_hid))?
        .transpose(0, 1)?
        .contiguous()?;
    Ok(vec![
        Value::Tensor(from_compute(out, dt)?),
        Value::Tensor(from_compute(state.reshape((b, hkv, dk, dv))?, state_dt)?),
    ])
}

#[cfg(test)]
mod tests {
    use candle_core::Device as CDevice;

    use super::*;

    fn run(cfg: &LinAttnCfg, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
        let dev = CDevice::Cpu;
        let options = crate::RunOptions::default();
        let cx = RunCx {
            device: &dev,
            options: &options,
        };
        let vals: Vec<Option<Value>> = ins.iter().map(|t| t.clone().map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        let outs = run_linear_attention(cfg, &cx, &refs)?;
        Ok(outs
            .into_iter()
            .map(|v| match v {
                Value::Tensor(t) => t,
                _ => panic!("expected a tensor"),
            })
            .collect())
    }

    fn seq(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| (i as f64 * 0.37 + seed).sin() * 0.5).collect()
    }

    fn t64(v: Vec<f64>, dims: &[usize]) -> Tensor {
        Tensor::from_f64s(v, dims, DType::F64, &CDevice::Cpu).unwrap()
    }

    /// Scalar-loop reference for gated_delta with per-head decay, shared beta, GQA and a past state.
    #[test]
    fn gated_delta_gqa_matches_scalar_reference() {
        let (b, t, hq, hkv, dk, dv) = (2, 3, 4, 2, 3, 2);
        let g = hq / hkv;
        let q = seq(b * t * hq * dk, 0.1);
        let k = seq(b * t * hkv * dk, 0.7);
        let v = seq(b * t * hkv * dv, 1.3);
        let decay: Vec<f64> = seq(b * t * hkv, 2.1).iter().map(|x| -x.abs()).collect();
        let beta: Vec<f64> = seq(b * t, 3.3).iter().map(|x| x.abs() + 0.2).collect();
        let past = seq(b * hkv * dk * dv, 4.9);
        let scale = 0.5;
        let cfg = LinAttnCfg {
            q_heads: hq,
            kv_heads: hkv,
            scale: scale as f32,
            gating: true,
            delta: true,
        };
        let outs = run(
            &cfg,
            &[
                Some(t64(q.clone(), &[b, t, hq * dk])),
                Some(t64(k.clone(), &[b, t, hkv * dk])),
                Some(t64(v.clone(), &[b, t, hkv * dv])),
                Some(t64(past.clone(), &[b, hkv, dk, dv])),
                Some(t64(decay.clone(), &[b, t, hkv])),
                Some(t64(beta.clone(), &[b, t, 1])),
            ],
        )
        .unwrap();
        assert_eq!(outs[0].dims(), [b, t, hq * dv]);
        assert_eq!(outs[1].dims(), [b, hkv, dk, dv]);
        let (out, state) = (outs[0].to_f64_vec().unwrap(), outs[1].to_f64_vec().unwrap());
        let mut s = past;
        let si = |bb: usize, h: usize, i: usize, j: usize| ((bb * hkv + h) * dk + i) * dv + j;
        for bb in 0..b {
            for ti in 0..t {
                for h in 0..hkv {
                    let e = decay[(bb * t + ti) * hkv + h].exp();
                    let kv = |i: usize| k[((bb * t + ti) * hkv + h) * dk + i];
                    for i in 0..dk {
                        for j in 0..dv {
                            s[si(bb, h, i, j)] *= e;
                        }
                    }
                    let mut vt = vec![0.0; dv];
                    for (j, vj) in vt.iter_mut().enumerate() {
                        let r: f64 = (0..dk).map(|i| s[si(bb, h, i, j)] * kv(i)).sum();
                        *vj = beta[bb * t + ti] * (v[((bb * t + ti) * hkv + h) * dv + j] - r);
                    }
                    for i in 0..dk {
                        for (j, vj) in vt.iter().enumerate() {
                            s[si(bb, h, i, j)] += kv(i) * vj;
                        }
                    }
                    for gi in 0..g {
                        let qh = h * g + gi;
                        for j in 0..dv {
                            let o: f64 = (0..dk)
                                .map(|i| q[((bb * t + ti) * hq + qh) * dk + i] * s[si(bb, h, i, j)])
                                .sum();
                            let got = out[((bb * t + ti) * hq + qh) * dv + j];
                            assert!((got - scale * o).abs() < 1e-12, "{got} vs {}", scale * o);
                        }
                    }
                }
            }
        }
        for (a, e) in state.iter().zip(&s) {
            assert!((a - e).abs() < 1e-12);
        }
    }

    #[test]
    fn empty_sequence_passes_state_through() {
        let cfg = LinAttnCfg {
            q_heads: 2,
            kv_heads: 1,
            scale: 0.0,
            gating: false,
            delta: false,
        };
        let past = Tensor::from_f64s(seq(4, 0.0), &[1, 1, 2, 2], DType::F32, &CDevice::Cpu).unwrap();
        let z = |n| Tensor::from_f64s(vec![], &[1, 0, n], DType::F16, &CDevice::Cpu).unwrap();
        let outs = run(&cfg, &[Some(z(4)), Some(z(2)), Some(z(2)), Some(past.clone())]).unwrap();
        assert_eq!(outs[0].dims(), [1, 0, 4]);
        assert_eq!(outs[0].dtype(), DType::F16);
        assert_eq!(outs[1].dtype(), DType::F32);
        assert_eq!(outs[1].to_f64_vec().unwrap(), past.to_f64_vec().unwrap());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = LinAttnCfg {
            q_heads: 2,
            kv_heads: 2,
            scale: 0.0,
            gating: true,
            delta: false,
        };
        let x = |n| t64(seq(2 * n, 0.0), &[1, 2, n]);
        // Missing decay for a gated rule.
        assert!(run(&cfg, &[Some(x(4)), Some(x(4)), Some(x(4))]).is_err());
        // Decay with a last dim that is neither H_kv nor H_kv*d_k.
        assert!(run(&cfg, &[Some(x(4)), Some(x(4)), Some(x(4)), None, Some(x(3))]).is_err());
        // Key head size differs from the query's.
        assert!(run(&cfg, &[Some(x(4)), Some(x(6)), Some(x(4)), None, Some(x(2))]).is_err());
        assert!(run(&cfg, &[Some(x(4)), Some(x(4)), Some(x(4)), None, Some(x(2))]).is_ok());
    }
}
