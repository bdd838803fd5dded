//! Fast CPU paths for 2-D f32 convolution (NCHW), used by `Conv` before the generic code in
//! `nn.rs`:
//! - dense (group 1): im2col over tiles of output rows, built with contiguous row copies, then one
//!   gemm per tile (`[M, C*KH*KW] x [C*KH*KW, tile]`), bias added while the tile is written out.
//!   1x1 / stride 1 / no padding skips im2col: the input plane is the gemm operand as it is.
//! - grouped (each group a dense conv on its channel slice) through the same tiles per group;
//! - depthwise (one input channel per group, channel multiplier 1): `conv_dw.rs`.
//!
//! candle's own conv2d builds im2col tiles element by element with scattered writes and handles
//! depthwise convs as a dense conv per group; on PP-OCR's detector that made Conv 12x slower
//! than ONNX Runtime's.

use candle_core::Tensor as CT;
use rayon::prelude::*;

use crate::fastmath::with_f32;
use crate::Result;

/// Geometry of one 2-D convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
    pub kh: usize,
    pub kw: usize,
    pub group: usize,
    pub stride: (usize, usize),
    pub dil: (usize, usize),
    /// (top, left); bottom/right only shape the output size.
    pub pad: (usize, usize),
    pub oh: usize,
    pub ow: usize,
}

/// Output elements per im2col tile (bounded so the column buffer stays in the low megabytes).
const TILE_COLS_BUDGET: usize = 1 << 19;

impl Conv2d {
    /// Convolves `x` `[N, C, H, W]` with `w` `[M, C/g, KH, KW]` (+ bias `[M]`), then clamps to
    /// `clamp` `(lo, hi)` if given (a fused Relu or Clip: `min(max(v, lo), hi)`, in the GEMM's or the
    /// depthwise kernel's epilogue where they run); `None` when an operand is not a contiguous f32
    /// CPU tensor or the grouping is not one this file handles.
    /// `w` may be absent when `packed` holds the filter (the plan consumed the weight input); the
    /// paths that need the tensor then return `None` and the caller rebuilds it.
    pub(crate) fn run(
        &self,
        x: &CT,
        w: Option<&CT>,
        bias: Option<&CT>,
        packed: Option<&PackedFilter>,
        clamp: Option<(f32, f32)>,
    ) -> Option<Result<CT>> {
        let g = self.group;
        let empty = [
            self.n, self.c, self.h, self.w, self.m, self.kh, self.kw, self.oh, self.ow,
        ]
        .contains(&0);
        if empty
            || g == 0
            || !self.c.is_multiple_of(g)
            || !self.m.is_multiple_of(g)
            || self.stride.0 == 0
            || self.stride.1 == 0
        {
            return None;
        }
        let depthwise = g > 1 && g == self.c && self.m == self.c;
        let bias_v = bias_values(bias, self.m)?;
        let out = if depthwise {
            let wv = with_f32(w?, |s| s.to_vec())?;
            let post = |_: usize, plane: &mut [f32]| {
                if let Some(c) = clamp {
                    clamp_slice(plane, c);
                }
            };
            with_f32(x, |xs| self.depthwise_conv(xs, &wv, bias_v.as_deref(), Some(&post)))?
        } else {
            let r = with_f32(x, |xs| match self.dense_rows(xs, w, bias_v.as_deref(), packed, clamp) {
                Some(r) => Some(r),
                None => Some(self.dense(xs, w?, bias_v.as_deref()).map(|mut v| {
                    if let Some(c) = clamp {
                        clamp_slice(&mut v, c);
                    }
                    v
                })),
            })??;
            match r {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            }
        };
        Some(CT::from_vec(out, (self.n, self.m, self.oh, self.ow), x.device()).map_err(Into::into))
    }

    /// Dense and grouped convs through [`crate::sgemm::gemm_packed_a_rows`]: the input laid out
    /// once as zero-padded, stride-phase-split planes (none for a pointwise conv), each im2col row
    /// read straight from them, the filter packed at plan time (`packed`) or here. `None` when the
    /// CPU lacks the kernel or the filter is not an f32 CPU tensor.
    fn dense_rows(
        &self,
        x: &[f32],
        w: Option<&CT>,
        bias: Option<&[f32]>,
        packed: Option<&PackedFilter>,
        clamp: Option<(f32, f32)>,
    ) -> Option<Result<Vec<f32>>> {
        use crate::sgemm::{gemm_packed_a_rows, rows_available, RowsB};
        if !rows_available() {
            return None;
        }
        let g = self.group;
        let (cg, mg) = (self.c / g, self.m / g);
        let (kh, kw) = (self.kh, self.kw);
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dil;
        let k = cg * kh * kw;
        let p = self.oh * self.ow;
        let owned;
        let plan_filter = packed.filter(|pf| pf.fits(g, mg, k));
        let packed: &[crate::sgemm::PackedA] = match plan_filter {
            Some(pf) => &pf.groups,
            // A filter packed per call costs M*K, too much against M*K*P for a handful of output
            // pixels (`dense` then takes candle's GEMM).
            None if p < 64 => return None,
            None => {
                owned = with_f32(w?, |wv| PackedFilter::pack_groups(wv, g, mg, k))?.ok()?;
                &owned
            }
        };
        let pointwise =
            kh == 1 && kw == 1 && self.stride == (1, 1) && self.pad == (0, 0) && self.oh == self.h && self.ow == self.w;
        // Phase plane (ci, ry, rx): padded rows ry, ry + sh, ... and columns rx, rx + sw, ... (hq x wq);
        // output (oy, ox) of tap (ky, kx) reads plane (ci, ky*dh % sh, kx*dw % sw) at row
        // oy + ky*dh / sh, column ox + kx*dw / sw. Outputs are computed over rows of wq columns (the
        // columns past ow are discarded), so each im2col row is one contiguous run.
        let hq = self.oh + (kh - 1) * dh / sh;
        let wq = self.ow + (kw - 1) * dw / sw;
        let plane = hq * wq;
        let offs: Vec<usize> = if pointwise {
            (0..cg).map(|ci| ci * self.h * self.w).collect()
        } else {
            let mut v = Vec::with_capacity(k);
            for ci in 0..cg {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (ry, rx) = (ky * dh % sh, kx * dw % sw);
                        v.push(((ci * sh + ry) * sw + rx) * plane + ky * dh / sh * wq + kx * dw / sw);
                    }
                }
            }
            v
        };
        if let Some(pf) = plan_filter.filter(|_| p < FEW_PIXELS) {
            if let Some(r) = self.dense_few_pixels(x, bias, pf, (!pointwise).then_some((hq, wq, offs.as_slice()))) {
                return Some(r.map(|mut v| {
                    if let Some(c) = clamp {
                        clamp_slice(&mut v, c);
                    }
                    v
                }));
            }
        }
        let nq = if pointwise { p } else { self.oh * wq };
        let mut out = vec![0f32; self.n * self.m * p];
        // The last plane's discarded columns read up to wq floats past it.
        let mut phases = if pointwise {
            Vec::new()
        } else {
            vec![0f32; cg * sh * sw * plane + wq]
        };
        let mut cbuf = if pointwise { Vec::new() } else { vec![0f32; mg * nq] };
        let err = |e: crate::sgemm::GemmError| crate::RuntimeError::msg(e.to_string());
        for b in 0..self.n {
            for (gi, pa) in packed.iter().enumerate() {
                let plane0 = (b * self.c + gi * cg) * self.h * self.w;
                let xin = &x[plane0..plane0 + cg * self.h * self.w];
                let bias_g = bias.map(|bs| &bs[gi * mg..(gi + 1) * mg]);
                let dst = &mut out[(b * self.m + gi * mg) * p..(b * self.m + (gi + 1) * mg) * p];
                let r = if pointwise {
                    gemm_packed_a_rows(
                        pa,
                        RowsB {
                            data: xin,
                            offs: &offs,
                            n: p,
                        },
                        bias_g,
                        clamp,
                        dst,
                        p,
                    )
                } else {
                    self.fill_phases(xin, cg, hq, wq, &mut phases);
                    let r = gemm_packed_a_rows(
                        pa,
                        RowsB {
                            data: &phases,
                            offs: &offs,
                            n: nq,
                        },
                        bias_g,
                        clamp,
                        &mut cbuf,
                        nq,
                    );
                    for (drow, crow) in dst.chunks_exact_mut(self.ow).zip(cbuf.chunks_exact(wq)) {
                        drow.copy_from_slice(&crow[..self.ow]);
                    }
                    r
                };
                if let Err(e) = r {
                    return Some(Err(err(e)));
                }
            }
        }
        Some(Ok(out))
    }

    /// `dense_rows` for a handful of output pixels: `C^T = im2col^T · W^T` through the packed-B GEMM
    /// (its few-rows path streams each filter panel once), then transposed into the output. `phased`:
    /// `dense_rows`'s phase-plane geometry and im2col row offsets (`None` for a pointwise conv, whose
    /// input planes are read as they are). `None` when `W^T` could not be packed.
    fn dense_few_pixels(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        pf: &PackedFilter,
        phased: Option<(usize, usize, &[usize])>,
    ) -> Option<Result<Vec<f32>>> {
        use crate::sgemm::{gemm_packed_b, gemm_packed_b_seq, Bias, MatRef, PackedB};
        let g = self.group;
        let (cg, mg) = (self.c / g, self.m / g);
        let k = cg * self.kh * self.kw;
        let p = self.oh * self.ow;
        let tb = pf.transposed.get_or_init(|| {
            // From the packed filter itself: the plan may hold no other copy of the weight.
            let wv = pf.weight_values();
            (0..g)
                .map(|gi| {
                    let wg = &wv[gi * mg * k..(gi + 1) * mg * k];
                    // Element (kk, oc) of W^T is wg[oc * k + kk].
                    PackedB::pack(MatRef {
                        data: wg,
                        rows: k,
                        cols: mg,
                        rs: 1,
                        cs: k,
                    })
                    .ok()
                })
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default()
        });
        if tb.len() != g {
            return None;
        }
        let (sh, sw) = self.stride;
        let mut phases = match phased {
            Some((hq, wq, _)) => vec![0f32; cg * sh * sw * hq * wq + wq],
            None => Vec::new(),
        };
        let mut at = vec![0f32; p * k];
        let mut ct = vec![0f32; p * mg];
        let mut out = vec![0f32; self.n * self.m * p];
        for b in 0..self.n {
            for (gi, pb) in tb.iter().enumerate() {
                let plane0 = (b * self.c + gi * cg) * self.h * self.w;
                let xin = &x[plane0..plane0 + cg * self.h * self.w];
                let a = match phased {
                    // Element (pixel, ci) of im2col^T is xin[ci * p + pixel].
                    None => MatRef {
                        data: xin,
                        rows: p,
                        cols: k,
                        rs: 1,
                        cs: p,
                    },
                    Some((hq, wq, offs)) => {
                        self.fill_phases(xin, cg, hq, wq, &mut phases);
                        // Row `pix` of im2col^T: each tap's value at the pixel's place in its plane.
                        for (pix, row) in at.chunks_exact_mut(k).enumerate() {
                            let j = pix / self.ow * wq + pix % self.ow;
                            for (v, &off) in row.iter_mut().zip(offs) {
                                *v = phases[off + j];
                            }
                        }
                        MatRef::row_major(&at, p, k)
                    }
                };
                let bias_g = bias.map_or(Bias::None, |bs| Bias::PerCol(&bs[gi * mg..(gi + 1) * mg]));
                // A handful of pixels is little work: waking the pool costs more than it saves.
                let r = if p * k * mg < 1 << 22 {
                    gemm_packed_b_seq(a, pb, bias_g, &mut ct, mg)
                } else {
                    gemm_packed_b(a, pb, bias_g, &mut ct, mg)
                };
                if let Err(e) = r {
                    return Some(Err(crate::RuntimeError::msg(e.to_string())));
                }
                let dst = &mut out[(b * self.m + gi * mg) * p..(b * self.m + (gi + 1) * mg) * p];
                for (oc, drow) in dst.chunks_exact_mut(p).enumerate() {
                    for (pix, d) in drow.iter_mut().enumerate() {
                        *d = ct[pix * mg + oc];
                    }
                }
            }
        }
        Some(Ok(out))
    }

    /// Writes the `cg` channels of `xin` as phase planes (see `dense_rows`) into `buf`.
    fn fill_phases(&self, xin: &[f32], cg: usize, hq: usize, wq: usize, buf: &mut [f32]) {
        let (h, w) = (self.h, self.w);
        let (sh, sw) = self.stride;
        let (pt, pl) = self.pad;
        let plane = hq * wq;
        let fill = |(ci, dst): (usize, &mut [f32])| {
            let src = &xin[ci * h * w..(ci + 1) * h * w];
            for ry in 0..sh {
                for rx in 0..sw {
                    let ph = &mut dst[(ry * sw + rx) * plane..][..plane];
                    for (yq, drow) in ph.chunks_exact_mut(wq).enumerate() {
                        let iy = (yq * sh + ry) as isize - pt as isize;
                        if iy < 0 || iy >= h as isize {
                            drow.fill(0.0);
                            continue;
                        }
                        let srow = &src[iy as usize * w..][..w];
                        phase_row(srow, drow, sw, rx, pl);
                    }
                }
            }
        };
        let per = sh * sw * plane;
        let body = &mut buf[..cg * per];
        if cg * per >= 1 << 16 {
            body.par_chunks_mut(per).enumerate().for_each(fill);
        } else {
            body.chunks_mut(per).enumerate().for_each(fill);
        }
    }

    fn dense(&self, x: &[f32], w: &CT, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let g = self.group;
        let (cg, mg) = (self.c / g, self.m / g);
        let k = cg * self.kh * self.kw;
        let p = self.oh * self.ow;
        let mut out = vec![0f32; self.n * self.m * p];
        let w2 = w.reshape((self.m, k))?;
        let pointwise = self.kh == 1
            && self.kw == 1
            && self.stride == (1, 1)
            && self.pad == (0, 0)
            && self.oh == self.h
            && self.ow == self.w;
        // Packed kernels: the filter packed once per call, the input packed panel by panel straight
        // from the image (implicit im2col), the product written into `out` with the bias as its
        // initial value. Small outputs keep the paths below: several images per gemm, or, for a single
        // image with fewer than 64 output pixels, candle's gemm (packing the filter per call costs
        // M*K, too much against M*K*P when P is a handful of frames, as in Silero VAD's convs).
        let batched = p < 1024 && (TILE_COLS_BUDGET / (k * p).max(1)).clamp(1, self.n) > 1;
        if crate::sgemm::available() && !batched && p >= 64 {
            let done = with_f32(w, |wv| -> Result<()> {
                use crate::sgemm::{gemm_packed_a, gemm_packed_a_source, Bias, MatRef, PackedA};
                let err = |e: crate::sgemm::GemmError| crate::RuntimeError::msg(e.to_string());
                for gi in 0..g {
                    let wg = wv.get(gi * mg * k..(gi + 1) * mg * k).unwrap_or(&[]);
                    let pa = PackedA::pack(MatRef::row_major(wg, mg, k)).map_err(err)?;
                    let bias_g = bias.and_then(|bs| bs.get(gi * mg..(gi + 1) * mg));
                    let bias_g = bias_g.map_or(Bias::None, Bias::PerRow);
                    for b in 0..self.n {
                        let plane0 = (b * self.c + gi * cg) * self.h * self.w;
                        let xin = &x[plane0..plane0 + cg * self.h * self.w];
                        let c = &mut out[(b * self.m + gi * mg) * p..(b * self.m + (gi + 1) * mg) * p];
                        if pointwise {
                            gemm_packed_a(&pa, MatRef::row_major(xin, cg, p), bias_g, c, p).map_err(err)?;
                        } else {
                            let src = Im2col::new(self, xin, cg);
                            gemm_packed_a_source(&pa, &src, bias_g, c, p).map_err(err)?;
                        }
                    }
                }
                Ok(())
            });
            if let Some(r) = done {
                r?;
                return Ok(out);
            }
        }
        // Columns for image `b`'s channel slice `xin`, output rows oy0..oy1.
        let columns = |xin: &[f32], oy0: usize, oy1: usize| -> Vec<f32> {
            if pointwise {
                // Rows of the input plane are the columns; gather this tile's span.
                let tile = (oy1 - oy0) * self.ow;
                let mut v = Vec::with_capacity(cg * tile);
                for ci in 0..cg {
                    let base = ci * p + oy0 * self.ow;
                    v.extend_from_slice(&xin[base..base + tile]);
                }
                v
            } else {
                self.im2col(xin, cg, oy0, oy1)
            }
        };
        // Runs one gemm over `cols` ([k, imgs * rows * ow]: images b0.., output rows oy0..oy1 of
        // each) for group `gi` and writes the tile into `out`, adding the bias.
        let mut emit = |cols: Vec<f32>, gi: usize, b0: usize, imgs: usize, oy0: usize, oy1: usize| -> Result<()> {
            let span = (oy1 - oy0) * self.ow;
            let wg = if g == 1 { w2.clone() } else { w2.narrow(0, gi * mg, mg)? };
            let cols = CT::from_vec(cols, (k, imgs * span), w.device())?;
            let y = wg.matmul(&cols)?;
            let written = with_f32(&y, |ys| {
                for mi in 0..mg {
                    let oc = gi * mg + mi;
                    let bv = bias.map_or(0.0, |bs| bs[oc]);
                    for i in 0..imgs {
                        let dst0 = ((b0 + i) * self.m + oc) * p + oy0 * self.ow;
                        let dst = &mut out[dst0..dst0 + span];
                        let src0 = (mi * imgs + i) * span;
                        let src = &ys[src0..src0 + span];
                        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s + bv);
                    }
                }
            });
            if written.is_none() {
                crate::bail!("internal: gemm result is not a contiguous f32 tensor");
            }
            Ok(())
        };
        let plane = |b: usize, gi: usize| {
            let plane0 = (b * self.c + gi * cg) * self.h * self.w;
            &x[plane0..plane0 + cg * self.h * self.w]
        };
        // Small outputs (1-D convs over short frames, late CNN stages): several images per gemm,
        // so the gemm is not dominated by its fixed cost.
        let imgs_per_tile = (TILE_COLS_BUDGET / (k * p).max(1)).clamp(1, self.n);
        if p < 1024 && imgs_per_tile > 1 {
            for gi in 0..g {
                let mut b0 = 0;
                while b0 < self.n {
                    let imgs = imgs_per_tile.min(self.n - b0);
                    let mut cols = vec![0f32; k * imgs * p];
                    for i in 0..imgs {
                        let one = columns(plane(b0 + i, gi), 0, self.oh);
                        for (r, src) in one.chunks_exact(p).enumerate() {
                            let at = (r * imgs + i) * p;
                            cols[at..at + p].copy_from_slice(src);
                        }
                    }
                    emit(cols, gi, b0, imgs, 0, self.oh)?;
                    b0 += imgs;
                }
            }
            return Ok(out);
        }
        // Whole output rows per tile.
        let rows = (TILE_COLS_BUDGET / (k * self.ow).max(1)).clamp(1, self.oh.max(1));
        for b in 0..self.n {
            for gi in 0..g {
                let xin = plane(b, gi);
                let mut oy0 = 0;
                while oy0 < self.oh {
                    let oy1 = (oy0 + rows).min(self.oh);
                    emit(columns(xin, oy0, oy1), gi, b, 1, oy0, oy1)?;
                    oy0 = oy1;
                }
            }
        }
        Ok(out)
    }

    /// im2col rows `(ci, ky, kx)` x columns `(oy in oy0..oy1, ox)`, zeros where the window
    /// hangs over the padding.
    fn im2col(&self, xin: &[f32], cg: usize, oy0: usize, oy1: usize) -> Vec<f32> {
        let (h, w, ow) = (self.h, self.w, self.ow);
        let (kh, kw) = (self.kh, self.kw);
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dil;
        let (pt, pl) = self.pad;
        let tile = (oy1 - oy0) * ow;
        let mut cols = vec![0f32; cg * kh * kw * tile];
        let fill = |(r, dst): (usize, &mut [f32])| {
            let ci = r / (kh * kw);
            let ky = (r / kw) % kh;
            let kx = r % kw;
            let src = &xin[ci * h * w..(ci + 1) * h * w];
            let off = (kx * dw) as isize - pl as isize;
            let (lo, hi) = valid_range(off, sw, w, ow);
            for oy in oy0..oy1 {
                let iy = (oy * sh + ky * dh) as isize - pt as isize;
                if iy < 0 || iy >= h as isize || lo >= hi {
                    continue;
                }
                let irow = &src[iy as usize * w..(iy as usize + 1) * w];
                let drow = &mut dst[(oy - oy0) * ow..(oy - oy0 + 1) * ow];
                if sw == 1 {
                    let start = (lo as isize + off) as usize;
                    drow[lo..hi].copy_from_slice(&irow[start..start + (hi - lo)]);
                } else {
                    for ox in lo..hi {
                        drow[ox] = irow[(ox as isize * sw as isize + off) as usize];
                    }
                }
            }
        };
        // Short rows are not worth a task each.
        if tile >= 256 {
            cols.par_chunks_mut(tile).enumerate().for_each(fill);
        } else {
            cols.chunks_mut(tile).enumerate().for_each(fill);
        }
        cols
    }
}

/// One image's (one group's) implicit im2col for the packed GEMM: row `(ci, ky, kx)`, column
/// `oy * ow + ox`, zero where the window hangs over the padding.
struct Im2col<'a> {
    x: &'a [f32],
    cv: &'a Conv2d,
    /// Per row: (offset of plane ci, ky * dh - pad top, kx * dw - pad left).
    taps: Vec<(usize, isize, isize)>,
}

impl<'a> Im2col<'a> {
    fn new(cv: &'a Conv2d, x: &'a [f32], cg: usize) -> Self {
        let mut taps = Vec::with_capacity(cg * cv.kh * cv.kw);
        for ci in 0..cg {
            for ky in 0..cv.kh {
                for kx in 0..cv.kw {
                    let dy = (ky * cv.dil.0) as isize - cv.pad.0 as isize;
                    let dx = (kx * cv.dil.1) as isize - cv.pad.1 as isize;
                    taps.push((ci * cv.h * cv.w, dy, dx));
                }
            }
        }
        Im2col { x, cv, taps }
    }
}

impl crate::sgemm::PanelSource for Im2col<'_> {
    fn rows(&self) -> usize {
        self.taps.len()
    }
    fn cols(&self) -> usize {
        self.cv.oh * self.cv.ow
    }
    fn pack_panel(&self, k0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        const NR: usize = crate::sgemm::NR;
        dst[..kc * NR].fill(0.0);
        let (h, w, ow) = (self.cv.h as isize, self.cv.w, self.cv.ow);
        let (sh, sw) = (self.cv.stride.0 as isize, self.cv.stride.1 as isize);
        let mut j = j0;
        // Columns in runs that share an output row.
        while j < j0 + nr {
            let (oy, ox0) = (j / ow, j % ow);
            let run = (ow - ox0).min(j0 + nr - j);
            let col = j - j0;
            for (p, &(base, dy, dx)) in self.taps[k0..k0 + kc].iter().enumerate() {
                let iy = oy as isize * sh + dy;
                if iy < 0 || iy >= h {
                    continue;
                }
                let row = &self.x[base + iy as usize * w..base + (iy as usize + 1) * w];
                let d = &mut dst[p * NR + col..p * NR + col + run];
                let start = ox0 as isize + dx;
                if sw == 1 && run == NR && start >= 0 && start as usize + NR <= w {
                    // The common case, a whole panel row inside the image: a fixed-size copy the
                    // compiler turns into two vector moves (a memcpy call per 16 floats cost as much
                    // as the FMAs that use them).
                    let s0 = start as usize;
                    if let (Ok(dd), Ok(ss)) = (<&mut [f32; NR]>::try_from(d), <&[f32; NR]>::try_from(&row[s0..s0 + NR]))
                    {
                        *dd = *ss;
                    }
                } else if sw == 1 {
                    let lo = (-start).max(0) as usize;
                    let hi = ((w as isize - start).max(0) as usize).min(run);
                    if lo < hi {
                        let s0 = (start + lo as isize) as usize;
                        d[lo..hi].copy_from_slice(&row[s0..s0 + (hi - lo)]);
                    }
                } else {
                    for (t, v) in d.iter_mut().enumerate() {
                        let ix = (ox0 + t) as isize * sw + dx;
                        if ix >= 0 && ix < w as isize {
                            *v = row[ix as usize];
                        }
                    }
                }
            }
            j += run;
        }
    }
}

/// A conv filter `[M, C/g, KH, KW]` packed once per group (`[M/g, C/g*KH*KW]` each) for
/// [`crate::sgemm::gemm_packed_a_rows`]; built at plan time for a constant weight.
pub(crate) struct PackedFilter {
    groups: Vec<crate::sgemm::PackedA>,
    /// Each group's `W^T` (`[C/g*KH*KW, M/g]`) as a packed right operand, made on the first call with
    /// fewer than [`FEW_PIXELS`] output pixels (empty when packing failed).
    transposed: std::sync::OnceLock<Vec<crate::sgemm::PackedB>>,
}

/// Output pixels below which a conv with a plan-time filter runs as `im2col^T · W^T` (pixels as the
/// GEMM's rows, each filter panel streamed once for all of them) instead of `W · im2col`, whose
/// 32-column tiles would be mostly empty (Silero VAD's 1-D convs have 2-4 output frames).
const FEW_PIXELS: usize = 24;

impl PackedFilter {
    /// Packs a constant weight for `group` groups; `None` when the CPU lacks the kernel or the
    /// weight is depthwise (each group one row: `conv_dw.rs` runs those).
    pub(crate) fn new(wv: &[f32], dims: &[usize], group: usize) -> Option<PackedFilter> {
        let m = *dims.first()?;
        if !crate::sgemm::rows_available() || group == 0 || !m.is_multiple_of(group) || m / group < 2 {
            return None;
        }
        let k: usize = dims[1..].iter().product();
        if wv.len() != m * k {
            return None;
        }
        Self::pack_groups(wv, group, m / group, k)
            .ok()
            .map(|groups| PackedFilter {
                groups,
                transposed: std::sync::OnceLock::new(),
            })
    }

    /// The filter back as its `[M, C/g * KH * KW]` values (groups in order), from the packed copy.
    pub(crate) fn weight_values(&self) -> Vec<f32> {
        self.groups.iter().flat_map(crate::sgemm::PackedA::unpack).collect()
    }

    /// Bytes of the packed groups (the transposed copy made for few-pixel calls not counted).
    pub(crate) fn bytes(&self) -> usize {
        self.groups.iter().map(crate::sgemm::PackedA::bytes).sum()
    }

    fn pack_groups(wv: &[f32], g: usize, mg: usize, k: usize) -> Result<Vec<crate::sgemm::PackedA>> {
        use crate::sgemm::{MatRef, PackedA};
        (0..g)
            .map(|gi| {
                let wg = wv.get(gi * mg * k..(gi + 1) * mg * k).unwrap_or(&[]);
                PackedA::pack(MatRef::row_major(wg, mg, k)).map_err(|e| crate::RuntimeError::msg(e.to_string()))
            })
            .collect()
    }

    fn fits(&self, g: usize, mg: usize, k: usize) -> bool {
        self.groups.len() == g && self.groups.iter().all(|pa| pa.m() == mg && pa.k() == k)
    }
}

/// A bias tensor's values: `Some(None)` without a bias, `None` when it is not a contiguous f32 CPU
/// tensor of `m` values (the caller then takes its general path, which reports a bad length).
pub(crate) fn bias_values(bias: Option<&CT>, m: usize) -> Option<Option<Vec<f32>>> {
    match bias {
        None => Some(None),
        Some(b) => with_f32(b, |s| s.to_vec()).filter(|v| v.len() == m).map(Some),
    }
}

/// `v = min(max(v, lo), hi)` in place (NaN becomes `lo`, as `f32::max` gives).
pub(crate) fn clamp_slice(v: &mut [f32], (lo, hi): (f32, f32)) {
    v.iter_mut().for_each(|x| *x = x.max(lo).min(hi));
}

/// Phase `rx` of one padded input row: `drow[q] = srow[q * sw + rx - pl]`, zero where that column
/// lies outside the row.
pub(crate) fn phase_row(srow: &[f32], drow: &mut [f32], sw: usize, rx: usize, pl: usize) {
    let (lo, hi) = valid_range(rx as isize - pl as isize, sw, srow.len(), drow.len());
    drow[..lo].fill(0.0);
    drow[hi..].fill(0.0);
    if lo == hi {
        return;
    }
    let start = lo * sw + rx - pl;
    let dst = &mut drow[lo..hi];
    if sw == 1 {
        dst.copy_from_slice(&srow[start..start + dst.len()]);
    } else if sw == 2 {
        let src = &srow[start..];
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm::use_avx512() {
            // SAFETY: `use_avx512` checked the CPU.
            unsafe { evens_masked(src, dst) };
            return;
        }
        // Pairs: the compiler turns this into vector shuffles (step_by stays scalar).
        let pairs = dst.len().min(src.len() / 2);
        for (d, s) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
            *d = s[0];
        }
        if pairs < dst.len() {
            dst[pairs] = src[2 * pairs];
        }
    } else {
        for (d, &v) in dst.iter_mut().zip(srow[start..].iter().step_by(sw)) {
            *d = v;
        }
    }
}

/// `dst[i] = src[2 * i]` for every `i < dst.len()` (`src` holds at least `2 * dst.len() - 1` floats):
/// 16 outputs per step from two (masked) loads and one permutation, the row's end masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn evens_masked(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = dst.len();
    assert!(n == 0 || src.len() > 2 * (n - 1), "evens_masked: src too short");
    let idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mask = |k: usize| {
        if k >= 16 {
            0xffff
        } else {
            ((1u32 << k) - 1) as __mmask16
        }
    };
    let mut i = 0;
    while i < n {
        let m = (n - i).min(16);
        let take = (src.len() - 2 * i).min(32);
        // SAFETY: the loads read src[2i .. 2i + take] (lanes past `take` are masked off, and a
        // masked-off lane is never accessed), the store writes dst[i .. i + m].
        unsafe {
            let base = src.as_ptr().add(2 * i);
            let lo = _mm512_maskz_loadu_ps(mask(take.min(16)), base);
            let hi = _mm512_maskz_loadu_ps(mask(take.saturating_sub(16)), base.wrapping_add(16));
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask(m), _mm512_permutex2var_ps(lo, idx, hi));
        }
        i += m;
    }
}

/// The output columns `ox` whose input column `ox * stride + off` lies inside `0..width`
/// (`lo == hi` when there are none).
pub(crate) fn valid_range(off: isize, stride: usize, width: usize, ow: usize) -> (usize, usize) {
    let s = stride as isize;
    // ox * s + off >= 0  <=>  ox >= ceil(-off / s)
    let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
    // ox * s + off <= width - 1  <=>  ox <= floor((width - 1 - off) / s)
    let last = width as isize - 1 - off;
    let hi = if last < 0 { 0 } else { last / s + 1 };
    let lo = (lo as usize).min(ow);
    (lo, (hi as usize).clamp(lo, ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference: the textbook 7-loop convolution in f64.
    fn reference(cv: &Conv2d, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let (cg, mg) = (cv.c / cv.group, cv.m / cv.group);
        let mut out = vec![0f32; cv.n * cv.m * cv.oh * cv.ow];
        for n in 0..cv.n {
            for oc in 0..cv.m {
                let gi = oc / mg;
                for oy in 0..cv.oh {
                    for ox in 0..cv.ow {
                        let mut acc = b.map_or(0.0, |b| b[oc] as f64);
                        for ci in 0..cg {
                            for ky in 0..cv.kh {
                                for kx in 0..cv.kw {
                                    let iy = (oy * cv.stride.0 + ky * cv.dil.0) as isize - cv.pad.0 as isize;
                                    let ix = (ox * cv.stride.1 + kx * cv.dil.1) as isize - cv.pad.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= cv.h as isize || ix >= cv.w as isize {
                                        continue;
                                    }
                                    let xi = ((n * cv.c + gi * cg + ci) * cv.h + iy as usize) * cv.w + ix as usize;
                                    let wi = ((oc * cg + ci) * cv.kh + ky) * cv.kw + kx;
                                    acc += x[xi] as f64 * w[wi] as f64;
                                }
                            }
                        }
                        out[((n * cv.m + oc) * cv.oh + oy) * cv.ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn case(
        n: usize,
        c: usize,
        hw: (usize, usize),
        m: usize,
        k: (usize, usize),
        g: usize,
        s: usize,
        d: usize,
        p: (usize, usize, usize, usize),
    ) {
        let (h, w) = hw;
        let oh = (h + p.0 + p.2 - ((k.0 - 1) * d + 1)) / s + 1;
        let ow = (w + p.1 + p.3 - ((k.1 - 1) * d + 1)) / s + 1;
        let cv = Conv2d {
            n,
            c,
            h,
            w,
            m,
            kh: k.0,
            kw: k.1,
            group: g,
            stride: (s, s),
            dil: (d, d),
            pad: (p.0, p.1),
            oh,
            ow,
        };
        let xv: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
            .collect();
        let wv: Vec<f32> = (0..m * (c / g) * k.0 * k.1)
            .map(|i| ((i * 104_729 % 97) as f32 - 48.0) / 40.0)
            .collect();
        let bv: Vec<f32> = (0..m).map(|i| i as f32 * 0.25 - 1.0).collect();
        let dev = Device::Cpu;
        let x = CT::from_vec(xv.clone(), (n, c, h, w), &dev).expect("x");
        let wt = CT::from_vec(wv.clone(), (m, c / g, k.0, k.1), &dev).expect("w");
        let b = CT::from_vec(bv.clone(), m, &dev).expect("b");
        let want = reference(&cv, &xv, &wv, Some(&bv));
        // The filter packed per call, then at plan time (few output pixels take `W^T` then).
        let plan = PackedFilter::new(&wv, &[m, c / g, k.0, k.1], g);
        // And with a fused clamp (Relu / Clip), in the kernels' epilogues.
        let runs = [
            (None, None),
            (plan.as_ref(), None),
            (plan.as_ref(), Some((-0.3f32, 0.8f32))),
            (None, Some((0.0, f32::INFINITY))),
        ];
        for (packed, clamp) in runs {
            // With the plan-time filter, also without the weight tensor (the plan consumed it).
            let got = match packed {
                Some(_) if cv.group != cv.c => cv.run(&x, None, Some(&b), packed, clamp),
                _ => cv.run(&x, Some(&wt), Some(&b), packed, clamp),
            };
            let got = got.expect("handled").expect("ok");
            assert_eq!(got.dims(), &[n, m, oh, ow]);
            let got: Vec<f32> = got.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
            let how = if packed.is_some() {
                "plan-time filter"
            } else {
                "per call"
            };
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let b = clamp.map_or(*b, |(lo, hi)| b.max(lo).min(hi));
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{cv:?} ({how}, clamp {clamp:?}) at {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn dense_convs_match_reference() {
        case(1, 3, (9, 11), 4, (3, 3), 1, 1, 1, (1, 1, 1, 1));
        case(2, 5, (8, 8), 6, (3, 3), 1, 2, 1, (1, 1, 1, 1));
        case(1, 4, (10, 7), 3, (5, 3), 1, 1, 2, (2, 0, 3, 1));
        case(1, 8, (6, 6), 8, (1, 1), 1, 1, 1, (0, 0, 0, 0));
        case(2, 3, (7, 5), 2, (1, 1), 1, 2, 1, (0, 0, 0, 0));
        case(1, 2, (3, 3), 2, (3, 3), 1, 3, 1, (2, 2, 2, 2));
        // Several images per gemm (small outputs): dense, pointwise, grouped.
        case(3, 4, (5, 6), 6, (3, 3), 1, 1, 1, (1, 1, 1, 1));
        case(3, 8, (4, 4), 5, (1, 1), 1, 1, 1, (0, 0, 0, 0));
        case(4, 4, (1, 9), 6, (1, 3), 2, 2, 1, (0, 1, 0, 1));
        // Packed-kernel path (large outputs): padding on every side, stride 2, k over one block
        // (96 * 9 = 864), pointwise over two images, groups, dilation, odd widths.
        case(1, 16, (40, 37), 24, (3, 3), 1, 1, 1, (1, 1, 1, 1));
        case(1, 3, (64, 63), 16, (3, 3), 1, 2, 1, (1, 1, 1, 1));
        case(1, 96, (20, 21), 24, (3, 3), 1, 1, 1, (1, 1, 1, 1));
        case(2, 32, (33, 33), 40, (1, 1), 1, 1, 1, (0, 0, 0, 0));
        case(1, 8, (32, 35), 8, (3, 3), 2, 1, 2, (2, 2, 2, 2));
        case(1, 5, (30, 50), 7, (2, 5), 1, 3, 1, (0, 2, 1, 0));
        // Few output pixels (the W^T path with a plan-time filter): 1-D-like rows, pointwise,
        // strided, dilated, grouped, several images.
        case(1, 9, (1, 8), 20, (1, 3), 1, 2, 1, (0, 1, 0, 1));
        case(2, 12, (2, 3), 14, (1, 1), 1, 1, 1, (0, 0, 0, 0));
        case(1, 6, (5, 5), 8, (3, 3), 2, 2, 1, (1, 1, 1, 1));
        case(3, 4, (4, 6), 6, (2, 2), 1, 1, 2, (1, 0, 0, 1));
    }

    #[test]
    fn grouped_and_depthwise_convs_match_reference() {
        case(1, 6, (9, 9), 4, (3, 3), 2, 1, 1, (1, 1, 1, 1));
        case(2, 8, (10, 9), 8, (3, 3), 8, 1, 1, (1, 1, 1, 1));
        case(1, 6, (11, 11), 6, (5, 5), 6, 2, 1, (2, 2, 2, 2));
        case(1, 4, (8, 8), 4, (3, 3), 4, 2, 2, (0, 1, 2, 0));
        case(1, 3, (4, 4), 3, (3, 3), 3, 1, 1, (0, 0, 0, 0));
        // Stride 2 over rows of several 16-lane blocks and a partial one, odd and even widths,
        // each side's padding 0-2, two images (the phase buffers are reused across planes).
        case(2, 5, (30, 67), 5, (3, 3), 5, 2, 1, (1, 1, 1, 1));
        case(1, 4, (21, 64), 4, (5, 5), 4, 2, 1, (2, 2, 2, 2));
        case(1, 3, (17, 45), 3, (3, 3), 3, 2, 1, (0, 2, 1, 0));
        case(2, 2, (9, 33), 2, (3, 3), 2, 2, 1, (1, 0, 0, 1));
    }

    /// Taps that read only padding for every output column (a 1x1 or width-1 input under a 3x3
    /// kernel with pad 1, a kernel wider than the padded input row): the tap adds nothing. Such
    /// taps once computed a negative start index and panicked.
    #[test]
    fn taps_wholly_in_the_padding_are_skipped() {
        // Depthwise, 1x1 image (the mobile CNN case) and width 1 (the VAD case), stride 1 and 2.
        case(1, 4, (1, 1), 4, (3, 3), 4, 1, 1, (1, 1, 1, 1));
        case(2, 3, (5, 1), 3, (3, 3), 3, 1, 1, (1, 1, 1, 1));
        case(1, 3, (1, 1), 3, (3, 3), 3, 2, 1, (1, 1, 1, 1));
        case(1, 2, (1, 2), 2, (5, 5), 2, 2, 1, (2, 2, 2, 2));
        case(1, 2, (3, 1), 2, (3, 3), 2, 1, 2, (2, 2, 2, 2));
        // Dense and grouped convs over the same degenerate images.
        case(1, 3, (1, 1), 4, (3, 3), 1, 1, 1, (1, 1, 1, 1));
        case(1, 4, (1, 1), 4, (3, 3), 2, 2, 1, (1, 1, 1, 1));
        case(1, 2, (2, 1), 3, (5, 5), 1, 1, 1, (2, 2, 2, 2));
    }

    /// The stride-2 column split, every length around the 16-lane blocks, from sources as short as
    /// allowed (`2n - 1`) and one longer.
    #[test]
    fn phase_row_at_stride_two_takes_every_other_column() {
        for n in 0..40usize {
            for extra in [0, 1, 2] {
                let len = (2 * n).saturating_sub(1) + extra;
                let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
                let mut dst = vec![f32::NAN; n + 3];
                // The odd phase (column 2 * ox + 1); columns past the row's end are zero.
                let width = len.min(2 * n + 1);
                phase_row(&src[..width], &mut dst, 2, 1, 0);
                let want: Vec<f32> = (0..n + 3)
                    .map(|ox| if 2 * ox + 1 < width { (2 * ox + 1) as f32 } else { 0.0 })
                    .collect();
                assert_eq!(dst, want, "n {n} extra {extra}");
                #[cfg(target_arch = "x86_64")]
                if crate::sgemm::use_avx512() && len + 1 >= 2 * n {
                    let mut got = vec![f32::NAN; n];
                    // SAFETY: use_avx512 checked the CPU.
                    unsafe { evens_masked(&src, &mut got) };
                    let want: Vec<f32> = (0..n).map(|i| (2 * i) as f32).collect();
                    assert_eq!(got, want, "evens_masked n {n} extra {extra}");
                }
            }
        }
    }

    #[test]
    fn valid_range_clips_both_ends() {
        assert_eq!(valid_range(-1, 1, 5, 5), (1, 5));
        assert_eq!(valid_range(1, 1, 5, 5), (0, 4));
        assert_eq!(valid_range(-2, 2, 5, 3), (1, 3));
        assert_eq!(valid_range(-10, 1, 5, 5), (5, 5));
        assert_eq!(valid_range(10, 1, 5, 5), (0, 0));
    }
}
