//! Softmax, LogSoftmax and the losses built on them (NegativeLogLikelihoodLoss,
//! SoftmaxCrossEntropyLoss).
//!
//! Softmax runs on candle over the whole tensor with max subtraction for stability; f16/bf16 are
//! computed in f32. The losses (training ops, rare at inference) gather on the host.

use candle_core::{DType as CDType, Tensor as CT};
use rayon::prelude::*;

use super::common::{norm_axis, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::fastmath;
use crate::{bail, Result, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("Softmax", |n| softmax_factory(n, false));
    r.add("LogSoftmax", |n| softmax_factory(n, true));
    r.add("NegativeLogLikelihoodLoss", |n| loss_factory(n, false));
    r.add("SoftmaxCrossEntropyLoss", |n| loss_factory(n, true));
}

fn softmax_factory(n: &NodeCtx, log: bool) -> Result<Box<dyn OpKernel>> {
    let legacy = n.opset < 13;
    let axis = n.attr_i("axis", if legacy { 1 } else { -1 })?;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        if !log {
            if let Some(y) = softmax_cuda(x, axis, legacy)? {
                return out1(y);
            }
        }
        out1(softmax(x, axis, legacy, log)?)
    }))
}

/// The fused CUDA softmax when `x` is on a CUDA device and the axis is the last one (or, before
/// opset 13, the flattened trailing axes); `None` otherwise.
fn softmax_cuda(x: &Tensor, axis: i64, legacy: bool) -> Result<Option<Tensor>> {
    if x.rank() == 0 || !x.dtype().is_float() {
        return Ok(None);
    }
    let a = norm_axis(axis, x.rank())?;
    let cols = if legacy {
        x.dims()[a..].iter().product()
    } else if a + 1 == x.rank() {
        x.dims()[a]
    } else {
        return Ok(None);
    };
    let spec = crate::cuda_kernels::SoftmaxSpec::plain(cols);
    match crate::cuda_kernels::softmax(x.candle(), &spec)? {
        Some(y) => Ok(Some(Tensor::new(y, x.dtype())?)),
        None => Ok(None),
    }
}

/// Softmax (or log-softmax) of `x` along `axis`; `legacy` (opset < 13) flattens to 2-D at `axis`.
fn softmax(x: &Tensor, axis: i64, legacy: bool, log: bool) -> Result<Tensor> {
    let dt = x.dtype();
    if !dt.is_float() {
        bail!("Softmax expects a float input, got {dt}");
    }
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let dims = x.dims().to_vec();
    let store = x.candle().dtype();
    let mut c = match store {
        CDType::F16 | CDType::BF16 => x.candle().to_dtype(CDType::F32)?,
        _ => x.candle().clone(),
    };
    let ax = if x.rank() == 0 {
        c = c.reshape(1)?;
        0
    } else if legacy {
        let a = norm_axis(axis, x.rank())?;
        let pre: usize = dims[..a].iter().product();
        let post: usize = dims[a..].iter().product();
        c = c.reshape((pre, post))?;
        1
    } else {
        norm_axis(axis, x.rank())?
    };
    if c.device().is_cpu() && c.dtype() == CDType::F32 && ax + 1 == c.rank() {
        let r = softmax_last_cpu(&c, log)?.reshape(dims)?.to_dtype(store)?;
        return Tensor::new(r, dt);
    }
    let m = c.max_keepdim(ax)?;
    let d = c.broadcast_sub(&m)?;
    let e = d.exp()?;
    let s = e.sum_keepdim(ax)?;
    let r = if log {
        d.broadcast_sub(&s.log()?)?
    } else {
        e.broadcast_div(&s)?
    };
    let r = r.reshape(dims)?.to_dtype(store)?;
    Tensor::new(r, dt)
}

/// Fused CPU softmax over the last axis of an f32 tensor: one pass per row (max, exp-sum, scale),
/// rows in parallel.
fn softmax_last_cpu(c: &CT, log: bool) -> Result<CT> {
    let dims = c.dims().to_vec();
    let len = dims.last().copied().unwrap_or(1).max(1);
    let mut v = c.flatten_all()?.to_vec1::<f32>()?;
    let min_rows = (16384 / len).max(1);
    v.par_chunks_mut(len).with_min_len(min_rows).for_each(|row| {
        if log {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
            let ls = s.ln();
            row.iter_mut().for_each(|x| *x = *x - m - ls);
        } else {
            fastmath::softmax_row(row);
        }
    });
    Ok(CT::from_vec(v, dims, c.device())?)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

fn loss_factory(n: &NodeCtx, with_softmax: bool) -> Result<Box<dyn OpKernel>> {
    let reduction = match n.attr_s("reduction", "mean")?.as_str() {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => return Err(n.err(format!("unknown reduction '{other}'"))),
    };
    let ignore = n.attr_i_opt("ignore_index")?;
    let want_log_prob = with_softmax && n.num_outputs() > 1;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let target = tin(ins, 1)?;
        let weight = tin_opt(ins, 2)?;
        let dt = x.dtype();
        if !dt.is_float() {
            bail!("loss input must be float, got {dt}");
        }
        if x.rank() < 2 {
            bail!("loss input must have rank >= 2, got shape {:?}", x.dims());
        }
        let dims = x.dims();
        let (n_, c) = (dims[0], dims[1]);
        let d: usize = dims[2..].iter().product();
        let mut tdims = vec![n_];
        tdims.extend_from_slice(&dims[2..]);
        if target.dims() != tdims.as_slice() {
            bail!("target shape {:?} does not match input shape {:?}", target.dims(), dims);
        }
        let log_prob = if with_softmax {
            Some(softmax(x, 1, false, true)?)
        } else {
            None
        };
        let lp = log_prob.as_ref().unwrap_or(x).to_f64_vec()?;
        let t = target.to_i64_vec()?;
        let w = weight.map(Tensor::to_f64_vec).transpose()?;
        if let Some(w) = &w {
            if w.len() != c {
                bail!("weight has {} values, expected {c}", w.len());
            }
        }
        let mut loss = vec![0f64; n_ * d];
        let mut wsum = 0f64;
        for i in 0..n_ {
            for k in 0..d {
                let p = i * d + k;
                let tv = t.get(p).copied().unwrap_or(0);
                if Some(tv) == ignore {
                    continue;
                }
                if tv < 0 || tv as u64 >= c as u64 {
                    bail!("target value {tv} is out of range [0, {c})");
                }
                let cls = tv as usize;
                let wv = match &w {
                    Some(w) => w.get(cls).copied().unwrap_or(0.0),
                    None => 1.0,
                };
                let v = lp.get((i * c + cls) * d + k).copied().unwrap_or(0.0);
                if let Some(slot) = loss.get_mut(p) {
                    *slot = -v * wv;
                }
                wsum += wv;
            }
        }
        let dev = x.device();
        let out = match reduction {
            Reduction::None => Tensor::from_f64s(loss, &tdims, dt, dev)?,
            Reduction::Sum => Tensor::from_f64s(vec![loss.iter().sum()], &[], dt, dev)?,
            Reduction::Mean => {
                let s: f64 = loss.iter().sum();
                let denom = if w.is_none() && ignore.is_none() {
                    loss.len() as f64
                } else {
                    wsum
                };
                Tensor::from_f64s(vec![s / denom], &[], dt, dev)?
            }
        };
        let mut outs = vec![Value::Tensor(out)];
        if want_log_prob {
            if let Some(lp) = log_prob {
                outs.push(Value::Tensor(lp));
            }
        }
        Ok(outs)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn generic(c: &CT, log: bool) -> CT {
        let ax = c.rank() - 1;
        let m = c.max_keepdim(ax).unwrap();
        let d = c.broadcast_sub(&m).unwrap();
        let e = d.exp().unwrap();
        let s = e.sum_keepdim(ax).unwrap();
        if log {
            d.broadcast_sub(&s.log().unwrap()).unwrap()
        } else {
            e.broadcast_div(&s).unwrap()
        }
    }

    #[test]
    fn fused_last_axis_matches_candle() {
        let dev = Device::Cpu;
        let c = CT::randn(0f32, 3.0, (2, 12, 256, 256), &dev).unwrap();
        for log in [false, true] {
            let t0 = std::time::Instant::now();
            let a = softmax_last_cpu(&c, log).unwrap();
            let t1 = std::time::Instant::now();
            let b = generic(&c, log);
            let t2 = std::time::Instant::now();
            eprintln!("log={log}: fused {:?}, candle {:?}", t1 - t0, t2 - t1);
            let diff = a.sub(&b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
