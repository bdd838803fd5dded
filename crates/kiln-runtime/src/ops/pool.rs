//! Operator family `pool`: MaxPool, AveragePool, LpPool, the Global pools, MaxUnpool.
//!
//! Windowed pools run on whole candle tensors: the padded input is sliced once per kernel
//! offset (strided views) and the slices are folded with `maximum` / `add`.

#![allow(clippy::needless_range_loop)]

use candle_core::Tensor as CT;
use kiln_graph::DType;
use rayon::prelude::*;

use super::common::{elems, tin, tin_opt};
use super::nn::{
    float_back, float_work, kernel_offset, pad_value, parse_auto_pad, spatial_attr, window_pads, window_view, AutoPad,
};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::fastmath::with_f32;
use crate::{bail, Result, Tensor, Value};
use kiln_graph::passes::elementwise_chain::KILN;
use kiln_graph::passes::nhwc::{AVERAGE_POOL_NHWC, GLOBAL_AVERAGE_POOL_NHWC, MAX_POOL_NHWC};

pub fn register(r: &mut Registry) {
    r.add("MaxPool", |n| pool_factory(n, Kind::Max));
    r.add("AveragePool", |n| pool_factory(n, Kind::Avg));
    r.add("LpPool", |n| pool_factory(n, Kind::Lp));
    r.add("GlobalAveragePool", |_| Ok(global(Kind::Avg, 2)));
    r.add("GlobalMaxPool", |_| Ok(global(Kind::Max, 2)));
    r.add("GlobalLpPool", |n| {
        let p = n.attr_i("p", 2)?;
        if p < 1 {
            return Err(n.err(format!("p must be positive, got {p}")));
        }
        Ok(global(Kind::Lp, p))
    });
    r.add("MaxUnpool", max_unpool);
    r.add("RoiAlign", roi_align);
    r.add("MaxRoiPool", max_roi_pool);
    r.add_domain(KILN, MAX_POOL_NHWC, |n| nhwc_pool(n, Kind::Max));
    r.add_domain(KILN, AVERAGE_POOL_NHWC, |n| nhwc_pool(n, Kind::Avg));
    r.add_domain(KILN, GLOBAL_AVERAGE_POOL_NHWC, |_| Ok(kernel(global_avg_nhwc)));
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Max,
    Avg,
    Lp,
}

#[derive(Clone, Debug)]
struct PoolAttrs {
    kind: Kind,
    auto: AutoPad,
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    ceil: bool,
    count_include_pad: bool,
    p: i64,
    storage_order: i64,
    want_indices: bool,
}

fn pool_factory(n: &NodeCtx, kind: Kind) -> Result<Box<dyn OpKernel>> {
    let a = pool_attrs(n, kind)?;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        pool_run(cx, x, &a)
    }))
}

fn pool_attrs(n: &NodeCtx, kind: Kind) -> Result<PoolAttrs> {
    let a = PoolAttrs {
        kind,
        auto: parse_auto_pad(n)?,
        kernel: n
            .attr_ints("kernel_shape")?
            .ok_or_else(|| n.err("kernel_shape is required"))?,
        strides: n.attr_ints("strides")?,
        dilations: n.attr_ints("dilations")?,
        pads: n.attr_ints("pads")?,
        ceil: n.attr_i("ceil_mode", 0)? != 0,
        count_include_pad: n.attr_i("count_include_pad", 0)? != 0,
        p: n.attr_i("p", 2)?,
        storage_order: n.attr_i("storage_order", 0)?,
        want_indices: kind == Kind::Max && n.num_outputs() > 1,
    };
    if kind == Kind::Lp && a.p < 1 {
        return Err(n.err(format!("p must be positive, got {}", a.p)));
    }
    if a.kernel.iter().any(|&k| !(1..=super::nn::LIMIT).contains(&k)) {
        return Err(n.err(format!("kernel_shape must be positive: {:?}", a.kernel)));
    }
    Ok(a)
}

/// `ai.kiln::MaxPoolNhwc` / `AveragePoolNhwc` (`kiln_graph::passes::nhwc`): the 2-D pool over
/// `[N, H, W, C]`, vectorized across channels for contiguous f32 CPU tensors; other inputs go
/// through the NCHW kernel between two transposes.
fn nhwc_pool(n: &NodeCtx, kind: Kind) -> Result<Box<dyn OpKernel>> {
    let mut a = pool_attrs(n, kind)?;
    a.want_indices = false;
    if a.kernel.len() != 2 {
        return Err(n.err(format!("kernel_shape {:?} is not 2-D", a.kernel)));
    }
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let d = x.dims().to_vec();
        let [nb, h, w, c] = d[..] else {
            bail!("NHWC pooling needs a [N, H, W, C] input, got {d:?}");
        };
        let g = geometry(&a, &[h, w])?;
        let (oh, ow) = (g.out[0], g.out[1]);
        cx.check_alloc(elems(&[nb, oh, ow, c]), x.dtype())?;
        let win = super::nhwc::Window {
            n: nb,
            h,
            w,
            c,
            kh: g.k[0],
            kw: g.k[1],
            stride: (g.s[0], g.s[1]),
            dil: (g.d[0], g.d[1]),
            pad: (g.pb[0], g.pb[1]),
            oh,
            ow,
        };
        let empty = [nb, h, w, c, oh, ow].contains(&0);
        if x.dtype() == DType::F32 && !empty {
            let xc = x.candle().contiguous()?;
            let fast = with_f32(&xc, |xs| {
                let mut out = crate::fastmath::zeroed(nb * oh * ow * c);
                match kind {
                    Kind::Max => super::nhwc::max_pool(&win, xs, &mut out),
                    _ => super::nhwc::avg_pool(&win, (g.pe[0], g.pe[1]), a.count_include_pad, xs, &mut out),
                }
                out
            });
            if let Some(out) = fast {
                return out1(Tensor::new(
                    CT::from_vec(out, (nb, oh, ow, c), xc.device())?,
                    DType::F32,
                )?);
            }
        }
        // 8-bit codes (a QOperator model's MaxPool): the max of the codes is the code of the max,
        // so the f32 kernel runs on them as floats (exact) and the result is stored back.
        if matches!(kind, Kind::Max) && matches!(x.dtype(), DType::U8 | DType::I8) && !empty && x.device().is_cpu() {
            let xf = x.candle().to_dtype(candle_core::DType::F32)?;
            let fast = with_f32(&xf, |xs| {
                let mut out = crate::fastmath::zeroed(nb * oh * ow * c);
                super::nhwc::max_pool(&win, xs, &mut out);
                out
            });
            if let Some(out) = fast {
                let y = CT::from_vec(out, (nb, oh, ow, c), xf.device())?;
                return out1(Tensor::new(
                    y.to_dtype(crate::tensor::storage_dtype(x.dtype())?)?,
                    x.dtype(),
                )?);
            }
        }
        let nchw = Tensor::new(x.candle().permute((0, 3, 1, 2))?.contiguous()?, x.dtype())?;
        let mut outs = pool_run(cx, &nchw, &a)?;
        let Some(Value::Tensor(y)) = outs.drain(..).next() else {
            bail!("NHWC pooling: the pool gave no tensor");
        };
        out1(Tensor::new(y.candle().permute((0, 2, 3, 1))?.contiguous()?, y.dtype())?)
    }))
}

/// `ai.kiln::GlobalAveragePoolNhwc`: `[N, H, W, C]` -> `[N, 1, 1, C]`.
fn global_avg_nhwc(_: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let x = tin(ins, 0)?;
    let d = x.dims().to_vec();
    let [nb, h, w, c] = d[..] else {
        bail!("GlobalAveragePoolNhwc needs a [N, H, W, C] input, got {d:?}");
    };
    if x.dtype() == DType::F32 && h * w > 0 {
        let xc = x.candle().contiguous()?;
        let fast = with_f32(&xc, |xs| {
            let mut out = crate::fastmath::zeroed(nb * c);
            super::nhwc::global_avg(nb, h * w, c, xs, &mut out);
            out
        });
        if let Some(out) = fast {
            return out1(Tensor::new(CT::from_vec(out, (nb, 1, 1, c), xc.device())?, DType::F32)?);
        }
    }
    let y = float_work(x)?
        .reshape((nb, h * w, c))?
        .mean_keepdim(1)?
        .reshape((nb, 1, 1, c))?;
    out1(float_back(y, x.dtype())?)
}

/// Geometry of one pooling call.
struct Geo {
    k: Vec<usize>,
    s: Vec<usize>,
    d: Vec<usize>,
    pb: Vec<usize>,
    pe: Vec<usize>,
    out: Vec<usize>,
}

fn geometry(a: &PoolAttrs, input: &[usize]) -> Result<Geo> {
    let sp = input.len();
    if a.kernel.len() != sp {
        bail!("kernel_shape has {} values for {sp} spatial axes", a.kernel.len());
    }
    let k: Vec<usize> = a.kernel.iter().map(|&v| v as usize).collect();
    let s = spatial_attr(&a.strides, sp, 1, "strides")?;
    let d = spatial_attr(&a.dilations, sp, 1, "dilations")?;
    let (pb, pe) = window_pads(a.auto, &a.pads, input, &k, &s, &d)?;
    let mut out = Vec::with_capacity(sp);
    for i in 0..sp {
        let span = (k[i] - 1) * d[i] + 1;
        let padded = input[i] + pb[i] + pe[i];
        let o = match a.auto {
            AutoPad::SameUpper | AutoPad::SameLower => input[i].div_ceil(s[i]),
            _ => {
                // ONNX Runtime's sizes, with num = padded - span: floor mode num / s + 1 with the
                // division truncated toward zero, ceil mode ceil(num / s) + 1 minus a last window
                // that would start in the end padding. Where the window fits these are the spec's
                // floor/ceil; a window that does not fit gives 0 or 1 windows (over the padded
                // input) while num > -s, and an error below that.
                let (si, num) = (s[i] as i64, padded as i64 - span as i64);
                let o = if !a.ceil {
                    num / si + 1
                } else {
                    let c = if num >= 0 { (num + si - 1) / si } else { num / si };
                    let mut o = c + 1;
                    if o > 0 && (o - 1) * si >= (input[i] + pb[i]) as i64 {
                        o -= 1;
                    }
                    o
                };
                if o < 0 {
                    bail!("pooling window larger than the padded input");
                }
                o as usize
            }
        };
        out.push(o);
    }
    Ok(Geo { k, s, d, pb, pe, out })
}

fn min_value(dt: DType) -> f64 {
    match dt {
        DType::U8 | DType::U16 | DType::U32 | DType::U64 | DType::Bool => 0.0,
        DType::I8 => -128.0,
        DType::I16 => -32768.0,
        DType::I32 => i32::MIN as f64,
        DType::I64 => i64::MIN as f64,
        _ => f64::NEG_INFINITY,
    }
}

/// Folds every kernel offset of the padded tensor `xp` with `f`.
fn fold_windows(xp: &CT, g: &Geo, f: impl Fn(&CT, &CT) -> candle_core::Result<CT>) -> Result<CT> {
    let kprod: usize = g.k.iter().product();
    let mut acc: Option<CT> = None;
    for kk in 0..kprod {
        let s = window_view(xp, &kernel_offset(kk, &g.k), &g.d, &g.out, &g.s)?;
        acc = Some(match acc {
            None => s.contiguous()?,
            Some(a) => f(&a, &s)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => bail!("empty pooling kernel"),
    }
}

/// Max (`max`) or sum over every window of the padded tensor `xp`. 2-D windows without dilation
/// use candle's pooling kernels (one pass); the rest fold strided views.
fn window_reduce(xp: &CT, g: &Geo, max: bool) -> Result<CT> {
    let fast = g.k.len() == 2 && g.d.iter().all(|&d| d == 1) && g.out.iter().all(|&o| o > 0);
    if !fast {
        return if max {
            fold_windows(xp, g, |a, b| a.maximum(b))
        } else {
            fold_windows(xp, g, |a, b| a.add(b))
        };
    }
    // Trim to exactly the extent the windows cover, so candle's floor gives `g.out`.
    let mut t = xp.clone();
    for i in 0..2 {
        let need = (g.out[i] - 1) * g.s[i] + g.k[i];
        if t.dims()[2 + i] < need {
            bail!("internal: padded input shorter than the pooling windows");
        }
        t = t.narrow(2 + i, 0, need)?;
    }
    let t = t.contiguous()?;
    let (k, s) = ((g.k[0], g.k[1]), (g.s[0], g.s[1]));
    if max {
        Ok(t.max_pool2d_with_stride(k, s)?)
    } else {
        Ok((t.avg_pool2d_with_stride(k, s)? * (g.k[0] * g.k[1]) as f64)?)
    }
}

/// Pads the spatial axes: `pb` before, and after enough to fit every window.
fn pad_spatial(t: &CT, g: &Geo, input: &[usize], value: f64, explicit_end_value: Option<f64>) -> Result<CT> {
    let mut xp = t.clone();
    for i in 0..g.k.len() {
        let span = (g.k[i] - 1) * g.d[i] + 1;
        let need = (g.out[i].saturating_sub(1)) * g.s[i] + span;
        let end = need.saturating_sub(input[i] + g.pb[i]);
        match explicit_end_value {
            // Pads inside the explicit pad region get `value`, the ceil-mode extra gets the other.
            Some(v2) => {
                let inner = end.min(g.pe[i]);
                xp = pad_value(&xp, 2 + i, g.pb[i], inner, value)?;
                xp = pad_value(&xp, 2 + i, 0, end - inner, v2)?;
            }
            None => xp = pad_value(&xp, 2 + i, g.pb[i], end, value)?,
        }
    }
    Ok(xp)
}

fn pool_run(cx: &RunCx, x: &Tensor, a: &PoolAttrs) -> Result<Vec<Value>> {
    let xd = x.dims().to_vec();
    if xd.len() < 3 {
        bail!("pooling needs an input of rank >= 3, got {xd:?}");
    }
    let input = &xd[2..];
    let g = geometry(a, input)?;
    let mut out_dims = xd[..2].to_vec();
    out_dims.extend_from_slice(&g.out);
    cx.check_alloc(elems(&out_dims), x.dtype())?;
    if a.want_indices {
        return max_pool_indices(x, &g, a.storage_order, &out_dims);
    }
    match a.kind {
        Kind::Max => {
            if x.dtype() == DType::Bool {
                bail!("MaxPool does not take bool input");
            }
            if let Some(y) = max_pool_2d_f32(x, &g)? {
                return out1(y);
            }
            let xp = pad_spatial(x.candle(), &g, input, min_value(x.dtype()), None)?;
            let y = window_reduce(&xp, &g, true)?;
            out1(Tensor::new(y, x.dtype())?)
        }
        Kind::Avg | Kind::Lp => {
            let xc = float_work(x)?;
            let xc = if a.kind == Kind::Lp {
                if a.p == 1 {
                    xc.abs()?
                } else if a.p == 2 {
                    xc.sqr()?
                } else {
                    xc.abs()?.powf(a.p as f64)?
                }
            } else {
                xc
            };
            let xp = pad_spatial(&xc, &g, input, 0.0, None)?;
            let sum = window_reduce(&xp, &g, false)?;
            let y = if a.kind == Kind::Lp {
                if a.p == 1 {
                    sum
                } else if a.p == 2 {
                    sum.sqrt()?
                } else {
                    sum.powf(1.0 / a.p as f64)?
                }
            } else {
                // Divisor: the pooled count of valid (or explicitly padded) positions.
                let mut od = vec![1usize, 1];
                od.extend_from_slice(input);
                let ones = CT::ones(od.as_slice(), xc.dtype(), xc.device())?;
                let mp = if a.count_include_pad {
                    pad_spatial(&ones, &g, input, 1.0, Some(0.0))?
                } else {
                    pad_spatial(&ones, &g, input, 0.0, None)?
                };
                let cnt = window_reduce(&mp, &g, false)?;
                let cnt = cnt.maximum(1.0)?;
                sum.broadcast_div(&cnt)?
            };
            out1(float_back(y, x.dtype())?)
        }
    }
}

/// 2-D MaxPool on a contiguous f32 CPU tensor through the depthwise conv's padded phase planes
/// (`conv_dw.rs`); `None` for anything else. candle's pooling after an explicit padding copy took a
/// millisecond for SqueezeNet's first 3x3 stride-2 pool (96 x 109 x 109).
fn max_pool_2d_f32(x: &Tensor, g: &Geo) -> Result<Option<Tensor>> {
    let t = x.candle();
    let d = t.dims();
    if d.len() != 4 || x.dtype() != DType::F32 || !t.device().is_cpu() || g.out.contains(&0) || d.contains(&0) {
        return Ok(None);
    }
    let cv = super::conv_cpu::Conv2d {
        n: d[0],
        c: d[1],
        h: d[2],
        w: d[3],
        m: d[1],
        kh: g.k[0],
        kw: g.k[1],
        group: d[1],
        stride: (g.s[0], g.s[1]),
        dil: (g.d[0], g.d[1]),
        pad: (g.pb[0], g.pb[1]),
        oh: g.out[0],
        ow: g.out[1],
    };
    let Some(y) = with_f32(t, |xs| cv.max_pool(xs)) else {
        return Ok(None);
    };
    let y = CT::from_vec(y, (d[0], d[1], g.out[0], g.out[1]), t.device())?;
    Ok(Some(Tensor::new(y, DType::F32)?))
}

/// MaxPool with the Indices output (host code).
fn max_pool_indices(x: &Tensor, g: &Geo, storage_order: i64, out_dims: &[usize]) -> Result<Vec<Value>> {
    let xd = x.dims().to_vec();
    let input = &xd[2..];
    let sp = input.len();
    let in_n: usize = input.iter().product();
    let out_n: usize = g.out.iter().product();
    let xv = x.to_f64_vec()?;
    let kprod: usize = g.k.iter().product();
    let nc = xd[0] * xd[1];
    let mut vals = vec![0.0f64; nc * out_n];
    let mut idxs = vec![0i64; nc * out_n];
    vals.par_chunks_mut(out_n.max(1))
        .zip(idxs.par_chunks_mut(out_n.max(1)))
        .enumerate()
        .for_each(|(ci, (vd, id))| {
            let src = &xv[ci * in_n..(ci + 1) * in_n];
            let mut o = vec![0usize; sp];
            let mut pos = vec![0i64; sp];
            for p in 0..out_n {
                let mut r = p;
                for i in (0..sp).rev() {
                    o[i] = r % g.out[i];
                    r /= g.out[i];
                }
                let mut best = f64::NEG_INFINITY;
                let mut best_i: i64 = -1;
                for kk in 0..kprod {
                    let mut r = kk;
                    let mut ok = true;
                    for i in (0..sp).rev() {
                        let ko = r % g.k[i];
                        r /= g.k[i];
                        pos[i] = (o[i] * g.s[i] + ko * g.d[i]) as i64 - g.pb[i] as i64;
                        if pos[i] < 0 || pos[i] >= input[i] as i64 {
                            ok = false;
                        }
                    }
                    if !ok {
                        continue;
                    }
                    let mut off = 0usize;
                    for i in 0..sp {
                        off = off * input[i] + pos[i] as usize;
                    }
                    let v = src[off];
                    if v > best || best_i < 0 {
                        best = v;
                        let flat = if storage_order == 1 {
                            let mut f = 0usize;
                            for i in (0..sp).rev() {
                                f = f * input[i] + pos[i] as usize;
                            }
                            f
                        } else {
                            off
                        };
                        best_i = (ci * in_n + flat) as i64;
                    }
                }
                vd[p] = best;
                id[p] = best_i;
            }
        });
    let y = Tensor::from_f64s(vals, out_dims, x.dtype(), x.device())?;
    let i = Tensor::from_i64s(idxs, out_dims, x.device())?;
    Ok(vec![Value::Tensor(y), Value::Tensor(i)])
}

fn global(kind: Kind, p: i64) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let d = x.dims().to_vec();
        if d.len() < 2 {
            bail!("global pooling needs rank >= 2");
        }
        let mut od = d[..2].to_vec();
        od.extend(std::iter::repeat_n(1, d.len() - 2));
        let flat = (d[0], d[1], d[2..].iter().product::<usize>());
        match kind {
            Kind::Max => {
                if flat.2 == 0 {
                    bail!("GlobalMaxPool of an empty input");
                }
                let y = x.candle().reshape(flat)?.max_keepdim(2)?.reshape(od)?;
                out1(Tensor::new(y, x.dtype())?)
            }
            Kind::Avg => {
                let y = float_work(x)?.reshape(flat)?.mean_keepdim(2)?.reshape(od)?;
                out1(float_back(y, x.dtype())?)
            }
            Kind::Lp => {
                let xc = float_work(x)?.reshape(flat)?.abs()?;
                let y = xc.powf(p as f64)?.sum_keepdim(2)?.powf(1.0 / p as f64)?.reshape(od)?;
                out1(float_back(y, x.dtype())?)
            }
        }
    })
}

fn max_unpool(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let kernel_shape = n
        .attr_ints("kernel_shape")?
        .ok_or_else(|| n.err("kernel_shape is required"))?;
    let strides = n.attr_ints("strides")?;
    let pads = n.attr_ints("pads")?;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let ind = tin(ins, 1)?;
        let xd = x.dims().to_vec();
        if xd.len() < 3 || ind.dims() != xd.as_slice() {
            bail!("MaxUnpool: X {:?} and I {:?} must match", xd, ind.dims());
        }
        let sp = xd.len() - 2;
        if kernel_shape.len() != sp || kernel_shape.iter().any(|&k| !(1..=super::nn::LIMIT).contains(&k)) {
            bail!("MaxUnpool: bad kernel_shape {kernel_shape:?}");
        }
        let s = spatial_attr(&strides, sp, 1, "strides")?;
        let (pb, pe) = window_pads(AutoPad::NotSet, &pads, &xd[2..], &vec![1; sp], &s, &vec![1; sp])?;
        let out_dims: Vec<usize> = match tin_opt(ins, 2)? {
            Some(t) => {
                let v = t.to_i64_vec()?;
                if v.len() != xd.len() || v.iter().any(|&d| d < 0) {
                    bail!("MaxUnpool: bad output_shape {v:?}");
                }
                v.iter().map(|&d| d as usize).collect()
            }
            None => {
                let mut o = xd[..2].to_vec();
                for i in 0..sp {
                    let full = xd[2 + i].saturating_sub(1) * s[i] + kernel_shape[i] as usize;
                    o.push(full.saturating_sub(pb[i] + pe[i]));
                }
                o
            }
        };
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        let total: usize = out_dims.iter().product();
        let xv = x.to_f64_vec()?;
        let iv = ind.to_i64_vec()?;
        let mut out = vec![0.0f64; total];
        for (&v, &i) in xv.iter().zip(&iv) {
            if i < 0 || i as usize >= total {
                bail!("MaxUnpool: index {i} out of range");
            }
            let dst = i as usize;
            out[dst] = v;
        }
        out1(Tensor::from_f64s(out, &out_dims, x.dtype(), x.device())?)
    }))
}

/// Bilinear sample positions and weights of one RoiAlign sampling point.
#[derive(Clone, Copy, Default)]
struct Pre {
    pos: [usize; 4],
    w: [f64; 4],
}

fn roi_align(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let default_ctm = if n.opset >= 16 {
        "half_pixel"
    } else {
        "output_half_pixel"
    };
    let half_pixel = n.attr_s("coordinate_transformation_mode", default_ctm)? == "half_pixel";
    let max_mode = n.attr_s("mode", "avg")?.eq_ignore_ascii_case("max");
    let oh = n.attr_i("output_height", 1)?;
    let ow = n.attr_i("output_width", 1)?;
    let sampling = n.attr_i("sampling_ratio", 0)?;
    let scale = n.attr_f("spatial_scale", 1.0)? as f64;
    if !(1..=super::nn::LIMIT).contains(&oh) || !(1..=super::nn::LIMIT).contains(&ow) || sampling < 0 {
        return Err(n.err("RoiAlign: bad output size or sampling_ratio"));
    }
    let (ph_n, pw_n) = (oh as usize, ow as usize);
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let rois = tin(ins, 1)?;
        let bi = tin(ins, 2)?.to_i64_vec()?;
        let xd = x.dims().to_vec();
        if xd.len() != 4 || rois.dims().len() != 2 || rois.dims()[1] != 4 || rois.dims()[0] != bi.len() {
            bail!("RoiAlign: bad shapes X {:?} rois {:?}", xd, rois.dims());
        }
        let (nb, c, h, w) = (xd[0], xd[1], xd[2], xd[3]);
        if bi.iter().any(|&b| b < 0 || b as usize >= nb) {
            bail!("RoiAlign: batch index out of range");
        }
        let nr = bi.len();
        let out_dims = vec![nr, c, ph_n, pw_n];
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        if h == 0 || w == 0 {
            bail!("RoiAlign: empty feature map");
        }
        let xv = x.to_f64_vec()?;
        let rv = rois.to_f64_vec()?;
        let per = c * ph_n * pw_n;
        let mut out = vec![0.0f64; nr * per];
        let off = if half_pixel { 0.5 } else { 0.0 };
        // Per ROI: sampling grid and its precomputed bilinear taps.
        let mut plans = Vec::with_capacity(nr);
        for r in 0..nr {
            let rs_w = rv[r * 4] * scale - off;
            let rs_h = rv[r * 4 + 1] * scale - off;
            let re_w = rv[r * 4 + 2] * scale - off;
            let re_h = rv[r * 4 + 3] * scale - off;
            let (mut rw, mut rh) = (re_w - rs_w, re_h - rs_h);
            if !half_pixel {
                rw = rw.max(1.0);
                rh = rh.max(1.0);
            }
            let bh = rh / ph_n as f64;
            let bw = rw / pw_n as f64;
            let gh = if sampling > 0 {
                sampling as usize
            } else {
                (rh / ph_n as f64).ceil().max(0.0) as usize
            };
            let gw = if sampling > 0 {
                sampling as usize
            } else {
                (rw / pw_n as f64).ceil().max(0.0) as usize
            };
            if (gh as u128) * (gw as u128) * (ph_n * pw_n) as u128 > 1 << 26 {
                bail!("RoiAlign: sampling grid too large");
            }
            let mut pre = Vec::with_capacity(gh * gw * ph_n * pw_n);
            for ph in 0..ph_n {
                for pw in 0..pw_n {
                    for iy in 0..gh {
                        let yy = rs_h + ph as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = rs_w + pw as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            pre.push(roi_pre(yy, xx, h, w));
                        }
                    }
                }
            }
            plans.push((pre, (gh * gw).max(1)));
        }
        out.par_chunks_mut(per.max(1)).enumerate().for_each(|(r, dst)| {
            let (pre, count) = &plans[r];
            let b = bi[r] as usize;
            let samples = pre.len() / (ph_n * pw_n);
            for ci in 0..c {
                let img = &xv[(b * c + ci) * h * w..(b * c + ci + 1) * h * w];
                for p in 0..ph_n * pw_n {
                    let taps = &pre[p * samples..(p + 1) * samples];
                    let v = if max_mode {
                        taps.iter()
                            .map(|t| (0..4).map(|k| t.w[k] * img[t.pos[k]]).fold(f64::NEG_INFINITY, f64::max))
                            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
                            .unwrap_or(0.0)
                    } else {
                        let s: f64 = taps
                            .iter()
                            .map(|t| (0..4).map(|k| t.w[k] * img[t.pos[k]]).sum::<f64>())
                            .sum();
                        s / *count as f64
                    };
                    dst[ci * ph_n * pw_n + p] = v;
                }
            }
        });
        out1(Tensor::from_f64s(out, &out_dims, x.dtype(), x.device())?)
    }))
}

fn roi_pre(y: f64, x: f64, h: usize, w: usize) -> Pre {
    if !(y >= -1.0 && y <= h as f64 && x >= -1.0 && x <= w as f64) {
        return Pre::default();
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut yl, mut xl) = (y as usize, x as usize);
    let (yh, xh);
    if yl >= h - 1 {
        yl = h - 1;
        yh = yl;
        y = yl as f64;
    } else {
        yh = yl + 1;
    }
    if xl >= w - 1 {
        xl = w - 1;
        xh = xl;
        x = xl as f64;
    } else {
        xh = xl + 1;
    }
    let (ly, lx) = (y - yl as f64, x - xl as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Pre {
        pos: [yl * w + xl, yl * w + xh, yh * w + xl, yh * w + xh],
        w: [hy * hx, hy * lx, ly * hx, ly * lx],
    }
}

fn max_roi_pool(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let pooled = n
        .attr_ints("pooled_shape")?
        .ok_or_else(|| n.err("pooled_shape is required"))?;
    let scale = n.attr_f("spatial_scale", 1.0)? as f64;
    if pooled.len() != 2 || pooled.iter().any(|&v| !(1..=super::nn::LIMIT).contains(&v)) {
        return Err(n.err(format!("MaxRoiPool: bad pooled_shape {pooled:?}")));
    }
    let (ph_n, pw_n) = (pooled[0] as usize, pooled[1] as usize);
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let rois = tin(ins, 1)?;
        let xd = x.dims().to_vec();
        if xd.len() != 4 || rois.dims().len() != 2 || rois.dims()[1] != 5 {
            bail!("MaxRoiPool: bad shapes X {:?} rois {:?}", xd, rois.dims());
        }
        let (nb, c, h, w) = (xd[0], xd[1], xd[2], xd[3]);
        let nr = rois.dims()[0];
        let out_dims = vec![nr, c, ph_n, pw_n];
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        let xv = x.to_f64_vec()?;
        let rv = rois.to_f64_vec()?;
        let mut out = vec![0.0f64; nr * c * ph_n * pw_n];
        for r in 0..nr {
            let b = rv[r * 5];
            if !(b >= 0.0 && (b as usize) < nb) {
                bail!("MaxRoiPool: batch index {b} out of range");
            }
            let b = b as usize;
            let sw = (rv[r * 5 + 1] * scale).round() as i64;
            let sh = (rv[r * 5 + 2] * scale).round() as i64;
            let ew = (rv[r * 5 + 3] * scale).round() as i64;
            let eh = (rv[r * 5 + 4] * scale).round() as i64;
            let rw = (ew.saturating_sub(sw).saturating_add(1)).max(1) as f64;
            let rh = (eh.saturating_sub(sh).saturating_add(1)).max(1) as f64;
            let (bh, bw) = (rh / ph_n as f64, rw / pw_n as f64);
            for ci in 0..c {
                let img = &xv[(b * c + ci) * h * w..(b * c + ci + 1) * h * w];
                for ph in 0..ph_n {
                    let hs = ((ph as f64 * bh).floor() as i64).saturating_add(sh).clamp(0, h as i64) as usize;
                    let he = (((ph + 1) as f64 * bh).ceil() as i64)
                        .saturating_add(sh)
                        .clamp(0, h as i64) as usize;
                    for pw in 0..pw_n {
                        let ws = ((pw as f64 * bw).floor() as i64).saturating_add(sw).clamp(0, w as i64) as usize;
                        let we = (((pw + 1) as f64 * bw).ceil() as i64)
                            .saturating_add(sw)
                            .clamp(0, w as i64) as usize;
                        let mut m = f64::NEG_INFINITY;
                        for yy in hs..he {
                            for xx in ws..we {
                                m = m.max(img[yy * w + xx]);
                            }
                        }
                        out[((r * c + ci) * ph_n + ph) * pw_n + pw] = if he <= hs || we <= ws { 0.0 } else { m };
                    }
                }
            }
        }
        out1(Tensor::from_f64s(out, &out_dims, x.dtype(), x.device())?)
    }))
}
