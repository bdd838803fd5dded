//! Reductions (ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare), ArgMax/ArgMin,
//! CumSum/CumProd, TopK and Hardmax.
//!
//! Float reductions run on candle (`sum_keepdim`, `max_keepdim`, ...) over the whole tensor, with
//! f16/bf16 accumulated in f32. Integer and bool reductions use exact host code on i64 values
//! with wrap-around arithmetic (they are small shape/index computations in practice).

use std::cmp::Ordering;

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;
use rayon::prelude::*;

use super::common::{elems, ints_input, norm_axes, norm_axis, tin};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::{bail, Result, Tensor, Value};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Red {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

pub fn register(r: &mut Registry) {
    r.add("ReduceSum", |n| reduce_factory(n, Red::Sum));
    r.add("ReduceMean", |n| reduce_factory(n, Red::Mean));
    r.add("ReduceMax", |n| reduce_factory(n, Red::Max));
    r.add("ReduceMin", |n| reduce_factory(n, Red::Min));
    r.add("ReduceProd", |n| reduce_factory(n, Red::Prod));
    r.add("ReduceL1", |n| reduce_factory(n, Red::L1));
    r.add("ReduceL2", |n| reduce_factory(n, Red::L2));
    r.add("ReduceLogSum", |n| reduce_factory(n, Red::LogSum));
    r.add("ReduceLogSumExp", |n| reduce_factory(n, Red::LogSumExp));
    r.add("ReduceSumSquare", |n| reduce_factory(n, Red::SumSquare));
    r.add("ArgMax", |n| arg_factory(n, true));
    r.add("ArgMin", |n| arg_factory(n, false));
    r.add("CumSum", |n| cum_factory(n, false));
    r.add("CumProd", |n| cum_factory(n, true));
    r.add("TopK", topk_factory);
    r.add("Hardmax", hardmax_factory);
}

// ---------------------------------------------------------------------------------------------
// Reduce*
// ---------------------------------------------------------------------------------------------

fn reduce_factory(n: &NodeCtx, op: Red) -> Result<Box<dyn OpKernel>> {
    let axes_input_since = if op == Red::Sum { 13 } else { 18 };
    let keepdims = n.attr_i("keepdims", 1)? != 0;
    let noop = n.attr_i("noop_with_empty_axes", 0)? != 0;
    let attr_axes = n.attr_ints("axes")?;
    let use_input = n.opset >= axes_input_since;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let axes = if use_input {
            match ints_input(ins, 1)? {
                Some(a) => Some(a),
                None => attr_axes.clone(),
            }
        } else {
            attr_axes.clone()
        };
        let rank = x.rank();
        let axes: Vec<usize> = match axes {
            Some(a) if !a.is_empty() => {
                let mut v = norm_axes(&a, rank)?;
                v.retain(|&d| d < rank);
                v.sort_unstable();
                v
            }
            _ if noop => Vec::new(),
            _ => (0..rank).collect(),
        };
        out1(reduce(cx, x, op, &axes, keepdims)?)
    }))
}

/// Output dims of a reduction with the reduced axes kept as 1 and, when `keepdims` is false, removed.
fn reduced_dims(dims: &[usize], axes: &[usize], keepdims: bool) -> (Vec<usize>, Vec<usize>) {
    let kept: Vec<usize> = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let fin = if keepdims {
        kept.clone()
    } else {
        dims.iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect()
    };
    (kept, fin)
}

fn int_bounds(dt: DType) -> (i64, i64) {
    match dt {
        DType::Bool => (0, 1),
        DType::U8 => (0, u8::MAX as i64),
        DType::I8 => (i8::MIN as i64, i8::MAX as i64),
        DType::I16 => (i16::MIN as i64, i16::MAX as i64),
        DType::U16 => (0, u16::MAX as i64),
        DType::I32 => (i32::MIN as i64, i32::MAX as i64),
        DType::U32 => (0, u32::MAX as i64),
        DType::U64 => (0, -1),
        _ => (i64::MIN, i64::MAX),
    }
}

/// Value of a reduction over an empty set.
fn empty_value(op: Red, dt: DType) -> (f64, i64) {
    let (lo, hi) = int_bounds(dt);
    match op {
        Red::Sum | Red::L1 | Red::L2 | Red::SumSquare => (0.0, 0),
        Red::Prod => (1.0, 1),
        Red::Mean => (f64::NAN, 0),
        Red::Max => (f64::NEG_INFINITY, lo),
        Red::Min => (f64::INFINITY, hi),
        Red::LogSum | Red::LogSumExp => (f64::NEG_INFINITY, lo),
    }
}

fn reduce(cx: &RunCx, x: &Tensor, op: Red, axes: &[usize], keepdims: bool) -> Result<Tensor> {
    let dt = x.dtype();
    let (kept, fin) = reduced_dims(x.dims(), axes, keepdims);
    if x.elem_count() == 0 {
        let count = elems(&fin);
        cx.check_alloc(count, dt)?;
        let count = count as usize;
        let (fv, iv) = empty_value(op, dt);
        return if dt.is_float() {
            Tensor::from_f64s(vec![fv; count], &fin, dt, x.device())
        } else {
            Tensor::from_i64s(vec![iv; count], &fin, x.device())?.cast(dt)
        };
    }
    if dt.is_float() {
        return reduce_float(x, op, axes, &kept, &fin);
    }
    match op {
        Red::L2 | Red::LogSum | Red::LogSumExp => reduce_float(&x.cast(DType::F64)?, op, axes, &kept, &fin)?.cast(dt),
        _ => {
            let v = x.to_i64_vec()?;
            let dims = x.dims();
            let unsigned64 = dt == DType::U64;
            let r = match op {
                Red::Sum => host_reduce(&v, dims, axes, 0i64, |a, b| a.wrapping_add(b)),
                Red::Prod => host_reduce(&v, dims, axes, 1i64, |a, b| a.wrapping_mul(b)),
                Red::L1 => host_reduce(&v, dims, axes, 0i64, |a, b| a.wrapping_add(b.wrapping_abs())),
                Red::SumSquare => host_reduce(&v, dims, axes, 0i64, |a, b| a.wrapping_add(b.wrapping_mul(b))),
                Red::Max if unsigned64 => host_reduce(&v, dims, axes, 0i64, |a, b| (a as u64).max(b as u64) as i64),
                Red::Min if unsigned64 => host_reduce(&v, dims, axes, -1i64, |a, b| (a as u64).min(b as u64) as i64),
                Red::Max => host_reduce(&v, dims, axes, i64::MIN, i64::max),
                Red::Min => host_reduce(&v, dims, axes, i64::MAX, i64::min),
                Red::Mean => {
                    let count: i64 = axes.iter().map(|&a| dims[a] as i64).product();
                    let s = host_reduce(&v, dims, axes, 0i64, |a, b| a.wrapping_add(b));
                    if count == 0 {
                        bail!("mean over an empty set");
                    }
                    s.into_iter().map(|s| s / count).collect()
                }
                Red::L2 | Red::LogSum | Red::LogSumExp => unreachable_red(op)?,
            };
            Tensor::from_i64s(r, &fin, x.device())?.cast(dt)
        }
    }
}

fn unreachable_red(op: Red) -> Result<Vec<i64>> {
    bail!("internal: {op:?} has no integer path")
}

fn to_compute(c: &CT) -> Result<CT> {
    Ok(match c.dtype() {
        CDType::F16 | CDType::BF16 => c.to_dtype(CDType::F32)?,
        _ => c.clone(),
    })
}

fn sum_axes(c: &CT, axes: &[usize]) -> Result<CT> {
    if axes.is_empty() {
        return Ok(c.clone());
    }
    Ok(c.sum_keepdim(axes.to_vec())?)
}

fn max_axes(c: &CT, axes: &[usize]) -> Result<CT> {
    let mut r = c.clone();
    for &a in axes {
        r = r.max_keepdim(a)?;
    }
    Ok(r)
}

fn min_axes(c: &CT, axes: &[usize]) -> Result<CT> {
    let mut r = c.clone();
    for &a in axes {
        r = r.min_keepdim(a)?;
    }
    Ok(r)
}

/// Replaces non-finite values (inf, nan) by 0.
fn finite_or_zero(m: &CT) -> Result<CT> {
    let z = m.zeros_like()?;
    let finite = m.sub(m)?.eq(&z)?;
    Ok(finite.where_cond(m, &z)?)
}

fn reduce_float(x: &Tensor, op: Red, axes: &[usize], kept: &[usize], fin: &[usize]) -> Result<Tensor> {
    let dt = x.dtype();
    if op == Red::Prod {
        let v = x.to_f64_vec()?;
        let r = host_reduce(&v, x.dims(), axes, 1.0f64, |a, b| a * b);
        return Tensor::from_f64s(r, fin, dt, x.device());
    }
    if matches!(op, Red::Sum | Red::Mean) {
        if let Some(r) = sum_f32_contiguous(x, axes, op == Red::Mean, fin)? {
            return Ok(r);
        }
    }
    let c = to_compute(x.candle())?;
    let r = match op {
        Red::Sum => sum_axes(&c, axes)?,
        Red::Mean => {
            if axes.is_empty() {
                c
            } else {
                c.mean_keepdim(axes.to_vec())?
            }
        }
        Red::Max => max_axes(&c, axes)?,
        Red::Min => min_axes(&c, axes)?,
        Red::L1 => sum_axes(&c.abs()?, axes)?,
        Red::L2 => sum_axes(&c.sqr()?, axes)?.sqrt()?,
        Red::SumSquare => sum_axes(&c.sqr()?, axes)?,
        Red::LogSum => sum_axes(&c, axes)?.log()?,
        Red::LogSumExp => {
            let m = finite_or_zero(&max_axes(&c, axes)?)?;
            sum_axes(&c.broadcast_sub(&m)?.exp()?, axes)?.log()?.add(&m)?
        }
        Red::Prod => unreachable_float()?,
    };
    if r.dims() != kept {
        bail!("internal: reduction produced shape {:?}, expected {kept:?}", r.dims());
    }
    let r = r.reshape(fin)?.to_dtype(x.candle().dtype())?;
    Tensor::new(r, dt)
}

/// ReduceSum / ReduceMean of a contiguous f32 CPU tensor over consecutive axes, in one pass: the
/// tensor is `[outer, reduced, inner]` and each reduced row is added into its output row (a mean
/// pooling's `[8, 64, 384]` sum over the tokens took 0.5 ms through candle's strided sum).
/// `None` for anything else.
fn sum_f32_contiguous(x: &Tensor, axes: &[usize], mean: bool, fin: &[usize]) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || axes.is_empty() || axes.windows(2).any(|w| w[1] != w[0] + 1) {
        return Ok(None);
    }
    let dims = x.dims();
    let (first, last) = (axes[0], axes[axes.len() - 1]);
    let outer: usize = dims[..first].iter().product();
    let red: usize = dims[first..=last].iter().product();
    let inner: usize = dims[last + 1..].iter().product();
    if red == 0 || inner == 0 || outer == 0 {
        return Ok(None);
    }
    let Some(out) = crate::fastmath::with_f32(x.candle(), |v| {
        let mut out = vec![0f32; outer * inner];
        for (o, dst) in out.chunks_exact_mut(inner).enumerate() {
            let block = &v[o * red * inner..(o + 1) * red * inner];
            if inner == 1 {
                // Eight partial sums, so the loop vectorizes.
                let mut acc = [0f32; 8];
                let chunks = block.chunks_exact(8);
                let tail: f32 = chunks.remainder().iter().sum();
                for c in chunks {
                    for (a, &b) in acc.iter_mut().zip(c) {
                        *a += b;
                    }
                }
                dst[0] = acc.iter().sum::<f32>() + tail;
            } else {
                for row in block.chunks_exact(inner) {
                    for (d, &b) in dst.iter_mut().zip(row) {
                        *d += b;
                    }
                }
            }
        }
        if mean {
            let n = red as f32;
            out.iter_mut().for_each(|v| *v /= n);
        }
        out
    }) else {
        return Ok(None);
    };
    Ok(Some(Tensor::new(CT::from_vec(out, fin, x.device())?, DType::F32)?))
}

fn unreachable_float() -> Result<CT> {
    bail!("internal: ReduceProd has a host path")
}

/// Exact host reduction over `axes` (sorted, distinct) of a row-major tensor; result in kept-dims order.
fn host_reduce<T: Copy>(vals: &[T], dims: &[usize], axes: &[usize], init: T, f: impl Fn(T, T) -> T) -> Vec<T> {
    let rank = dims.len();
    let mut ostride = vec![0usize; rank];
    let mut acc = 1usize;
    for d in (0..rank).rev() {
        if !axes.contains(&d) {
            ostride[d] = acc;
            acc *= dims[d];
        }
    }
    let mut out = vec![init; acc];
    let mut idx = vec![0usize; rank];
    let mut o = 0usize;
    for &v in vals {
        if let Some(slot) = out.get_mut(o) {
            *slot = f(*slot, v);
        }
        for d in (0..rank).rev() {
            idx[d] += 1;
            o += ostride[d];
            if idx[d] < dims[d] {
                break;
            }
            o -= ostride[d] * dims[d];
            idx[d] = 0;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// ArgMax / ArgMin
// ---------------------------------------------------------------------------------------------

fn arg_factory(n: &NodeCtx, is_max: bool) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", 0)?;
    let keepdims = n.attr_i("keepdims", 1)? != 0;
    let last = n.attr_i("select_last_index", 0)? != 0;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let a = norm_axis(axis, x.rank())?;
        let Some(&len) = x.dims().get(a) else {
            bail!("ArgMax/ArgMin needs an input of rank >= 1");
        };
        if len == 0 {
            bail!("ArgMax/ArgMin over an empty axis");
        }
        let dev = x.device();
        let mut c = to_compute(x.candle())?;
        if x.dtype() == DType::U64 {
            // Stored as i64: order by the unsigned value through f64 (exact below 2^53).
            let v = x.to_i64_vec()?.into_iter().map(|v| v as u64 as f64).collect::<Vec<_>>();
            c = CT::from_vec(v, x.dims(), dev)?;
        }
        if last {
            let rev: Vec<u32> = (0..len as u32).rev().collect();
            c = c.index_select(&CT::from_vec(rev, len, dev)?, a)?;
        }
        let mut r = if is_max {
            c.argmax_keepdim(a)?
        } else {
            c.argmin_keepdim(a)?
        }
        .to_dtype(CDType::I64)?;
        if last {
            r = CT::full(len as i64 - 1, r.shape(), dev)?.sub(&r)?;
        }
        if !keepdims {
            r = r.squeeze(a)?;
        }
        out1(Tensor::new(r, DType::I64)?)
    }))
}

// ---------------------------------------------------------------------------------------------
// CumSum / CumProd
// ---------------------------------------------------------------------------------------------

fn cum_factory(n: &NodeCtx, prod: bool) -> Result<Box<dyn OpKernel>> {
    let exclusive = n.attr_i("exclusive", 0)? != 0;
    let reverse = n.attr_i("reverse", 0)? != 0;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let axis = tin(ins, 1)?.to_i64_vec()?;
        let [axis] = axis.as_slice() else {
            bail!("axis must hold exactly one value, got {}", axis.len());
        };
        let dims = x.dims();
        let a = norm_axis(*axis, x.rank())?;
        let Some(&len) = dims.get(a) else {
            bail!("CumSum/CumProd needs an input of rank >= 1");
        };
        let outer: usize = dims[..a].iter().product();
        let inner: usize = dims[a + 1..].iter().product();
        let dt = x.dtype();
        if dt.is_float() {
            let v = x.to_f64_vec()?;
            let r = if prod {
                cumulate(&v, outer, len, inner, 1.0, |p, q| p * q, exclusive, reverse)
            } else {
                cumulate(&v, outer, len, inner, 0.0, |p, q| p + q, exclusive, reverse)
            };
            out1(Tensor::from_f64s(r, dims, dt, x.device())?)
        } else {
            let v = x.to_i64_vec()?;
            let r = if prod {
                cumulate(&v, outer, len, inner, 1, i64::wrapping_mul, exclusive, reverse)
            } else {
                cumulate(&v, outer, len, inner, 0, i64::wrapping_add, exclusive, reverse)
            };
            out1(Tensor::from_i64s(r, dims, x.device())?.cast(dt)?)
        }
    }))
}

#[allow(clippy::too_many_arguments)]
fn cumulate<T: Copy>(
    v: &[T],
    outer: usize,
    len: usize,
    inner: usize,
    init: T,
    f: impl Fn(T, T) -> T,
    exclusive: bool,
    reverse: bool,
) -> Vec<T> {
    let mut out = vec![init; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let mut acc = init;
            for step in 0..len {
                let k = if reverse { len - 1 - step } else { step };
                let p = (o * len + k) * inner + i;
                let (Some(&x), Some(slot)) = (v.get(p), out.get_mut(p)) else {
                    continue;
                };
                if exclusive {
                    *slot = acc;
                    acc = f(acc, x);
                } else {
                    acc = f(acc, x);
                    *slot = acc;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// TopK
// ---------------------------------------------------------------------------------------------

fn topk_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", -1)?;
    let largest = n.attr_i("largest", 1)? != 0;
    let k_attr = if n.opset < 10 { Some(n.attr_i("k", 0)?) } else { None };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let k = match k_attr {
            Some(k) => k,
            None => {
                let kv = tin(ins, 1)?.to_i64_vec()?;
                let [k] = kv.as_slice() else {
                    bail!("k must hold exactly one value, got {}", kv.len());
                };
                *k
            }
        };
        let dims = x.dims().to_vec();
        let a = norm_axis(axis, x.rank())?;
        let Some(&len) = dims.get(a) else {
            bail!("TopK needs an input of rank >= 1");
        };
        if k < 0 || k as u64 > len as u64 {
            bail!("k = {k} is out of range for axis of size {len}");
        }
        let k = k as usize;
        let mut odims = dims.clone();
        odims[a] = k;
        cx.check_alloc(elems(&odims), DType::I64)?;
        let outer: usize = dims[..a].iter().product();
        let inner: usize = dims[a + 1..].iter().product();
        let dt = x.dtype();
        let dev = x.device();
        let (vals, idx) = if dt.is_float() {
            let v = x.to_f64_vec()?;
            let (vals, idx) = topk_host(&v, outer, len, inner, k, largest, |p: &f64, q: &f64| {
                p.partial_cmp(q).unwrap_or_else(|| p.is_nan().cmp(&q.is_nan()))
            });
            (Tensor::from_f64s(vals, &odims, dt, dev)?, idx)
        } else if dt == DType::U64 {
            let v = x.to_i64_vec()?;
            let (vals, idx) = topk_host(&v, outer, len, inner, k, largest, |p: &i64, q: &i64| {
                (*p as u64).cmp(&(*q as u64))
            });
            (Tensor::from_i64s(vals, &odims, dev)?.cast(dt)?, idx)
        } else {
            let v = x.to_i64_vec()?;
            let (vals, idx) = topk_host(&v, outer, len, inner, k, largest, i64::cmp);
            (Tensor::from_i64s(vals, &odims, dev)?.cast(dt)?, idx)
        };
        let idx = Tensor::from_i64s(idx, &odims, dev)?;
        Ok(vec![Value::Tensor(vals), Value::Tensor(idx)])
    }))
}

/// Top-k along the middle axis of a `[outer, len, inner]` tensor, sorted, ties by lower index.
fn topk_host<T: Copy + Send + Sync>(
    v: &[T],
    outer: usize,
    len: usize,
    inner: usize,
    k: usize,
    largest: bool,
    cmp: impl Fn(&T, &T) -> Ordering + Sync,
) -> (Vec<T>, Vec<i64>) {
    let order = |p: &(T, usize), q: &(T, usize)| {
        let c = if largest { cmp(&q.0, &p.0) } else { cmp(&p.0, &q.0) };
        c.then(p.1.cmp(&q.1))
    };
    let slices: Vec<Vec<(T, usize)>> = (0..outer * inner)
        .into_par_iter()
        .map(|s| {
            let (o, i) = (s / inner.max(1), s % inner.max(1));
            let mut row: Vec<(T, usize)> = (0..len)
                .filter_map(|j| v.get((o * len + j) * inner + i).map(|&x| (x, j)))
                .collect();
            if k == 0 {
                return Vec::new();
            }
            if k < row.len() {
                row.select_nth_unstable_by(k - 1, order);
                row.truncate(k);
            }
            row.sort_unstable_by(order);
            row
        })
        .collect();
    let total = outer * k * inner;
    let mut vals: Vec<Option<T>> = vec![None; total];
    let mut idx = vec![0i64; total];
    for (s, row) in slices.into_iter().enumerate() {
        let (o, i) = (s / inner.max(1), s % inner.max(1));
        for (j, (x, p)) in row.into_iter().enumerate() {
            let q = (o * k + j) * inner + i;
            if let (Some(vs), Some(is)) = (vals.get_mut(q), idx.get_mut(q)) {
                *vs = Some(x);
                *is = p as i64;
            }
        }
    }
    let vals = vals.into_iter().flatten().collect();
    (vals, idx)
}

// ---------------------------------------------------------------------------------------------
// Hardmax
// ---------------------------------------------------------------------------------------------

fn hardmax_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let legacy = n.opset < 13;
    let axis = n.attr_i("axis", if legacy { 1 } else { -1 })?;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        if x.elem_count() == 0 || x.rank() == 0 {
            return out1(x.map(|c| c.ones_like())?);
        }
        let dims = x.dims().to_vec();
        let a = norm_axis(axis, x.rank())?;
        let mut c = to_compute(x.candle())?;
        if !c.dtype().is_float() {
            c = c.to_dtype(CDType::F64)?;
        }
        let ax = if legacy {
            let pre: usize = dims[..a].iter().product();
            let post: usize = dims[a..].iter().product();
            c = c.reshape((pre, post))?;
            1
        } else {
            a
        };
        let len = c.dims()[ax];
        let idx = c.argmax_keepdim(ax)?;
        let mut shape = vec![1usize; c.rank()];
        shape[ax] = len;
        let ar = CT::arange(0u32, len as u32, x.device())?.reshape(shape)?;
        let hot = idx.broadcast_eq(&ar)?.to_dtype(x.candle().dtype())?.reshape(dims)?;
        out1(Tensor::new(hot, x.dtype())?)
    }))
}
