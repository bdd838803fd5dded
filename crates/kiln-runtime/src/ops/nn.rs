//! Operator family `nn`: Conv, ConvTranspose, DepthToSpace, SpaceToDepth, Col2Im, DeformConv.
//!
//! 1-D/2-D convolutions with uniform strides/dilations run on candle's conv kernels; every other
//! case uses an im2col built from strided views of the padded input plus one batched matmul.

#![allow(clippy::needless_range_loop)]

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;
use rayon::prelude::*;

use super::common::{elems, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::{bail, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.add("Conv", conv_factory);
    r.add("ConvTranspose", conv_transpose_factory);
    r.add("DepthToSpace", depth_to_space);
    r.add("SpaceToDepth", space_to_depth);
    r.add("Col2Im", col2im_factory);
    r.add("DeformConv", deform_conv_factory);
    r.add("CausalConvWithState", causal_conv_factory);
}

// ---------------------------------------------------------------------------------------------
// Shared helpers (also used by `pool.rs`).

/// Largest kernel size, stride, dilation or pad accepted (keeps index arithmetic in range).
pub(super) const LIMIT: i64 = i32::MAX as i64;

/// `auto_pad` attribute.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

pub(super) fn parse_auto_pad(n: &NodeCtx) -> Result<AutoPad> {
    Ok(match n.attr_s("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        s => return Err(n.err(format!("unsupported auto_pad '{s}'"))),
    })
}

/// Reads a per-spatial-axis attribute list, checking its length; `default` fills when absent.
pub(super) fn spatial_attr(v: &Option<Vec<i64>>, sp: usize, default: i64, name: &str) -> Result<Vec<usize>> {
    match v {
        None => Ok(vec![default as usize; sp]),
        Some(v) => {
            if v.len() != sp {
                bail!("attribute {name} has {} values for {sp} spatial axes", v.len());
            }
            if v.iter().any(|&x| !(1..=LIMIT).contains(&x)) {
                bail!("attribute {name} must be positive and below 2^31: {v:?}");
            }
            Ok(v.iter().map(|&x| x as usize).collect())
        }
    }
}

/// Begin/end pads per spatial axis for a forward window op (Conv, pooling).
pub(super) fn window_pads(
    auto: AutoPad,
    pads: &Option<Vec<i64>>,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> Result<(Vec<usize>, Vec<usize>)> {
    let sp = input.len();
    if kernel.len() != sp || kernel.iter().any(|&k| k == 0 || k as i64 > LIMIT) {
        bail!("bad kernel shape {kernel:?} for {sp} spatial axes");
    }
    match auto {
        AutoPad::NotSet => match pads {
            None => Ok((vec![0; sp], vec![0; sp])),
            Some(p) => {
                if p.len() != 2 * sp {
                    bail!("pads has {} values for {sp} spatial axes", p.len());
                }
                if p.iter().any(|&v| !(0..=LIMIT).contains(&v)) {
                    bail!("pads must be in 0..2^31: {p:?}");
                }
                Ok((
                    p[..sp].iter().map(|&v| v as usize).collect(),
                    p[sp..].iter().map(|&v| v as usize).collect(),
                ))
            }
        },
        AutoPad::Valid => Ok((vec![0; sp], vec![0; sp])),
        AutoPad::SameUpper | AutoPad::SameLower => {
            let mut b = Vec::with_capacity(sp);
            let mut e = Vec::with_capacity(sp);
            for i in 0..sp {
                let out = input[i].div_ceil(strides[i]);
                let need = (out.saturating_sub(1)) * strides[i] + (kernel[i] - 1) * dilations[i] + 1;
                let total = need.saturating_sub(input[i]);
                let half = total / 2;
                if auto == AutoPad::SameUpper {
                    b.push(half);
                    e.push(total - half);
                } else {
                    b.push(total - half);
                    e.push(half);
                }
            }
            Ok((b, e))
        }
    }
}

/// Pads `t` along `axis` with a constant value.
pub(super) fn pad_value(t: &CT, axis: usize, left: usize, right: usize, value: f64) -> Result<CT> {
    if left == 0 && right == 0 {
        return Ok(t.clone());
    }
    if value == 0.0 {
        return Ok(t.pad_with_zeros(axis, left, right)?);
    }
    let mut parts = Vec::with_capacity(3);
    let mut dims = t.dims().to_vec();
    if left > 0 {
        dims[axis] = left;
        parts.push(full(&dims, value, t)?);
    }
    parts.push(t.clone());
    if right > 0 {
        dims[axis] = right;
        parts.push(full(&dims, value, t)?);
    }
    Ok(CT::cat(&parts, axis)?)
}

fn full(dims: &[usize], value: f64, like: &CT) -> Result<CT> {
    let t = CT::ones(dims, CDType::F64, like.device())?.affine(value, 0.0)?;
    Ok(t.to_dtype(like.dtype())?)
}

/// `count` elements of `t` along `axis` starting at `start`, `step` apart (zero-filled past the end).
/// Coordinates of the `kk`-th kernel offset (row-major over kernel shape `k`).
pub(super) fn kernel_offset(kk: usize, k: &[usize]) -> Vec<usize> {
    let mut rem = kk;
    let mut off = vec![0usize; k.len()];
    for i in (0..k.len()).rev() {
        off[i] = rem % k[i];
        rem /= k[i];
    }
    off
}

/// The strided view of the padded input `xp` (N, C, spatial...) that kernel offset `off` reads
/// for every output position.
pub(super) fn window_view(xp: &CT, off: &[usize], dil: &[usize], out: &[usize], strides: &[usize]) -> Result<CT> {
    let mut s = xp.clone();
    for i in 0..off.len() {
        s = strided(&s, 2 + i, off[i] * dil[i], out[i], strides[i])?;
    }
    Ok(s)
}

pub(super) fn strided(t: &CT, axis: usize, start: usize, count: usize, step: usize) -> Result<CT> {
    if step == 1 {
        let dim = t.dims()[axis];
        if start + count > dim {
            let t = t.pad_with_zeros(axis, 0, start + count - dim)?;
            return Ok(t.narrow(axis, start, count)?);
        }
        return Ok(t.narrow(axis, start, count)?);
    }
    let len = count * step;
    let dim = t.dims()[axis];
    let t = if start + len > dim {
        t.pad_with_zeros(axis, 0, start + len - dim)?
    } else {
        t.clone()
    };
    let n = t.narrow(axis, start, len)?;
    let mut d = n.dims().to_vec();
    d[axis] = count;
    d.insert(axis + 1, step);
    Ok(n.reshape(d)?.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)?)
}

/// Takes `[begin, begin + len)` of `t` along `axis`; `begin` may be negative and the range may
/// run past the end (zero filled).
fn crop(t: &CT, axis: usize, begin: i64, len: usize) -> Result<CT> {
    let dim = t.dims()[axis] as i64;
    let end = begin + len as i64;
    let left = (-begin).max(0) as usize;
    let right = (end - dim).max(0) as usize;
    let t = t.pad_with_zeros(axis, left, right)?;
    Ok(t.narrow(axis, (begin + left as i64) as usize, len)?)
}

/// Computes on floats: f16/bf16 widen to f32.
pub(super) fn float_work(t: &Tensor) -> Result<CT> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(t.candle().clone()),
        DType::F16 | DType::BF16 => Ok(t.candle().to_dtype(CDType::F32)?),
        d => bail!("expected a float tensor, found {d}"),
    }
}

pub(super) fn float_back(t: CT, dt: DType) -> Result<Tensor> {
    let s = crate::tensor::storage_dtype(dt)?;
    Tensor::new(if t.dtype() == s { t } else { t.to_dtype(s)? }, dt)
}

// ---------------------------------------------------------------------------------------------
// Conv

#[derive(Clone, Debug)]
pub(super) struct ConvAttrs {
    pub auto: AutoPad,
    pub kernel_shape: Option<Vec<i64>>,
    pub strides: Option<Vec<i64>>,
    pub dilations: Option<Vec<i64>>,
    pub pads: Option<Vec<i64>>,
    pub group: i64,
}

pub(super) fn conv_attrs(n: &NodeCtx) -> Result<ConvAttrs> {
    Ok(ConvAttrs {
        auto: parse_auto_pad(n)?,
        kernel_shape: n.attr_ints("kernel_shape")?,
        strides: n.attr_ints("strides")?,
        dilations: n.attr_ints("dilations")?,
        pads: n.attr_ints("pads")?,
        group: n.attr_i("group", 1)?,
    })
}

fn conv_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    conv_kernel(n, None)
}

/// The Conv kernel, its output clamped to `clamp` `(lo, hi)` when given (FusedConv's Relu or Clip,
/// applied in the CPU kernels' epilogues where they run, else as a pass over the output).
pub(super) fn conv_kernel(n: &NodeCtx, clamp: Option<(f32, f32)>) -> Result<Box<dyn OpKernel>> {
    let a = conv_attrs(n)?;
    // A constant f32 filter is packed for the CPU GEMM once, here; only 1-D and 2-D convs run on
    // that kernel (a 3-D one would rebuild the consumed filter on every call).
    let packed = match n.const_input(1) {
        Some(w) if n.options.device.is_cpu() && w.dtype == DType::F32 && a.group >= 1 && w.dims.len() <= 4 => w
            .values::<f32>()
            .and_then(|wv| super::conv_cpu::PackedFilter::new(&wv, &w.dims, a.group as usize)),
        _ => None,
    };
    // The packed filter replaces the weight input (`NodeCtx::consume_input`): the plan keeps no
    // other copy; the paths that need the tensor rebuild it from the packed one.
    let mut packed_dims = Vec::new();
    if let Some(p) = &packed {
        n.note_held_bytes(p.bytes());
        packed_dims = n.const_input(1).map(|w| w.dims.clone()).unwrap_or_default();
        n.consume_input(1);
    }
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let w = match (&packed, ins.get(1).copied().flatten()) {
            (Some(_), None) => None,
            _ => Some(tin(ins, 1)?),
        };
        let b = tin_opt(ins, 2)?;
        let xd = x.dims().to_vec();
        let wd = w.map_or_else(|| packed_dims.clone(), |w| w.dims().to_vec());
        if xd.len() < 3 || wd.len() != xd.len() {
            bail!("Conv: input rank {} and weight rank {} do not fit", xd.len(), wd.len());
        }
        let sp = xd.len() - 2;
        let kshape: Vec<usize> = wd[2..].to_vec();
        if let Some(ks) = &a.kernel_shape {
            if ks.len() != sp || ks.iter().zip(&kshape).any(|(&k, &w)| k as usize != w) {
                bail!("Conv: kernel_shape {ks:?} does not match the weight {wd:?}");
            }
        }
        let strides = spatial_attr(&a.strides, sp, 1, "strides")?;
        let dil = spatial_attr(&a.dilations, sp, 1, "dilations")?;
        let (pb, pe) = window_pads(a.auto, &a.pads, &xd[2..], &kshape, &strides, &dil)?;
        if a.group < 1 {
            bail!("Conv: group must be positive");
        }
        // f16 on CUDA stays f16 for the im2col + GEMM path (f32 accumulation in cuBLAS); elsewhere
        // the arithmetic is f32.
        let keep_f16 = x.dtype() == DType::F16 && x.device().is_cuda() && a.group == 1 && sp <= 2;
        let xc = if keep_f16 { x.candle().clone() } else { float_work(x)? };
        let wc = w.map(|w| w.candle().to_dtype(xc.dtype())).transpose()?;
        let bc = b.map(|b| b.candle().to_dtype(xc.dtype())).transpose()?;
        let weight = ConvWeight {
            tensor: wc.as_ref(),
            dims: &wd,
            packed: packed.as_ref(),
        };
        let y = conv_nd_with(
            cx,
            &xc,
            weight,
            bc.as_ref(),
            a.group as usize,
            &strides,
            &dil,
            &pb,
            &pe,
            clamp,
        )?;
        out1(float_back(y, x.dtype())?)
    }))
}

/// N-D convolution on candle float tensors: x `[N, C, S...]`, w `[M, C/g, K...]`, bias `[M]`,
/// begin/end pads per spatial axis (see `window_pads`). Usable by other families (ConvInteger,
/// QLinearConv) after dequantizing to f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_nd(
    cx: &RunCx,
    x: &CT,
    w: &CT,
    b: Option<&CT>,
    g: usize,
    strides: &[usize],
    dil: &[usize],
    pb: &[usize],
    pe: &[usize],
    packed: Option<&super::conv_cpu::PackedFilter>,
    clamp: Option<(f32, f32)>,
) -> Result<CT> {
    let wd = w.dims().to_vec();
    let weight = ConvWeight {
        tensor: Some(w),
        dims: &wd,
        packed,
    };
    conv_nd_with(cx, x, weight, b, g, strides, dil, pb, pe, clamp)
}

/// A Conv filter for [`conv_nd_with`]: the tensor, or only its packed copy when the plan consumed
/// the weight input (then paths other than the packed CPU kernels rebuild the tensor from it).
pub(super) struct ConvWeight<'a> {
    pub tensor: Option<&'a CT>,
    pub dims: &'a [usize],
    pub packed: Option<&'a super::conv_cpu::PackedFilter>,
}

impl ConvWeight<'_> {
    fn tensor(&self, device: &candle_core::Device) -> Result<CT> {
        match (self.tensor, self.packed) {
            (Some(w), _) => Ok(w.clone()),
            (None, Some(p)) => Ok(CT::from_vec(p.weight_values(), self.dims, device)?),
            (None, None) => bail!("Conv: the weight is missing"),
        }
    }
}

/// [`conv_nd`] with the filter as a [`ConvWeight`].
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_nd_with(
    cx: &RunCx,
    x: &CT,
    weight: ConvWeight,
    b: Option<&CT>,
    g: usize,
    strides: &[usize],
    dil: &[usize],
    pb: &[usize],
    pe: &[usize],
    clamp: Option<(f32, f32)>,
) -> Result<CT> {
    let packed = weight.packed;
    let xd = x.dims().to_vec();
    let wd = weight.dims.to_vec();
    let sp = xd.len() - 2;
    let (nb, c) = (xd[0], xd[1]);
    let m = wd[0];
    if c % g != 0 || !m.is_multiple_of(g) || wd[1].checked_mul(g) != Some(c) {
        bail!("Conv: channels {c} / weight {wd:?} do not fit group {g}");
    }
    let k = &wd[2..];
    let mut out_sp = Vec::with_capacity(sp);
    if k.iter().any(|&v| v == 0 || v as i64 > LIMIT) {
        bail!("Conv: bad kernel shape {k:?}");
    }
    for i in 0..sp {
        let padded = xd[2 + i] + pb[i] + pe[i];
        let span = (k[i] - 1) * dil[i] + 1;
        if padded < span {
            bail!("Conv: kernel {k:?} larger than the padded input");
        }
        out_sp.push((padded - span) / strides[i] + 1);
    }
    let mut out_dims = vec![nb, m];
    out_dims.extend_from_slice(&out_sp);
    cx.check_alloc(elems(&out_dims), DType::F32)?;
    let kprod: usize = k.iter().product();
    let p: usize = out_sp.iter().product();
    cx.check_alloc(elems(&[nb, c, kprod, p]), DType::F32)?;
    if (sp == 1 || sp == 2) && x.dtype() == CDType::F32 && x.device().is_cpu() {
        // A 1-D conv is a 2-D one over a single row (the data layout is the same).
        let at = |v: &[usize], i: usize, one: usize| if sp == 1 { [one, v[i]] } else { [v[i], v[i + 1]] };
        let ([h, wd_], [kh, kw]) = (at(&xd, 2, 1), at(k, 0, 1));
        let cv = super::conv_cpu::Conv2d {
            n: nb,
            c,
            h,
            w: wd_,
            m,
            kh,
            kw,
            group: g,
            stride: at(strides, 0, 1).into(),
            dil: at(dil, 0, 1).into(),
            pad: at(pb, 0, 0).into(),
            oh: at(&out_sp, 0, 1)[0],
            ow: at(&out_sp, 0, 1)[1],
        };
        let wc = weight.tensor.map(|w| w.contiguous()).transpose()?;
        if let Some(y) = cv.run(
            &x.contiguous()?,
            wc.as_ref(),
            b.map(|b| b.contiguous()).transpose()?.as_ref(),
            packed,
            clamp,
        ) {
            return if sp == 1 { Ok(y?.reshape(out_dims)?) } else { y };
        }
    }
    // The paths below read the filter as a tensor.
    let w = &weight.tensor(x.device())?;
    if (sp == 1 || sp == 2) && g == 1 && x.device().is_cuda() {
        // im2col + one batched GEMM straight into NCHW, the bias inside the GEMM (`kernels/im2col.cu`).
        let at = |v: &[usize], i: usize, one: usize| if sp == 1 { [one, v[i]] } else { [v[i], v[i + 1]] };
        let geometry = crate::cuda_kernels::Conv2dGeometry {
            out: at(&out_sp, 0, 1),
            stride: at(strides, 0, 1),
            dilation: at(dil, 0, 1),
            pad: at(pb, 0, 0),
        };
        let (x4, w4) = if sp == 1 {
            (x.unsqueeze(2)?, w.unsqueeze(2)?)
        } else {
            (x.clone(), w.clone())
        };
        if let Some(y) = crate::cuda_kernels::conv2d(&x4, &w4, b, &geometry)? {
            let y = y.reshape(out_dims.as_slice())?;
            return Ok(match clamp {
                Some((lo, hi)) if lo == 0.0 && hi == f32::INFINITY => {
                    match crate::cuda_kernels::bias_act(&y, None, crate::cuda_kernels::Act::Relu)? {
                        Some(r) => r,
                        None => y.relu()?,
                    }
                }
                Some((lo, hi)) => y.maximum(f64::from(lo))?.minimum(f64::from(hi))?,
                None => y,
            });
        }
    }
    // Pad explicitly (asymmetric pads allowed).
    let uniform = strides.iter().all(|&s| s == strides[0]) && dil.iter().all(|&d| d == dil[0]);
    let depthwise = g > 1 && g == c && m == c && wd[1] == 1;
    // candle's kernels take one symmetric pad for all axes; use it when the pads allow.
    let native = !depthwise && uniform && sp <= 2;
    let sym = native && pb.iter().chain(pe).all(|&p| p == pb[0]);
    let native_pad = if sym { pb[0] } else { 0 };
    let mut xp = x.clone();
    if !sym {
        for i in 0..sp {
            xp = xp.pad_with_zeros(2 + i, pb[i], pe[i])?;
        }
    }
    let y = if depthwise {
        // One multiply-add per kernel offset over the whole tensor.
        let wk = w.reshape((m, kprod))?;
        let mut bshape = vec![1usize; sp + 2];
        bshape[1] = m;
        let mut acc: Option<CT> = None;
        for kk in 0..kprod {
            let s = window_view(&xp, &kernel_offset(kk, k), dil, &out_sp, strides)?;
            let term = s.broadcast_mul(&wk.narrow(1, kk, 1)?.reshape(bshape.as_slice())?)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        match acc {
            Some(a) => a,
            None => bail!("Conv: empty kernel"),
        }
    } else if sp == 2 && uniform {
        xp.contiguous()?
            .conv2d(&w.contiguous()?, native_pad, strides[0], dil[0], g)?
    } else if sp == 1 {
        xp.contiguous()?
            .conv1d(&w.contiguous()?, native_pad, strides[0], dil[0], g)?
    } else {
        // im2col from strided views: one slice per kernel offset.
        let mut cols = Vec::with_capacity(kprod);
        for kk in 0..kprod {
            let s = window_view(&xp, &kernel_offset(kk, k), dil, &out_sp, strides)?;
            cols.push(s.contiguous()?);
        }
        // [N, C, K, P] -> [N, g, C/g*K, P]
        let cols = CT::stack(&cols, 2)?.reshape((nb, g, c / g * kprod, p))?;
        let wm = w.contiguous()?.reshape((1, g, m / g, c / g * kprod))?;
        let y = wm.broadcast_matmul(&cols)?; // [N, g, M/g, P]
        y.reshape(out_dims.as_slice())?
    };
    let y = match b {
        Some(b) => {
            if b.elem_count() != m {
                bail!("Conv: bias has {} values, expected {m}", b.elem_count());
            }
            let mut bs = vec![1usize; sp + 2];
            bs[1] = m;
            y.broadcast_add(&b.reshape(bs)?)?
        }
        None => y,
    };
    Ok(match clamp {
        Some((lo, hi)) => y.maximum(f64::from(lo))?.minimum(f64::from(hi))?,
        None => y,
    })
}

// ---------------------------------------------------------------------------------------------
// CausalConvWithState: depthwise causal 1-D conv carrying the last k-1 inputs as state.

fn causal_conv_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let act = n.attr_s("activation", "none")?;
    let silu = match act.as_str() {
        "none" => false,
        "silu" | "swish" => true,
        s => return Err(n.err(format!("unsupported activation '{s}'"))),
    };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let w = tin(ins, 1)?;
        let xd = x.dims().to_vec();
        let wd = w.dims().to_vec();
        if xd.len() != 3 || wd.len() != 3 || wd[0] != xd[1] || wd[1] != 1 || wd[2] == 0 {
            bail!("CausalConvWithState: bad shapes input {xd:?} weight {wd:?}");
        }
        let (b, c, k) = (xd[0], xd[1], wd[2]);
        let xc = float_work(x)?;
        let padded = match tin_opt(ins, 3)? {
            Some(p) => {
                if p.dims() != [b, c, k - 1] {
                    bail!(
                        "CausalConvWithState: past_state shape {:?}, expected {:?}",
                        p.dims(),
                        [b, c, k - 1]
                    );
                }
                CT::cat(&[&p.candle().to_dtype(xc.dtype())?, &xc], 2)?
            }
            None => xc.pad_with_zeros(2, k - 1, 0)?,
        };
        let wc = w.candle().to_dtype(xc.dtype())?;
        let bc = tin_opt(ins, 2)?.map(|t| t.candle().to_dtype(xc.dtype())).transpose()?;
        let mut y = conv_nd(cx, &padded, &wc, bc.as_ref(), c, &[1], &[1], &[0], &[0], None, None)?;
        let y_dt = x.dtype();
        if silu {
            // Round to the output dtype first, like the reference.
            let yr = float_back(y, y_dt)?.candle().to_dtype(CDType::F32)?;
            y = yr.silu()?;
        }
        let len = padded.dims()[2];
        let state = padded.narrow(2, len - (k - 1), k - 1)?.contiguous()?;
        Ok(vec![
            crate::Value::Tensor(float_back(y, y_dt)?),
            crate::Value::Tensor(float_back(state, y_dt)?),
        ])
    }))
}

// ---------------------------------------------------------------------------------------------
// ConvTranspose

fn conv_transpose_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let a = conv_attrs(n)?;
    let output_padding = n.attr_ints("output_padding")?;
    let output_shape = n.attr_ints("output_shape")?;
    // A constant 2-D f32 filter is transposed and packed for the CPU GEMM once, here.
    let packed = match n.const_input(1) {
        Some(w) if n.options.device.is_cpu() && w.dtype == DType::F32 && a.group >= 1 => w
            .values::<f32>()
            .and_then(|wv| super::conv_transpose_cpu::PackedTransposed::new(&wv, &w.dims, a.group as usize)),
        _ => None,
    };
    if let Some(p) = &packed {
        n.note_held_bytes(p.bytes());
    }
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let w = tin(ins, 1)?;
        let b = tin_opt(ins, 2)?;
        let xd = x.dims().to_vec();
        let wd = w.dims().to_vec();
        if xd.len() < 3 || wd.len() != xd.len() {
            bail!(
                "ConvTranspose: input rank {} and weight rank {} do not fit",
                xd.len(),
                wd.len()
            );
        }
        let sp = xd.len() - 2;
        let g = a.group;
        if g < 1 {
            bail!("ConvTranspose: group must be positive");
        }
        let g = g as usize;
        let (nb, c) = (xd[0], xd[1]);
        if wd[0] != c || c % g != 0 {
            bail!("ConvTranspose: weight {wd:?} does not fit {c} input channels");
        }
        let mg = wd[1];
        let Some(m) = mg.checked_mul(g) else {
            bail!("ConvTranspose: too many output channels");
        };
        let k: Vec<usize> = wd[2..].to_vec();
        if k.iter().any(|&v| v == 0 || v as i64 > LIMIT) {
            bail!("ConvTranspose: bad kernel shape {k:?}");
        }
        if xd[2..].contains(&0) {
            bail!("ConvTranspose: empty spatial input");
        }
        let strides = spatial_attr(&a.strides, sp, 1, "strides")?;
        let dil = spatial_attr(&a.dilations, sp, 1, "dilations")?;
        let op: Vec<usize> = match &output_padding {
            None => vec![0; sp],
            Some(v) if v.len() == sp && v.iter().all(|&x| (0..=LIMIT).contains(&x)) => {
                v.iter().map(|&x| x as usize).collect()
            }
            Some(v) => bail!("ConvTranspose: bad output_padding {v:?}"),
        };
        // Begin pad and output size per axis.
        let mut begin: Vec<i64> = Vec::with_capacity(sp);
        let mut out_sp: Vec<usize> = Vec::with_capacity(sp);
        let oshape: Option<Vec<i64>> = match &output_shape {
            Some(v) if v.len() == sp + 2 => Some(v[2..].to_vec()),
            Some(v) if v.len() == sp => Some(v.clone()),
            Some(v) => bail!("ConvTranspose: bad output_shape {v:?}"),
            None => None,
        };
        for i in 0..sp {
            let full = (strides[i] * (xd[2 + i].saturating_sub(1)) + op[i] + (k[i] - 1) * dil[i] + 1) as i64;
            // With output_shape (any auto_pad, pads ignored) or SAME_*: total padding
            // full - target, split as the spec says (SAME_UPPER: the smaller half first; otherwise
            // the larger half first). A negative total: for output_shape, the output extends past
            // the full transposed convolution with zeros, by less than one stride (as ONNX Runtime;
            // more is refused); for SAME_* it is clamped to 0, so the output is the full size (ONNX
            // shape inference and ONNX Runtime agree on that).
            let target = match (&oshape, a.auto) {
                (Some(o), _) => Some(o[i]),
                (None, AutoPad::SameUpper | AutoPad::SameLower) => Some((xd[2 + i] * strides[i]) as i64),
                _ => None,
            };
            match target {
                Some(t) => {
                    if t < 0 {
                        bail!("ConvTranspose: negative output size");
                    }
                    let mut total = full - t;
                    let mut t = t;
                    if total < 0 {
                        if oshape.is_none() {
                            t = full;
                        } else if -total >= strides[i] as i64 {
                            bail!(
                                "ConvTranspose: output_shape {t} on axis {i} is not reachable from input size {} (full size {full}, stride {})",
                                xd[2 + i],
                                strides[i]
                            );
                        }
                        total = 0;
                    }
                    let (pb, _pe) = if a.auto == AutoPad::SameUpper {
                        (total / 2, total - total / 2)
                    } else {
                        (total - total / 2, total / 2)
                    };
                    begin.push(pb);
                    out_sp.push(t as usize);
                }
                None => {
                    let (pb, pe) = match (&a.pads, a.auto) {
                        (Some(p), AutoPad::NotSet) => {
                            if p.len() != 2 * sp {
                                bail!("ConvTranspose: pads has {} values", p.len());
                            }
                            (p[i], p[sp + i])
                        }
                        _ => (0, 0),
                    };
                    let o = full - pb - pe;
                    if o <= 0 {
                        // As ONNX Runtime: an output axis the pads remove entirely is an error.
                        bail!("ConvTranspose: pads {pb}+{pe} leave no output on axis {i} (full size {full})");
                    }
                    begin.push(pb);
                    out_sp.push(o as usize);
                }
            }
        }
        let mut out_dims = vec![nb, m];
        out_dims.extend_from_slice(&out_sp);
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        let xc = float_work(x)?;
        let wc = w.candle().to_dtype(xc.dtype())?;
        if sp == 2 && xc.dtype() == CDType::F32 && begin.iter().all(|&v| v >= 0) {
            let cv = super::conv_transpose_cpu::ConvT2d {
                n: nb,
                c,
                h: xd[2],
                w: xd[3],
                m,
                kh: k[0],
                kw: k[1],
                group: g,
                stride: (strides[0], strides[1]),
                dil: (dil[0], dil[1]),
                begin: (begin[0] as usize, begin[1] as usize),
                oh: out_sp[0],
                ow: out_sp[1],
            };
            let bc = b.map(|b| b.candle().to_dtype(CDType::F32)?.contiguous()).transpose()?;
            if let Some(y) = cv.run(&xc.contiguous()?, &wc.contiguous()?, bc.as_ref(), packed.as_ref()) {
                return out1(float_back(y?, x.dtype())?);
            }
        }
        let mut y = if strides.iter().any(|&s| s > 1) {
            conv_transpose_full(cx, &xc, &wc, g, &strides, &dil)?
        } else {
            transpose_by_conv(cx, &xc, &wc, g, &dil)?
        };
        for i in 0..sp {
            y = crop(&y, 2 + i, begin[i], out_sp[i])?;
        }
        if let Some(b) = b {
            if b.elem_count() != m {
                bail!("ConvTranspose: bias has {} values, expected {m}", b.elem_count());
            }
            let mut bs = vec![1usize; sp + 2];
            bs[1] = m;
            y = y.broadcast_add(&b.candle().to_dtype(y.dtype())?.reshape(bs)?)?;
        }
        out1(float_back(y.contiguous()?, x.dtype())?)
    }))
}

/// Full transposed conv with unit strides = conv of the input with the flipped, transposed kernel.
fn transpose_by_conv(cx: &RunCx, xc: &CT, wc: &CT, g: usize, dil: &[usize]) -> Result<CT> {
    let xd = xc.dims().to_vec();
    let wd = wc.dims().to_vec();
    let sp = xd.len() - 2;
    let c = xd[1];
    let mg = wd[1];
    let m = mg * g;
    let k: Vec<usize> = wd[2..].to_vec();
    // Weight [C, M/g, K...] -> [M, C/g, K...] with flipped spatial axes.
    let mut wf = wc
        .reshape([vec![g, c / g, mg], k.clone()].concat())?
        .transpose(1, 2)?
        .contiguous()?;
    for i in 0..sp {
        let ax = 3 + i;
        let idx: Vec<u32> = (0..k[i] as u32).rev().collect();
        let idx = CT::from_vec(idx, k[i], wf.device())?;
        wf = wf.index_select(&idx, ax)?;
    }
    let wf = wf.reshape([vec![m, c / g], k.clone()].concat())?;
    let pads: Vec<usize> = (0..sp).map(|i| (k[i] - 1) * dil[i]).collect();
    let ones = vec![1usize; sp];
    conv_nd(cx, xc, &wf, None, g, &ones, dil, &pads, &pads, None, None)
}

/// Full (unpadded) transposed convolution as one GEMM plus a phase-split col2im:
/// x `[N, C, I...]`, w `[C, M/g, K...]` -> `[N, M, F...]` with `F = (I-1)*s + (K-1)*d + 1`.
/// Output positions are grouped by their residue modulo the stride, so every kernel offset adds a
/// shifted (not interleaved) block, and the residue grids are interleaved once at the end.
fn conv_transpose_full(cx: &RunCx, x: &CT, w: &CT, g: usize, s: &[usize], d: &[usize]) -> Result<CT> {
    let xd = x.dims().to_vec();
    let wd = w.dims().to_vec();
    let sp = xd.len() - 2;
    let (nb, c) = (xd[0], xd[1]);
    let mg = wd[1];
    let m = mg * g;
    let k = &wd[2..];
    let kprod: usize = k.iter().product();
    let ins = &xd[2..];
    let p_in: usize = ins.iter().product();
    cx.check_alloc(elems(&[nb, m, kprod, p_in]), DType::F32)?;
    let full: Vec<usize> = (0..sp).map(|i| (ins[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1).collect();
    let lmax: Vec<usize> = (0..sp).map(|i| full[i].div_ceil(s[i])).collect();
    let nphase: usize = s.iter().product();
    let mut grid = vec![nb, m];
    grid.extend_from_slice(&lmax);
    cx.check_alloc(elems(&grid).saturating_mul(nphase as u128), DType::F32)?;
    // cols[n, g, (M/g)*K, P] = W_g^T x_g
    let wt = w
        .reshape((g, c / g, mg * kprod))?
        .transpose(1, 2)?
        .contiguous()?
        .unsqueeze(0)?;
    let xg = x.contiguous()?.reshape((nb, g, c / g, p_in))?;
    let cols = wt.broadcast_matmul(&xg)?;
    let mut cd = vec![nb, m, kprod];
    cd.extend_from_slice(ins);
    let cols = cols.reshape(cd)?;
    let mut phases: Vec<Option<CT>> = vec![None; nphase];
    for kk in 0..kprod {
        let off = kernel_offset(kk, k);
        let mut block = cols.narrow(2, kk, 1)?.squeeze(2)?;
        let mut ph = 0usize;
        for i in 0..sp {
            let pos = off[i] * d[i];
            let (q, r) = (pos / s[i], pos % s[i]);
            ph = ph * s[i] + r;
            let after = lmax[i]
                .checked_sub(q + ins[i])
                .ok_or_else(|| crate::RuntimeError::msg("internal: transposed conv block out of range"))?;
            block = block.pad_with_zeros(2 + i, q, after)?;
        }
        phases[ph] = Some(match phases[ph].take() {
            None => block,
            Some(a) => (a + block)?,
        });
    }
    let mut level: Vec<CT> = phases
        .into_iter()
        .map(|p| match p {
            Some(t) => Ok(t),
            None => CT::zeros(grid.as_slice(), x.dtype(), x.device()),
        })
        .collect::<candle_core::Result<_>>()?;
    // Interleave the residue grids, last axis first.
    for i in (0..sp).rev() {
        let si = s[i];
        let mut next = Vec::with_capacity(level.len() / si);
        for chunk in level.chunks(si) {
            let st = CT::stack(chunk, 3 + i)?;
            let mut dd = st.dims().to_vec();
            dd.remove(3 + i);
            dd[2 + i] *= si;
            next.push(st.reshape(dd)?.narrow(2 + i, 0, full[i])?);
        }
        level = next;
    }
    match level.pop() {
        Some(t) => Ok(t),
        None => bail!("internal: empty transposed conv"),
    }
}

// ---------------------------------------------------------------------------------------------
// DepthToSpace / SpaceToDepth

fn depth_to_space(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let bs = n.attr_i("blocksize", 0)?;
    let crd = n.attr_s("mode", "DCR")? == "CRD";
    if bs < 1 {
        return Err(n.err("blocksize must be positive"));
    }
    let b = bs as usize;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let d = x.dims();
        if d.len() != 4 || b > 1 << 16 || d[1] % (b * b) != 0 {
            bail!("DepthToSpace: bad input shape {d:?} for blocksize {b}");
        }
        let (nb, c, h, w) = (d[0], d[1], d[2], d[3]);
        let cc = c / (b * b);
        let t = x.candle();
        let y = if crd {
            t.reshape(vec![nb, cc, b, b, h, w])?.permute(vec![0, 1, 4, 2, 5, 3])?
        } else {
            t.reshape(vec![nb, b, b, cc, h, w])?.permute(vec![0, 3, 4, 1, 5, 2])?
        };
        let y = y.contiguous()?.reshape((nb, cc, h * b, w * b))?;
        out1(Tensor::new(y, x.dtype())?)
    }))
}

fn space_to_depth(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let bs = n.attr_i("blocksize", 0)?;
    if bs < 1 {
        return Err(n.err("blocksize must be positive"));
    }
    let b = bs as usize;
    let crd = n.attr_s("mode", "DCR")? == "CRD";
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let d = x.dims();
        if d.len() != 4 || d[2] % b != 0 || d[3] % b != 0 {
            bail!("SpaceToDepth: bad input shape {d:?} for blocksize {b}");
        }
        let (nb, c, h, w) = (d[0], d[1], d[2], d[3]);
        let y = x
            .candle()
            .reshape(vec![nb, c, h / b, b, w / b, b])?
            .permute(if crd {
                vec![0, 1, 3, 5, 2, 4]
            } else {
                vec![0, 3, 5, 1, 2, 4]
            })?
            .contiguous()?
            .reshape((nb, c * b * b, h / b, w / b))?;
        out1(Tensor::new(y, x.dtype())?)
    }))
}

// ---------------------------------------------------------------------------------------------
// Col2Im

fn col2im_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let dil_a = n.attr_ints("dilations")?;
    let pads_a = n.attr_ints("pads")?;
    let str_a = n.attr_ints("strides")?;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let image = tin(ins, 1)?.to_i64_vec()?;
        let block = tin(ins, 2)?.to_i64_vec()?;
        let sp = image.len();
        if block.len() != sp || sp == 0 || image.iter().chain(&block).any(|&v| !(1..=LIMIT).contains(&v)) {
            bail!("Col2Im: bad image_shape {image:?} / block_shape {block:?}");
        }
        let image: Vec<usize> = image.iter().map(|&v| v as usize).collect();
        let block: Vec<usize> = block.iter().map(|&v| v as usize).collect();
        let dil = spatial_attr(&dil_a, sp, 1, "dilations")?;
        let strides = spatial_attr(&str_a, sp, 1, "strides")?;
        let (pb, pe) = window_pads(AutoPad::NotSet, &pads_a, &image, &block, &strides, &dil)?;
        let xd = x.dims();
        let kprod: usize = block.iter().product();
        if xd.len() != 3 || xd[1] % kprod != 0 {
            bail!("Col2Im: input shape {xd:?} does not fit block {block:?}");
        }
        let (nb, c, l) = (xd[0], xd[1] / kprod, xd[2]);
        let mut blocks_per = Vec::with_capacity(sp);
        for i in 0..sp {
            let padded = image[i] + pb[i] + pe[i];
            let span = (block[i] - 1) * dil[i] + 1;
            if padded < span {
                bail!("Col2Im: block larger than the padded image");
            }
            blocks_per.push((padded - span) / strides[i] + 1);
        }
        if blocks_per.iter().product::<usize>() != l {
            bail!("Col2Im: {l} columns, expected {}", blocks_per.iter().product::<usize>());
        }
        let mut out_dims = vec![nb, c];
        out_dims.extend_from_slice(&image);
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        let img_n: usize = image.iter().product();
        let xv = x.to_f64_vec()?;
        let mut out = vec![0.0f64; nb * c * img_n];
        out.par_chunks_mut(img_n.max(1)).enumerate().for_each(|(nc, dst)| {
            let (bi, ci) = (nc / c, nc % c);
            for kk in 0..kprod {
                let row = (bi * c * kprod + ci * kprod + kk) * l;
                let mut ko = vec![0usize; sp];
                let mut r = kk;
                for i in (0..sp).rev() {
                    ko[i] = r % block[i];
                    r /= block[i];
                }
                for li in 0..l {
                    let mut r = li;
                    let mut off = 0usize;
                    let mut ok = true;
                    let mut pos = vec![0i64; sp];
                    for i in (0..sp).rev() {
                        let bpos = r % blocks_per[i];
                        r /= blocks_per[i];
                        pos[i] = (bpos * strides[i] + ko[i] * dil[i]) as i64 - pb[i] as i64;
                    }
                    for i in 0..sp {
                        if pos[i] < 0 || pos[i] >= image[i] as i64 {
                            ok = false;
                            break;
                        }
                        off = off * image[i] + pos[i] as usize;
                    }
                    if ok {
                        dst[off] += xv[row + li];
                    }
                }
            }
        });
        out1(Tensor::from_f64s(out, &out_dims, x.dtype(), x.device())?)
    }))
}

// ---------------------------------------------------------------------------------------------
// DeformConv (2-D, host)

fn deform_conv_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let dil_a = n.attr_ints("dilations")?;
    let pads_a = n.attr_ints("pads")?;
    let str_a = n.attr_ints("strides")?;
    let group = n.attr_i("group", 1)?;
    let ogroup = n.attr_i("offset_group", 1)?;
    if group < 1 || ogroup < 1 {
        return Err(n.err("DeformConv: group and offset_group must be positive"));
    }
    let (g, og) = (group as usize, ogroup as usize);
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let w = tin(ins, 1)?;
        let offset = tin(ins, 2)?;
        let bias = tin_opt(ins, 3)?;
        let mask = tin_opt(ins, 4)?;
        let xd = x.dims().to_vec();
        let wd = w.dims().to_vec();
        if xd.len() != 4 || wd.len() != 4 {
            bail!("DeformConv: only 2-D inputs are supported");
        }
        let (nb, c, h, wi) = (xd[0], xd[1], xd[2], xd[3]);
        let (m, cg, kh, kw) = (wd[0], wd[1], wd[2], wd[3]);
        if cg * g != c || m % g != 0 || c % og != 0 {
            bail!("DeformConv: channels do not fit the groups");
        }
        let strides = spatial_attr(&str_a, 2, 1, "strides")?;
        let dil = spatial_attr(&dil_a, 2, 1, "dilations")?;
        let (pb, pe) = window_pads(AutoPad::NotSet, &pads_a, &xd[2..], &wd[2..], &strides, &dil)?;
        let oh_span = (kh - 1) * dil[0] + 1;
        let ow_span = (kw - 1) * dil[1] + 1;
        if h + pb[0] + pe[0] < oh_span || wi + pb[1] + pe[1] < ow_span || kh == 0 || kw == 0 {
            bail!("DeformConv: kernel larger than the padded input");
        }
        let oh = (h + pb[0] + pe[0] - oh_span) / strides[0] + 1;
        let ow = (wi + pb[1] + pe[1] - ow_span) / strides[1] + 1;
        let od = offset.dims();
        if od != [nb, og * 2 * kh * kw, oh, ow] {
            bail!("DeformConv: offset shape {od:?} unexpected");
        }
        if let Some(mk) = mask {
            if mk.dims() != [nb, og * kh * kw, oh, ow] {
                bail!("DeformConv: mask shape {:?} unexpected", mk.dims());
            }
        }
        cx.check_alloc(elems(&[nb, c * kh * kw, oh * ow]), DType::F32)?;
        let xv = x.to_f64_vec()?;
        let ov = offset.to_f64_vec()?;
        let mv = mask.map(|t| t.to_f64_vec()).transpose()?;
        let kk = kh * kw;
        let p = oh * ow;
        // cols: [N, C*K, P]
        let mut cols = vec![0.0f64; nb * c * kk * p];
        let cpg = c / og;
        cols.par_chunks_mut(kk * p).enumerate().for_each(|(nci, dst)| {
            let (bi, ci) = (nci / c, nci % c);
            let ogi = ci / cpg;
            let img = &xv[(bi * c + ci) * h * wi..(bi * c + ci + 1) * h * wi];
            for ki in 0..kh {
                for kj in 0..kw {
                    let k = ki * kw + kj;
                    for y in 0..oh {
                        for xx in 0..ow {
                            let pi = y * ow + xx;
                            let obase = ((bi * og + ogi) * 2 * kk + 2 * k) * p;
                            let dy = ov[obase + pi];
                            let dx = ov[obase + p + pi];
                            let py = (y * strides[0]) as f64 - pb[0] as f64 + (ki * dil[0]) as f64 + dy;
                            let px = (xx * strides[1]) as f64 - pb[1] as f64 + (kj * dil[1]) as f64 + dx;
                            let mut v = bilinear(img, h, wi, py, px);
                            if let Some(mv) = &mv {
                                v *= mv[((bi * og + ogi) * kk + k) * p + pi];
                            }
                            dst[k * p + pi] = v;
                        }
                    }
                }
            }
        });
        let dev = x.device();
        let cols = CT::from_vec(cols, (nb, g, cg * kk, p), dev)?;
        let wm = CT::from_vec(w.to_f64_vec()?, (1, g, m / g, cg * kk), dev)?;
        let mut y = wm.broadcast_matmul(&cols)?.reshape((nb, m, oh, ow))?;
        if let Some(b) = bias {
            y = y.broadcast_add(&CT::from_vec(b.to_f64_vec()?, (1, m, 1, 1), dev)?)?;
        }
        out1(Tensor::new(y, DType::F64)?.cast(x.dtype())?)
    }))
}

fn bilinear(img: &[f64], h: usize, w: usize, y: f64, x: f64) -> f64 {
    if !(y > -1.0 && y < h as f64 && x > -1.0 && x < w as f64) {
        return 0.0;
    }
    let (y0, x0) = (y.floor(), x.floor());
    let (ly, lx) = (y - y0, x - x0);
    let (y0, x0) = (y0 as i64, x0 as i64);
    let at = |yy: i64, xx: i64| -> f64 {
        if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
            0.0
        } else {
            img[yy as usize * w + xx as usize]
        }
    };
    (1.0 - ly) * (1.0 - lx) * at(y0, x0)
        + (1.0 - ly) * lx * at(y0, x0 + 1)
        + ly * (1.0 - lx) * at(y0 + 1, x0)
        + ly * lx * at(y0 + 1, x0 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1-D convs take the 2-D CPU path as a single row; compare with candle's conv1d.
    #[test]
    fn conv1d_through_the_2d_path_matches_candle() {
        let dev = candle_core::Device::Cpu;
        let options = crate::RunOptions::default();
        let cx = RunCx {
            device: &dev,
            options: &options,
        };
        let val = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + seed) * 7919) % 211) as f32 / 211.0 - 0.5)
                .collect()
        };
        // (n, c, l, m, k, group, stride, dilation, pad)
        for (n, c, l, m, k, g, s, d, p) in [
            (1, 1, 640, 258, 256, 1, 128, 1, 0),
            (2, 4, 33, 6, 3, 1, 2, 1, 1),
            (2, 6, 20, 6, 3, 3, 1, 2, 2),
            (3, 4, 17, 4, 5, 4, 1, 1, 2),
        ] {
            let x = CT::from_vec(val(n * c * l, 1), (n, c, l), &dev).unwrap();
            let w = CT::from_vec(val(m * (c / g) * k, 2), (m, c / g, k), &dev).unwrap();
            let b = CT::from_vec(val(m, 3), m, &dev).unwrap();
            let got = conv_nd(&cx, &x, &w, Some(&b), g, &[s], &[d], &[p], &[p], None, None).unwrap();
            let want = x
                .conv1d(&w, p, s, d, g)
                .unwrap()
                .broadcast_add(&b.reshape((1, m, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-4,
                "case c {c} k {k} g {g}: {diff}"
            );
        }
    }
}
