//! Indexing and data-selection operators: Pad, GatherElements, GatherND, ScatterElements, ScatterND,
//! Scatter, NonZero, Compress, OneHot, Unique, EyeLike, Trilu, ReverseSequence, NonMaxSuppression,
//! TensorScatter.
//!
//! Most of these compute a flat "source position" per output element on the host and then move the
//! data with one candle `index_select`, which keeps every dtype exact and the data on the device.

use candle_core::Tensor as CT;
use kiln_graph::DType;

use super::common::{elems, ints_input, norm_axes, norm_axis, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, RuntimeError, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("Pad", pad);
    r.add("GatherElements", |n| {
        let axis = n.attr_i("axis", 0)?;
        Ok(kernel(move |cx, ins| {
            let (x, idx) = (tin(ins, 0)?, tin(ins, 1)?);
            cx.check_alloc(elems(idx.dims()), x.dtype())?;
            out1(gather_elements(x, idx, axis)?)
        }))
    });
    r.add("GatherND", |n| {
        let batch_dims = n.attr_i("batch_dims", 0)?;
        Ok(kernel(move |cx, ins| {
            let (x, idx) = (tin(ins, 0)?, tin(ins, 1)?);
            out1(gather_nd(cx, x, idx, batch_dims)?)
        }))
    });
    r.add("ScatterElements", |n| {
        let axis = n.attr_i("axis", 0)?;
        let red = Reduction::parse(&n.attr_s("reduction", "none")?)?;
        Ok(kernel(move |_, ins| {
            out1(scatter_elements(tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?, axis, red)?)
        }))
    });
    r.add("Scatter", |n| {
        let axis = n.attr_i("axis", 0)?;
        Ok(kernel(move |_, ins| {
            out1(scatter_elements(
                tin(ins, 0)?,
                tin(ins, 1)?,
                tin(ins, 2)?,
                axis,
                Reduction::None,
            )?)
        }))
    });
    r.add("ScatterND", |n| {
        let red = Reduction::parse(&n.attr_s("reduction", "none")?)?;
        Ok(kernel(move |_, ins| {
            out1(scatter_nd(tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?, red)?)
        }))
    });
    r.add("NonZero", |_| {
        Ok(kernel(|cx, ins| {
            let x = tin(ins, 0)?;
            let v = x.to_f64_vec()?;
            let dims = x.dims().to_vec();
            let st = strides(&dims);
            let nz: Vec<usize> = v
                .iter()
                .enumerate()
                .filter(|(_, &e)| e != 0.0)
                .map(|(i, _)| i)
                .collect();
            let r = dims.len();
            let mut out = vec![0i64; r * nz.len()];
            for (k, &flat) in nz.iter().enumerate() {
                for d in 0..r {
                    out[d * nz.len() + k] = ((flat / st[d]) % dims[d].max(1)) as i64;
                }
            }
            let n = nz.len();
            out1(Tensor::from_i64s(out, &[r, n], cx.device)?)
        }))
    });
    r.add("Compress", |n| {
        let axis = n.attr_i_opt("axis")?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let cond = tin(ins, 1)?.to_f64_vec()?;
            let keep = |len: usize| -> Result<Vec<i64>> {
                let mut v = Vec::new();
                for (i, &c) in cond.iter().enumerate() {
                    if c != 0.0 {
                        if i >= len {
                            bail!("Compress: condition selects index {i} beyond the length {len}");
                        }
                        v.push(i as i64);
                    }
                }
                Ok(v)
            };
            match axis {
                None => {
                    let flat = x.candle().flatten_all()?;
                    let k = keep(flat.elem_count())?;
                    let n = k.len();
                    out1(Tensor::new(take(&flat, k, &[n])?, x.dtype())?)
                }
                Some(a) => {
                    let a = norm_axis(a, x.rank())?;
                    let k = keep(x.dims()[a])?;
                    let n = k.len();
                    let ids = CT::from_vec(k, n, x.device())?;
                    out1(x.map(|t| t.contiguous()?.index_select(&ids, a))?)
                }
            }
        }))
    });
    r.add("OneHot", |n| {
        let axis = n.attr_i("axis", -1)?;
        Ok(kernel(move |cx, ins| {
            let idx = tin(ins, 0)?;
            let depth = tin(ins, 1)?.to_f64_vec()?;
            let values = tin(ins, 2)?;
            let depth = match depth.first() {
                Some(&d) if depth.len() == 1 && d >= 1.0 && d.is_finite() => d as i64,
                _ => bail!("OneHot: depth must be a single positive value"),
            };
            if values.elem_count() != 2 {
                bail!("OneHot: values must have 2 elements");
            }
            let ax = norm_axis(axis, idx.rank() + 1)?;
            let mut dims = idx.dims().to_vec();
            dims.insert(ax, depth as usize);
            cx.check_alloc(elems(&dims), values.dtype())?;
            let iv = idx.to_f64_vec()?;
            let outer: usize = idx.dims()[..ax].iter().product();
            let inner: usize = idx.dims()[ax..].iter().product();
            let d = depth as usize;
            let mut src = vec![0i64; outer * d * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let mut k = iv[o * inner + i].trunc() as i64;
                    if k < 0 {
                        k += depth;
                    }
                    if (0..depth).contains(&k) {
                        src[(o * d + k as usize) * inner + i] = 1;
                    }
                }
            }
            let flat = values.candle().flatten_all()?;
            out1(Tensor::new(take(&flat, src, &dims)?, values.dtype())?)
        }))
    });
    r.add("Unique", unique);
    r.add("EyeLike", |n| {
        let dtype = match n.attr_i_opt("dtype")? {
            Some(c) => Some(DType::from_onnx(c as i32).ok_or_else(|| n.err(format!("unsupported dtype code {c}")))?),
            None => None,
        };
        let k = n.attr_i("k", 0)?;
        Ok(kernel(move |cx, ins| {
            let x = tin(ins, 0)?;
            if x.rank() != 2 {
                bail!("EyeLike expects a 2-D input, got rank {}", x.rank());
            }
            let (r, c) = (x.dims()[0], x.dims()[1]);
            let dt = dtype.unwrap_or(x.dtype());
            cx.check_alloc(elems(x.dims()), dt)?;
            let mut v = vec![0f64; r * c];
            for i in 0..r {
                let j = i as i64 + k;
                if j >= 0 && (j as usize) < c {
                    v[i * c + j as usize] = 1.0;
                }
            }
            out1(Tensor::from_f64s(v, &[r, c], dt, cx.device)?)
        }))
    });
    r.add("Trilu", |n| {
        let upper = n.attr_i("upper", 1)? != 0;
        Ok(kernel(move |cx, ins| {
            let x = tin(ins, 0)?;
            let k = match ints_input(ins, 1)? {
                Some(v) => *v.first().ok_or_else(|| RuntimeError::msg("Trilu: empty k"))?,
                None => 0,
            };
            if x.rank() < 2 {
                bail!("Trilu expects rank >= 2");
            }
            let r = x.rank();
            let (nr, nc) = (x.dims()[r - 2], x.dims()[r - 1]);
            let mut m = vec![0u8; nr * nc];
            for i in 0..nr {
                for j in 0..nc {
                    let d = j as i64 - i as i64;
                    m[i * nc + j] = if upper { d >= k } else { d <= k } as u8;
                }
            }
            let mask = CT::from_vec(m, (nr, nc), cx.device)?.broadcast_as(x.dims())?;
            out1(x.map(|t| mask.where_cond(t, &t.zeros_like()?))?)
        }))
    });
    r.add("ReverseSequence", |n| {
        let time_axis = n.attr_i("time_axis", 0)?;
        let batch_axis = n.attr_i("batch_axis", 1)?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let lens = tin(ins, 1)?.to_i64_vec()?;
            out1(reverse_sequence(x, &lens, time_axis, batch_axis)?)
        }))
    });
    r.add("NonMaxSuppression", |n| {
        let cpb = n.attr_i("center_point_box", 0)? != 0;
        Ok(kernel(move |cx, ins| nms(cx, ins, cpb)))
    });
    r.add("TensorScatter", |n| {
        let axis = n.attr_i("axis", -2)?;
        let circular = match n.attr_s("mode", "linear")?.as_str() {
            "linear" => false,
            "circular" => true,
            m => return Err(n.err(format!("unknown mode '{m}'"))),
        };
        Ok(kernel(move |_, ins| {
            let past = tin(ins, 0)?;
            let upd = tin(ins, 1)?;
            let wi = ints_input(ins, 2)?;
            out1(tensor_scatter(past, upd, wi, axis, circular)?)
        }))
    });
}

/// Row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Picks the elements of a flat tensor at positions `idx`, shaped as `dims`.
fn take(flat: &CT, idx: Vec<i64>, dims: &[usize]) -> Result<CT> {
    let n = idx.len();
    if n == 0 {
        return Ok(CT::zeros(dims, flat.dtype(), flat.device())?);
    }
    let ids = CT::from_vec(idx, n, flat.device())?;
    Ok(flat.index_select(&ids, 0)?.reshape(dims)?)
}

/// Normalizes an index against a dimension, with a bounds check.
fn norm_index(i: i64, n: usize) -> Result<usize> {
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        bail!("index {i} is out of bounds for a dimension of size {n}");
    }
    Ok(j as usize)
}

fn gather_elements(x: &Tensor, idx: &Tensor, axis: i64) -> Result<Tensor> {
    let r = x.rank();
    if idx.rank() != r {
        bail!("GatherElements: indices rank {} differs from data rank {r}", idx.rank());
    }
    let a = norm_axis(axis, r)?;
    let id = idx.dims().to_vec();
    let src = element_offsets(x.dims(), idx, a, "GatherElements")?
        .into_iter()
        .map(|o| o as i64)
        .collect();
    Tensor::new(take(&x.candle().flatten_all()?, src, &id)?, x.dtype())
}

/// For GatherElements/ScatterElements: the flat data offset addressed by each element of `idx`
/// (its own coordinates, with the `axis` coordinate replaced by the index value).
fn element_offsets(xd: &[usize], idx: &Tensor, a: usize, op: &str) -> Result<Vec<usize>> {
    let id = idx.dims();
    for d in 0..xd.len() {
        if d != a && id[d] > xd[d] {
            bail!("{op}: indices shape {id:?} exceeds data shape {xd:?}");
        }
    }
    let xs = strides(xd);
    let is = strides(id);
    let iv = idx.to_i64_vec()?;
    let mut out = Vec::with_capacity(iv.len());
    for (flat, &k) in iv.iter().enumerate() {
        let mut off = 0usize;
        for d in 0..xd.len() {
            let c = (flat / is[d]) % id[d].max(1);
            let c = if d == a { norm_index(k, xd[a])? } else { c };
            off += c * xs[d];
        }
        out.push(off);
    }
    Ok(out)
}

fn gather_nd(cx: &super::RunCx, x: &Tensor, idx: &Tensor, batch_dims: i64) -> Result<Tensor> {
    let xd = x.dims();
    let id = idx.dims();
    let b = usize::try_from(batch_dims).map_err(|_| RuntimeError::msg("GatherND: negative batch_dims"))?;
    if id.is_empty() || b >= id.len() || b >= xd.len() || xd[..b] != id[..b] {
        bail!("GatherND: bad shapes data {xd:?} indices {id:?} batch_dims {b}");
    }
    let q = id[id.len() - 1];
    if b + q > xd.len() {
        bail!("GatherND: index tuple of {q} is too long for data rank {}", xd.len());
    }
    let slice: usize = xd[b + q..].iter().product();
    let mut out_dims = id[..id.len() - 1].to_vec();
    out_dims.extend_from_slice(&xd[b + q..]);
    cx.check_alloc(elems(&out_dims), x.dtype())?;
    let xs = strides(xd);
    let batch: usize = xd[..b].iter().product();
    let per_batch: usize = id[b..id.len() - 1].iter().product();
    let iv = idx.to_i64_vec()?;
    let batch_stride: usize = xd[b..].iter().product();
    let mut src = Vec::with_capacity(batch * per_batch * slice);
    for bi in 0..batch {
        for t in 0..per_batch {
            let base = (bi * per_batch + t) * q;
            let mut off = bi * batch_stride;
            for k in 0..q {
                let v = *iv
                    .get(base + k)
                    .ok_or_else(|| RuntimeError::msg("GatherND: short indices"))?;
                off += norm_index(v, xd[b + k])? * xs[b + k];
            }
            src.extend((0..slice).map(|s| (off + s) as i64));
        }
    }
    Tensor::new(take(&x.candle().flatten_all()?, src, &out_dims)?, x.dtype())
}

#[derive(Clone, Copy, PartialEq)]
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

impl Reduction {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Reduction::None,
            "add" => Reduction::Add,
            "mul" => Reduction::Mul,
            "max" => Reduction::Max,
            "min" => Reduction::Min,
            _ => bail!("unknown reduction '{s}'"),
        })
    }
}

/// Writes `updates[src]` into `data[dst]` for each `(dst, src)` pair, in order, combining with
/// `red`.
fn scatter_apply(data: &Tensor, updates: &Tensor, pairs: &[(usize, usize)], red: Reduction) -> Result<Tensor> {
    if data.dtype() != updates.dtype() {
        bail!("data and updates have different dtypes");
    }
    let n = data.elem_count();
    let dims = data.dims().to_vec();
    if red == Reduction::None {
        let mut src: Vec<i64> = (0..n as i64).collect();
        for &(d, s) in pairs {
            src[d] = (n + s) as i64;
        }
        let both = CT::cat(&[data.candle().flatten_all()?, updates.candle().flatten_all()?], 0)?;
        return Tensor::new(take(&both, src, &dims)?, data.dtype());
    }
    if data.dtype().is_float() {
        let mut v = data.to_f64_vec()?;
        let u = updates.to_f64_vec()?;
        for &(d, s) in pairs {
            let (a, b) = (v[d], u[s]);
            v[d] = match red {
                Reduction::Add => a + b,
                Reduction::Mul => a * b,
                Reduction::Max => a.max(b),
                Reduction::Min => a.min(b),
                Reduction::None => b,
            };
        }
        Tensor::from_f64s(v, &dims, data.dtype(), data.device())
    } else {
        let mut v = data.to_i64_vec()?;
        let u = updates.to_i64_vec()?;
        for &(d, s) in pairs {
            let (a, b) = (v[d], u[s]);
            v[d] = match red {
                Reduction::Add => a.wrapping_add(b),
                Reduction::Mul => a.wrapping_mul(b),
                Reduction::Max => a.max(b),
                Reduction::Min => a.min(b),
                Reduction::None => b,
            };
        }
        Tensor::from_i64s(v, &dims, data.device())?.cast(data.dtype())
    }
}

fn scatter_elements(x: &Tensor, idx: &Tensor, upd: &Tensor, axis: i64, red: Reduction) -> Result<Tensor> {
    let r = x.rank();
    let a = norm_axis(axis, r)?;
    let id = idx.dims().to_vec();
    if idx.rank() != r || upd.dims() != id.as_slice() {
        bail!(
            "Scatter: data {:?}, indices {id:?} and updates {:?} do not match",
            x.dims(),
            upd.dims()
        );
    }
    let pairs: Vec<(usize, usize)> = element_offsets(x.dims(), idx, a, "Scatter")?
        .into_iter()
        .enumerate()
        .map(|(flat, off)| (off, flat))
        .collect();
    scatter_apply(x, upd, &pairs, red)
}

fn scatter_nd(x: &Tensor, idx: &Tensor, upd: &Tensor, red: Reduction) -> Result<Tensor> {
    let xd = x.dims();
    let id = idx.dims();
    if id.is_empty() {
        bail!("ScatterND: indices must have rank >= 1");
    }
    let q = id[id.len() - 1];
    if q > xd.len() {
        bail!("ScatterND: index tuple of {q} is too long for data rank {}", xd.len());
    }
    let mut want = id[..id.len() - 1].to_vec();
    want.extend_from_slice(&xd[q..]);
    if upd.dims() != want.as_slice() {
        bail!("ScatterND: updates shape {:?}, expected {want:?}", upd.dims());
    }
    let slice: usize = xd[q..].iter().product();
    let xs = strides(xd);
    let iv = idx.to_i64_vec()?;
    let count: usize = id[..id.len() - 1].iter().product();
    let mut pairs = Vec::with_capacity(count * slice);
    for t in 0..count {
        let mut off = 0usize;
        for k in 0..q {
            off += norm_index(iv[t * q + k], xd[k])? * xs[k];
        }
        pairs.extend((0..slice).map(|s| (off + s, t * slice + s)));
    }
    scatter_apply(x, upd, &pairs, red)
}

fn pad(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let mode = n.attr_s("mode", "constant")?;
    if !matches!(mode.as_str(), "constant" | "reflect" | "edge" | "wrap") {
        return Err(n.err(format!("unknown pad mode '{mode}'")));
    }
    let opset = n.opset;
    let attr_pads = if opset < 2 {
        n.attr_ints("paddings")?
    } else {
        n.attr_ints("pads")?
    };
    let attr_value = n.attr_f("value", 0.0)? as f64;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let r = x.rank();
        let (pads, value, axes) = if opset < 11 {
            let p = attr_pads
                .clone()
                .ok_or_else(|| RuntimeError::msg("Pad: missing pads"))?;
            (
                p,
                Value::Tensor(Tensor::from_f64s(vec![attr_value], &[], x.dtype(), x.device())?),
                None,
            )
        } else {
            let p = ints_input(ins, 1)?.ok_or_else(|| RuntimeError::msg("Pad: missing pads"))?;
            let v = match tin_opt(ins, 2)? {
                Some(t) if t.elem_count() > 0 => {
                    if t.dtype() != x.dtype() {
                        bail!(
                            "Pad: constant_value dtype {} differs from data {}",
                            t.dtype(),
                            x.dtype()
                        );
                    }
                    Value::Tensor(t.clone())
                }
                _ => Value::Tensor(Tensor::from_f64s(vec![0.0], &[], x.dtype(), x.device())?),
            };
            (p, v, ints_input(ins, 3)?)
        };
        let axes: Vec<usize> = match axes {
            Some(a) => norm_axes(&a, r)?,
            None => (0..r).collect(),
        };
        if pads.len() != 2 * axes.len() {
            bail!("Pad: {} pads for {} axes", pads.len(), axes.len());
        }
        if pads.iter().any(|p| p.unsigned_abs() > 1 << 40) {
            bail!("Pad: pads {pads:?} are out of range");
        }
        let mut per_axis = vec![(0i64, 0i64); r];
        for (i, &a) in axes.iter().enumerate() {
            per_axis[a] = (pads[i], pads[axes.len() + i]);
        }
        let mut out_dims = Vec::with_capacity(r);
        for (d, &(b, e)) in per_axis.iter().enumerate() {
            let o = x.dims()[d] as i64 + b + e;
            if o < 0 {
                bail!("Pad: negative output dimension on axis {d}");
            }
            out_dims.push(o as usize);
        }
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        if out_dims.contains(&0) {
            // An empty result; the non-constant modes still refuse to pad from an empty extent.
            if mode != "constant" {
                for (d, &(b, e)) in per_axis.iter().enumerate() {
                    let n = x.dims()[d] as i64 - (-b).max(0) - (-e).max(0);
                    if n <= 0 && out_dims[d] > 0 {
                        bail!("Pad: cannot {mode}-pad axis {d}: no input elements left after the negative pads");
                    }
                }
            }
            return out1(Tensor::new(
                CT::zeros(out_dims, x.candle().dtype(), x.candle().device())?,
                x.dtype(),
            )?);
        }
        let value = value.as_tensor()?.candle().flatten_all()?.narrow(0, 0, 1)?;
        let mut t = x.candle().clone();
        for (d, &(b, e)) in per_axis.iter().enumerate() {
            if b == 0 && e == 0 {
                continue;
            }
            // Output index o reads input index o - b. Negative pads crop: constant mode fills
            // everything outside the input, the other modes pad from the cropped input (the effective
            // extent), as ONNX Runtime does.
            let len = t.dims()[d] as i64;
            let out_n = out_dims[d];
            if mode == "constant" {
                let lo = (-b).max(0).min(len);
                let hi = len.min(out_n as i64 - b);
                let keep = (hi - lo).max(0);
                let left = b.clamp(0, out_n as i64);
                let right = out_n as i64 - left - keep;
                let kept = t.narrow(d, lo as usize, keep as usize)?;
                let fill = |k: i64| -> Result<CT> {
                    let mut sd = kept.dims().to_vec();
                    sd[d] = k as usize;
                    Ok(value.reshape(vec![1; sd.len()])?.broadcast_as(sd)?.contiguous()?)
                };
                let mut parts = Vec::new();
                if left > 0 {
                    parts.push(fill(left)?);
                }
                if keep > 0 {
                    parts.push(kept.clone());
                }
                if right > 0 {
                    parts.push(fill(right)?);
                }
                t = if parts.is_empty() { kept } else { CT::cat(&parts, d)? };
            } else {
                let lo = (-b).max(0);
                let n = len - lo - (-e).max(0);
                if n <= 0 {
                    if out_n > 0 {
                        bail!("Pad: cannot {mode}-pad axis {d}: no input elements left after the negative pads");
                    }
                    let mut sd = t.dims().to_vec();
                    sd[d] = 0;
                    t = CT::zeros(sd, t.dtype(), t.device())?;
                    continue;
                }
                let b = b.max(0);
                let mut idx = Vec::with_capacity(out_n);
                for o in 0..out_n as i64 {
                    let i = o - b;
                    let j = match mode.as_str() {
                        "edge" => i.clamp(0, n - 1),
                        "wrap" => i.rem_euclid(n),
                        _ => {
                            if n == 1 {
                                0
                            } else {
                                let p = 2 * (n - 1);
                                let m = i.rem_euclid(p);
                                if m >= n {
                                    p - m
                                } else {
                                    m
                                }
                            }
                        }
                    };
                    idx.push((j + lo) as u32);
                }
                let ids = CT::from_vec(idx, out_n, t.device())?;
                t = t.contiguous()?.index_select(&ids, d)?;
            }
        }
        out1(Tensor::new(t, x.dtype())?)
    }))
}

fn unique(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let sorted = n.attr_i("sorted", 1)? != 0;
    let axis = n.attr_i_opt("axis")?;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        // Items: single elements (no axis) or slices along `axis` (moved to the front).
        let (a, items, item_len) = match axis {
            None => (None, x.candle().flatten_all()?, 1usize),
            Some(ax) => {
                if x.rank() == 0 {
                    bail!("Unique: axis given for a scalar input");
                }
                let a = norm_axis(ax, x.rank())?;
                let t = x.candle().transpose(0, a)?.contiguous()?;
                let len = t.dims()[0];
                let inner = t.elem_count().checked_div(len).unwrap_or(0);
                (Some(a), t.flatten_all()?, inner)
            }
        };
        let count = items
            .elem_count()
            .checked_div(item_len)
            .unwrap_or_else(|| x.dims()[a.unwrap_or(0)]);
        let flat = Tensor::new(items, x.dtype())?;
        let groups = if x.dtype().is_float() {
            group_items(&flat.to_f64_vec()?, count, item_len, sorted)
        } else {
            group_items(&flat.to_i64_vec()?, count, item_len, sorted)
        };
        let (first, inverse, counts) = groups;
        let k = first.len();
        let ids = CT::from_vec(first.clone(), k, cx.device)?;
        let y = match a {
            None => x.candle().flatten_all()?.index_select(&ids, 0)?,
            Some(a) => x.candle().contiguous()?.index_select(&ids, a)?,
        };
        let ni = inverse.len();
        Ok(vec![
            Value::Tensor(Tensor::new(y, x.dtype())?),
            Value::Tensor(Tensor::from_i64s(first, &[k], cx.device)?),
            Value::Tensor(Tensor::from_i64s(inverse, &[ni], cx.device)?),
            Value::Tensor(Tensor::from_i64s(counts, &[k], cx.device)?),
        ])
    }))
}

/// Groups `count` items of `len` values: (first occurrence of each unique item, inverse map,
/// counts), unique items in sorted or first-seen order.
fn group_items<T: PartialOrd + Copy>(
    v: &[T],
    count: usize,
    len: usize,
    sorted: bool,
) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let item = |i: usize| &v[i * len..(i + 1) * len];
    let cmp = |a: usize, b: usize| {
        item(a)
            .iter()
            .zip(item(b))
            .map(|(p, q)| p.partial_cmp(q).unwrap_or(std::cmp::Ordering::Equal))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by(|&a, &b| cmp(a, b).then(a.cmp(&b)));
    // Group in sorted order: group id per item, first occurrence per group.
    let mut group_of = vec![0usize; count];
    let mut firsts: Vec<usize> = Vec::new();
    let mut counts: Vec<i64> = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if pos == 0 || cmp(order[pos - 1], i).is_ne() {
            firsts.push(i);
            counts.push(0);
        }
        let g = firsts.len() - 1;
        group_of[i] = g;
        counts[g] += 1;
    }
    // Rank of each group in the output order.
    let mut rank: Vec<usize> = (0..firsts.len()).collect();
    if !sorted {
        let mut by_first: Vec<usize> = (0..firsts.len()).collect();
        by_first.sort_by_key(|&g| firsts[g]);
        for (r, &g) in by_first.iter().enumerate() {
            rank[g] = r;
        }
    }
    let mut out_first = vec![0i64; firsts.len()];
    let mut out_counts = vec![0i64; firsts.len()];
    for g in 0..firsts.len() {
        out_first[rank[g]] = firsts[g] as i64;
        out_counts[rank[g]] = counts[g];
    }
    let inverse = group_of.iter().map(|&g| rank[g] as i64).collect();
    (out_first, inverse, out_counts)
}

fn reverse_sequence(x: &Tensor, lens: &[i64], time_axis: i64, batch_axis: i64) -> Result<Tensor> {
    let r = x.rank();
    if r < 2 {
        bail!("ReverseSequence expects rank >= 2");
    }
    let ta = norm_axis(time_axis, r)?;
    let ba = norm_axis(batch_axis, r)?;
    if ta == ba || ta > 1 || ba > 1 {
        bail!("ReverseSequence: time_axis and batch_axis must be 0 and 1");
    }
    let dims = x.dims().to_vec();
    let (t_n, b_n) = (dims[ta], dims[ba]);
    if lens.len() != b_n {
        bail!("ReverseSequence: {} sequence lengths for batch {b_n}", lens.len());
    }
    let st = strides(&dims);
    let inner: usize = dims[2..].iter().product();
    let mut src = Vec::with_capacity(x.elem_count());
    for i0 in 0..dims[0] {
        for i1 in 0..dims[1] {
            let (t, b) = if ta == 0 { (i0, i1) } else { (i1, i0) };
            let l = lens[b];
            if l < 0 || l as usize > t_n {
                bail!("ReverseSequence: sequence length {l} out of range");
            }
            let l = l as usize;
            let ts = if t < l { l - 1 - t } else { t };
            let off = if ta == 0 {
                ts * st[0] + b * st[1]
            } else {
                b * st[0] + ts * st[1]
            };
            src.extend((0..inner).map(|k| (off + k) as i64));
        }
    }
    Tensor::new(take(&x.candle().flatten_all()?, src, &dims)?, x.dtype())
}

fn nms(cx: &super::RunCx, ins: &[Option<&Value>], center: bool) -> Result<Vec<Value>> {
    let boxes = tin(ins, 0)?;
    let scores = tin(ins, 1)?;
    let max_out = ints_input(ins, 2)?.and_then(|v| v.first().copied()).unwrap_or(0).max(0) as usize;
    let iou_th = tin_opt(ins, 3)?
        .map(|t| t.to_f64_vec())
        .transpose()?
        .and_then(|v| v.first().copied())
        .unwrap_or(0.0);
    let score_th = tin_opt(ins, 4)?
        .map(|t| t.to_f64_vec())
        .transpose()?
        .and_then(|v| v.first().copied());
    let (bd, sd) = (boxes.dims(), scores.dims());
    if bd.len() != 3 || bd[2] != 4 || sd.len() != 3 || sd[0] != bd[0] || sd[2] != bd[1] {
        bail!("NonMaxSuppression: bad shapes boxes {bd:?} scores {sd:?}");
    }
    let (nb, nbox, nc) = (bd[0], bd[1], sd[1]);
    let bv = boxes.to_f64_vec()?;
    let sv = scores.to_f64_vec()?;
    // (ymin, xmin, ymax, xmax) normalized corners.
    let corners = |b: usize, i: usize| -> [f64; 4] {
        let o = (b * nbox + i) * 4;
        let (p0, p1, p2, p3) = (bv[o], bv[o + 1], bv[o + 2], bv[o + 3]);
        if center {
            [p1 - p3 / 2.0, p0 - p2 / 2.0, p1 + p3 / 2.0, p0 + p2 / 2.0]
        } else {
            [p0.min(p2), p1.min(p3), p0.max(p2), p1.max(p3)]
        }
    };
    let suppress = |a: [f64; 4], b: [f64; 4]| -> bool {
        let ix0 = a[1].max(b[1]);
        let ix1 = a[3].min(b[3]);
        if ix1 <= ix0 {
            return false;
        }
        let iy0 = a[0].max(b[0]);
        let iy1 = a[2].min(b[2]);
        if iy1 <= iy0 {
            return false;
        }
        let inter = (ix1 - ix0) * (iy1 - iy0);
        let a1 = (a[2] - a[0]) * (a[3] - a[1]);
        let a2 = (b[2] - b[0]) * (b[3] - b[1]);
        let uni = a1 + a2 - inter;
        if inter <= 0.0 || a1 <= 0.0 || a2 <= 0.0 || uni <= 0.0 {
            return false;
        }
        inter / uni > iou_th
    };
    let mut out: Vec<i64> = Vec::new();
    if max_out > 0 {
        for b in 0..nb {
            for c in 0..nc {
                let so = (b * nc + c) * nbox;
                let mut cand: Vec<usize> = (0..nbox).filter(|&i| score_th.is_none_or(|t| sv[so + i] > t)).collect();
                cand.sort_by(|&i, &j| {
                    sv[so + j]
                        .partial_cmp(&sv[so + i])
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(i.cmp(&j))
                });
                let mut sel: Vec<usize> = Vec::new();
                for i in cand {
                    if sel.len() >= max_out {
                        break;
                    }
                    let ci = corners(b, i);
                    if sel.iter().all(|&s| !suppress(ci, corners(b, s))) {
                        sel.push(i);
                        out.extend([b as i64, c as i64, i as i64]);
                    }
                }
            }
        }
    }
    let k = out.len() / 3;
    out1(Tensor::from_i64s(out, &[k, 3], cx.device)?)
}

fn tensor_scatter(past: &Tensor, upd: &Tensor, wi: Option<Vec<i64>>, axis: i64, circular: bool) -> Result<Tensor> {
    let pd = past.dims().to_vec();
    let ud = upd.dims();
    let r = pd.len();
    let a = norm_axis(axis, r)?;
    if a == 0 || ud.len() != r || past.dtype() != upd.dtype() {
        bail!("TensorScatter: bad shapes past {pd:?} update {ud:?} axis {axis}");
    }
    for d in 0..r {
        if (d != a && pd[d] != ud[d]) || (d == a && ud[d] > pd[d]) {
            bail!("TensorScatter: update shape {ud:?} does not fit cache {pd:?}");
        }
    }
    let wi = wi.unwrap_or_else(|| vec![0; pd[0]]);
    if wi.len() != pd[0] {
        bail!("TensorScatter: {} write indices for batch {}", wi.len(), pd[0]);
    }
    let maxlen = pd[a] as i64;
    let prefix: usize = pd[..a].iter().product();
    let per_batch: usize = pd[1..a].iter().product();
    let inner: usize = pd[a + 1..].iter().product();
    let mut pairs = Vec::with_capacity(upd.elem_count());
    for p in 0..prefix {
        let batch = p / per_batch.max(1);
        for s in 0..ud[a] {
            let mut t = wi[batch] + s as i64;
            if circular {
                t = t.rem_euclid(maxlen.max(1));
            }
            if t < 0 || t >= maxlen {
                bail!("TensorScatter: write position {t} out of range {maxlen}");
            }
            let dst = (p * pd[a] + t as usize) * inner;
            let src = (p * ud[a] + s) * inner;
            pairs.extend((0..inner).map(|k| (dst + k, src + k)));
        }
    }
    scatter_apply(past, upd, &pairs, Reduction::None)
}
