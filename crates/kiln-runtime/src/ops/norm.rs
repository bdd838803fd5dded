//! Operator family `norm`: BatchNormalization, InstanceNormalization, LayerNormalization,
//! GroupNormalization, RMSNormalization, LpNormalization, MeanVarianceNormalization, LRN, and ONNX
//! Runtime's RMS norms: SimplifiedLayerNormalization (registered in the default domain, where ONNX
//! Runtime's exporters put it, and in `com.microsoft`) and `com.microsoft::SkipSimplifiedLayerNormalization`.
//!
//! Everything runs on whole candle tensors; f16/bf16 are computed in f32 and cast back. The RMS norms
//! take a fused f32 CPU path (one pass per row, `fastmath::rms_norm_row`) when the scale has exactly
//! the normalized shape.

#![allow(clippy::needless_range_loop)]

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;
use rayon::prelude::*;

use super::common::{broadcast_dims, elems, norm_axes, norm_axis, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor, Value};

const MS: &str = "com.microsoft";

pub fn register(r: &mut Registry) {
    r.add("BatchNormalization", batch_norm);
    r.add("InstanceNormalization", instance_norm);
    r.add("LayerNormalization", layer_norm);
    r.add("GroupNormalization", group_norm);
    r.add("RMSNormalization", rms_norm);
    r.add("SimplifiedLayerNormalization", simplified_layer_norm);
    r.add_domain(MS, "SimplifiedLayerNormalization", simplified_layer_norm);
    r.add_domain(MS, "SkipSimplifiedLayerNormalization", skip_simplified_layer_norm);
    r.add("LpNormalization", lp_norm);
    r.add("MeanVarianceNormalization", mvn);
    r.add("LRN", lrn);
}

/// Compute dtype for a float input: f16/bf16 widen to f32.
fn work(t: &Tensor) -> Result<CT> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(t.candle().clone()),
        DType::F16 | DType::BF16 => Ok(t.candle().to_dtype(CDType::F32)?),
        d => bail!("expected a float tensor, found {d}"),
    }
}

/// Widens `t` to the compute dtype `like`.
fn work_as(t: &Tensor, like: &CT) -> Result<CT> {
    if !t.dtype().is_float() {
        bail!("expected a float tensor, found {}", t.dtype());
    }
    Ok(t.candle().to_dtype(like.dtype())?)
}

fn back(t: CT, dt: DType) -> Result<Tensor> {
    let s = crate::tensor::storage_dtype(dt)?;
    Tensor::new(if t.dtype() == s { t } else { t.to_dtype(s)? }, dt)
}

/// Shape `[1, C, 1, ...]` for per-channel parameters of a rank-`r` input.
fn chan_shape(c: usize, r: usize) -> Vec<usize> {
    let mut s = vec![1usize; r.max(2)];
    s[1] = c;
    s
}

fn batch_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let eps = n.attr_f("epsilon", 1e-5)? as f64;
    let momentum = n.attr_f("momentum", 0.9)? as f64;
    let training = n.opset >= 14 && n.attr_i("training_mode", 0)? != 0;
    let nout = n.num_outputs();
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let xc = work(x)?;
        let r = x.rank();
        if r < 2 {
            bail!("BatchNormalization needs rank >= 2");
        }
        let c = x.dims()[1];
        let per_act: usize = x.dims()[1..].iter().product();
        let p = |i: usize| -> Result<CT> {
            let t = tin(ins, i)?;
            if t.elem_count() == c {
                Ok(work_as(t, &xc)?.reshape(chan_shape(c, r))?)
            } else if t.elem_count() == per_act && !training {
                // Opset < 9 with spatial = 0: one value per activation.
                let mut d = x.dims().to_vec();
                d[0] = 1;
                Ok(work_as(t, &xc)?.reshape(d)?)
            } else {
                bail!("parameter {i} has {} values, expected {c}", t.elem_count())
            }
        };
        let (scale, bias, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
        if training {
            // Statistics over every axis but 1.
            let xt = xc
                .transpose(0, 1)?
                .contiguous()?
                .reshape((c, x.elem_count() / c.max(1)))?;
            let bm = xt.mean_keepdim(1)?;
            let bv = xt.broadcast_sub(&bm)?.sqr()?.mean_keepdim(1)?;
            let (bm, bv) = (bm.reshape(chan_shape(c, r))?, bv.reshape(chan_shape(c, r))?);
            let y = xc
                .broadcast_sub(&bm)?
                .broadcast_div(&(bv.clone() + eps)?.sqrt()?)?
                .broadcast_mul(&scale)?
                .broadcast_add(&bias)?;
            let om = ((mean * momentum)? + (bm * (1.0 - momentum))?)?.flatten_all()?;
            let ov = ((var * momentum)? + (bv * (1.0 - momentum))?)?.flatten_all()?;
            let mut out = vec![Value::Tensor(back(y, x.dtype())?)];
            if nout > 1 {
                out.push(Value::Tensor(back(om, x.dtype())?));
            }
            if nout > 2 {
                out.push(Value::Tensor(back(ov, x.dtype())?));
            }
            return Ok(out);
        }
        let inv = scale.broadcast_div(&(var + eps)?.sqrt()?)?;
        let shift = bias.broadcast_sub(&mean.broadcast_mul(&inv)?)?;
        let y = xc.broadcast_mul(&inv)?.broadcast_add(&shift)?;
        out1(back(y, x.dtype())?)
    }))
}

/// Normalizes rows of a 2-D tensor: returns (centered * inv_std, mean, inv_std).
fn norm_rows(x2: &CT, eps: f64) -> Result<(CT, CT, CT)> {
    let mean = x2.mean_keepdim(1)?;
    let cen = x2.broadcast_sub(&mean)?;
    let var = cen.sqr()?.mean_keepdim(1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok((cen.broadcast_mul(&inv)?, mean, inv))
}

fn instance_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let eps = n.attr_f("epsilon", 1e-5)? as f64;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let xc = work(x)?;
        let d = x.dims().to_vec();
        if d.len() < 2 {
            bail!("InstanceNormalization needs rank >= 2");
        }
        let (nb, c) = (d[0], d[1]);
        let inner: usize = d[2..].iter().product();
        let (y, _, _) = norm_rows(&xc.reshape((nb * c, inner))?, eps)?;
        let cs = chan_shape(c, d.len());
        let scale = work_as(tin(ins, 1)?, &xc)?.reshape(cs.as_slice())?;
        let bias = work_as(tin(ins, 2)?, &xc)?.reshape(cs.as_slice())?;
        let y = y.reshape(d.as_slice())?.broadcast_mul(&scale)?.broadcast_add(&bias)?;
        out1(back(y, x.dtype())?)
    }))
}

/// Compute dtype from `stash_type` (1 = f32) and the input.
fn stash_work(x: &Tensor, stash: i64) -> Result<CT> {
    let c = work(x)?;
    if stash == 1 || c.dtype() == CDType::F64 {
        Ok(c)
    } else {
        Ok(c.to_dtype(CDType::F64)?)
    }
}

fn layer_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", -1)?;
    let eps = n.attr_f("epsilon", 1e-5)? as f64;
    let stash = n.attr_i("stash_type", 1)?;
    let nout = n.num_outputs();
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let d = x.dims().to_vec();
        let a = norm_axis(axis, d.len())?;
        if nout == 1 && stash == 1 {
            let (s, b) = (
                tin_opt(ins, 1)?.map(Tensor::candle),
                tin_opt(ins, 2)?.map(Tensor::candle),
            );
            if let Some(y) = crate::cuda_kernels::layer_norm(x.candle(), s, b, a, eps as f32, false)? {
                return out1(Tensor::new(y, x.dtype())?);
            }
        }
        let outer: usize = d[..a].iter().product();
        if nout == 1 {
            if let Some(y) = layer_norm_f32(x, a, tin_opt(ins, 1)?, tin_opt(ins, 2)?, eps as f32)? {
                return out1(y);
            }
        }
        let xc = stash_work(x, stash)?;
        let (y, mean, inv) = norm_rows(&xc.reshape((outer, d[a..].iter().product::<usize>()))?, eps)?;
        let mut y = y.reshape(d.as_slice())?;
        if let Some(s) = tin_opt(ins, 1)? {
            y = y.broadcast_mul(&work_as(s, &y)?)?;
        }
        if let Some(b) = tin_opt(ins, 2)? {
            y = y.broadcast_add(&work_as(b, &y)?)?;
        }
        let mut out = vec![Value::Tensor(back(y, x.dtype())?)];
        let mut sd = d.clone();
        sd[a..].iter_mut().for_each(|v| *v = 1);
        let stat_dt = if stash == 1 { DType::F32 } else { x.dtype() };
        if nout > 1 {
            out.push(Value::Tensor(back(mean.reshape(sd.as_slice())?, stat_dt)?));
        }
        if nout > 2 {
            out.push(Value::Tensor(back(inv.reshape(sd.as_slice())?, stat_dt)?));
        }
        Ok(out)
    }))
}

/// Fused CPU LayerNormalization for f32 `x` with per-row f32 scale (and bias) of the normalized
/// size: rows in parallel, one read and one write of `x`. `None` when the case does not apply.
fn layer_norm_f32(
    x: &Tensor,
    axis: usize,
    scale: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<Option<Tensor>> {
    use crate::fastmath::with_f32;
    let d = x.dims();
    let inner: usize = d[axis..].iter().product();
    let rows: usize = d[..axis].iter().product();
    let Some(scale) = scale else { return Ok(None) };
    // Scale and bias must be exactly the normalized dims (leading 1s aside), not a broadcast.
    let strip = |v: &[usize]| -> Vec<usize> { v.iter().copied().skip_while(|&x| x == 1).collect() };
    let want = strip(&d[axis..]);
    let fits = |t: &Tensor| t.dtype() == DType::F32 && strip(t.dims()) == want;
    if x.dtype() != DType::F32 || inner == 0 || rows == 0 || !fits(scale) || bias.is_some_and(|b| !fits(b)) {
        return Ok(None);
    }
    let (Some(sv), bv) = (
        with_f32(&scale.candle().contiguous()?, |s| s.to_vec()),
        match bias {
            Some(b) => with_f32(&b.candle().contiguous()?, |s| s.to_vec()),
            None => None,
        },
    ) else {
        return Ok(None);
    };
    if bias.is_some() && bv.is_none() {
        return Ok(None);
    }
    let out = with_f32(x.candle(), |xs| {
        let mut y = vec![0f32; xs.len()];
        y.par_chunks_mut(inner)
            .zip(xs.par_chunks(inner))
            .with_min_len((16384 / inner).max(1))
            .for_each(|(yr, xr)| crate::fastmath::layer_norm_row(xr, &sv, bv.as_deref(), eps, yr));
        y
    });
    match out {
        Some(y) => Ok(Some(Tensor::new(CT::from_vec(y, d, x.device())?, DType::F32)?)),
        None => Ok(None),
    }
}

fn rms_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", -1)?;
    let eps = n.attr_f("epsilon", 1e-5)? as f64;
    let stash = n.attr_i("stash_type", 1)?;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let (y, _) = rms_norm_run(x, tin_opt(ins, 1)?, axis, eps, stash, false)?;
        out1(y)
    }))
}

/// `SimplifiedLayerNormalization(X, scale)` (ONNX Runtime): RMSNormalization over the dims from
/// `axis` on, with the optional second output `inv_std_var` (`1 / sqrt(mean(x²) + eps)`, the
/// normalized dims kept as 1s, f32 with `stash_type` 1).
fn simplified_layer_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", -1)?;
    let eps = n.attr_f("epsilon", 1e-5)? as f64;
    let stash = n.attr_i("stash_type", 1)?;
    if n.num_outputs() > 2 {
        return Err(n.err(format!("has {} outputs, at most 2 (Y, inv_std_var)", n.num_outputs())));
    }
    let want_inv = wired(n, 1);
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let scale = tin(ins, 1).map_err(|_| crate::RuntimeError::msg("input 1 (scale) is required"))?;
        let (y, inv) = rms_norm_run(x, Some(scale), axis, eps, stash, want_inv)?;
        let mut out = vec![Value::Tensor(y)];
        if let Some(inv) = inv {
            out.push(Value::Tensor(inv));
        }
        Ok(out)
    }))
}

/// Whether the node's output `i` is wired to a value.
fn wired(n: &NodeCtx, i: usize) -> bool {
    n.node.outputs.get(i).is_some_and(|o| o.is_some())
}

/// A zero-element stand-in for an output position the node leaves unwired (the executor drops it).
fn unwired(dev: &candle_core::Device) -> Result<Value> {
    Ok(Value::Tensor(Tensor::new(CT::zeros(0, CDType::F32, dev)?, DType::F32)?))
}

/// RMS normalization of `x` over the dims from `axis` on, times `scale` (broadcast to them); with
/// `want_inv`, also `1 / sqrt(mean(x²) + eps)` per row (shape of `x` with the normalized dims 1).
fn rms_norm_run(
    x: &Tensor,
    scale: Option<&Tensor>,
    axis: i64,
    eps: f64,
    stash: i64,
    want_inv: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let d = x.dims().to_vec();
    let a = norm_axis(axis, d.len())?;
    if !x.dtype().is_float() {
        bail!("X must be a float tensor, found {}", x.dtype());
    }
    let mut stat_dims = d.clone();
    stat_dims[a..].iter_mut().for_each(|v| *v = 1);
    let stat_dt = if stash == 1 { DType::F32 } else { x.dtype() };
    if stash == 1 && !want_inv {
        let s = scale.map(Tensor::candle);
        if let Some(y) = crate::cuda_kernels::layer_norm(x.candle(), s, None, a, eps as f32, true)? {
            return Ok((Tensor::new(y, x.dtype())?, None));
        }
    }
    if let Some(scale) = scale {
        if let Some((y, inv)) = rms_norm_f32(x, a, scale, eps as f32)? {
            let inv = match want_inv {
                true => Some(back(CT::from_vec(inv, stat_dims.as_slice(), x.device())?, stat_dt)?),
                false => None,
            };
            return Ok((y, inv));
        }
    }
    let outer: usize = d[..a].iter().product();
    let xc = stash_work(x, stash)?;
    let x2 = xc.reshape((outer, d[a..].iter().product::<usize>()))?;
    let inv = (x2.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let mut y = x2.broadcast_mul(&inv)?.reshape(d.as_slice())?;
    if let Some(s) = scale {
        y = y.broadcast_mul(&work_as(s, &y)?)?;
    }
    let inv = match want_inv {
        true => Some(back(inv.reshape(stat_dims.as_slice())?, stat_dt)?),
        false => None,
    };
    Ok((back(y, x.dtype())?, inv))
}

/// Scale values when `scale` is an f32 tensor of exactly the normalized dims `norm` (leading 1s
/// aside, no broadcast), for the fused row kernels.
fn exact_scale(scale: &Tensor, norm: &[usize]) -> Result<Option<Vec<f32>>> {
    let strip = |v: &[usize]| -> Vec<usize> { v.iter().copied().skip_while(|&x| x == 1).collect() };
    if scale.dtype() != DType::F32 || strip(scale.dims()) != strip(norm) {
        return Ok(None);
    }
    Ok(crate::fastmath::with_f32(&scale.candle().contiguous()?, |s| s.to_vec()))
}

/// Fused CPU RMS normalization for f32 `x` and an f32 scale of the normalized dims: rows in
/// parallel, one read and one write of `x`. Returns Y and the per-row inverse RMS; `None` when the
/// case does not apply.
fn rms_norm_f32(x: &Tensor, axis: usize, scale: &Tensor, eps: f32) -> Result<Option<(Tensor, Vec<f32>)>> {
    let d = x.dims();
    let inner: usize = d[axis..].iter().product();
    if x.dtype() != DType::F32 || inner == 0 {
        return Ok(None);
    }
    let Some(sv) = exact_scale(scale, &d[axis..])? else {
        return Ok(None);
    };
    let out = crate::fastmath::with_f32(x.candle(), |xs| {
        let mut y = vec![0f32; xs.len()];
        let mut inv = vec![0f32; xs.len() / inner];
        y.par_chunks_mut(inner)
            .zip(xs.par_chunks(inner))
            .zip(inv.par_iter_mut())
            .with_min_len((16384 / inner).max(1))
            .for_each(|((yr, xr), iv)| *iv = crate::fastmath::rms_norm_row(xr, &sv, eps, yr));
        (y, inv)
    });
    match out {
        Some((y, inv)) => Ok(Some((Tensor::new(CT::from_vec(y, d, x.device())?, DType::F32)?, inv))),
        None => Ok(None),
    }
}

/// `com.microsoft::SkipSimplifiedLayerNormalization(input, skip, gamma, bias?)`: with
/// `s = input + skip (+ bias)`, output 0 is `s / sqrt(mean(s²) + eps) * gamma` over the last dim,
/// output 3 (`input_skip_bias_sum`) is `s`, output 2 (`inv_std_var`) the per-row inverse RMS (f32,
/// last dim 1). Output 1 (`mean`) has no meaning for an RMS norm and is refused when wired; unwired
/// outputs are not computed. `skip` has the input's shape or broadcasts to it (`[S, H]`, `[1, S, H]`).
fn skip_simplified_layer_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let eps = n.attr_f("epsilon", 1e-5)?;
    let nout = n.num_outputs();
    if nout > 4 {
        return Err(n.err(format!("has {nout} outputs, at most 4")));
    }
    if wired(n, 1) {
        return Err(n.err("output 1 (mean) is not produced by an RMS norm; leave it unwired"));
    }
    let (want_inv, want_sum) = (wired(n, 2), wired(n, 3));
    Ok(kernel(move |cx, ins| {
        let (x, skip, gamma) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
        let bias = tin_opt(ins, 3)?;
        let d = x.dims().to_vec();
        let Some(&hidden) = d.last() else {
            bail!("input must have rank >= 1, got a scalar");
        };
        if !x.dtype().is_float() {
            bail!("input must be a float tensor, found {}", x.dtype());
        }
        for (t, what) in [(Some(skip), "skip"), (Some(gamma), "gamma"), (bias, "bias")] {
            if let Some(t) = t {
                if t.dtype() != x.dtype() {
                    bail!("{what} has dtype {}, the input {}", t.dtype(), x.dtype());
                }
            }
        }
        if gamma.dims() != [hidden] {
            bail!(
                "gamma has shape {:?}, expected [{hidden}] (the input's last dim)",
                gamma.dims()
            );
        }
        if let Some(b) = bias {
            if b.dims() != [hidden] {
                bail!(
                    "bias has shape {:?}, expected [{hidden}] (the input's last dim)",
                    b.dims()
                );
            }
        }
        let skip_fits = skip.dims().last() == Some(&hidden)
            && skip.rank() <= d.len()
            && broadcast_dims(skip.dims(), &d).is_ok_and(|b| b == d);
        if !skip_fits {
            bail!(
                "skip has shape {:?}, which does not broadcast to the input's {d:?}",
                skip.dims()
            );
        }
        cx.check_alloc(elems(&d).saturating_mul(1 + want_sum as u128), x.dtype())?;
        let mut stat_dims = d.clone();
        stat_dims[d.len() - 1] = 1;
        let (y, sum, inv) = match skip_rms_f32(x, skip, gamma, bias, eps, want_sum)? {
            Some(r) => r,
            None => {
                let xc = work(x)?;
                let mut s = xc.broadcast_add(&work_as(skip, &xc)?.broadcast_as(d.as_slice())?)?;
                if let Some(b) = bias {
                    s = s.broadcast_add(&work_as(b, &xc)?)?;
                }
                let rows = elems(&d[..d.len() - 1]) as usize;
                let s2 = s.reshape((rows, hidden))?;
                let inv = (s2.sqr()?.mean_keepdim(1)? + eps as f64)?.sqrt()?.recip()?;
                let y = s2.broadcast_mul(&inv)?.broadcast_mul(&work_as(gamma, &xc)?)?;
                let y = back(y.reshape(d.as_slice())?, x.dtype())?;
                let sum = match want_sum {
                    true => Some(back(s, x.dtype())?),
                    false => None,
                };
                let inv = inv.to_dtype(CDType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                (y, sum, inv)
            }
        };
        let dev = x.device();
        let mut out = vec![Value::Tensor(y)];
        if nout > 1 {
            out.push(unwired(dev)?);
        }
        if nout > 2 {
            out.push(match want_inv {
                true => Value::Tensor(Tensor::new(CT::from_vec(inv, stat_dims.as_slice(), dev)?, DType::F32)?),
                false => unwired(dev)?,
            });
        }
        if nout > 3 {
            out.push(match sum {
                Some(s) => Value::Tensor(s),
                None => unwired(dev)?,
            });
        }
        Ok(out)
    }))
}

type SkipRms = (Tensor, Option<Tensor>, Vec<f32>);

/// Fused CPU SkipSimplifiedLayerNormalization for f32 tensors with `skip` of the input's shape: per
/// row, the sum, its RMS and the normalized row in one pass. Returns (Y, the sum when asked for, the
/// inverse RMS per row); `None` when the case does not apply.
fn skip_rms_f32(
    x: &Tensor,
    skip: &Tensor,
    gamma: &Tensor,
    bias: Option<&Tensor>,
    eps: f32,
    want_sum: bool,
) -> Result<Option<SkipRms>> {
    use crate::fastmath::f32_view;
    let d = x.dims();
    let hidden = d.last().copied().unwrap_or(0);
    if x.dtype() != DType::F32 || skip.dims() != d || hidden == 0 {
        return Ok(None);
    }
    let Some(gv) = exact_scale(gamma, &[hidden])? else {
        return Ok(None);
    };
    let bv = match bias {
        None => None,
        Some(b) => match exact_scale(b, &[hidden])? {
            Some(v) => Some(v),
            None => return Ok(None),
        },
    };
    let (xc, sc) = (x.candle().contiguous()?, skip.candle().contiguous()?);
    let (Some(xv), Some(sv)) = (f32_view(&xc), f32_view(&sc)) else {
        return Ok(None);
    };
    let (xs, ss) = (xv.slice(), sv.slice());
    let rows = xs.len() / hidden;
    let mut y = vec![0f32; xs.len()];
    let mut sum = vec![0f32; xs.len()];
    let mut inv = vec![0f32; rows];
    y.par_chunks_mut(hidden)
        .zip(sum.par_chunks_mut(hidden))
        .zip(inv.par_iter_mut())
        .enumerate()
        .with_min_len((16384 / hidden).max(1))
        .for_each(|(r, ((yr, sr), iv))| {
            let (xr, kr) = (&xs[r * hidden..(r + 1) * hidden], &ss[r * hidden..(r + 1) * hidden]);
            match &bv {
                Some(b) => sr
                    .iter_mut()
                    .zip(xr.iter().zip(kr).zip(b))
                    .for_each(|(o, ((&a, &k), &bb))| *o = a + k + bb),
                None => sr
                    .iter_mut()
                    .zip(xr.iter().zip(kr))
                    .for_each(|(o, (&a, &k))| *o = a + k),
            }
            *iv = crate::fastmath::rms_norm_row(sr, &gv, eps, yr);
        });
    let dev = x.device();
    let y = Tensor::new(CT::from_vec(y, d, dev)?, DType::F32)?;
    let sum = match want_sum {
        true => Some(Tensor::new(CT::from_vec(sum, d, dev)?, DType::F32)?),
        false => None,
    };
    Ok(Some((y, sum, inv)))
}

fn group_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let eps = n.attr_f("epsilon", 1e-5)? as f64;
    let groups = n.attr_i("num_groups", 0)?;
    let stash = n.attr_i("stash_type", 1)?;
    if groups <= 0 {
        return Err(n.err("num_groups must be positive"));
    }
    let g = groups as usize;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let d = x.dims().to_vec();
        if d.len() < 2 || d[1] % g != 0 {
            bail!(
                "GroupNormalization: channels {:?} not divisible by {g} groups",
                d.get(1)
            );
        }
        let (nb, c) = (d[0], d[1]);
        let xc = stash_work(x, stash)?;
        let per_group: usize = d[1..].iter().product::<usize>() / g;
        let (y, _, _) = norm_rows(&xc.reshape((nb * g, per_group))?, eps)?;
        let y = y.reshape(d.as_slice())?;
        let per = |t: &Tensor| -> Result<CT> {
            let v = work_as(t, &y)?.flatten_all()?;
            let v = if v.dims()[0] == g && g != c {
                // Opset 18: one value per group, repeated over its channels.
                v.reshape((g, 1))?.broadcast_as((g, c / g))?.flatten_all()?
            } else {
                v
            };
            if v.dims()[0] != c {
                bail!("GroupNormalization: parameter has {} values", v.dims()[0]);
            }
            Ok(v.reshape(chan_shape(c, d.len()))?)
        };
        let y = y
            .broadcast_mul(&per(tin(ins, 1)?)?)?
            .broadcast_add(&per(tin(ins, 2)?)?)?;
        out1(back(y, x.dtype())?)
    }))
}

fn lp_norm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", -1)?;
    let p = n.attr_i("p", 2)?;
    if p != 1 && p != 2 {
        return Err(n.err(format!("LpNormalization: p must be 1 or 2, got {p}")));
    }
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let a = norm_axis(axis, x.rank())?;
        let xc = work(x)?;
        let norm = if p == 1 {
            xc.abs()?.sum_keepdim(a)?
        } else {
            xc.sqr()?.sum_keepdim(a)?.sqrt()?
        };
        let zero = norm.eq(0.0)?;
        let safe = zero.where_cond(&norm.ones_like()?, &norm)?;
        let y = xc.broadcast_div(&safe)?;
        let y = zero.broadcast_as(y.dims())?.where_cond(&y.zeros_like()?, &y)?;
        out1(back(y, x.dtype())?)
    }))
}

fn mvn(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axes = n.attr_ints("axes")?.unwrap_or(vec![0, 2, 3]);
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let ax = norm_axes(&axes, x.rank())?;
        let xc = work(x)?;
        let mut mean = xc.clone();
        let mut msq = xc.sqr()?;
        for &a in &ax {
            mean = mean.mean_keepdim(a)?;
            msq = msq.mean_keepdim(a)?;
        }
        let var = (msq - mean.sqr()?)?.relu()?;
        let std = (var.sqrt()? + 1e-9)?;
        let y = xc.broadcast_sub(&mean)?.broadcast_div(&std)?;
        out1(back(y, x.dtype())?)
    }))
}

fn lrn(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let alpha = n.attr_f("alpha", 1e-4)? as f64;
    let beta = n.attr_f("beta", 0.75)? as f64;
    let bias = n.attr_f("bias", 1.0)? as f64;
    let size = n.attr_i("size", 0)?;
    if size <= 0 {
        return Err(n.err("LRN: size must be positive"));
    }
    let size = size as usize;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        if x.rank() < 3 {
            bail!("LRN needs rank >= 3");
        }
        let xc = work(x)?;
        let c = x.dims()[1];
        // Window [i - c1, i + c2]; parts past the channel range only add zeros.
        let c1 = ((size - 1) / 2).min(c);
        let c2 = (size - 1 - (size - 1) / 2).min(c);
        let sq = xc.sqr()?.pad_with_zeros(1, c1, c2)?;
        let mut sum = sq.narrow(1, 0, c)?;
        for k in 1..=c1 + c2 {
            sum = (sum + sq.narrow(1, k, c)?)?;
        }
        let den = ((sum * (alpha / size as f64))? + bias)?.powf(beta)?;
        let y = xc.div(&den)?;
        out1(back(y, x.dtype())?)
    }))
}
