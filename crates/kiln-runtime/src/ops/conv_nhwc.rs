//! `ai.kiln::ConvNhwc` (`kiln_graph::passes::nhwc`): 2-D f32 convolution over `[N, H, W, C]`
//! tensors, with FusedConv's residual and activation or FusedConvChain's chain in its epilogue.
//!
//! - dense (group 1): `[pixels, KH*KW*C] x [KH*KW*C, M]` on the packed GEMM, the filter packed once
//!   at plan time as the right-hand operand; the left operand is the input itself for a pointwise
//!   conv (1x1, stride 1, no padding) and otherwise channels-last im2col rows built per block of
//!   output pixels in a per-thread buffer (each tap a contiguous run of `C` floats);
//! - depthwise (channel multiplier 1): `nhwc::depthwise`, vectorized across channels.
//!
//! Each block of output rows gets its residual, activation and chain while it is still in cache.

use std::cell::RefCell;

use candle_core::Tensor as CT;
use kiln_graph::passes::elementwise_chain::{decode, Step, KILN};
use kiln_graph::passes::nhwc::CONV_NHWC;
use kiln_graph::DType;
use rayon::prelude::*;

use super::common::{tin, tin_opt};
use super::conv_cpu::{clamp_slice, Conv2d, PackedFilter};
use super::fused::{parse_act, Act};
use super::nhwc::{self, Window};
use super::nn::{conv_attrs, spatial_attr, window_pads};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::fastmath::with_f32;
use crate::sgemm::{self, Bias, MatRef, PackedB};
use crate::{bail, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.add_domain(KILN, CONV_NHWC, conv_nhwc);
}

/// The filter in the form its kernel reads.
enum Filter {
    /// `[KH*KW*C, M]`, row `(ky*KW + kx)*C + ci`.
    Dense(PackedB),
    /// Few output channels (see [`few_channels`]) on a CPU without the direct kernel
    /// ([`sgemm::indexed_available`]): the NCHW kernel's packed filter; the input is transposed to
    /// NCHW, convolved there and the (narrow) output transposed back.
    Nchw(PackedFilter),
    /// `[KH*KW][C]`.
    Depthwise(Vec<f32>),
}

/// Residual add, activation and chain, applied to finished output rows.
struct Epilogue {
    act: Option<Act>,
    steps: Option<Vec<Step>>,
}

impl Epilogue {
    fn is_empty(&self) -> bool {
        self.act.is_none() && self.steps.is_none()
    }

    fn apply(&self, rows: &mut [f32], z: Option<&[f32]>) {
        if let Some(z) = z {
            rows.iter_mut().zip(z).for_each(|(v, z)| *v += z);
        }
        match self.act {
            Some(Act::Relu) => clamp_slice(rows, (0.0, f32::INFINITY)),
            Some(Act::Clip(lo, hi)) => clamp_slice(rows, (lo, hi)),
            Some(a) => rows.iter_mut().for_each(|v| *v = a.apply(*v)),
            None => {}
        }
        if let Some(s) = &self.steps {
            super::chain::run_in_place(s, rows);
        }
    }
}

/// Multiply-adds below which a conv runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;
/// Floats of im2col rows per block (256 KiB: the block and its filter panel stay in L2).
const PATCH_BUDGET: usize = 1 << 16;

thread_local! {
    static PATCHES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn conv_nhwc(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let a = conv_attrs(n)?;
    let w = n
        .const_input(1)
        .ok_or_else(|| n.err("ConvNhwc needs a constant filter"))?;
    if w.dtype != DType::F32 || w.dims.len() != 4 || w.dims.contains(&0) {
        return Err(n.err(format!("ConvNhwc needs a 4-D f32 filter, got {} {:?}", w.dtype, w.dims)));
    }
    let (m, cg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
    if let Some(ks) = &a.kernel_shape {
        if ks.len() != 2 || ks[0] as usize != kh || ks[1] as usize != kw {
            return Err(n.err(format!("kernel_shape {ks:?} does not match the filter {:?}", w.dims)));
        }
    }
    let group = usize::try_from(a.group)
        .ok()
        .filter(|&g| g >= 1)
        .ok_or_else(|| n.err("group must be positive"))?;
    let depthwise = group > 1;
    if depthwise && (cg != 1 || m != group) {
        return Err(n.err("ConvNhwc: grouped convs other than depthwise are not supported"));
    }
    let wv = w.values::<f32>().ok_or_else(|| n.err("ConvNhwc: unreadable filter"))?;
    let taps = kh * kw;
    let filter = if depthwise {
        let mut wt = vec![0f32; taps * m];
        for ch in 0..m {
            for t in 0..taps {
                wt[t * m + ch] = wv[ch * taps + t];
            }
        }
        Filter::Depthwise(wt)
    } else if let Some(p) = (few_channels(m) && !sgemm::indexed_available())
        .then(|| PackedFilter::new(&wv, &w.dims, 1))
        .flatten()
    {
        Filter::Nchw(p)
    } else {
        let k = taps * cg;
        let mut bt = vec![0f32; k * m];
        for mi in 0..m {
            for ci in 0..cg {
                for t in 0..taps {
                    bt[(t * cg + ci) * m + mi] = wv[(mi * cg + ci) * taps + t];
                }
            }
        }
        Filter::Dense(PackedB::pack(MatRef::row_major(&bt, k, m)).map_err(|e| n.err(e.to_string()))?)
    };
    n.note_held_bytes(match &filter {
        Filter::Dense(p) => p.bytes(),
        Filter::Nchw(p) => p.bytes(),
        Filter::Depthwise(v) => v.len() * 4,
    });
    n.consume_input(1);
    let epi = Epilogue {
        act: n.node.attr("activation").map(|_| parse_act(n)).transpose()?,
        steps: match n.attr_floats("program")? {
            Some(p) => Some(decode(&p).ok_or_else(|| n.err("malformed 'program' attribute"))?),
            None => None,
        },
    };
    let strides = spatial_attr(&a.strides, 2, 1, "strides")?;
    let dil = spatial_attr(&a.dilations, 2, 1, "dilations")?;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let xd = x.dims().to_vec();
        let [nb, h, wd, c] = xd[..] else {
            bail!("ConvNhwc: input must be [N, H, W, C], got {xd:?}");
        };
        if c != cg * group {
            bail!("ConvNhwc: input has {c} channels, the filter expects {}", cg * group);
        }
        if x.dtype() != DType::F32 {
            bail!("ConvNhwc: f32 input expected, got {}", x.dtype());
        }
        let (pb, pe) = window_pads(a.auto, &a.pads, &[h, wd], &[kh, kw], &strides, &dil)?;
        let out_len = |i: usize, size: usize, k: usize| -> Result<usize> {
            let span = (k - 1) * dil[i] + 1;
            let padded = size + pb[i] + pe[i];
            if padded < span {
                bail!("ConvNhwc: the kernel ({span}) is larger than the padded input ({padded})");
            }
            Ok((padded - span) / strides[i] + 1)
        };
        let (oh, ow) = (out_len(0, h, kh)?, out_len(1, wd, kw)?);
        let total = nb as u128 * oh as u128 * ow as u128 * m as u128;
        cx.check_alloc(total, DType::F32)?;
        let bias = match tin_opt(ins, 2)? {
            Some(b) => {
                let v = b
                    .candle()
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if v.len() != m {
                    bail!("ConvNhwc: bias has {} values for {m} output channels", v.len());
                }
                Some(v)
            }
            None => None,
        };
        let z = tin_opt(ins, 3)?;
        let zt = match z {
            Some(z) if z.dims() == [nb, oh, ow, m] => Some(z.candle().to_dtype(candle_core::DType::F32)?.contiguous()?),
            _ => None,
        };
        let broadcast_z = z.is_some() && zt.is_none();
        let g = Window {
            n: nb,
            h,
            w: wd,
            c,
            kh,
            kw,
            stride: (strides[0], strides[1]),
            dil: (dil[0], dil[1]),
            pad: (pb[0], pb[1]),
            oh,
            ow,
        };
        let xc = x.candle().contiguous()?;
        let no_epi = Epilogue { act: None, steps: None };
        let run_epi = if broadcast_z { &no_epi } else { &epi };
        let compute = |xs: &[f32], zs: Option<&[f32]>| -> Result<Vec<f32>> {
            match &filter {
                Filter::Depthwise(wt) => {
                    let mut out = crate::fastmath::zeroed(total as usize);
                    let row = ow * m;
                    let post = |r: usize, rows: &mut [f32]| {
                        run_epi.apply(rows, zs.map(|z| &z[r * row..(r + 1) * row]));
                    };
                    nhwc::depthwise(&g, xs, wt, bias.as_deref(), &mut out, &post);
                    Ok(out)
                }
                Filter::Dense(pw) => dense(&g, xs, pw, m, bias.as_deref(), run_epi, zs, (&pb, &pe)),
                Filter::Nchw(pf) => {
                    let cv = Conv2d {
                        n: nb,
                        c,
                        h,
                        w: wd,
                        m,
                        kh,
                        kw,
                        group: 1,
                        stride: g.stride,
                        dil: g.dil,
                        pad: g.pad,
                        oh,
                        ow,
                    };
                    let mut out = by_nchw(&cv, xs, pf, bias.as_deref())?;
                    let rows = (PATCH_BUDGET / m).max(1) * m;
                    let finish =
                        |(i, o): (usize, &mut [f32])| run_epi.apply(o, zs.map(|z| &z[i * rows..i * rows + o.len()]));
                    if out.len() > rows {
                        out.par_chunks_mut(rows).enumerate().for_each(finish);
                    } else {
                        out.chunks_mut(rows).enumerate().for_each(finish);
                    }
                    Ok(out)
                }
            }
        };
        let out = with_f32(&xc, |xs| match &zt {
            Some(z) => with_f32(z, |zs| compute(xs, Some(zs))),
            None => Some(compute(xs, None)),
        })
        .flatten()
        .ok_or_else(|| crate::RuntimeError::msg("ConvNhwc runs on CPU tensors"))??;
        let mut y = CT::from_vec(out, (nb, oh, ow, m), xc.device())?;
        if let (true, Some(z)) = (broadcast_z, z) {
            // A residual of another shape broadcasts as the fused Add did, then the activation.
            y = y
                .broadcast_add(&z.candle().to_dtype(candle_core::DType::F32)?)?
                .contiguous()?;
            let mut v = y.flatten_all()?.to_vec1::<f32>()?;
            epi.apply(&mut v, None);
            y = CT::from_vec(v, (nb, oh, ow, m), xc.device())?;
        }
        out1(Tensor::new(y, DType::F32)?)
    }))
}

/// Output channel counts the `[pixels, K] x [K, M]` GEMM fills poorly: its tiles are 32 columns wide,
/// so 24 channels fill one three-quarters and 16 leave half the accumulators idle. For these the NCHW
/// kernel (`M` rows of 6-row tiles over pixels) runs between two transposes, which move `C + M`
/// floats per pixel against `K * M` multiply-adds. The direct kernel (`dense_direct`) runs these
/// channel counts itself: measured faster than the transposes (docs/benchmarks.md).
fn few_channels(m: usize) -> bool {
    m < 128 && !m.is_multiple_of(32)
}

/// A dense conv through the NCHW kernel: `xs` `[N, H, W, C]` transposed to NCHW, convolved, and the
/// result transposed back to `[N, OH, OW, M]`.
fn by_nchw(cv: &Conv2d, xs: &[f32], pf: &PackedFilter, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let cpu = candle_core::Device::Cpu;
    let mut xt = crate::fastmath::zeroed(xs.len());
    super::shape::batched_transpose(xs, cv.n, cv.h * cv.w, cv.c, &mut xt);
    let x = CT::from_vec(xt, (cv.n, cv.c, cv.h, cv.w), &cpu)?;
    let b = bias.map(|b| CT::from_slice(b, b.len(), &cpu)).transpose()?;
    // Without the packed-rows kernel (no AVX-512) the NCHW kernel needs the filter as a tensor.
    let y = match cv.run(&x, None, b.as_ref(), Some(pf), None) {
        Some(y) => y?,
        None => {
            let w = CT::from_vec(pf.weight_values(), (cv.m, cv.c, cv.kh, cv.kw), &cpu)?;
            cv.run(&x, Some(&w), b.as_ref(), Some(pf), None)
                .ok_or_else(|| crate::RuntimeError::msg("ConvNhwc: the NCHW kernel declined the conv"))??
        }
    };
    let mut out = crate::fastmath::zeroed(cv.n * cv.m * cv.oh * cv.ow);
    let done = with_f32(&y, |ys| {
        super::shape::batched_transpose(ys, cv.n, cv.m, cv.oh * cv.ow, &mut out)
    });
    done.ok_or_else(|| crate::RuntimeError::msg("ConvNhwc: the NCHW kernel gave no f32 tensor"))?;
    Ok(out)
}

/// Dense conv: blocks of output pixels, each one GEMM against the packed filter then the epilogue.
#[allow(clippy::too_many_arguments)]
fn dense(
    g: &Window,
    xs: &[f32],
    pw: &PackedB,
    m: usize,
    bias: Option<&[f32]>,
    epi: &Epilogue,
    z: Option<&[f32]>,
    (pb, pe): (&[usize], &[usize]),
) -> Result<Vec<f32>> {
    if sgemm::indexed_available() {
        return dense_direct(g, xs, pw, m, bias, epi, z, (pb, pe));
    }
    let k = pw.k();
    let pixels = g.oh * g.ow;
    let mut out = crate::fastmath::zeroed(g.n * pixels * m);
    let bias = bias.map_or(Bias::None, Bias::PerCol);
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == (1, 1) && pb.iter().chain(pe).all(|&p| p == 0);
    let macs = g.n * pixels * k * m;
    // Rows per block: a multiple of the GEMM's 6-row tile.
    let block = (PATCH_BUDGET / k.max(1)).clamp(12, 512) / 6 * 6;
    let tasks = g.n * pixels.div_ceil(block);
    let err = std::sync::Mutex::new(None);
    let fail = |e: sgemm::GemmError| {
        if let Ok(mut slot) = err.lock() {
            slot.get_or_insert(e);
        }
    };
    // One block: output rows `row0..row0 + ob.len() / m` of image `img` (pixel p0 onwards).
    let one = |img: usize, p0: usize, ob: &mut [f32], parallel_gemm: bool| {
        let rows = ob.len() / m;
        let gemm = |a: MatRef, ob: &mut [f32]| {
            let r = if parallel_gemm {
                sgemm::gemm_packed_b(a, pw, bias, ob, m)
            } else {
                sgemm::gemm_packed_b_seq(a, pw, bias, ob, m)
            };
            if let Err(e) = r {
                fail(e);
            }
        };
        if pointwise {
            let r0 = img * pixels + p0;
            gemm(MatRef::row_major(&xs[r0 * k..(r0 + rows) * k], rows, k), ob);
        } else {
            PATCHES.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < rows * k {
                    buf.resize(rows * k, 0.0);
                }
                let patches = &mut buf[..rows * k];
                nhwc::im2col(g, xs, img, p0, p0 + rows, patches);
                gemm(MatRef::row_major(patches, rows, k), ob);
            });
        }
        if !epi.is_empty() || z.is_some() {
            let at = (img * pixels + p0) * m;
            epi.apply(ob, z.map(|z| &z[at..at + ob.len()]));
        }
    };
    let split = Split::choose(macs, tasks, 4);
    over_blocks(&mut out, pixels * m, block * m, split, |img, bi, ob, inside| {
        one(img, bi * block, ob, inside)
    });
    if let Some(e) = err.into_inner().ok().flatten() {
        bail!("ConvNhwc: {e}");
    }
    Ok(out)
}

/// How a dense conv's blocks of output pixels share the threads.
#[derive(Clone, Copy)]
enum Split {
    /// All on the calling thread (a small conv, or one thread).
    None,
    /// One task per block (enough blocks for every thread).
    Blocks,
    /// Blocks one after the other, each GEMM split over the threads (a small feature map).
    InsideBlocks,
}

impl Split {
    /// `tasks` blocks of `macs` multiply-adds in all: one task per block when there are at least
    /// `per_thread` per thread.
    fn choose(macs: usize, tasks: usize, per_thread: usize) -> Split {
        let threads = rayon::current_num_threads();
        if macs < PARALLEL_MIN_MACS || threads == 1 {
            Split::None
        } else if tasks >= per_thread * threads {
            Split::Blocks
        } else {
            Split::InsideBlocks
        }
    }
}

/// Runs `one(image, block index, block, split inside)` over `out` (images of `image` floats, each in
/// blocks of `block` floats) as `split` says.
fn over_blocks(
    out: &mut [f32],
    image: usize,
    block: usize,
    split: Split,
    one: impl Fn(usize, usize, &mut [f32], bool) + Sync,
) {
    match split {
        Split::Blocks => out.par_chunks_mut(image).enumerate().for_each(|(img, oi)| {
            oi.par_chunks_mut(block)
                .enumerate()
                .for_each(|(bi, ob)| one(img, bi, ob, false));
        }),
        Split::None | Split::InsideBlocks => {
            let inside = matches!(split, Split::InsideBlocks);
            for (img, oi) in out.chunks_mut(image).enumerate() {
                for (bi, ob) in oi.chunks_mut(block).enumerate() {
                    one(img, bi, ob, inside);
                }
            }
        }
    }
}

/// Output pixels per task of [`dense_direct`] (16 tiles of 6: each run of filter steps, loaded into
/// L1 once, serves them all).
const DIRECT_BLOCK: usize = 96;

/// Dense conv without im2col: the input zero-padded once (when the conv pads), then each block of
/// output pixels one [`sgemm::gemm_indexed_a`] whose A rows are the pixels' windows read in place.
#[allow(clippy::too_many_arguments)]
fn dense_direct(
    g: &Window,
    xs: &[f32],
    pw: &PackedB,
    m: usize,
    bias: Option<&[f32]>,
    epi: &Epilogue,
    z: Option<&[f32]>,
    (pb, pe): (&[usize], &[usize]),
) -> Result<Vec<f32>> {
    let (c, k) = (g.c, pw.k());
    let (hp, wp) = (g.h + pb[0] + pe[0], g.w + pb[1] + pe[1]);
    let padded;
    let src: &[f32] = if pb.iter().chain(pe).all(|&p| p == 0) {
        xs
    } else {
        padded = pad_nhwc(g, xs, hp, wp);
        &padded
    };
    let offs: Vec<usize> = (0..g.kh)
        .flat_map(|ky| (0..g.kw).map(move |kx| (ky * g.dil.0 * wp + kx * g.dil.1) * c))
        .flat_map(|tap| (0..c).map(move |ci| tap + ci))
        .collect();
    if offs.len() != k {
        bail!("ConvNhwc: the packed filter has k = {k}, the window {}", offs.len());
    }
    // A lone Relu or Clip runs on the finished tiles in registers.
    let clamp = match (z, &epi.steps, epi.act) {
        (None, None, Some(Act::Relu)) => Some((0.0, f32::INFINITY)),
        (None, None, Some(Act::Clip(lo, hi))) => Some((lo, hi)),
        _ => None,
    };
    let in_kernel = clamp.is_some();
    let pixels = g.oh * g.ow;
    let mut out = crate::fastmath::zeroed(g.n * pixels * m);
    let tasks = g.n * pixels.div_ceil(DIRECT_BLOCK);
    let macs = g.n * pixels * k * m;
    let err = std::sync::Mutex::new(None);
    // Output pixels `p0 .. p0 + ob.len() / m` of image `img`.
    let one = |img: usize, p0: usize, ob: &mut [f32], parallel: bool| {
        let rows: Vec<usize> = (p0..p0 + ob.len() / m)
            .map(|p| ((img * hp + p / g.ow * g.stride.0) * wp + p % g.ow * g.stride.1) * c)
            .collect();
        let a = sgemm::IndexedA {
            data: src,
            rows: &rows,
            offs: &offs,
        };
        if let Err(e) = sgemm::gemm_indexed_a(a, pw, bias, clamp, ob, m, parallel) {
            if let Ok(mut slot) = err.lock() {
                slot.get_or_insert(e);
            }
        }
        if !in_kernel && (!epi.is_empty() || z.is_some()) {
            let at = (img * pixels + p0) * m;
            epi.apply(ob, z.map(|z| &z[at..at + ob.len()]));
        }
    };
    let split = Split::choose(macs, tasks, 2);
    over_blocks(&mut out, pixels * m, DIRECT_BLOCK * m, split, |img, bi, ob, inside| {
        one(img, bi * DIRECT_BLOCK, ob, inside)
    });
    if let Some(e) = err.into_inner().ok().flatten() {
        bail!("ConvNhwc: {e}");
    }
    Ok(out)
}

/// `xs` `[N, H, W, C]` into a zeroed `[N, hp, wp, C]` at the window's top-left padding.
fn pad_nhwc(g: &Window, xs: &[f32], hp: usize, wp: usize) -> Vec<f32> {
    let (row, prow) = (g.w * g.c, wp * g.c);
    let mut dst = crate::fastmath::zeroed(g.n * hp * prow);
    let fill = |(img, d): (usize, &mut [f32])| {
        for y in 0..g.h {
            let s = &xs[(img * g.h + y) * row..][..row];
            d[(y + g.pad.0) * prow + g.pad.1 * g.c..][..row].copy_from_slice(s);
        }
    };
    if g.n > 1 && xs.len() >= 1 << 16 {
        dst.par_chunks_mut(hp * prow).enumerate().for_each(fill);
    } else {
        dst.chunks_mut(hp * prow).enumerate().for_each(fill);
    }
    dst
}
