//! Operator family `quant`: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, QLinearMatMul and
//! the integer convolutions ConvInteger and QLinearConv.

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;

use super::common::{elems, norm_axis, tin, tin_opt};
use super::matmul::matmul_integer;
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::fastmath::{self, with_f32};
use crate::qgemm::Int8;
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
    r.add("QLinearConv", |n| {
        let p = ConvParams::from_node(n)?;
        let packed = PackedQConv::from_node(n, &p)?;
        Ok(kernel(move |cx, ins| {
            if let Some(pk) = &packed {
                if let Some(y) = pk.run(cx, &p, ins)? {
                    return out1(y);
                }
            }
            qlinear_conv(cx, &p, ins)
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
fn qrange(d: DType) -> Result<(f64, f64)> {
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

fn cdt(d: DType) -> Result<CDType> {
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

struct ConvParams {
    auto_pad: String,
    dilations: Option<Vec<i64>>,
    group: i64,
    kernel_shape: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
}

impl ConvParams {
    fn from_node(n: &NodeCtx) -> Result<Self> {
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
struct ConvGeometry {
    strides: Vec<usize>,
    dil: Vec<usize>,
    pads: Vec<usize>,
    group: usize,
    out_dims: Vec<usize>,
}

fn conv_geometry(p: &ConvParams, xd: &[usize], wd: &[usize]) -> Result<ConvGeometry> {
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

/// QLinearConv with a constant 4-D filter. One group runs on the exact integer GEMM
/// (`crate::qgemm`: VNNI when the CPU has it): the filter is packed once as `B = W^T`
/// (`[C*kh*kw, M]`), each image's patches are gathered as the rows of `A` (`[out pixels, C*kh*kw]`,
/// padding filled with the input's zero point so it contributes nothing). Grouped and depthwise
/// filters are summed directly in i32 per output. The i32 sums are requantized exactly as
/// [`qlinear_conv`] does: `(acc + bias) * (x_scale * w_scale / y_scale) +
/// y_zero_point` in f64, clamped, rounded half to even.
struct PackedQConv {
    kind: QConvKind,
    /// W's shape `[M, C / group, kh, kw]` and element type.
    wd: Vec<usize>,
    wdt: DType,
}

enum QConvKind {
    /// One group: the filter packed as the GEMM's B operand.
    Gemm(crate::qgemm::PackedQB),
    /// Grouped (depthwise) convolutions: the filter minus its zero point, `[M, C / group, kh, kw]`,
    /// summed directly in i32 over each output's window.
    Direct(Vec<i32>),
}

impl PackedQConv {
    fn from_node(n: &NodeCtx, p: &ConvParams) -> Result<Option<PackedQConv>> {
        use crate::qgemm::{PackedQB, ZeroPoint};
        let Some(w) = n.const_input(3) else { return Ok(None) };
        if w.dims.len() != 4 || p.group < 1 || !matches!(w.dtype, DType::U8 | DType::I8) {
            return Ok(None);
        }
        let zp: Vec<i32> = match n.const_input(5) {
            Some(z) if z.dtype == w.dtype => match z.dtype {
                DType::U8 => z.values::<u8>().map(|v| v.into_iter().map(i32::from).collect()),
                _ => z.values::<i8>().map(|v| v.into_iter().map(i32::from).collect()),
            }
            .unwrap_or_default(),
            Some(_) => return Ok(None),
            None if n.num_inputs() > 5 && n.node.inputs[5].is_some() => return Ok(None),
            None => vec![0],
        };
        let (m, k) = (w.dims[0], w.dims[1] * w.dims[2] * w.dims[3]);
        if m == 0 || k == 0 || (zp.len() != 1 && zp.len() != m) {
            return Ok(None);
        }
        let bytes: Vec<u8> = match w.dtype {
            DType::U8 => w.values::<u8>(),
            _ => w.values::<i8>().map(|v| v.into_iter().map(|x| x as u8).collect()),
        }
        .ok_or_else(|| n.err("QLinearConv filter data"))?;
        if bytes.len() != m * k {
            return Ok(None);
        }
        if p.group != 1 {
            let val = |x: u8| if w.dtype == DType::U8 { x as i32 } else { x as i8 as i32 };
            let direct = (0..m * k).map(|i| val(bytes[i]) - zp[(i / k) % zp.len()]).collect();
            return Ok(Some(PackedQConv {
                kind: QConvKind::Direct(direct),
                wd: w.dims.clone(),
                wdt: w.dtype,
            }));
        }
        // B[kk, oc] = W[oc, ci, i, j] with kk = (i * kw + j) * C + ci: the order of the
        // channels-last patches `QConvShape::im2col` gathers.
        let (c, kh, kw) = (w.dims[1], w.dims[2], w.dims[3]);
        let mut bt = vec![0u8; k * m];
        for oc in 0..m {
            for ci in 0..c {
                for t in 0..kh * kw {
                    bt[(t * c + ci) * m + oc] = bytes[oc * k + ci * kh * kw + t];
                }
            }
        }
        let ty = if w.dtype == DType::U8 { Int8::U8 } else { Int8::I8 };
        let zpv = if zp.len() == 1 {
            ZeroPoint::Scalar(zp[0])
        } else {
            ZeroPoint::PerIndex(&zp)
        };
        let b = PackedQB::pack(&bt, ty, k, m, zpv).map_err(|e| n.err(e.to_string()))?;
        Ok(Some(PackedQConv {
            kind: QConvKind::Gemm(b),
            wd: w.dims.clone(),
            wdt: w.dtype,
        }))
    }

    /// The output, or `None` when this call's inputs need the reference path (other shapes, types,
    /// per-channel input parameters, a filter fed at run time).
    fn run(&self, cx: &RunCx, p: &ConvParams, ins: &[Option<&Value>]) -> Result<Option<Tensor>> {
        let (x, x_s, x_zp) = (tin(ins, 0)?, tin(ins, 1)?, tin_opt(ins, 2)?);
        let (w, w_s, y_s, y_zp) = (tin(ins, 3)?, tin(ins, 4)?, tin(ins, 6)?, tin_opt(ins, 7)?);
        let bias = tin_opt(ins, 8)?;
        let scalar = |t: Option<&Tensor>| t.is_none_or(|t| t.elem_count() == 1);
        if x.rank() != 4
            || !matches!(x.dtype(), DType::U8 | DType::I8)
            || w.dtype() != self.wdt
            || w.dims() != self.wd.as_slice()
            || x_zp.is_some_and(|z| z.dtype() != x.dtype())
            || !scalar(x_zp)
            || !scalar(Some(x_s))
            || !scalar(Some(y_s))
        {
            return Ok(None);
        }
        let g = conv_geometry(p, x.dims(), w.dims())?;
        let (nb, c, h, wi) = (x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]);
        let (m, kh, kw) = (self.wd[0], self.wd[2], self.wd[3]);
        let (oh, ow) = (g.out_dims[2], g.out_dims[3]);
        let (pix, k) = (oh * ow, self.wd[1] * kh * kw);
        cx.check_alloc(elems(&g.out_dims), DType::F32)?;
        cx.check_alloc((pix as u128) * (k as u128 + 4 * m as u128), DType::U8)?;
        // Requantization parameters, computed as `qlinear_conv` computes them.
        let out = y_zp.map_or(x.dtype(), |z| z.dtype());
        let (lo, hi) = qrange(out)?;
        let f32s = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_f64_vec()?.into_iter().map(|v| v as f32).collect()) };
        let (xs, ys, ws) = (f32s(x_s)?[0], f32s(y_s)?[0], f32s(w_s)?);
        if ws.len() != 1 && ws.len() != m {
            return Ok(None);
        }
        let mult: Vec<f64> = (0..m).map(|oc| ((xs * ws[oc % ws.len()]) / ys) as f64).collect();
        if mult.iter().any(|v| !v.is_finite()) {
            // Zero or non-finite scales: the reference path gives their NaN/saturated results.
            return Ok(None);
        }
        let yzp = match y_zp {
            Some(z) => z.to_f64_vec()?.first().copied().unwrap_or(0.0),
            None => 0.0,
        };
        let bias: Vec<f64> = match bias {
            Some(b) if b.elem_count() == m => b.to_f64_vec()?,
            Some(b) => bail!("QLinearConv bias has {} values for {m} output channels", b.elem_count()),
            None => vec![0.0; m],
        };
        let zx = match x_zp {
            Some(z) => z.to_f64_vec()?[0] as i32,
            None => 0,
        };
        let flat = x.candle().flatten_all()?;
        let xb: Vec<u8> = match x.dtype() {
            DType::U8 => flat.to_vec1::<u8>()?,
            // i8 is stored widened to i16.
            _ => flat.to_vec1::<i16>()?.into_iter().map(|v| v as i8 as u8).collect(),
        };
        let ty = if x.dtype() == DType::U8 { Int8::U8 } else { Int8::I8 };
        let geo = QConvShape {
            nb,
            c,
            h,
            w: wi,
            m,
            kh,
            kw,
            oh,
            ow,
            stride: [g.strides[0], g.strides[1]],
            dil: [g.dil[0], g.dil[1]],
            pad: [g.pads[0], g.pads[1]],
            group: g.group,
        };
        let rq = Requant {
            bias,
            mult,
            yzp,
            lo,
            hi,
        };
        let ct = match out {
            DType::U8 => CT::from_vec(self.compute::<u8>(&geo, &xb, ty, zx, &rq)?, g.out_dims, x.device())?,
            _ => CT::from_vec(self.compute::<i16>(&geo, &xb, ty, zx, &rq)?, g.out_dims, x.device())?,
        };
        Ok(Some(Tensor::new(ct.to_dtype(cdt(out)?)?, out)?))
    }

    /// The quantized output `[N, M, OH, OW]` of `xb` (`[N, C, H, W]` bytes of type `ty`, zero point
    /// `zx`).
    fn compute<T: QStore>(&self, s: &QConvShape, xb: &[u8], ty: Int8, zx: i32, rq: &Requant) -> Result<Vec<T>> {
        use crate::qgemm::{gemm, ZeroPoint};
        use rayon::prelude::*;
        let (pix, hw) = (s.oh * s.ow, s.h * s.w);
        let mut y = vec![T::default(); s.nb * s.m * pix];
        let k = self.wd[1] * s.kh * s.kw;
        let parallel = s.nb * s.m * pix * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1;
        match &self.kind {
            QConvKind::Direct(wv) if self.wd[1] == 1 && s.m == s.c && s.c >= 8 => {
                // Depthwise: channels-last sums, C lanes per tap and pixel.
                let (m, taps) = (s.m, s.kh * s.kw);
                let mut wt = vec![0i32; taps * m];
                for oc in 0..m {
                    for t in 0..taps {
                        wt[t * m + oc] = wv[oc * taps + t];
                    }
                }
                let mut xs = Scratch::take(&SHIFTED, hw * s.c);
                let mut acc = Scratch::take(&SUMS, pix * m);
                for b in 0..s.nb {
                    let img = &xb[b * s.c * hw..(b + 1) * s.c * hw];
                    shifted_channels_last(img, s.c, hw, ty, zx, &mut xs);
                    s.depthwise_channels_last(&xs, &wt, &mut acc, parallel);
                    let yb = &mut y[b * m * pix..(b + 1) * m * pix];
                    let block = |(bi, ys): (usize, &mut [T])| T::requant_block(rq, &acc, m, bi * 16, ys, pix);
                    if parallel {
                        yb.par_chunks_mut(16 * pix).enumerate().for_each(block);
                    } else {
                        yb.chunks_mut(16 * pix).enumerate().for_each(block);
                    }
                }
            }
            QConvKind::Direct(wv) => {
                let (cg, mg) = (self.wd[1], s.m / s.group);
                let plane = |(i, yo): (usize, &mut [T])| {
                    let (b, oc) = (i / s.m, i % s.m);
                    let c0 = (oc / mg) * cg;
                    let img = &xb[(b * s.c + c0) * hw..(b * s.c + c0 + cg) * hw];
                    let acc = s.direct(img, cg, &wv[oc * k..(oc + 1) * k], ty, zx);
                    T::requant_plane(rq, oc, &acc, yo);
                };
                if parallel {
                    y.par_chunks_mut(pix).enumerate().for_each(plane);
                } else {
                    y.chunks_mut(pix).enumerate().for_each(plane);
                }
            }
            QConvKind::Gemm(packed) => {
                let mut a = Scratch::take(&PATCHES, pix * k);
                let mut hwc = Scratch::take(&CHANNELS_LAST, hw * s.c);
                let mut acc = Scratch::take(&SUMS, pix * s.m);
                for b in 0..s.nb {
                    let img = &xb[b * s.c * hw..(b + 1) * s.c * hw];
                    to_channels_last(img, s.c, hw, &mut hwc);
                    // A 1x1 filter at stride 1 without padding reads the channels-last image as is.
                    let a: &[u8] = if k == s.c && pix == hw && s.pad == [0, 0] && s.stride == [1, 1] {
                        &hwc
                    } else {
                        s.im2col(&hwc, zx as u8, &mut a, parallel);
                        &a
                    };
                    gemm(a, ty, pix, ZeroPoint::Scalar(zx), packed, &mut acc)
                        .map_err(|e| crate::RuntimeError::msg(e.to_string()))?;
                    // Requantize `[pix, M]` into M planes, 16 channels per task (one cache line of
                    // each pixel's sums).
                    let yb = &mut y[b * s.m * pix..(b + 1) * s.m * pix];
                    let block = |(bi, ys): (usize, &mut [T])| T::requant_block(rq, &acc, s.m, bi * 16, ys, pix);
                    if parallel {
                        yb.par_chunks_mut(16 * pix).enumerate().for_each(block);
                    } else {
                        yb.chunks_mut(16 * pix).enumerate().for_each(block);
                    }
                }
            }
        }
        Ok(y)
    }
}

std::thread_local! {
    static PATCHES: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static CHANNELS_LAST: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static SHIFTED: std::cell::Cell<Vec<i16>> = const { std::cell::Cell::new(Vec::new()) };
    static SUMS: std::cell::Cell<Vec<i32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Buffers larger than this are freed after the call instead of kept for the next one.
const SCRATCH_KEEP_BYTES: usize = 32 << 20;

/// A QLinearConv work buffer reused across calls on one thread (fresh zeroed pages for every call
/// cost a fifth of a 224x224 MobileNetV2): taken out of the thread's slot while in use, so a call
/// nested on the same thread gets one of its own, and put back when dropped. The contents are left
/// from earlier calls; every user writes each element before reading it.
struct Scratch<T: 'static> {
    v: Vec<T>,
    len: usize,
    slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
}

impl<T: Copy + Default> Scratch<T> {
    fn take(slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>, len: usize) -> Self {
        let mut v = slot.with(|c| c.take());
        if v.len() < len {
            v.resize(len, T::default());
        }
        Scratch { v, len, slot }
    }
}

impl<T> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v[..self.len]
    }
}

impl<T> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v[..self.len]
    }
}

impl<T> Drop for Scratch<T> {
    fn drop(&mut self) {
        if self.v.len() * std::mem::size_of::<T>() <= SCRATCH_KEEP_BYTES {
            let v = std::mem::take(&mut self.v);
            // During thread teardown the slot may be gone; the buffer is then simply freed.
            let _ = self.slot.try_with(|c| c.set(v));
        }
    }
}

/// `[C, HW]` bytes into `[HW, C]`, 64 pixels at a time (their destination rows stay in cache).
fn to_channels_last(img: &[u8], c: usize, hw: usize, out: &mut [u8]) {
    for p0 in (0..hw).step_by(64) {
        let p1 = (p0 + 64).min(hw);
        for ci in 0..c {
            let src = &img[ci * hw + p0..ci * hw + p1];
            for (p, &v) in (p0..p1).zip(src) {
                out[p * c + ci] = v;
            }
        }
    }
}

/// `[C, HW]` codes of type `ty` minus the zero point `zx`, as i16 `[HW, C]`.
fn shifted_channels_last(img: &[u8], c: usize, hw: usize, ty: Int8, zx: i32, out: &mut [i16]) {
    for p0 in (0..hw).step_by(64) {
        let p1 = (p0 + 64).min(hw);
        for ci in 0..c {
            let src = &img[ci * hw + p0..ci * hw + p1];
            for (p, &v) in (p0..p1).zip(src) {
                out[p * c + ci] = (if ty == Int8::U8 { v as i32 } else { v as i8 as i32 } - zx) as i16;
            }
        }
    }
}

/// Multiply-adds of one QLinearConv call below which its patch gathering, depthwise sums and
/// requantization stay on the calling thread (below this, waking the pool for each of those passes
/// cost more than it saved: MobileNetV2's 96x96 layers at 2 threads).
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// The geometry of one 2-D integer convolution call.
struct QConvShape {
    nb: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: [usize; 2],
    dil: [usize; 2],
    /// Top and left padding.
    pad: [usize; 2],
    group: usize,
}

impl QConvShape {
    /// Image patches as the GEMM's A operand, `[OH * OW, kh * kw * C]` from the channels-last image
    /// `hwc` (`[H, W, C]`): each filter tap of an output pixel is one run of C bytes (the packed
    /// filter is ordered to match), `pad` (the input's zero point, so it adds nothing) where the tap
    /// falls outside. One task per output row.
    fn im2col(&self, hwc: &[u8], pad: u8, a: &mut [u8], parallel: bool) {
        use rayon::prelude::*;
        let (c, h, w, kh, kw, ow) = (self.c, self.h, self.w, self.kh, self.kw, self.ow);
        let k = c * kh * kw;
        let ([sh, sw], [dh, dw], [pt, pl]) = (self.stride, self.dil, self.pad);
        let row = |(oy, rows): (usize, &mut [u8])| {
            for (ox, patch) in rows.chunks_exact_mut(k).enumerate() {
                for i in 0..kh {
                    let iy = (oy * sh + i * dh) as isize - pt as isize;
                    let row_inside = iy >= 0 && (iy as usize) < h;
                    // Undilated taps of one filter row inside the image are kw * c consecutive
                    // bytes of the channels-last image: one copy (a 7x7 filter over 3 channels
                    // copied 3 bytes at a time spent more time in memcpy calls than in the GEMM).
                    let ix0 = (ox * sw) as isize - pl as isize;
                    if row_inside && dw == 1 && ix0 >= 0 && ix0 as usize + kw <= w {
                        let src = (iy as usize * w + ix0 as usize) * c;
                        patch[i * kw * c..(i + 1) * kw * c].copy_from_slice(&hwc[src..src + kw * c]);
                        continue;
                    }
                    for j in 0..kw {
                        let ix = (ox * sw + j * dw) as isize - pl as isize;
                        let dst = &mut patch[(i * kw + j) * c..][..c];
                        if row_inside && ix >= 0 && (ix as usize) < w {
                            dst.copy_from_slice(&hwc[(iy as usize * w + ix as usize) * c..][..c]);
                        } else {
                            dst.fill(pad);
                        }
                    }
                }
            }
        };
        if parallel {
            a.par_chunks_mut(ow * k).enumerate().for_each(row);
        } else {
            a.chunks_mut(ow * k).enumerate().for_each(row);
        }
    }

    /// Depthwise sums `acc` (`[OH * OW, C]`) of the shifted channels-last image `xs` (`[H, W, C]`)
    /// through `wt` (`[kh * kw, C]`, zero point subtracted): every tap inside the image adds a
    /// C-wide multiply-add to its pixel's sums (taps in the padding add zero). One task per output
    /// row; built for AVX-512 and AVX2 as well.
    fn depthwise_channels_last(&self, xs: &[i16], wt: &[i32], acc: &mut [i32], parallel: bool) {
        use rayon::prelude::*;
        let row = |(oy, out): (usize, &mut [i32])| {
            #[cfg(target_arch = "x86_64")]
            if crate::fastmath::has_avx2_fma() {
                // SAFETY: the CPU has the features each build is compiled for (checked here).
                unsafe {
                    if crate::sgemm::use_avx512() {
                        self.dw_row_avx512(xs, wt, oy, out)
                    } else {
                        self.dw_row_avx2(xs, wt, oy, out)
                    }
                }
                return;
            }
            self.dw_row(xs, wt, oy, out)
        };
        if parallel {
            acc.par_chunks_mut(self.ow * self.c).enumerate().for_each(row);
        } else {
            acc.chunks_mut(self.ow * self.c).enumerate().for_each(row);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn dw_row_avx512(&self, xs: &[i16], wt: &[i32], oy: usize, out: &mut [i32]) {
        self.dw_row(xs, wt, oy, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dw_row_avx2(&self, xs: &[i16], wt: &[i32], oy: usize, out: &mut [i32]) {
        self.dw_row(xs, wt, oy, out)
    }

    #[inline(always)]
    fn dw_row(&self, xs: &[i16], wt: &[i32], oy: usize, out: &mut [i32]) {
        let (c, h, w, kh, kw) = (self.c, self.h, self.w, self.kh, self.kw);
        let ([sh, sw], [dh, dw], [pt, pl]) = (self.stride, self.dil, self.pad);
        for (ox, a) in out.chunks_exact_mut(c).enumerate() {
            a.fill(0);
            for i in 0..kh {
                let iy = (oy * sh + i * dh) as isize - pt as isize;
                if iy < 0 || iy as usize >= h {
                    continue;
                }
                for j in 0..kw {
                    let ix = (ox * sw + j * dw) as isize - pl as isize;
                    if ix < 0 || ix as usize >= w {
                        continue;
                    }
                    let x = &xs[(iy as usize * w + ix as usize) * c..][..c];
                    let wr = &wt[(i * kw + j) * c..][..c];
                    for ((d, &wv), &xv) in a.iter_mut().zip(wr).zip(x) {
                        *d = d.wrapping_add(wv.wrapping_mul(xv as i32));
                    }
                }
            }
        }
    }

    /// i32 sums of one output channel that reads `cg` input planes (`img`, `[cg, H, W]` bytes of
    /// type `ty`) through filter `wv` (`[cg, kh, kw]`, zero point already subtracted). Each plane
    /// is shifted by `zx` into i16 and zero-padded once, split into `stride` column phases, so every
    /// filter tap adds one contiguous row segment to the sums (a loop the compiler vectorizes; built
    /// for AVX-512 and AVX2 as well, chosen at run time).
    fn direct(&self, img: &[u8], cg: usize, wv: &[i32], ty: Int8, zx: i32) -> Vec<i32> {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::fastmath::has_avx2_fma() {
                // SAFETY: the CPU has the features each build is compiled for (checked here).
                unsafe {
                    return if crate::sgemm::use_avx512() {
                        self.direct_avx512(img, cg, wv, ty, zx)
                    } else {
                        self.direct_avx2(img, cg, wv, ty, zx)
                    };
                }
            }
        }
        self.direct_body(img, cg, wv, ty, zx)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn direct_avx512(&self, img: &[u8], cg: usize, wv: &[i32], ty: Int8, zx: i32) -> Vec<i32> {
        self.direct_body(img, cg, wv, ty, zx)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn direct_avx2(&self, img: &[u8], cg: usize, wv: &[i32], ty: Int8, zx: i32) -> Vec<i32> {
        self.direct_body(img, cg, wv, ty, zx)
    }

    #[inline(always)]
    fn direct_body(&self, img: &[u8], cg: usize, wv: &[i32], ty: Int8, zx: i32) -> Vec<i32> {
        let (h, w, kh, kw, oh, ow) = (self.h, self.w, self.kh, self.kw, self.oh, self.ow);
        let ([sh, sw], [dh, dw], [pt, pl]) = (self.stride, self.dil, self.pad);
        // The padded window the outputs read, rows 0..ph and columns 0..pw, split into sh x sw
        // phases of qh x qw (phase (rh, rw) holds window row qy * sh + rh, column qx * sw + rw). A
        // tap (i, j) then reads, for every output, phase ((i dh) % sh, (j dw) % sw) at
        // (oy + (i dh) / sh, ox + (j dw) / sw): with the sums kept at the phases' row pitch qw,
        // one contiguous run covers the whole output plane.
        let ph = (oh - 1) * sh + (kh - 1) * dh + 1;
        let pw = (ow - 1) * sw + (kw - 1) * dw + 1;
        let (qh, qw) = (ph.div_ceil(sh), pw.div_ceil(sw));
        let mut phases = vec![0i16; sh * sw * qh * qw];
        let run = (oh - 1) * qw + ow;
        let mut acc = vec![0i32; run];
        // Input columns inside the window: px = ix + pl in pl..min(pl + w, pw).
        let (px0, px1) = (pl.min(pw), (pl + w).min(pw));
        let val = |v: u8| (if ty == Int8::U8 { v as i32 } else { v as i8 as i32 } - zx) as i16;
        for ci in 0..cg {
            // Every channel writes the same positions, so the padding stays zero.
            let src = &img[ci * h * w..(ci + 1) * h * w];
            for py in 0..ph {
                let iy = py as isize - pt as isize;
                if iy < 0 || iy as usize >= h {
                    continue;
                }
                let line = &src[iy as usize * w..][..w];
                let (rh, qy) = (py % sh, py / sh);
                if sw == 1 {
                    let dst = &mut phases[(rh * qh + qy) * qw..][..qw];
                    for (d, &v) in dst[px0..px1].iter_mut().zip(&line[px0 - pl..]) {
                        *d = val(v);
                    }
                    continue;
                }
                for rw in 0..sw {
                    // Columns px = q * sw + rw of this phase.
                    let q0 = (px0 + sw - 1 - rw) / sw;
                    let q1 = (px1 + sw - 1 - rw) / sw;
                    let dst = &mut phases[((rh * sw + rw) * qh + qy) * qw..][..qw];
                    for q in q0..q1 {
                        dst[q] = val(line[q * sw + rw - pl]);
                    }
                }
            }
            for i in 0..kh {
                let (rh, di) = ((i * dh) % sh, (i * dh) / sh);
                for j in 0..kw {
                    let (rw, dj) = ((j * dw) % sw, (j * dw) / sw);
                    let wt = wv[(ci * kh + i) * kw + j];
                    let src = &phases[((rh * sw + rw) * qh + di) * qw + dj..][..run];
                    for (d, &v) in acc.iter_mut().zip(src) {
                        *d = d.wrapping_add(wt.wrapping_mul(v as i32));
                    }
                }
            }
        }
        if qw == ow {
            return acc;
        }
        let mut out = vec![0i32; oh * ow];
        for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
            row.copy_from_slice(&acc[oy * qw..oy * qw + ow]);
        }
        out
    }
}

/// Requantization parameters of one QLinearConv call: `(acc + bias) * mult + y_zero_point` in f64,
/// clamped to `[lo, hi]`, rounded half to even.
struct Requant {
    bias: Vec<f64>,
    mult: Vec<f64>,
    yzp: f64,
    lo: f64,
    hi: f64,
}

/// Which build of the requantization loops runs: AVX-512, AVX2 or portable.
fn simd_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2_fma() {
        return if crate::sgemm::use_avx512() { 2 } else { 1 };
    }
    0
}

/// How an 8-bit result is stored (u8 as u8, i8 widened to i16 as Kiln stores it), and the
/// requantization loops that write it.
trait QStore: Copy + Default + Send + Sync {
    /// `v` is in the type's range.
    fn from_i32(v: i32) -> Self;

    /// Plane `out` of output channel `oc` from its sums `acc`.
    fn requant_plane(rq: &Requant, oc: usize, acc: &[i32], out: &mut [Self]) {
        match simd_level() {
            // SAFETY: the CPU has the features each build is compiled for (`simd_level`).
            #[cfg(target_arch = "x86_64")]
            2 => unsafe { simd::plane_avx512(rq, oc, acc, out) },
            #[cfg(target_arch = "x86_64")]
            1 => unsafe { simd::plane_avx2(rq, oc, acc, out) },
            _ => requant_plane_body(rq, oc, acc, out),
        }
    }

    /// Planes `oc0..` (`out` holds up to 16 planes of `pix`) from the `[pix, m]` sums `acc`.
    fn requant_block(rq: &Requant, acc: &[i32], m: usize, oc0: usize, out: &mut [Self], pix: usize) {
        match simd_level() {
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            2 => unsafe { simd::block_avx512(rq, acc, m, oc0, out, pix) },
            #[cfg(target_arch = "x86_64")]
            1 => unsafe { simd::block_avx2(rq, acc, m, oc0, out, pix) },
            _ => requant_block_body(rq, acc, m, oc0, out, pix),
        }
    }
}

/// The requantization loops built for AVX-512 and AVX2 (the same arithmetic, so the same results).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{requant_block_body, requant_plane_body, QStore, Requant};

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn plane_avx512<T: QStore>(rq: &Requant, oc: usize, acc: &[i32], out: &mut [T]) {
        requant_plane_body(rq, oc, acc, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn plane_avx2<T: QStore>(rq: &Requant, oc: usize, acc: &[i32], out: &mut [T]) {
        requant_plane_body(rq, oc, acc, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn block_avx512<T: QStore>(
        rq: &Requant,
        acc: &[i32],
        m: usize,
        oc0: usize,
        out: &mut [T],
        pix: usize,
    ) {
        requant_block_body(rq, acc, m, oc0, out, pix)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2<T: QStore>(
        rq: &Requant,
        acc: &[i32],
        m: usize,
        oc0: usize,
        out: &mut [T],
        pix: usize,
    ) {
        requant_block_body(rq, acc, m, oc0, out, pix)
    }
}

impl QStore for u8 {
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as u8
    }
}

impl QStore for i16 {
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as i16
    }
}

#[inline(always)]
fn requant_plane_body<T: QStore>(rq: &Requant, oc: usize, acc: &[i32], out: &mut [T]) {
    let (b, m, z, lo, hi) = (rq.bias[oc], rq.mult[oc], rq.yzp, rq.lo, rq.hi);
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = T::from_i32(requant_int((a as f64 + b) * m + z, lo, hi));
    }
}

#[inline(always)]
fn requant_block_body<T: QStore>(rq: &Requant, acc: &[i32], m: usize, oc0: usize, out: &mut [T], pix: usize) {
    let n = out.len() / pix;
    let (z, lo, hi) = (rq.yzp, rq.lo, rq.hi);
    if n == 16 {
        // The common case with a fixed width, so the channel loop is vectorized.
        let (b, mu): (&[f64; 16], &[f64; 16]) = (
            rq.bias[oc0..oc0 + 16].try_into().expect("16 channels"),
            rq.mult[oc0..oc0 + 16].try_into().expect("16 channels"),
        );
        // 64 pixels at a time: their [64, 16] sums transposed into a small buffer, then each
        // channel's 64 requantized in one vectorized run straight into its plane (scattering one
        // output per plane per pixel kept the arithmetic scalar).
        const RUN: usize = 64;
        let mut tr = [[0i32; RUN]; 16];
        for px0 in (0..pix).step_by(RUN) {
            let len = RUN.min(pix - px0);
            for (r, sums) in acc[px0 * m..].chunks(m).take(len).enumerate() {
                let row: &[i32; 16] = sums[oc0..oc0 + 16].try_into().expect("16 sums");
                for (t, &v) in tr.iter_mut().zip(row) {
                    t[r] = v;
                }
            }
            for j in 0..16 {
                let (bj, mj) = (b[j], mu[j]);
                let plane = &mut out[j * pix + px0..j * pix + px0 + len];
                for (o, &a) in plane.iter_mut().zip(&tr[j][..len]) {
                    *o = T::from_i32(requant_int((a as f64 + bj) * mj + z, lo, hi));
                }
            }
        }
        return;
    }
    for j in 0..n {
        let (b, mu) = (rq.bias[oc0 + j], rq.mult[oc0 + j]);
        for px in 0..pix {
            out[j * pix + px] = T::from_i32(requant_int((acc[px * m + oc0 + j] as f64 + b) * mu + z, lo, hi));
        }
    }
}

/// A finite `r` clamped to `[lo, hi]` (within +-2^31) and rounded half to even, as an integer: adding
/// 1.5 * 2^52 rounds in the FPU's default nearest-even mode and leaves the integer in the low bits
/// (no libm call and no float-to-integer conversion, so the loops around it stay vectorized).
#[inline(always)]
fn requant_int(r: f64, lo: f64, hi: f64) -> i32 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    // Compare-and-select (not f64::max/min, whose NaN rule keeps the loops scalar).
    let r = if r < lo { lo } else { r };
    let r = if r > hi { hi } else { r };
    (r + MAGIC).to_bits() as u32 as i32
}

/// Whole numbers already in `out`'s range as a tensor of `out` (u8 or i8, stored as candle stores them).
pub(super) fn quantized_tensor(y: &[f64], dims: Vec<usize>, out: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let t = match out {
        DType::U8 => CT::from_vec(y.iter().map(|&v| v as u8).collect::<Vec<u8>>(), dims, dev)?,
        _ => CT::from_vec(y.iter().map(|&v| v as i16).collect::<Vec<i16>>(), dims, dev)?,
    };
    Tensor::new(t.to_dtype(cdt(out)?)?, out)
}

fn qlinear_conv(cx: &RunCx, p: &ConvParams, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
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

#[cfg(test)]
mod tests {
    use super::{requant_int, Int8, QConvShape};

    /// A small deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The patch GEMM (one group) and the direct sums (grouped, depthwise) give the plain
    /// definition's i32 sums over random geometries: strides 1-3, dilations 1-2, asymmetric
    /// padding, 1x1 filters, windows that lie partly or wholly in the padding, u8 and i8 inputs.
    #[test]
    fn integer_conv_paths_match_the_plain_sum() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..400 {
            let group = [1, 1, 2, 3, 4][r.below(5)];
            let depthwise = case % 4 == 1;
            let cg = if depthwise { 1 } else { 1 + r.below(4) };
            let c = cg * if depthwise { 1 + r.below(6) } else { group };
            let group = if depthwise { c } else { group };
            let m = group * (1 + r.below(3));
            let (h, w) = (1 + r.below(11), 1 + r.below(11));
            let (kh, kw) = if case % 5 == 0 {
                (1, 1)
            } else {
                (1 + r.below(4), 1 + r.below(4))
            };
            let (sh, sw) = (1 + r.below(3), 1 + r.below(3));
            let (dh, dw) = (1 + r.below(2), 1 + r.below(2));
            let pads = [r.below(3), r.below(3), r.below(3), r.below(3)];
            let (eh, ew) = ((kh - 1) * dh + 1, (kw - 1) * dw + 1);
            if h + pads[0] + pads[2] < eh || w + pads[1] + pads[3] < ew {
                continue;
            }
            let oh = (h + pads[0] + pads[2] - eh) / sh + 1;
            let ow = (w + pads[1] + pads[3] - ew) / sw + 1;
            let ty = if case % 2 == 0 { Int8::U8 } else { Int8::I8 };
            let zx = r.below(256) as i32 - if ty == Int8::I8 { 128 } else { 0 };
            let img: Vec<u8> = (0..c * h * w).map(|_| r.below(256) as u8).collect();
            let k = cg * kh * kw;
            let wv: Vec<i32> = (0..m * k).map(|_| r.below(511) as i32 - 255).collect();
            let s = QConvShape {
                nb: 1,
                c,
                h,
                w,
                m,
                kh,
                kw,
                oh,
                ow,
                stride: [sh, sw],
                dil: [dh, dw],
                pad: [pads[0], pads[1]],
                group,
            };
            let xval = |v: u8| if ty == Int8::U8 { v as i32 } else { v as i8 as i32 } - zx;
            let mut want = vec![0i32; m * oh * ow];
            for oc in 0..m {
                let c0 = (oc / (m / group)) * cg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0i32;
                        for ci in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (oy * sh + i * dh) as isize - pads[0] as isize;
                                    let ix = (ox * sw + j * dw) as isize - pads[1] as isize;
                                    if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w {
                                        let x = xval(img[((c0 + ci) * h + iy as usize) * w + ix as usize]);
                                        acc += x * wv[oc * k + (ci * kh + i) * kw + j];
                                    }
                                }
                            }
                        }
                        want[(oc * oh + oy) * ow + ox] = acc;
                    }
                }
            }
            let label = format!(
                "case {case}: c {c} m {m} group {group} {h}x{w} k {kh}x{kw} s {sh},{sw} d {dh},{dw} pads {pads:?}"
            );
            if group == 1 {
                // W' = W + w_zp with a per-channel zero point, packed as B = W^T.
                let wzp: Vec<i32> = (0..m).map(|oc| (oc as i32 * 37) % 100 - 50).collect();
                // Row kk of B in the patches' channels-last order: kk = (i * kw + j) * C + ci.
                let bt: Vec<u8> = (0..k * m)
                    .map(|idx| {
                        let (kk, oc) = (idx / m, idx % m);
                        let (t, ci) = (kk / c, kk % c);
                        let v = (wv[oc * k + ci * kh * kw + t] / 2).clamp(-128 - wzp[oc], 127 - wzp[oc]) + wzp[oc];
                        v as i8 as u8
                    })
                    .collect();
                let mut hwc = vec![0u8; h * w * c];
                super::to_channels_last(&img, c, h * w, &mut hwc);
                let packed =
                    crate::qgemm::PackedQB::pack(&bt, Int8::I8, k, m, crate::qgemm::ZeroPoint::PerIndex(&wzp)).unwrap();
                for parallel in [false, true] {
                    let mut a = vec![0u8; oh * ow * k];
                    s.im2col(&hwc, zx as u8, &mut a, parallel);
                    let mut acc = vec![0i32; oh * ow * m];
                    crate::qgemm::gemm(&a, ty, oh * ow, crate::qgemm::ZeroPoint::Scalar(zx), &packed, &mut acc)
                        .unwrap();
                    for oc in 0..m {
                        for px in 0..oh * ow {
                            let mut sum = 0i32;
                            let (oy, ox) = (px / ow, px % ow);
                            for kk in 0..k {
                                let (ci, i, j) = (kk % c, (kk / c) / kw, (kk / c) % kw);
                                let iy = (oy * sh + i * dh) as isize - pads[0] as isize;
                                let ix = (ox * sw + j * dw) as isize - pads[1] as isize;
                                if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w {
                                    let x = xval(img[(ci * h + iy as usize) * w + ix as usize]);
                                    sum += x * ((bt[kk * m + oc] as i8 as i32) - wzp[oc]);
                                }
                            }
                            assert_eq!(acc[px * m + oc], sum, "{label} oc {oc} px {px}");
                        }
                    }
                }
            } else {
                for oc in 0..m {
                    let c0 = (oc / (m / group)) * cg;
                    let got = s.direct(
                        &img[c0 * h * w..(c0 + cg) * h * w],
                        cg,
                        &wv[oc * k..(oc + 1) * k],
                        ty,
                        zx,
                    );
                    assert_eq!(got, want[oc * oh * ow..(oc + 1) * oh * ow], "{label} oc {oc}");
                }
                if cg == 1 && m == c {
                    // The channels-last depthwise path: sums [pixel, channel].
                    let mut xs = vec![0i16; h * w * c];
                    super::shifted_channels_last(&img, c, h * w, ty, zx, &mut xs);
                    let wt: Vec<i32> = (0..k * m).map(|i| wv[(i % m) * k + i / m]).collect();
                    for parallel in [false, true] {
                        let mut acc = vec![7i32; oh * ow * m];
                        s.depthwise_channels_last(&xs, &wt, &mut acc, parallel);
                        for oc in 0..m {
                            for px in 0..oh * ow {
                                assert_eq!(
                                    acc[px * m + oc],
                                    want[oc * oh * ow + px],
                                    "{label} channels-last oc {oc} px {px}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The add-and-subtract rounding equals clamp + round_ties_even on ties, near-ties, negatives,
    /// the range's edges and values outside it.
    #[test]
    fn requant_int_matches_round_ties_even() {
        let mut xs: Vec<f64> = (-3000..=3000).map(|i| i as f64 * 0.125).collect();
        xs.extend([
            -128.5,
            -127.5,
            254.5,
            255.5,
            0.5,
            -0.5,
            1.5,
            2.5,
            1e9,
            -1e9,
            0.49999999999999994,
        ]);
        for &(lo, hi) in &[(0.0, 255.0), (-128.0, 127.0), (i32::MIN as f64, i32::MAX as f64)] {
            for &x in &xs {
                let want = x.clamp(lo, hi).round_ties_even();
                // Equal as numbers (-0.5 gives +0 here and -0 there: the same integer).
                assert_eq!(requant_int(x, lo, hi) as f64, want, "{x} in [{lo}, {hi}]");
            }
        }
    }

    /// Requantizing 16 (or fewer) planes from `[pix, m]` sums gives each output the per-element
    /// formula, for pixel counts on both sides of the 64-pixel runs.
    #[test]
    fn requant_block_writes_each_plane() {
        use super::{QStore, Requant};
        let m = 24;
        let rq = Requant {
            bias: (0..m).map(|c| c as f64 * 3.0 - 20.0).collect(),
            mult: (0..m).map(|c| 0.01 + c as f64 * 0.002).collect(),
            yzp: 100.0,
            lo: 0.0,
            hi: 255.0,
        };
        for pix in [1, 63, 64, 65, 200] {
            let acc: Vec<i32> = (0..pix * m).map(|i| ((i * 7919) % 4001) as i32 - 2000).collect();
            for (oc0, n) in [(0, 16), (16, 8)] {
                let mut out = vec![0u8; n * pix];
                u8::requant_block(&rq, &acc, m, oc0, &mut out, pix);
                for j in 0..n {
                    for px in 0..pix {
                        let oc = oc0 + j;
                        let v = (acc[px * m + oc] as f64 + rq.bias[oc]) * rq.mult[oc] + rq.yzp;
                        let want = v.clamp(0.0, 255.0).round_ties_even() as u8;
                        assert_eq!(out[j * pix + px], want, "pix {pix} oc {oc} px {px}");
                    }
                }
            }
        }
    }
}
