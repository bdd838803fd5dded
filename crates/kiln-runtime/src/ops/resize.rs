//! Operator family `resize`: Resize, Upsample, GridSample, AffineGrid, CenterCropPad.
//!
//! Resize is separable: each resized axis is interpolated in turn on a host f64 buffer, following
//! the ONNX reference (`onnx/reference/ops/op_resize.py`) exactly.

#![allow(clippy::needless_range_loop)]

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;
use rayon::prelude::*;

use super::common::{elems, norm_axes, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.add("Resize", resize_factory);
    r.add("Upsample", upsample_factory);
    r.add("GridSample", grid_sample_factory);
    r.add("AffineGrid", affine_grid_factory);
    r.add("CenterCropPad", center_crop_pad_factory);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Ctm {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
    TfHalfPixelForNn,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// Opset < 11 (Upsample, Resize-10): floor when upsampling, ceil when downsampling.
    Simple,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Policy {
    Stretch,
    NotLarger,
    NotSmaller,
}

#[derive(Clone, Debug)]
struct ResizeCfg {
    mode: Mode,
    ctm: Ctm,
    nearest: Nearest,
    cubic_a: f64,
    exclude_outside: bool,
    extrapolation: f64,
    antialias: bool,
    axes: Option<Vec<i64>>,
    policy: Policy,
    legacy: bool,
}

fn parse_mode(s: &str) -> Result<Mode> {
    Ok(match s {
        "nearest" => Mode::Nearest,
        "linear" | "bilinear" | "trilinear" => Mode::Linear,
        "cubic" | "bicubic" => Mode::Cubic,
        _ => bail!("unsupported resize mode '{s}'"),
    })
}

fn resize_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let legacy = n.opset < 11;
    let mode = parse_mode(&n.attr_s("mode", "nearest")?).map_err(|e| n.err(e.to_string()))?;
    let ctm = if legacy {
        Ctm::Asymmetric
    } else {
        match n.attr_s("coordinate_transformation_mode", "half_pixel")?.as_str() {
            "half_pixel" => Ctm::HalfPixel,
            "half_pixel_symmetric" => Ctm::HalfPixelSymmetric,
            "pytorch_half_pixel" => Ctm::PytorchHalfPixel,
            "align_corners" => Ctm::AlignCorners,
            "asymmetric" => Ctm::Asymmetric,
            "tf_crop_and_resize" => Ctm::TfCropAndResize,
            "tf_half_pixel_for_nn" => Ctm::TfHalfPixelForNn,
            s => return Err(n.err(format!("unsupported coordinate_transformation_mode '{s}'"))),
        }
    };
    let nearest = if legacy {
        Nearest::Simple
    } else {
        match n.attr_s("nearest_mode", "round_prefer_floor")?.as_str() {
            "round_prefer_floor" => Nearest::RoundPreferFloor,
            "round_prefer_ceil" => Nearest::RoundPreferCeil,
            "floor" => Nearest::Floor,
            "ceil" => Nearest::Ceil,
            s => return Err(n.err(format!("unsupported nearest_mode '{s}'"))),
        }
    };
    let policy = match n.attr_s("keep_aspect_ratio_policy", "stretch")?.as_str() {
        "stretch" => Policy::Stretch,
        "not_larger" => Policy::NotLarger,
        "not_smaller" => Policy::NotSmaller,
        s => return Err(n.err(format!("unsupported keep_aspect_ratio_policy '{s}'"))),
    };
    let cfg = ResizeCfg {
        mode,
        ctm,
        nearest,
        cubic_a: n.attr_f("cubic_coeff_a", -0.75)? as f64,
        exclude_outside: n.attr_i("exclude_outside", 0)? != 0,
        extrapolation: n.attr_f("extrapolation_value", 0.0)? as f64,
        antialias: n.attr_i("antialias", 0)? != 0 && mode != Mode::Nearest,
        axes: n.attr_ints("axes")?,
        policy,
        legacy,
    };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let (roi, scales, sizes) = if cfg.legacy {
            (None, tin_opt(ins, 1)?, None)
        } else {
            (tin_opt(ins, 1)?, tin_opt(ins, 2)?, tin_opt(ins, 3)?)
        };
        let roi = roi.filter(|t| t.elem_count() > 0).map(|t| t.to_f64_vec()).transpose()?;
        let scales = scales
            .filter(|t| t.elem_count() > 0)
            .map(|t| t.to_f64_vec())
            .transpose()?;
        let sizes = sizes
            .filter(|t| t.elem_count() > 0)
            .map(|t| t.to_i64_vec())
            .transpose()?;
        let out = resize_run(cx, x, &cfg, roi, scales, sizes)?;
        out1(out)
    }))
}

fn upsample_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let mode = parse_mode(&n.attr_s("mode", "nearest")?).map_err(|e| n.err(e.to_string()))?;
    let attr_scales = n.attr_floats("scales")?;
    let cfg = ResizeCfg {
        mode,
        ctm: Ctm::Asymmetric,
        nearest: Nearest::Simple,
        cubic_a: -0.75,
        exclude_outside: false,
        extrapolation: 0.0,
        antialias: false,
        axes: None,
        policy: Policy::Stretch,
        legacy: true,
    };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let scales = match &attr_scales {
            Some(s) => s.iter().map(|&v| v as f64).collect(),
            None => tin(ins, 1)?.to_f64_vec()?,
        };
        out1(resize_run(cx, x, &cfg, None, Some(scales), None)?)
    }))
}

fn resize_run(
    cx: &super::RunCx,
    x: &Tensor,
    cfg: &ResizeCfg,
    roi: Option<Vec<f64>>,
    scales: Option<Vec<f64>>,
    sizes: Option<Vec<i64>>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let r = dims.len();
    let axes: Vec<usize> = match &cfg.axes {
        Some(a) => norm_axes(a, r)?,
        None => (0..r).collect(),
    };
    let na = axes.len();
    // Full-rank roi.
    let roi_full: Option<Vec<f64>> = match roi {
        Some(v) if cfg.ctm == Ctm::TfCropAndResize => {
            if v.len() != 2 * na {
                bail!("roi has {} values, expected {}", v.len(), 2 * na);
            }
            let mut full: Vec<f64> = vec![0.0; r];
            full.extend(std::iter::repeat_n(1.0, r));
            for (i, &d) in axes.iter().enumerate() {
                full[d] = v[i];
                full[r + d] = v[na + i];
            }
            Some(full)
        }
        _ => None,
    };
    if cfg.ctm == Ctm::TfCropAndResize && roi_full.is_none() {
        bail!("tf_crop_and_resize needs a roi input");
    }
    let mut scale_f: Vec<f64> = vec![1.0; r];
    let mut out_dims: Vec<usize> = dims.clone();
    match (scales, sizes) {
        (_, Some(sz)) => {
            if sz.len() != na {
                bail!("sizes has {} values, expected {}", sz.len(), na);
            }
            for (i, &d) in axes.iter().enumerate() {
                if sz[i] < 0 {
                    bail!("negative output size {}", sz[i]);
                }
                out_dims[d] = sz[i] as usize;
                scale_f[d] = if dims[d] == 0 {
                    1.0
                } else {
                    sz[i] as f64 / dims[d] as f64
                };
            }
            if cfg.policy != Policy::Stretch {
                let it = axes.iter().map(|&d| scale_f[d]);
                let s = if cfg.policy == Policy::NotLarger {
                    it.fold(f64::INFINITY, f64::min)
                } else {
                    it.fold(f64::NEG_INFINITY, f64::max)
                };
                for &d in &axes {
                    scale_f[d] = s;
                    out_dims[d] = (s * dims[d] as f64 + 0.5) as usize;
                }
            }
        }
        (Some(sc), None) => {
            if sc.len() != na {
                bail!("scales has {} values, expected {}", sc.len(), na);
            }
            for (i, &d) in axes.iter().enumerate() {
                if sc[i].is_nan() || sc[i] <= 0.0 || !sc[i].is_finite() {
                    bail!("invalid scale {}", sc[i]);
                }
                scale_f[d] = sc[i];
                let o = sc[i] * dims[d] as f64;
                if o > 1e15 {
                    bail!("output size too large");
                }
                out_dims[d] = o as usize;
            }
        }
        (None, None) => bail!("Resize needs scales or sizes"),
    }
    cx.check_alloc(elems(&out_dims), x.dtype())?;
    for &d in &axes {
        if dims[d] == 0 && out_dims[d] > 0 {
            bail!("cannot resize an empty axis");
        }
    }
    let dt = x.dtype();
    if elems(&out_dims) == 0 {
        let z = CT::zeros(out_dims.as_slice(), x.candle().dtype(), x.device())?;
        return Tensor::new(z, dt);
    }
    // Nearest without renormalisation or extrapolation is a pure gather: exact for every dtype.
    let gather = cfg.mode == Mode::Nearest && !cfg.exclude_outside && cfg.ctm != Ctm::TfCropAndResize;
    let mut t: CT = match dt {
        _ if gather => x.candle().clone(),
        DType::F32 | DType::F64 => x.candle().clone(),
        DType::F16 | DType::BF16 => x.candle().to_dtype(CDType::F32)?,
        _ => x.candle().to_dtype(CDType::F64)?,
    };
    if gather && r >= 2 {
        if let Some(y) = nearest_last2_fast(x, &axes, &dims, &out_dims, &scale_f, cfg, roi_full.as_deref())? {
            return Tensor::new(y, dt);
        }
        if let Some(y) = nearest_channels_last_fast(x, &axes, &dims, &out_dims, &scale_f, cfg, roi_full.as_deref())? {
            return Tensor::new(y, dt);
        }
    }
    let mut cur = dims.clone();
    for &ax in &axes {
        let s = scale_f[ax];
        let o = out_dims[ax];
        let axis_roi = roi_full.as_ref().map(|v| (v[ax], v[ax + r]));
        let identity = (s - 1.0).abs() < 1e-9
            && o == cur[ax]
            && axis_roi.is_none_or(|(a, b)| a.abs() < 1e-9 && (b - 1.0).abs() < 1e-9);
        if identity {
            continue;
        }
        let taps = axis_taps(cur[ax], s, o, cfg, axis_roi)?;
        t = apply_taps(&t, ax, &taps, gather, cfg.extrapolation)?;
        cur[ax] = o;
    }
    if gather {
        return Tensor::new(t.contiguous()?, dt);
    }
    if dt.is_float() {
        let st = crate::tensor::storage_dtype(dt)?;
        return Tensor::new(t.to_dtype(st)?, dt);
    }
    let (lo, hi) = int_range(dt);
    let t = t.round()?.clamp(lo, hi)?;
    Tensor::new(t, DType::F64)?.cast(dt)
}

/// Nearest-neighbour resize of the last two axes of a contiguous f32 CPU tensor (the FPN
/// upsampling of detection models): per plane, each output row is gathered once from its source
/// row and repeated rows are copied. `None` when the case does not apply.
#[allow(clippy::too_many_arguments)]
fn nearest_last2_fast(
    x: &Tensor,
    axes: &[usize],
    dims: &[usize],
    out_dims: &[usize],
    scale_f: &[f64],
    cfg: &ResizeCfg,
    roi_full: Option<&[f64]>,
) -> Result<Option<CT>> {
    let r = dims.len();
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(None);
    }
    let mut index: [Option<Vec<usize>>; 2] = [None, None];
    for &ax in axes {
        let axis_roi = roi_full.map(|v| (v[ax], v[ax + r]));
        let identity = (scale_f[ax] - 1.0).abs() < 1e-9
            && out_dims[ax] == dims[ax]
            && axis_roi.is_none_or(|(a, b)| a.abs() < 1e-9 && (b - 1.0).abs() < 1e-9);
        if identity {
            continue;
        }
        if ax + 2 < r {
            return Ok(None);
        }
        let taps = axis_taps(dims[ax], scale_f[ax], out_dims[ax], cfg, axis_roi)?;
        index[ax + 2 - r] = Some(taps.iter().map(nearest_source).collect());
    }
    let (h, w) = (dims[r - 2], dims[r - 1]);
    let (oh, ow) = (out_dims[r - 2], out_dims[r - 1]);
    let iy = index[0].take().unwrap_or_else(|| (0..h).collect());
    let ix = index[1].take().unwrap_or_else(|| (0..w).collect());
    if iy.iter().any(|&i| i >= h) || ix.iter().any(|&i| i >= w) || oh * ow == 0 || h * w == 0 {
        return Ok(None);
    }
    let planes: usize = dims[..r - 2].iter().product();
    let xc = x.candle().contiguous()?;
    let out = crate::fastmath::with_f32(&xc, |src| {
        let mut out = vec![0f32; planes * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, dst)| {
            let plane = &src[p * h * w..(p + 1) * h * w];
            for oy in 0..oh {
                if oy > 0 && iy[oy] == iy[oy - 1] {
                    let (done, rest) = dst.split_at_mut(oy * ow);
                    rest[..ow].copy_from_slice(&done[(oy - 1) * ow..]);
                    continue;
                }
                let srow = &plane[iy[oy] * w..(iy[oy] + 1) * w];
                let drow = &mut dst[oy * ow..(oy + 1) * ow];
                drow.iter_mut().zip(&ix).for_each(|(d, &i)| *d = srow[i]);
            }
        });
        out
    });
    match out {
        Some(v) => Ok(Some(CT::from_vec(v, out_dims, x.device())?)),
        None => Ok(None),
    }
}

/// Nearest-neighbour resize of the two axes before the last of a contiguous f32 CPU tensor, the last
/// axis unchanged (`[N, H, W, C]`, the channels-last upsampling): each output pixel copies the `C`
/// floats of its source pixel, repeated rows are copied whole. `None` when the case does not apply.
#[allow(clippy::too_many_arguments)]
fn nearest_channels_last_fast(
    x: &Tensor,
    axes: &[usize],
    dims: &[usize],
    out_dims: &[usize],
    scale_f: &[f64],
    cfg: &ResizeCfg,
    roi_full: Option<&[f64]>,
) -> Result<Option<CT>> {
    let r = dims.len();
    if x.dtype() != DType::F32 || !x.device().is_cpu() || r < 3 {
        return Ok(None);
    }
    let mut index: [Option<Vec<usize>>; 2] = [None, None];
    for &ax in axes {
        let axis_roi = roi_full.map(|v| (v[ax], v[ax + r]));
        let identity = (scale_f[ax] - 1.0).abs() < 1e-9
            && out_dims[ax] == dims[ax]
            && axis_roi.is_none_or(|(a, b)| a.abs() < 1e-9 && (b - 1.0).abs() < 1e-9);
        if identity {
            continue;
        }
        if ax + 3 < r || ax + 1 == r {
            return Ok(None);
        }
        let taps = axis_taps(dims[ax], scale_f[ax], out_dims[ax], cfg, axis_roi)?;
        index[ax + 3 - r] = Some(taps.iter().map(nearest_source).collect());
    }
    let (h, w, c) = (dims[r - 3], dims[r - 2], dims[r - 1]);
    let (oh, ow) = (out_dims[r - 3], out_dims[r - 2]);
    let iy = index[0].take().unwrap_or_else(|| (0..h).collect());
    let ix = index[1].take().unwrap_or_else(|| (0..w).collect());
    if iy.iter().any(|&i| i >= h) || ix.iter().any(|&i| i >= w) || oh * ow * c == 0 || h * w == 0 {
        return Ok(None);
    }
    let images: usize = dims[..r - 3].iter().product();
    let xc = x.candle().contiguous()?;
    let out = crate::fastmath::with_f32(&xc, |src| {
        let mut out = vec![0f32; images * oh * ow * c];
        out.par_chunks_mut(oh * ow * c).enumerate().for_each(|(p, dst)| {
            let image = &src[p * h * w * c..(p + 1) * h * w * c];
            let row = ow * c;
            for oy in 0..oh {
                if oy > 0 && iy[oy] == iy[oy - 1] {
                    let (done, rest) = dst.split_at_mut(oy * row);
                    rest[..row].copy_from_slice(&done[(oy - 1) * row..]);
                    continue;
                }
                let srow = &image[iy[oy] * w * c..(iy[oy] + 1) * w * c];
                let drow = &mut dst[oy * row..(oy + 1) * row];
                drow.chunks_exact_mut(c)
                    .zip(&ix)
                    .for_each(|(d, &i)| d.copy_from_slice(&srow[i * c..(i + 1) * c]));
            }
        });
        out
    });
    match out {
        Some(v) => Ok(Some(CT::from_vec(v, out_dims, x.device())?)),
        None => Ok(None),
    }
}

/// The source index a nearest tap reads (its largest weight).
fn nearest_source(tap: &Tap) -> usize {
    let (i, c, _) = tap;
    let k = c
        .iter()
        .enumerate()
        .fold(0usize, |best, (k, &v)| if v > c[best] { k } else { best });
    i.get(k).copied().unwrap_or(0)
}

/// One output position of a 1-D resize: source indices, their weights, extrapolated flag.
type Tap = (Vec<usize>, Vec<f64>, bool);

/// Applies per-axis taps with candle gathers and a weighted sum.
fn apply_taps(t: &CT, axis: usize, taps: &[Tap], gather: bool, ev: f64) -> Result<CT> {
    // candle's index_select needs a contiguous source.
    let t = &t.contiguous()?;
    let dev = t.device();
    let out_w = taps.len();
    if gather {
        let idx: Vec<u32> = taps.iter().map(|t| nearest_source(t) as u32).collect();
        return Ok(t.index_select(&CT::from_vec(idx, out_w, dev)?, axis)?);
    }
    let n = taps.first().map(|t| t.1.len()).unwrap_or(0);
    if taps.iter().any(|t| t.1.len() != n || t.0.len() != n) || n == 0 {
        bail!("internal: uneven resize taps");
    }
    let mut wshape = vec![1usize; t.rank()];
    wshape[axis] = out_w;
    let mut acc: Option<CT> = None;
    for k in 0..n {
        let idx: Vec<u32> = taps.iter().map(|tp| tp.0[k] as u32).collect();
        let w: Vec<f64> = taps.iter().map(|tp| tp.1[k]).collect();
        if w.iter().all(|&v| v == 0.0) {
            continue;
        }
        let g = t.index_select(&CT::from_vec(idx, out_w, dev)?, axis)?;
        let w = CT::from_vec(w, out_w, dev)?
            .to_dtype(t.dtype())?
            .reshape(wshape.as_slice())?;
        let term = g.broadcast_mul(&w)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    let acc = match acc {
        Some(a) => a,
        None => {
            let mut d = t.dims().to_vec();
            d[axis] = out_w;
            CT::zeros(d, t.dtype(), dev)?
        }
    };
    if taps.iter().any(|tp| tp.2) {
        let m: Vec<u8> = taps.iter().map(|tp| tp.2 as u8).collect();
        let m = CT::from_vec(m, out_w, dev)?
            .reshape(wshape.as_slice())?
            .broadcast_as(acc.dims())?;
        let e = (acc.zeros_like()? + ev)?;
        return Ok(m.where_cond(&e, &acc)?);
    }
    Ok(acc)
}

fn int_range(dt: DType) -> (f64, f64) {
    match dt {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::U16 => (0.0, 65535.0),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::U32 => (0.0, u32::MAX as f64),
        DType::Bool => (0.0, 1.0),
        _ => (f64::MIN, f64::MAX),
    }
}

fn coeffs_for(cfg: &ResizeCfg, ratio: f64, scale: f64, x_ori: f64) -> Vec<f64> {
    match cfg.mode {
        Mode::Nearest => {
            if ratio.fract() == 0.0 {
                return vec![0.0, 1.0];
            }
            let up = match cfg.nearest {
                Nearest::RoundPreferFloor => ratio > 0.5,
                Nearest::RoundPreferCeil => ratio >= 0.5,
                Nearest::Floor => false,
                Nearest::Ceil => true,
                Nearest::Simple => scale < 1.0 && x_ori.fract() != 0.0,
            };
            if up {
                vec![0.0, 1.0]
            } else {
                vec![1.0, 0.0]
            }
        }
        Mode::Linear if cfg.antialias => {
            let s = scale.min(1.0);
            let start = (-1.0 / s).floor() as i64 + 1;
            let footprint = 2 - 2 * start;
            let c: Vec<f64> = (start..start + footprint)
                .map(|i| (1.0 - ((i as f64 - ratio) * s).abs()).clamp(0.0, 1.0))
                .collect();
            normalize(c)
        }
        Mode::Linear => vec![1.0 - ratio, ratio],
        Mode::Cubic if cfg.antialias => {
            let a = cfg.cubic_a;
            let s = scale.min(1.0);
            let cc = |x: f64| {
                let x = x.abs();
                let (x2, x3) = (x * x, x * x * x);
                if x <= 1.0 {
                    (a + 2.0) * x3 - (a + 3.0) * x2 + 1.0
                } else if x < 2.0 {
                    a * x3 - 5.0 * a * x2 + 8.0 * a * x - 4.0 * a
                } else {
                    0.0
                }
            };
            let i_start = (-2.0 / s).floor() as i64 + 1;
            let i_end = 2 - i_start;
            normalize((i_start..i_end).map(|i| cc(s * (i as f64 - ratio))).collect())
        }
        Mode::Cubic => {
            let a = cfg.cubic_a;
            let r = ratio;
            vec![
                ((a * (r + 1.0) - 5.0 * a) * (r + 1.0) + 8.0 * a) * (r + 1.0) - 4.0 * a,
                ((a + 2.0) * r - (a + 3.0)) * r * r + 1.0,
                ((a + 2.0) * (1.0 - r) - (a + 3.0)) * (1.0 - r) * (1.0 - r) + 1.0,
                ((a * ((1.0 - r) + 1.0) - 5.0 * a) * ((1.0 - r) + 1.0) + 8.0 * a) * ((1.0 - r) + 1.0) - 4.0 * a,
            ]
        }
    }
}

fn normalize(c: Vec<f64>) -> Vec<f64> {
    let s: f64 = c.iter().sum();
    if s == 0.0 {
        return c;
    }
    c.into_iter().map(|v| v / s).collect()
}

/// Source taps along one axis (reference `_interpolate_1d_along_axis`).
fn axis_taps(in_w: usize, scale: f64, out_w: usize, cfg: &ResizeCfg, roi: Option<(f64, f64)>) -> Result<Vec<Tap>> {
    if in_w == 0 {
        bail!("cannot resize an empty axis");
    }
    let output_width = scale * in_w as f64;
    // Per output position: (indices, coeffs, extrapolated).
    let mut taps: Vec<Tap> = Vec::with_capacity(out_w);
    for y in 0..out_w {
        let yf = y as f64;
        let mut extrap = false;
        let x_ori = match cfg.ctm {
            Ctm::AlignCorners => {
                if output_width == 1.0 {
                    0.0
                } else {
                    yf * (in_w as f64 - 1.0) / (output_width - 1.0)
                }
            }
            Ctm::Asymmetric => yf / scale,
            Ctm::TfCropAndResize => {
                let (r0, r1) = roi.unwrap_or((0.0, 1.0));
                // The roi arithmetic is single precision (as in the reference and ORT), so that
                // ties such as x.5 land where theirs do.
                let span = (r1 as f32 - r0 as f32) as f64;
                let start = (r0 as f32 * (in_w as f32 - 1.0)) as f64;
                let v = if output_width == 1.0 {
                    span * (in_w as f64 - 1.0) / 2.0
                } else {
                    yf * span * (in_w as f64 - 1.0) / (output_width - 1.0)
                } + start;
                extrap = v < 0.0 || v > in_w as f64 - 1.0;
                v
            }
            Ctm::PytorchHalfPixel => {
                if output_width == 1.0 {
                    -0.5
                } else {
                    (yf + 0.5) / scale - 0.5
                }
            }
            Ctm::HalfPixel => (yf + 0.5) / scale - 0.5,
            Ctm::TfHalfPixelForNn => (yf + 0.5) / scale,
            Ctm::HalfPixelSymmetric => {
                let adjustment = out_w as f64 / output_width;
                let center = in_w as f64 / 2.0;
                center * (1.0 - adjustment) + (yf + 0.5) / scale - 0.5
            }
        };
        if !x_ori.is_finite() {
            bail!("non-finite resize coordinate");
        }
        let xi = x_ori.floor();
        let ratio = if x_ori == xi { 1.0 } else { x_ori - xi };
        let mut c = coeffs_for(cfg, ratio, scale, x_ori);
        let n = c.len() as i64;
        let pad = (n + 1) / 2;
        let xp = x_ori + pad as f64;
        let pp = xp.floor();
        let frac = xp - pp;
        let off = if n % 2 == 0 {
            if frac == 0.0 {
                -(n / 2)
            } else {
                -(n / 2) + 1
            }
        } else {
            let base = -((n - 1) / 2);
            if frac <= 0.5 {
                base
            } else {
                base + 1
            }
        };
        let start = pp as i64 + off - pad;
        let idx: Vec<i64> = (0..n).map(|k| start + k).collect();
        if cfg.exclude_outside {
            for (k, &i) in idx.iter().enumerate() {
                if i < 0 || i >= in_w as i64 {
                    c[k] = 0.0;
                }
            }
            let s: f64 = c.iter().sum();
            let s = if s == 0.0 { 1.0 } else { s };
            c.iter_mut().for_each(|v| *v /= s);
        }
        let idx = idx.into_iter().map(|i| i.clamp(0, in_w as i64 - 1) as usize).collect();
        taps.push((idx, c, extrap));
    }
    Ok(taps)
}

// ---------------------------------------------------------------------------------------------
// GridSample

fn grid_sample_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let mode = match n
        .attr_s("mode", if n.opset >= 20 { "linear" } else { "bilinear" })?
        .as_str()
    {
        "linear" | "bilinear" => Mode::Linear,
        "nearest" => Mode::Nearest,
        "cubic" | "bicubic" => Mode::Cubic,
        s => return Err(n.err(format!("unsupported GridSample mode '{s}'"))),
    };
    let padding = match n.attr_s("padding_mode", "zeros")?.as_str() {
        "zeros" => 0u8,
        "border" => 1,
        "reflection" => 2,
        s => return Err(n.err(format!("unsupported padding_mode '{s}'"))),
    };
    let align = n.attr_i("align_corners", 0)? != 0;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let grid = tin(ins, 1)?;
        let xd = x.dims().to_vec();
        let gd = grid.dims().to_vec();
        let r = xd.len();
        if r < 3 || gd.len() != r || gd[0] != xd[0] || gd[r - 1] != r - 2 {
            bail!("GridSample: bad input shapes {:?} and {:?}", xd, gd);
        }
        let sp = r - 2;
        let (nb, c) = (xd[0], xd[1]);
        let in_sp = &xd[2..];
        let out_sp = &gd[1..r - 1];
        if in_sp.contains(&0) {
            bail!("GridSample: empty spatial input");
        }
        let mut out_dims = vec![nb, c];
        out_dims.extend_from_slice(out_sp);
        cx.check_alloc(elems(&out_dims), x.dtype())?;
        let xv = x.to_f64_vec()?;
        let gv = grid.to_f64_vec()?;
        let in_n: usize = in_sp.iter().product();
        let out_n: usize = out_sp.iter().product();
        let mut out = vec![0.0; nb * c * out_n];
        // Strides of the input spatial dims.
        let mut strides = vec![1usize; sp];
        for i in (0..sp.saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * in_sp[i + 1];
        }
        out.par_chunks_mut(out_n.max(1)).enumerate().for_each(|(nc, dst)| {
            let b = nc / c;
            let img = &xv[nc * in_n..(nc + 1) * in_n];
            for (p, d) in dst.iter_mut().enumerate() {
                let g = &gv[(b * out_n + p) * sp..(b * out_n + p + 1) * sp];
                // grid's last dim is (x, y[, z]) = innermost first.
                let coords: Vec<f64> = (0..sp)
                    .map(|i| {
                        let size = in_sp[i] as f64;
                        let gc = g[sp - 1 - i];
                        if align {
                            (gc + 1.0) / 2.0 * (size - 1.0)
                        } else {
                            ((gc + 1.0) * size - 1.0) / 2.0
                        }
                    })
                    .collect();
                *d = gs_sample(img, in_sp, &strides, &coords, mode, padding, align);
            }
        });
        out1(Tensor::from_f64s(out, &out_dims, x.dtype(), x.device())?)
    }))
}

fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let rng = hi - lo;
    if rng <= 0.0 {
        return lo;
    }
    let mut x = x;
    if x < lo {
        let dx = lo - x;
        let n = (dx / rng).floor();
        let r = dx - n * rng;
        x = if (n as i64) % 2 == 0 { lo + r } else { hi - r };
    } else if x > hi {
        let dx = x - hi;
        let n = (dx / rng).floor();
        let r = dx - n * rng;
        x = if (n as i64) % 2 == 0 { hi - r } else { lo + r };
    }
    x
}

fn gs_bounds(size: usize, align: bool) -> (f64, f64) {
    if align {
        (0.0, size as f64 - 1.0)
    } else {
        (-0.5, size as f64 - 0.5)
    }
}

fn gs_pixel(img: &[f64], dims: &[usize], strides: &[usize], idx: &[i64], padding: u8, align: bool) -> f64 {
    let mut off = 0usize;
    for i in 0..dims.len() {
        let mut v = idx[i];
        let size = dims[i] as i64;
        if v < 0 || v >= size {
            match padding {
                0 => return 0.0,
                1 => v = v.clamp(0, size - 1),
                _ => {
                    let (lo, hi) = gs_bounds(dims[i], align);
                    v = (reflect(v as f64, lo, hi) as i64).clamp(0, size - 1);
                }
            }
        }
        off += v as usize * strides[i];
    }
    img.get(off).copied().unwrap_or(0.0)
}

fn cubic_w(t: f64) -> [f64; 4] {
    let a = -0.75;
    let w0 = ((a * (t + 1.0) - 5.0 * a) * (t + 1.0) + 8.0 * a) * (t + 1.0) - 4.0 * a;
    let w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0;
    let w2 = ((a + 2.0) * (1.0 - t) - (a + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0;
    let u = 2.0 - t;
    let w3 = ((a * u - 5.0 * a) * u + 8.0 * a) * u - 4.0 * a;
    [w0, w1, w2, w3]
}

fn gs_sample(
    img: &[f64],
    dims: &[usize],
    strides: &[usize],
    coords: &[f64],
    mode: Mode,
    padding: u8,
    align: bool,
) -> f64 {
    let sp = dims.len();
    let mut coords = coords.to_vec();
    for i in 0..sp {
        if mode == Mode::Nearest {
            coords[i] = round_half_even(coords[i]);
        }
        let (lo, hi) = gs_bounds(dims[i], align);
        let v = coords[i];
        if !v.is_finite() {
            return 0.0;
        }
        if v < lo || v > hi {
            if padding == 1 {
                coords[i] = v.clamp(0.0, dims[i] as f64 - 1.0);
            } else if padding == 2 {
                coords[i] = reflect(v, lo, hi);
            }
        }
    }
    match mode {
        Mode::Nearest => {
            let idx: Vec<i64> = coords.iter().map(|&c| c as i64).collect();
            gs_pixel(img, dims, strides, &idx, padding, align)
        }
        Mode::Linear | Mode::Cubic => {
            let (taps, base): (usize, i64) = if mode == Mode::Linear { (2, 0) } else { (4, -1) };
            let mut w: Vec<Vec<f64>> = Vec::with_capacity(sp);
            let mut start: Vec<i64> = Vec::with_capacity(sp);
            for &c in &coords {
                let f = c.floor();
                let t = c - f;
                start.push(f as i64 + base);
                w.push(if mode == Mode::Linear {
                    vec![1.0 - t, t]
                } else {
                    cubic_w(t).to_vec()
                });
            }
            let total = taps.pow(sp as u32);
            let mut acc = 0.0;
            let mut idx = vec![0i64; sp];
            for k in 0..total {
                let mut rem = k;
                let mut wt = 1.0;
                for i in (0..sp).rev() {
                    let j = rem % taps;
                    rem /= taps;
                    idx[i] = start[i] + j as i64;
                    wt *= w[i][j];
                }
                if wt != 0.0 {
                    acc += wt * gs_pixel(img, dims, strides, &idx, padding, align);
                }
            }
            acc
        }
    }
}

fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

// ---------------------------------------------------------------------------------------------
// AffineGrid

fn affine_grid_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let align = n.attr_i("align_corners", 0)? != 0;
    Ok(kernel(move |cx, ins| {
        let theta = tin(ins, 0)?;
        let size = tin(ins, 1)?.to_i64_vec()?;
        if size.iter().any(|&v| v < 0) {
            bail!("AffineGrid: negative size");
        }
        let size: Vec<usize> = size.iter().map(|&v| v as usize).collect();
        let sp = size.len().saturating_sub(2);
        if sp != 2 && sp != 3 {
            bail!("AffineGrid: size must have 4 or 5 values");
        }
        let td = theta.dims();
        if td.len() != 3 || td[0] != size[0] || td[1] != sp || td[2] != sp + 1 {
            bail!("AffineGrid: theta shape {:?} does not match size {:?}", td, size);
        }
        let nb = size[0];
        let sdims = &size[2..];
        let mut out_dims = vec![nb];
        out_dims.extend_from_slice(sdims);
        out_dims.push(sp);
        cx.check_alloc(elems(&out_dims), theta.dtype())?;
        let npts: usize = sdims.iter().product();
        let th = theta.to_f64_vec()?;
        let lin = |i: usize, n: usize| -> f64 {
            if n <= 1 {
                return 0.0;
            }
            let v = -1.0 + 2.0 * i as f64 / (n as f64 - 1.0);
            if align {
                v
            } else {
                v * (n as f64 - 1.0) / n as f64
            }
        };
        let mut out = Vec::with_capacity(nb * npts * sp);
        for b in 0..nb {
            let t = &th[b * sp * (sp + 1)..(b + 1) * sp * (sp + 1)];
            for p in 0..npts {
                // spatial index (d, h, w) or (h, w); base coords are (x=w, y=h, z=d, 1).
                let mut rem = p;
                let mut idx = vec![0usize; sp];
                for i in (0..sp).rev() {
                    idx[i] = rem % sdims[i];
                    rem /= sdims[i];
                }
                let mut base: Vec<f64> = (0..sp).map(|i| lin(idx[sp - 1 - i], sdims[sp - 1 - i])).collect();
                base.push(1.0);
                for row in 0..sp {
                    let v: f64 = (0..=sp).map(|k| t[row * (sp + 1) + k] * base[k]).sum();
                    out.push(v);
                }
            }
        }
        out1(Tensor::from_f64s(out, &out_dims, theta.dtype(), theta.device())?)
    }))
}

// ---------------------------------------------------------------------------------------------
// CenterCropPad

fn center_crop_pad_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axes_attr = n.attr_ints("axes")?;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let shape = tin(ins, 1)?.to_i64_vec()?;
        let r = x.rank();
        let axes: Vec<usize> = match &axes_attr {
            Some(a) => norm_axes(a, r)?,
            None => (0..r).collect(),
        };
        if shape.len() != axes.len() {
            bail!(
                "CenterCropPad: shape has {} values for {} axes",
                shape.len(),
                axes.len()
            );
        }
        let mut t = x.candle().clone();
        for (i, &ax) in axes.iter().enumerate() {
            if shape[i] < 0 {
                bail!("CenterCropPad: negative size");
            }
            let want = shape[i] as usize;
            let have = t.dims()[ax];
            if want < have {
                let start = (have - want) / 2;
                t = t.narrow(ax, start, want)?;
            } else if want > have {
                let mut d = t.dims().to_vec();
                d[ax] = want;
                cx.check_alloc(elems(&d), x.dtype())?;
                let left = (want - have) / 2;
                t = t.pad_with_zeros(ax, left, want - have - left)?;
            }
        }
        out1(Tensor::new(t.contiguous()?, x.dtype())?)
    }))
}
