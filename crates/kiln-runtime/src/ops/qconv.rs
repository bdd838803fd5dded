//! QLinearConv with a constant filter on the exact integer GEMM (`crate::qgemm`) and direct
//! i32 sums, over `[N, C, H, W]` (ONNX `QLinearConv`) or `[N, H, W, C]` tensors
//! (`ai.kiln::QLinearConvNhwc`, the channels-last regions of `kiln_graph::passes::nhwc`).
//!
//! Both layouts compute the same i32 sums and requantize them with the same arithmetic, so their
//! codes are identical. Channels-last, a dense conv reads its input as the GEMM's rows as they are
//! (a pointwise conv) or gathers its patches straight from them, and the `[pixels, M]` sums are
//! requantized in place order; in NCHW each call transposes its input to channels-last first and
//! scatters the sums back into planes.

use candle_core::Tensor as CT;
use kiln_graph::passes::nhwc::QLINEAR_CONV_NHWC;
use kiln_graph::DType;

use super::common::{elems, tin, tin_opt};
use super::quant::{cdt, conv_geometry, qlinear_conv, qrange, ConvParams};
use super::{kernel, out1, NodeCtx, Registry, RunCx};
use crate::qgemm::Int8;
use crate::{bail, Result, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("QLinearConv", |n| {
        let p = ConvParams::from_node(n)?;
        let packed = PackedQConv::from_node(n, &p)?;
        Ok(kernel(move |cx, ins| {
            if let Some(pk) = &packed {
                if let Some(y) = pk.run(cx, &p, ins, Layout::Nchw)? {
                    return out1(y);
                }
            }
            qlinear_conv(cx, &p, ins)
        }))
    });
    r.add_domain("ai.kiln", QLINEAR_CONV_NHWC, |n| {
        let p = ConvParams::from_node(n)?;
        let packed = PackedQConv::from_node(n, &p)?;
        Ok(kernel(move |cx, ins| {
            if let Some(pk) = &packed {
                if let Some(y) = pk.run(cx, &p, ins, Layout::Nhwc)? {
                    return out1(y);
                }
            }
            // Inputs the packed path does not take (a filter fed at run time, per-channel input
            // parameters): the reference conv between two transposes.
            let x = tin(ins, 0)?;
            if x.rank() != 4 {
                bail!("QLinearConvNhwc needs a 4-D input, got {:?}", x.dims());
            }
            let xn = Value::Tensor(Tensor::new(x.candle().permute((0, 3, 1, 2))?.contiguous()?, x.dtype())?);
            let mut nchw: Vec<Option<&Value>> = ins.to_vec();
            nchw[0] = Some(&xn);
            let y = qlinear_conv(cx, &p, &nchw)?;
            let y = y
                .into_iter()
                .next()
                .ok_or_else(|| crate::RuntimeError::msg("QLinearConv gave no output"))?;
            let y = y.as_tensor()?;
            out1(Tensor::new(y.candle().permute((0, 2, 3, 1))?.contiguous()?, y.dtype())?)
        }))
    });
}

/// The layout of a QLinearConv's input and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[N, C, H, W]`, as ONNX defines it.
    Nchw,
    /// `[N, H, W, C]`.
    Nhwc,
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
    /// per-channel input parameters, a filter fed at run time). `layout` is that of `X` and `Y`.
    fn run(&self, cx: &RunCx, p: &ConvParams, ins: &[Option<&Value>], layout: Layout) -> Result<Option<Tensor>> {
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
        // The NCHW dims of X, whatever its layout.
        let xd = x.dims();
        let (nb, c, h, wi) = match layout {
            Layout::Nchw => (xd[0], xd[1], xd[2], xd[3]),
            Layout::Nhwc => (xd[0], xd[3], xd[1], xd[2]),
        };
        let g = conv_geometry(p, &[nb, c, h, wi], w.dims())?;
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
        let dims = match layout {
            Layout::Nchw => g.out_dims,
            Layout::Nhwc => vec![nb, oh, ow, m],
        };
        let run = |xb: &[u8]| -> Result<CT> {
            Ok(match out {
                DType::U8 => CT::from_vec(
                    self.compute::<u8>(&geo, xb, ty, zx, &rq, layout)?,
                    dims.clone(),
                    x.device(),
                )?,
                _ => CT::from_vec(
                    self.compute::<i16>(&geo, xb, ty, zx, &rq, layout)?,
                    dims.clone(),
                    x.device(),
                )?,
            })
        };
        let ct = match crate::fastmath::with_u8(x.candle(), run) {
            Some(ct) => ct?,
            None => {
                let flat = x.candle().flatten_all()?;
                let xb: Vec<u8> = match x.dtype() {
                    DType::U8 => flat.to_vec1::<u8>()?,
                    // i8 is stored widened to i16.
                    _ => flat.to_vec1::<i16>()?.into_iter().map(|v| v as i8 as u8).collect(),
                };
                run(&xb)?
            }
        };
        Ok(Some(Tensor::new(ct.to_dtype(cdt(out)?)?, out)?))
    }

    /// The quantized output of `xb` (bytes of type `ty`, zero point `zx`): `[N, M, OH, OW]` from
    /// `[N, C, H, W]` or `[N, OH, OW, M]` from `[N, H, W, C]`, as `layout` says.
    fn compute<T: QStore>(
        &self,
        s: &QConvShape,
        xb: &[u8],
        ty: Int8,
        zx: i32,
        rq: &Requant,
        layout: Layout,
    ) -> Result<Vec<T>> {
        use crate::qgemm::{gemm, ZeroPoint};
        use rayon::prelude::*;
        let (pix, hw) = (s.oh * s.ow, s.h * s.w);
        let mut y = vec![T::default(); s.nb * s.m * pix];
        let k = self.wd[1] * s.kh * s.kw;
        let parallel = s.nb * s.m * pix * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1;
        let nhwc = layout == Layout::Nhwc;
        // Requantizes one image's `[pix, M]` sums into its output: M planes (NCHW), 16 channels
        // per task (one cache line of each pixel's sums), or in place order (NHWC), 64 pixels
        // per task.
        let requant = |acc: &[i32], yb: &mut [T]| {
            let m = s.m;
            if nhwc {
                let rows = |(ys, a): (&mut [T], &[i32])| T::requant_rows(rq, a, m, ys);
                if parallel {
                    yb.par_chunks_mut(64 * m).zip(acc.par_chunks(64 * m)).for_each(rows);
                } else {
                    yb.chunks_mut(64 * m).zip(acc.chunks(64 * m)).for_each(rows);
                }
                return;
            }
            let block = |(bi, ys): (usize, &mut [T])| T::requant_block(rq, acc, m, bi * 16, ys, pix);
            if parallel {
                yb.par_chunks_mut(16 * pix).enumerate().for_each(block);
            } else {
                yb.chunks_mut(16 * pix).enumerate().for_each(block);
            }
        };
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
                    if nhwc {
                        shifted(img, ty, zx, &mut xs);
                    } else {
                        shifted_channels_last(img, s.c, hw, ty, zx, &mut xs);
                    }
                    s.depthwise_channels_last(&xs, &wt, &mut acc, parallel);
                    requant(&acc, &mut y[b * m * pix..(b + 1) * m * pix]);
                }
            }
            QConvKind::Direct(wv) => {
                // Planes of the NCHW image; a channels-last one is transposed to NCHW and its
                // output planes back.
                let planes_in: Vec<u8>;
                let xb = if nhwc {
                    let mut t = vec![0u8; xb.len()];
                    for (src, dst) in xb.chunks_exact(hw * s.c).zip(t.chunks_exact_mut(hw * s.c)) {
                        super::shape::batched_transpose(src, 1, hw, s.c, dst);
                    }
                    planes_in = t;
                    &planes_in
                } else {
                    xb
                };
                let mut planes = if nhwc { vec![T::default(); y.len()] } else { Vec::new() };
                let dst = if nhwc { &mut planes } else { &mut y };
                let (cg, mg) = (self.wd[1], s.m / s.group);
                let plane = |(i, yo): (usize, &mut [T])| {
                    let (b, oc) = (i / s.m, i % s.m);
                    let c0 = (oc / mg) * cg;
                    let img = &xb[(b * s.c + c0) * hw..(b * s.c + c0 + cg) * hw];
                    let acc = s.direct(img, cg, &wv[oc * k..(oc + 1) * k], ty, zx);
                    T::requant_plane(rq, oc, &acc, yo);
                };
                if parallel {
                    dst.par_chunks_mut(pix).enumerate().for_each(plane);
                } else {
                    dst.chunks_mut(pix).enumerate().for_each(plane);
                }
                if nhwc {
                    for (src, dst) in planes.chunks_exact(s.m * pix).zip(y.chunks_exact_mut(s.m * pix)) {
                        super::shape::batched_transpose(src, 1, s.m, pix, dst);
                    }
                }
            }
            QConvKind::Gemm(packed) => {
                let mut a = Scratch::take(&PATCHES, pix * k);
                let mut hwc = Scratch::take(&CHANNELS_LAST, if nhwc { 0 } else { hw * s.c });
                let mut acc = Scratch::take(&SUMS, pix * s.m);
                for b in 0..s.nb {
                    let img = &xb[b * s.c * hw..(b + 1) * s.c * hw];
                    let img: &[u8] = if nhwc {
                        img
                    } else {
                        to_channels_last(img, s.c, hw, &mut hwc);
                        &hwc
                    };
                    // A 1x1 filter at stride 1 without padding reads the channels-last image as is.
                    let a: &[u8] = if k == s.c && pix == hw && s.pad == [0, 0] && s.stride == [1, 1] {
                        img
                    } else {
                        s.im2col(img, zx as u8, &mut a, parallel);
                        &a
                    };
                    gemm(a, ty, pix, ZeroPoint::Scalar(zx), packed, &mut acc)
                        .map_err(|e| crate::RuntimeError::msg(e.to_string()))?;
                    requant(&acc, &mut y[b * s.m * pix..(b + 1) * s.m * pix]);
                }
            }
        }
        Ok(y)
    }
}

/// Codes of type `ty` minus the zero point `zx`, as i16 (same order).
fn shifted(img: &[u8], ty: Int8, zx: i32, out: &mut [i16]) {
    match ty {
        Int8::U8 => out.iter_mut().zip(img).for_each(|(o, &v)| *o = (v as i32 - zx) as i16),
        Int8::I8 => out
            .iter_mut()
            .zip(img)
            .for_each(|(o, &v)| *o = (v as i8 as i32 - zx) as i16),
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

    /// Rows of `m` outputs (channels-last) from the rows of `m` sums `acc` (same length).
    fn requant_rows(rq: &Requant, acc: &[i32], m: usize, out: &mut [Self]) {
        match simd_level() {
            // SAFETY: the CPU has the features each build is compiled for (`simd_level`).
            #[cfg(target_arch = "x86_64")]
            2 => unsafe { simd::rows_avx512(rq, acc, m, out) },
            #[cfg(target_arch = "x86_64")]
            1 => unsafe { simd::rows_avx2(rq, acc, m, out) },
            _ => requant_rows_body(rq, acc, m, out),
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
    use super::{requant_block_body, requant_plane_body, requant_rows_body, QStore, Requant};

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn plane_avx512<T: QStore>(rq: &Requant, oc: usize, acc: &[i32], out: &mut [T]) {
        requant_plane_body(rq, oc, acc, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn plane_avx2<T: QStore>(rq: &Requant, oc: usize, acc: &[i32], out: &mut [T]) {
        requant_plane_body(rq, oc, acc, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn rows_avx512<T: QStore>(rq: &Requant, acc: &[i32], m: usize, out: &mut [T]) {
        requant_rows_body(rq, acc, m, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2<T: QStore>(rq: &Requant, acc: &[i32], m: usize, out: &mut [T]) {
        requant_rows_body(rq, acc, m, out)
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
fn requant_rows_body<T: QStore>(rq: &Requant, acc: &[i32], m: usize, out: &mut [T]) {
    let (b, mu, z, lo, hi) = (&rq.bias[..m], &rq.mult[..m], rq.yzp, rq.lo, rq.hi);
    for (o, a) in out.chunks_exact_mut(m).zip(acc.chunks_exact(m)) {
        for (((o, &a), &b), &mu) in o.iter_mut().zip(a).zip(b).zip(mu) {
            *o = T::from_i32(requant_int((a as f64 + b) * mu + z, lo, hi));
        }
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

    /// Requantizing `[pix, m]` sums in place order gives each output the per-element formula, for
    /// u8 and for i8 (stored as i16) outputs.
    #[test]
    fn requant_rows_keep_place_order() {
        use super::{QStore, Requant};
        let m = 21;
        let rq = |lo: f64, hi: f64| Requant {
            bias: (0..m).map(|c| c as f64 * 5.0 - 40.0).collect(),
            mult: (0..m).map(|c| 0.02 + c as f64 * 0.001).collect(),
            yzp: 3.0,
            lo,
            hi,
        };
        let pix = 37;
        let acc: Vec<i32> = (0..pix * m).map(|i| ((i * 7919) % 9001) as i32 - 4500).collect();
        let want = |r: &Requant, i: usize| {
            let oc = i % m;
            ((acc[i] as f64 + r.bias[oc]) * r.mult[oc] + r.yzp)
                .clamp(r.lo, r.hi)
                .round_ties_even() as i32
        };
        let r = rq(0.0, 255.0);
        let mut out = vec![0u8; pix * m];
        u8::requant_rows(&r, &acc, m, &mut out);
        for (i, &o) in out.iter().enumerate() {
            assert_eq!(o as i32, want(&r, i), "u8 {i}");
        }
        let r = rq(-128.0, 127.0);
        let mut out = vec![0i16; pix * m];
        i16::requant_rows(&r, &acc, m, &mut out);
        for (i, &o) in out.iter().enumerate() {
            assert_eq!(o as i32, want(&r, i), "i8 {i}");
        }
    }
}
