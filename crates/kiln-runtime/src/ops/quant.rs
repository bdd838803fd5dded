//! Operator family `quant`: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, QLinearMatMul and
//! the integer convolutions ConvInteger and QLinearConv's reference path (the packed QLinearConv is
//! `super::qconv`).

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;

use super::common::{elems, norm_axis, tin, tin_opt};
use super::matmul::matmul_integer;
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::fastmath::{self, with_f32};
use crate::{bail, Result, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("QuantizeLinear", quantize_linear);
    r.add("DequantizeLinear", dequantize_linear);
    r.add_domain("ai.kiln", "QuantizeDequantize", |_| {
        Ok(kernel(|_, ins| quantize_dequantize(ins)))
    });
    r.add("DynamicQuantizeLinear", |_| {
        Ok(kernel(|_, ins| dynamic_quantize(tin(ins, 0)?)))
    });
    r.add("QLinearMatMul", |_| Ok(kernel(qlinear_matmul)));
    r.add("ConvInteger", |n| {
        let p = ConvParams::from_node(n)?;
        Ok(kernel(move |cx, ins| {
            let (x, w) = (tin(ins, 0)?, tin(ins, 1)?);
            let acc = conv_integer(cx, &p, x, tin_opt(ins, 2)?, w, tin_opt(ins, 3)?)?;
            out1(Tensor::new(acc.round()?.to_dtype(CDType::I64)?, DType::I64)?.cast(DType::I32)?)
        }))
    });
}

/// `ai.kiln QuantizeDequantize(x, scale, zero_point)`: `DequantizeLinear(QuantizeLinear(x, s, z), s,
/// z)` with one f32 scale and one u8/i8 zero point (the optimizer's `quantize_dequantize_fusion`),
/// `(clamp(round_half_even(x / s) + z) - z) * s` in f32 without the 8-bit codes in between. The
/// pair's arithmetic, so the result is bit for bit the pair's.
fn quantize_dequantize(ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    use rayon::prelude::*;
    let (x, s, z) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    if x.dtype() != DType::F32 || s.dtype() != DType::F32 || s.elem_count() != 1 || z.elem_count() != 1 {
        bail!(
            "QuantizeDequantize takes an f32 input with one f32 scale and one zero point, got {} / {} x {} / {} x {}",
            x.dtype(),
            s.dtype(),
            s.elem_count(),
            z.dtype(),
            z.elem_count()
        );
    }
    let (lo, hi) = match z.dtype() {
        DType::U8 | DType::I8 => qrange(z.dtype())?,
        other => bail!("QuantizeDequantize zero point must be u8 or i8, got {other}"),
    };
    let scale = s.to_f64_vec()?[0] as f32;
    let zp = z.to_f64_vec()?[0] as f32;
    let (lo, hi) = (lo as f32, hi as f32);
    if x.device().is_cpu() {
        let xc = x.candle().contiguous()?;
        let fast = with_f32(&xc, |v| {
            let mut y = fastmath::zeroed(v.len());
            if v.len() >= 2 * DQL_CHUNK && rayon::current_num_threads() > 1 {
                y.par_chunks_mut(DQL_CHUNK)
                    .zip(v.par_chunks(DQL_CHUNK))
                    .for_each(|(yc, vc)| fastmath::quantize_dequantize(vc, scale, zp, lo, hi, yc));
            } else {
                fastmath::quantize_dequantize(v, scale, zp, lo, hi, &mut y);
            }
            CT::from_vec(y, x.dims(), x.device())
        });
        if let Some(y) = fast {
            return out1(Tensor::new(y?, DType::F32)?);
        }
    }
    let dev = x.device();
    let (sv, zv) = (CT::new(scale, dev)?, CT::new(zp, dev)?);
    let q = round_half_even(&x.candle().broadcast_div(&sv)?)?
        .broadcast_add(&zv)?
        .clamp(lo, hi)?;
    out1(Tensor::new(q.broadcast_sub(&zv)?.broadcast_mul(&sv)?, DType::F32)?)
}

/// Integer range of a quantized dtype.
pub(super) fn qrange(d: DType) -> Result<(f64, f64)> {
    Ok(match d {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::U4 | DType::I4 | DType::U2 | DType::I2 => {
            let (lo, hi) = d.small_int_range().unwrap_or((0, 0));
            (lo as f64, hi as f64)
        }
        other => bail!("quantized type {other} is not supported"),
    })
}

/// Reshapes a scale or zero point so that it broadcasts against `x_dims`: per tensor (scalar or
/// one element), per axis (1-D of size `x_dims[axis]`) or blocked (`block > 0`).
fn expand_param(p: &CT, x_dims: &[usize], axis: i64, block: i64) -> Result<CT> {
    if p.rank() == 0 {
        return Ok(p.clone());
    }
    if p.elem_count() == 1 {
        return Ok(p.flatten_all()?.reshape(())?);
    }
    if x_dims.is_empty() {
        bail!("a scalar input needs a scalar scale and zero point");
    }
    let ax = norm_axis(axis, x_dims.len())?;
    if block <= 0 {
        if p.rank() != 1 || p.dims()[0] != x_dims[ax] {
            bail!(
                "per-axis parameter of shape {:?} does not match axis {axis} of input shape {x_dims:?}",
                p.dims()
            );
        }
        let mut shape = vec![1usize; x_dims.len()];
        shape[ax] = x_dims[ax];
        return Ok(p.reshape(shape)?);
    }
    if p.rank() != x_dims.len() {
        bail!(
            "blocked parameter of shape {:?} does not match input shape {x_dims:?}",
            p.dims()
        );
    }
    let block = block as usize;
    let nb = p.dims()[ax];
    let n = x_dims[ax];
    if n.div_ceil(block) != nb {
        bail!("blocked parameter dim {nb} does not match ceil({n} / block_size {block}) on axis {axis}");
    }
    let idx: Vec<u32> = (0..n).map(|i| (i / block) as u32).collect();
    let idx = CT::from_vec(idx, n, p.device())?;
    let e = p.index_select(&idx, ax)?;
    if e.dims() != x_dims {
        bail!(
            "blocked parameter of shape {:?} does not match input shape {x_dims:?} outside axis {axis}",
            p.dims()
        );
    }
    Ok(e)
}

/// Round half to even, element-wise (float tensors).
fn round_half_even(x: &CT) -> Result<CT> {
    let r = x.round()?;
    let frac = (x - x.floor()?)?;
    let half = frac.eq(0.5)?;
    let even = ((x * 0.5)?.round()? * 2.0)?;
    Ok(half.where_cond(&even, &r)?)
}

fn float_dtype(code: i64) -> Result<DType> {
    match DType::from_onnx(code as i32) {
        Some(d) if d.is_float() && !d.is_exotic() => Ok(d),
        _ => bail!("unsupported float type code {code}"),
    }
}

pub(super) fn cdt(d: DType) -> Result<CDType> {
    crate::tensor::storage_dtype(d)
}

/// float8 types (zero point must be 0 and is ignored; `saturate` applies).
fn is_float8(d: DType) -> bool {
    matches!(
        d,
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ
    )
}

fn quantize_linear(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", 1)?;
    let block = n.attr_i("block_size", 0)?;
    let saturate = n.attr_i("saturate", 1)? != 0;
    let out_code = n.attr_i("output_dtype", 0)?;
    let precision = n.attr_i("precision", 0)?;
    let out_attr = if out_code != 0 {
        Some(DType::from_onnx(out_code as i32).ok_or_else(|| n.err(format!("unsupported output_dtype {out_code}")))?)
    } else {
        None
    };
    let prec = if precision != 0 {
        Some(float_dtype(precision)?)
    } else {
        None
    };
    Ok(kernel(move |_, ins| {
        let (x, s) = (tin(ins, 0)?, tin(ins, 1)?);
        let zp = tin_opt(ins, 2)?;
        let out = match (zp, out_attr) {
            (Some(z), Some(o)) if z.dtype() != o => {
                bail!("zero point dtype {} differs from output_dtype {o}", z.dtype())
            }
            (Some(z), _) => z.dtype(),
            (None, Some(o)) => o,
            (None, None) => DType::U8,
        };
        let float_out = is_float8(out) || out == DType::F4E2M1;
        if !float_out
            && !matches!(
                out,
                DType::U8 | DType::I8 | DType::U16 | DType::I16 | DType::U4 | DType::I4 | DType::U2 | DType::I2
            )
        {
            bail!("QuantizeLinear to {out} is not supported");
        }
        if let Some(y) = quantize_f32_per_tensor(x, s, zp, out, prec, block)? {
            return out1(y);
        }
        // Division in the requested precision (or the input's float type).
        let div_dt = match prec {
            Some(p) => p,
            None if x.dtype().is_float() => x.dtype(),
            None => DType::F32,
        };
        let xd = x.candle().to_dtype(cdt(div_dt)?)?;
        let sd = expand_param(&s.candle().to_dtype(cdt(div_dt)?)?, x.dims(), axis, block)?;
        let q = xd.broadcast_div(&sd)?;
        if float_out {
            // float8: x / scale, rounded to nearest even (zero point is 0 by definition);
            // float4: x / scale + zero point, saturating.
            let mut q = Tensor::new(q, div_dt)?;
            if let (Some(z), DType::F4E2M1) = (zp, out) {
                let wide = if div_dt == DType::F64 { DType::F64 } else { DType::F32 };
                let zd = expand_param(&z.candle().to_dtype(cdt(wide)?)?, x.dims(), axis, block)?;
                q = Tensor::new(q.candle().to_dtype(cdt(wide)?)?.broadcast_add(&zd)?, wide)?;
            }
            return out1(q.cast_with(out, saturate, "up")?);
        }
        let (lo, hi) = qrange(out)?;
        let wide = if div_dt == DType::F64 { CDType::F64 } else { CDType::F32 };
        let mut q = round_half_even(&q.to_dtype(wide)?)?;
        if let Some(z) = zp {
            let zd = expand_param(&z.candle().to_dtype(wide)?, x.dims(), axis, block)?;
            q = q.broadcast_add(&zd)?;
        }
        let q = q.clamp(lo, hi)?;
        out1(Tensor::new(q.to_dtype(cdt(out)?)?, out)?)
    }))
}

/// QuantizeLinear of a contiguous f32 CPU tensor with one f32 scale and zero point to u8 or i8, in
/// one vectorized pass (parallel chunks for large tensors); `None` for anything else.
fn quantize_f32_per_tensor(
    x: &Tensor,
    s: &Tensor,
    zp: Option<&Tensor>,
    out: DType,
    prec: Option<DType>,
    block: i64,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let simple = x.dtype() == DType::F32
        && x.device().is_cpu()
        && s.dtype() == DType::F32
        && s.elem_count() == 1
        && zp.is_none_or(|z| z.elem_count() == 1)
        && matches!(out, DType::U8 | DType::I8)
        && prec.is_none_or(|p| p == DType::F32)
        && block == 0;
    if !simple {
        return Ok(None);
    }
    let scale = s.to_f64_vec()?[0] as f32;
    let z = match zp {
        Some(z) => z.to_f64_vec()?[0] as f32,
        None => 0.0,
    };
    let xc = x.candle().contiguous()?;
    let parallel = x.elem_count() >= 2 * DQL_CHUNK && rayon::current_num_threads() > 1;
    // One kernel over the whole slice, or over parallel chunks of it.
    fn codes<T: Copy + Default + Send>(v: &[f32], parallel: bool, f: impl Fn(&[f32], &mut [T]) + Sync) -> Vec<T> {
        let mut q = vec![T::default(); v.len()];
        if parallel {
            q.par_chunks_mut(DQL_CHUNK)
                .zip(v.par_chunks(DQL_CHUNK))
                .for_each(|(qc, vc)| f(vc, qc));
        } else {
            f(v, &mut q);
        }
        q
    }
    let ct = match out {
        DType::U8 => with_f32(&xc, |v| {
            CT::from_vec(
                codes(v, parallel, |v, q| fastmath::quantize_u8(v, scale, z, q)),
                x.dims(),
                x.device(),
            )
        }),
        _ => with_f32(&xc, |v| {
            CT::from_vec(
                codes(v, parallel, |v, q| fastmath::quantize_i8(v, scale, z, q)),
                x.dims(),
                x.device(),
            )
        }),
    };
    match ct {
        Some(ct) => Ok(Some(Tensor::new(ct?.to_dtype(cdt(out)?)?, out)?)),
        None => Ok(None),
    }
}

fn dequantize_linear(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", 1)?;
    let block = n.attr_i("block_size", 0)?;
    let out_code = n.attr_i("output_dtype", 0)?;
    let out_attr = if out_code != 0 {
        Some(float_dtype(out_code)?)
    } else {
        None
    };
    Ok(kernel(move |_, ins| {
        let (x, s) = (tin(ins, 0)?, tin(ins, 1)?);
        let zp = tin_opt(ins, 2)?;
        let xdt = x.dtype();
        let float_in = is_float8(xdt) || xdt == DType::F4E2M1;
        if (xdt.is_float() && !float_in) || xdt == DType::Bool || xdt == DType::F8E8M0 {
            bail!("DequantizeLinear of {} is not supported", xdt);
        }
        if let Some(z) = zp {
            if z.dtype() != xdt {
                bail!("zero point dtype {} differs from input dtype {}", z.dtype(), xdt);
            }
            if is_float8(xdt) && z.to_f64_vec()?.iter().any(|&v| v != 0.0) {
                bail!("the zero point of a {xdt} input must be zero");
            }
        }
        // float8 and float4 inputs have no zero point to subtract.
        let zp = if float_in { None } else { zp };
        let out = out_attr.unwrap_or(s.dtype());
        if !out.is_float() {
            bail!("DequantizeLinear scale must be a float, got {}", s.dtype());
        }
        if out == DType::F32 && block == 0 {
            if let Some(y) = dequantize_8bit_f32(x, s, zp, axis)? {
                return out1(y);
            }
        }
        let wide = if out == DType::F64 { CDType::F64 } else { CDType::F32 };
        let mut d = x.candle().to_dtype(wide)?;
        if let Some(z) = zp {
            let zd = expand_param(&z.candle().to_dtype(wide)?, x.dims(), axis, block)?;
            d = d.broadcast_sub(&zd)?;
        }
        let sd = expand_param(&s.candle().to_dtype(wide)?, x.dims(), axis, block)?;
        let y = d.broadcast_mul(&sd)?;
        out1(Tensor::new(y.to_dtype(cdt(out)?)?, out)?)
    }))
}

/// DequantizeLinear of an 8-bit CPU tensor with an f32 scale per tensor or per `axis` (no blocks)
/// into f32 in one pass: `(f32(x) - f32(zp)) * scale`, the general path's f32 arithmetic (so the
/// same bits), without its broadcast tensors (an embedding's [8, 64, 384] output took 3.2 ms that
/// way). `None` when the operands do not fit; the general path then handles or rejects them.
pub(super) fn dequantize_8bit_f32(x: &Tensor, s: &Tensor, zp: Option<&Tensor>, axis: i64) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.elem_count() == 0
        || s.dtype() != DType::F32
        || !matches!(x.dtype(), DType::U8 | DType::I8)
    {
        return Ok(None);
    }
    let dims = x.dims();
    let per_tensor = s.elem_count() == 1 && zp.is_none_or(|z| z.elem_count() == 1);
    let (outer, channels, inner) = if per_tensor {
        (1, 1, x.elem_count())
    } else {
        let rank = dims.len() as i64;
        let ax = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&ax) || s.rank() != 1 {
            return Ok(None);
        }
        let ax = ax as usize;
        let c = dims[ax];
        if s.elem_count() != c || zp.is_some_and(|z| z.rank() != 1 || z.elem_count() != c) {
            return Ok(None);
        }
        (dims[..ax].iter().product(), c, dims[ax + 1..].iter().product())
    };
    let flat = x.candle().flatten_all()?;
    let q: Vec<f32> = match x.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(f32::from).collect(),
        // i8 is stored widened to i16.
        _ => flat.to_vec1::<i16>()?.into_iter().map(f32::from).collect(),
    };
    let scales: Vec<f32> = s.to_f64_vec()?.into_iter().map(|v| v as f32).collect();
    let zps: Vec<f32> = match zp {
        Some(z) => z.to_i64_vec()?.into_iter().map(|v| v as f32).collect(),
        None => vec![0.0; scales.len()],
    };
    let mut y = q;
    for block in y.chunks_exact_mut(channels * inner).take(outer) {
        for (c, run) in block.chunks_exact_mut(inner).enumerate() {
            let (z, sc) = (zps[c], scales[c]);
            run.iter_mut().for_each(|v| *v = (*v - z) * sc);
        }
    }
    Ok(Some(Tensor::new(CT::from_vec(y, dims, x.device())?, DType::F32)?))
}

/// DynamicQuantizeLinear's scale and zero point for a tensor whose range (widened to include 0)
/// is `[mn, mx]`: `(max - min) / 255` (1/255 for a constant tensor) and the zero point rounded half
/// to even and clamped to `[0, 255]`.
fn dynamic_qparams(mn: f32, mx: f32) -> (f32, f32) {
    let scale: f32 = (if mx == mn { 1.0 } else { mx - mn }) / 255.0;
    let zp = (0.0f32 - mn / scale).clamp(0.0, 255.0).round_ties_even();
    (scale, zp)
}

/// DynamicQuantizeLinear of f32 values: the u8 values, the scale and the zero point (as f32).
/// Tensors of at least this many elements are quantized in parallel chunks of this size.
const DQL_CHUNK: usize = 1 << 15;

pub(crate) fn dynamic_quantize_slice(v: &[f32]) -> (Vec<u8>, f32, f32) {
    use rayon::prelude::*;
    let parallel = v.len() >= 2 * DQL_CHUNK && rayon::current_num_threads() > 1;
    let (mn, mx) = if parallel {
        v.par_chunks(DQL_CHUNK).map(fastmath::min_max).reduce(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |a, b| (a.0.min(b.0), a.1.max(b.1)),
        )
    } else {
        fastmath::min_max(v)
    };
    let (scale, zp) = dynamic_qparams(mn.min(0.0), mx.max(0.0));
    let mut q = vec![0u8; v.len()];
    if parallel {
        q.par_chunks_mut(DQL_CHUNK)
            .zip(v.par_chunks(DQL_CHUNK))
            .for_each(|(qc, vc)| fastmath::quantize_u8(vc, scale, zp, qc));
    } else {
        fastmath::quantize_u8(v, scale, zp, &mut q);
    }
    (q, scale, zp)
}

/// DynamicQuantizeLinear over a contiguous f32 CPU tensor in two passes over its slice (range,
/// then `saturate(round_half_even(x / scale) + zp)`); `None` for anything else.
fn dynamic_quantize_f32(x: &Tensor) -> Result<Option<Vec<Value>>> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(None);
    }
    let xc = x.candle().contiguous()?;
    let Some((q, scale, zp)) = with_f32(&xc, dynamic_quantize_slice) else {
        return Ok(None);
    };
    let y = Tensor::new(CT::from_vec(q, x.dims(), x.device())?, DType::U8)?;
    let s = Tensor::new(CT::new(scale, x.device())?, DType::F32)?;
    let z = Tensor::new(CT::new(zp as u8, x.device())?, DType::U8)?;
    Ok(Some(vec![Value::Tensor(y), Value::Tensor(s), Value::Tensor(z)]))
}

fn dynamic_quantize(x: &Tensor) -> Result<Vec<Value>> {
    if !x.dtype().is_float() {
        bail!("DynamicQuantizeLinear needs a float input, got {}", x.dtype());
    }
    if let Some(out) = dynamic_quantize_f32(x)? {
        return Ok(out);
    }
    let xf = x.candle().to_dtype(CDType::F32)?;
    let (mx, mn) = if xf.elem_count() == 0 {
        (0f32, 0f32)
    } else {
        (
            xf.max_all()?.to_scalar::<f32>()?.max(0.0),
            xf.min_all()?.to_scalar::<f32>()?.min(0.0),
        )
    };
    let (scale, zpi) = dynamic_qparams(mn, mx);
    let st = CT::new(scale, x.device())?;
    let q = round_half_even(&xf.broadcast_div(&st)?)?;
    let q = (q + zpi as f64)?.clamp(0f64, 255f64)?.to_dtype(CDType::U8)?;
    let y = Tensor::new(q, DType::U8)?;
    let s = Tensor::new(st, DType::F32)?.cast(x.dtype())?;
    let z = Tensor::new(CT::new(zpi as u8, x.device())?, DType::U8)?;
    Ok(vec![Value::Tensor(y), Value::Tensor(s), Value::Tensor(z)])
}

/// Scale for a per-row (`rows`) or per-column parameter of a matmul operand.
fn mm_param(p: &CT, per_row: bool) -> Result<CT> {
    if p.elem_count() == 1 {
        return Ok(p.flatten_all()?.reshape(())?);
    }
    if per_row && p.rank() == 1 {
        return Ok(p.reshape((p.elem_count(), 1))?);
    }
    Ok(p.clone())
}

fn qlinear_matmul(cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let (a, a_s, a_zp) = (tin(ins, 0)?, tin(ins, 1)?, tin_opt(ins, 2)?);
    let (b, b_s, b_zp) = (tin(ins, 3)?, tin(ins, 4)?, tin_opt(ins, 5)?);
    let (y_s, y_zp) = (tin(ins, 6)?, tin_opt(ins, 7)?);
    for s in [a_s, b_s, y_s] {
        if !s.dtype().is_float() {
            bail!("QLinearMatMul scales must be floating point, got {}", s.dtype());
        }
    }
    let acc = matmul_integer(cx, a, a_zp, b, b_zp)?;
    let out = y_zp.map_or(a.dtype(), |z| z.dtype());
    let (lo, hi) = qrange(out)?;
    // Multiplier a_scale * b_scale / y_scale in the scales' own precision (as numpy does).
    let sdt = a_s.candle().dtype();
    let as_ = mm_param(a_s.candle(), true)?;
    let bs = mm_param(&b_s.candle().to_dtype(sdt)?, false)?;
    let ys = mm_param(&y_s.candle().to_dtype(sdt)?, false)?;
    let mult = as_.broadcast_mul(&bs)?.broadcast_div(&ys)?.to_dtype(CDType::F64)?;
    let mut d = acc.candle().to_dtype(CDType::F64)?.broadcast_mul(&mult)?;
    if let Some(z) = y_zp {
        d = d.broadcast_add(&mm_param(&z.candle().to_dtype(CDType::F64)?, false)?)?;
    }
    let q = round_half_even(&d)?.clamp(lo, hi)?;
    out1(Tensor::new(q.to_dtype(cdt(out)?)?, out)?)
}

// ---------------------------------------------------------------- integer convolution

pub(super) struct ConvParams {
    auto_pad: String,
    dilations: Option<Vec<i64>>,
    pub(super) group: i64,
    kernel_shape: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
}

impl ConvParams {
    pub(super) fn from_node(n: &NodeCtx) -> Result<Self> {
        Ok(ConvParams {
            auto_pad: n.attr_s("auto_pad", "NOTSET")?,
            dilations: n.attr_ints("dilations")?,
            group: n.attr_i("group", 1)?,
            kernel_shape: n.attr_ints("kernel_shape")?,
            pads: n.attr_ints("pads")?,
            strides: n.attr_ints("strides")?,
        })
    }
}

/// Shifts an integer tensor by its zero point into f64: scalar, or per channel along `ch_axis`.
fn shift(t: &Tensor, zp: Option<&Tensor>, ch_axis: usize) -> Result<CT> {
    if t.dtype().is_float() || t.dtype() == DType::Bool {
        bail!("integer convolution needs integer inputs, got {}", t.dtype());
    }
    let v = t.candle().to_dtype(CDType::F64)?;
    let Some(z) = zp else { return Ok(v) };
    let z = z.candle().to_dtype(CDType::F64)?;
    let z = if z.elem_count() == 1 {
        z.flatten_all()?.reshape(())?
    } else if z.rank() == 1 && t.rank() > ch_axis && z.dims()[0] == t.dims()[ch_axis] {
        let mut shape = vec![1usize; t.rank()];
        shape[ch_axis] = z.dims()[0];
        z.reshape(shape)?
    } else {
        bail!(
            "zero point of shape {:?} does not fit input shape {:?}",
            z.dims(),
            t.dims()
        );
    };
    Ok(v.broadcast_sub(&z)?)
}

/// Exact integer convolution `(x - x_zp) * (w - w_zp)`, as an f64 tensor.
fn conv_integer(
    cx: &RunCx,
    p: &ConvParams,
    x: &Tensor,
    xzp: Option<&Tensor>,
    w: &Tensor,
    wzp: Option<&Tensor>,
) -> Result<CT> {
    let xs = shift(x, xzp, 1)?;
    let ws = shift(w, wzp, 0)?;
    conv_f64(cx, p, &xs, &ws)
}

/// A convolution's resolved geometry: strides, dilations, pads (begins then ends), group and the
/// output shape `[N, M, spatial...]`.
pub(super) struct ConvGeometry {
    pub(super) strides: Vec<usize>,
    pub(super) dil: Vec<usize>,
    pub(super) pads: Vec<usize>,
    pub(super) group: usize,
    pub(super) out_dims: Vec<usize>,
}

pub(super) fn conv_geometry(p: &ConvParams, xd: &[usize], wd: &[usize]) -> Result<ConvGeometry> {
    let xr = xd.len();
    if xr < 3 || wd.len() != xr {
        bail!("convolution needs X and W of equal rank >= 3, got {xd:?} and {wd:?}");
    }
    let sp = xr - 2;
    let kshape: Vec<usize> = match &p.kernel_shape {
        Some(k) => k.iter().map(|&v| v.max(0) as usize).collect(),
        None => wd[2..].to_vec(),
    };
    if kshape.len() != sp || kshape[..] != wd[2..] {
        bail!("kernel_shape {kshape:?} does not match W shape {wd:?}");
    }
    let get = |o: &Option<Vec<i64>>, def: i64, len: usize, what: &str| -> Result<Vec<usize>> {
        match o {
            None => Ok(vec![def as usize; len]),
            Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => Ok(v.iter().map(|&x| x as usize).collect()),
            Some(v) => bail!("bad {what} {v:?}"),
        }
    };
    let strides = get(&p.strides, 1, sp, "strides")?;
    let dil = get(&p.dilations, 1, sp, "dilations")?;
    if strides.contains(&0) || dil.contains(&0) {
        bail!("strides and dilations must be positive");
    }
    let mut pads = get(&p.pads, 0, 2 * sp, "pads")?;
    if p.auto_pad == "SAME_UPPER" || p.auto_pad == "SAME_LOWER" {
        for i in 0..sp {
            let out = xd[i + 2].div_ceil(strides[i]);
            let eff = kshape[i].saturating_sub(1) * dil[i] + 1;
            let total = ((out.saturating_sub(1)) * strides[i] + eff).saturating_sub(xd[i + 2]);
            let (b, e) = if p.auto_pad == "SAME_UPPER" {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            };
            pads[i] = b;
            pads[i + sp] = e;
        }
    } else if p.auto_pad == "VALID" {
        pads = vec![0; 2 * sp];
    }
    let group = p.group;
    if group <= 0 || !xd[1].is_multiple_of(group as usize) || !wd[0].is_multiple_of(group as usize) {
        bail!("bad group {group} for shapes {xd:?}, {wd:?}");
    }
    let group = group as usize;
    if xd[1] != wd[1] * group {
        bail!(
            "input channels {} do not match W channels {} x group {group}",
            xd[1],
            wd[1]
        );
    }
    let mut out_dims = vec![xd[0], wd[0]];
    for i in 0..sp {
        let padded = xd[i + 2] + pads[i] + pads[i + sp];
        let eff = (kshape[i].max(1) - 1) * dil[i] + 1;
        if padded < eff {
            bail!("kernel larger than padded input");
        }
        out_dims.push((padded - eff) / strides[i] + 1);
    }
    Ok(ConvGeometry {
        strides,
        dil,
        pads,
        group,
        out_dims,
    })
}

fn conv_f64(cx: &RunCx, p: &ConvParams, x: &CT, w: &CT) -> Result<CT> {
    let ConvGeometry {
        strides,
        dil,
        pads,
        group,
        out_dims,
    } = conv_geometry(p, x.dims(), w.dims())?;
    let sp = x.rank() - 2;
    cx.check_alloc(elems(&out_dims), DType::F64)?;
    // Pad explicitly (asymmetric pads allowed).
    let mut xp = x.clone();
    for i in 0..sp {
        if pads[i] > 0 || pads[i + sp] > 0 {
            xp = xp.pad_with_zeros(i + 2, pads[i], pads[i + sp])?;
        }
    }
    let same = |v: &[usize]| v.iter().all(|&s| s == v[0]);
    if sp <= 2 && same(&strides) && same(&dil) {
        let r = if sp == 2 {
            xp.contiguous()?
                .conv2d(&w.contiguous()?, 0, strides[0], dil[0], group)?
        } else {
            xp.contiguous()?
                .conv1d(&w.contiguous()?, 0, strides[0], dil[0], group)?
        };
        return Ok(r);
    }
    host_conv(&xp, w, &strides, &dil, group, &out_dims)
}

/// Direct N-D convolution on the host (rare layouts: unequal strides or dilations, 3-D+).
fn host_conv(x: &CT, w: &CT, strides: &[usize], dil: &[usize], group: usize, out_dims: &[usize]) -> Result<CT> {
    let xd = x.dims().to_vec();
    let wd = w.dims().to_vec();
    let sp = xd.len() - 2;
    let xv = x.flatten_all()?.to_vec1::<f64>()?;
    let wv = w.flatten_all()?.to_vec1::<f64>()?;
    let (n, cin, cout) = (xd[0], xd[1], wd[0]);
    let cin_g = wd[1];
    let cout_g = cout / group;
    let osp: Vec<usize> = out_dims[2..].to_vec();
    let ocount: usize = osp.iter().product();
    let kcount: usize = wd[2..].iter().product();
    let xsp: usize = xd[2..].iter().product();
    let unravel = |mut i: usize, dims: &[usize]| -> Vec<usize> {
        let mut r = vec![0; dims.len()];
        for d in (0..dims.len()).rev() {
            r[d] = i % dims[d].max(1);
            i /= dims[d].max(1);
        }
        r
    };
    let mut out = vec![0f64; n * cout * ocount];
    for b in 0..n {
        for oc in 0..cout {
            let g = oc / cout_g;
            for o in 0..ocount {
                let opos = unravel(o, &osp);
                let mut acc = 0.0;
                for ic in 0..cin_g {
                    let c = g * cin_g + ic;
                    for k in 0..kcount {
                        let kpos = unravel(k, &wd[2..]);
                        let mut xi = 0usize;
                        for d in 0..sp {
                            xi = xi * xd[d + 2] + opos[d] * strides[d] + kpos[d] * dil[d];
                        }
                        acc += xv[(b * cin + c) * xsp + xi] * wv[(oc * cin_g + ic) * kcount + k];
                    }
                }
                out[(b * cout + oc) * ocount + o] = acc;
            }
        }
    }
    Ok(CT::from_vec(out, out_dims, x.device())?)
}

/// Whole numbers already in `out`'s range as a tensor of `out` (u8 or i8, stored as candle stores them).
pub(super) fn quantized_tensor(y: &[f64], dims: Vec<usize>, out: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let t = match out {
        DType::U8 => CT::from_vec(y.iter().map(|&v| v as u8).collect::<Vec<u8>>(), dims, dev)?,
        _ => CT::from_vec(y.iter().map(|&v| v as i16).collect::<Vec<i16>>(), dims, dev)?,
    };
    Tensor::new(t.to_dtype(cdt(out)?)?, out)
}

pub(super) fn qlinear_conv(cx: &RunCx, p: &ConvParams, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let (x, x_s, x_zp) = (tin(ins, 0)?, tin(ins, 1)?, tin_opt(ins, 2)?);
    let (w, w_s, w_zp) = (tin(ins, 3)?, tin(ins, 4)?, tin_opt(ins, 5)?);
    let (y_s, y_zp) = (tin(ins, 6)?, tin_opt(ins, 7)?);
    let bias = tin_opt(ins, 8)?;
    let mut acc = conv_integer(cx, p, x, x_zp, w, w_zp)?;
    if let Some(bv) = bias {
        let bv = bv.candle().to_dtype(CDType::F64)?;
        let mut shape = vec![1usize; acc.rank()];
        shape[1] = bv.elem_count();
        acc = acc.broadcast_add(&bv.reshape(shape)?)?;
    }
    let out = y_zp.map_or(x.dtype(), |z| z.dtype());
    let (lo, hi) = qrange(out)?;
    // Multiplier x_scale * w_scale / y_scale in f32 (the scales' precision), applied in f64.
    let xs = x_s.candle().flatten_all()?.to_dtype(CDType::F32)?;
    let ws = w_s.candle().to_dtype(CDType::F32)?;
    let ws = if ws.elem_count() == 1 {
        ws.flatten_all()?.reshape(())?
    } else {
        let mut shape = vec![1usize; acc.rank()];
        shape[1] = ws.elem_count();
        ws.reshape(shape)?
    };
    let ys = y_s.candle().flatten_all()?.to_dtype(CDType::F32)?;
    if xs.elem_count() != 1 || ys.elem_count() != 1 {
        bail!("QLinearConv x_scale and y_scale must be scalars");
    }
    let (xs, ys) = (xs.reshape(())?, ys.reshape(())?);
    let mult = xs.broadcast_mul(&ws)?.broadcast_div(&ys)?.to_dtype(CDType::F64)?;
    let mut r = acc.broadcast_mul(&mult)?;
    if let Some(z) = y_zp {
        r = r.broadcast_add(&z.candle().flatten_all()?.to_dtype(CDType::F64)?.reshape(())?)?;
    }
    let q = round_half_even(&r.clamp(lo, hi)?)?;
    out1(Tensor::new(q.to_dtype(cdt(out)?)?, out)?)
}
