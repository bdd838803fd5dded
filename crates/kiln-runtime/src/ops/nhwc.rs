//! f32 CPU kernels for 2-D window operations on channels-last (NHWC) tensors: depthwise
//! convolution (channel multiplier 1), im2col rows for a GEMM convolution, MaxPool, AveragePool
//! and GlobalAveragePool.
//!
//! Every kernel vectorizes across channels: for one output pixel and one tap, the `c` input
//! channels, the `c` weights of the tap and the `c` outputs are contiguous. Output rows are
//! computed one at a time (in parallel over rows when there is enough work): the columns whose
//! whole window lies inside the image run in blocks of 8 (or 4) pixels, each holding one vector of
//! accumulators per pixel in registers across all taps, so a depthwise tap costs one weight load
//! for 8 FMAs; the border columns run one pixel at a time over their own range of valid taps, so
//! no tap ever reads padding. Channel tails use masked loads and stores.
//!
//! The vector code is one generic body ([`Simd`]) built for AVX-512F and for AVX2+FMA and chosen
//! at run time ([`Isa::detect`]); a plain loop that compiles anywhere (and that the compiler
//! vectorizes for the baseline ISA) covers other CPUs.

use rayon::prelude::*;

/// Geometry of a 2-D window over NHWC data: input [n, h, w, c], output [n, oh, ow, c_out].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub dil: (usize, usize),
    /// (top, left) padding; bottom/right only shape oh/ow, which the caller computed.
    pub pad: (usize, usize),
    pub oh: usize,
    pub ow: usize,
}

/// Work (multiply-adds or compares, summed over the batch) from which rows run in parallel.
const PARALLEL_MIN_WORK: usize = 1 << 17;

impl Window {
    /// Taps `[lo, hi)` of the vertical window of output row `oy` that land inside the image.
    fn ky_range(&self, oy: usize) -> (usize, usize) {
        taps(oy, self.stride.0, self.dil.0, self.pad.0, self.kh, self.h)
    }

    /// Taps `[lo, hi)` of the horizontal window of output column `ox` that land inside the image.
    fn kx_range(&self, ox: usize) -> (usize, usize) {
        taps(ox, self.stride.1, self.dil.1, self.pad.1, self.kw, self.w)
    }

    /// Output columns `[a, b)` whose every horizontal tap lands inside the image (a contiguous
    /// range: `ox * sw >= pl` and `ox * sw + (kw - 1) * dw < w + pl`).
    fn interior_cols(&self) -> (usize, usize) {
        let (sw, dw, pl) = (self.stride.1.max(1), self.dil.1, self.pad.1);
        let span = self.kw.saturating_sub(1).saturating_mul(dw);
        let b = match (self.w + pl).checked_sub(span + 1) {
            Some(last) => (last / sw + 1).min(self.ow),
            None => 0,
        };
        (pl.div_ceil(sw).min(b), b)
    }

    fn image_len(&self) -> usize {
        self.h * self.w * self.c
    }

    fn row_len(&self) -> usize {
        self.ow * self.c
    }
}

/// Taps `k` in `[lo, hi)` (of `kernel`) for which `o * stride + k * dil - pad` lies in `[0, len)`.
fn taps(o: usize, stride: usize, dil: usize, pad: usize, kernel: usize, len: usize) -> (usize, usize) {
    let dil = dil.max(1);
    let base = o.saturating_mul(stride);
    let lo = pad.saturating_sub(base).div_ceil(dil);
    // base + k * dil < len + pad  <=>  k < ceil((len + pad - base) / dil)
    let hi = (len + pad).saturating_sub(base).div_ceil(dil).min(kernel);
    (lo.min(hi), hi)
}

/// The instruction set the vector kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Constructed only after the CPU was found to support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// Constructed only after the CPU was found to support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::sgemm::use_avx512() {
                return Isa::Avx512;
            }
            if crate::fastmath::has_avx2_fma() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every ISA this CPU runs (for tests that compare them all).
    #[cfg(test)]
    fn all() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::fastmath::has_avx2_fma() {
                v.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

/// Splits `out` into output rows (`ow * c` floats, `n * oh` of them) and calls `f(row_index, row)`
/// on each, in parallel when `work` is at least [`PARALLEL_MIN_WORK`].
fn for_rows(g: &Window, out: &mut [f32], work: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let rows = g.n * g.oh;
    let len = g.row_len();
    if len == 0 {
        (0..rows).for_each(|r| f(r, &mut []));
        return;
    }
    let out = &mut out[..rows * len];
    if work >= PARALLEL_MIN_WORK {
        out.par_chunks_mut(len).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(len).enumerate().for_each(|(r, row)| f(r, row));
    }
}

/// Depthwise conv (channel multiplier 1): out[n,oy,ox,ch] = bias[ch] + sum_{ky,kx} x[n, oy*sh - pt + ky*dh, ox*sw - pl + kx*dw, ch] * wt[(ky*kw + kx)*c + ch]
/// (taps outside the input contribute nothing). `wt` is [kh*kw][c] (tap-major, channel fastest).
/// `post(row_index, row)` is called once per finished output row: row_index = n_i*oh + oy, row = the ow*c outputs of that row,
/// while it is still in cache (the caller applies activations there). Parallel over rows with rayon when the work
/// (oh*ow*c*kh*kw multiply-adds summed over the batch) is at least 1<<17; otherwise on the calling thread.
pub(crate) fn depthwise(
    g: &Window,
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    depthwise_isa(Isa::detect(), g, x, wt, bias, out, post)
}

fn depthwise_isa(
    isa: Isa,
    g: &Window,
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    debug_assert_eq!(x.len(), g.n * g.image_len(), "depthwise: input length");
    debug_assert_eq!(wt.len(), g.kh * g.kw * g.c, "depthwise: weight length");
    debug_assert_eq!(out.len(), g.n * g.oh * g.row_len(), "depthwise: output length");
    debug_assert!(bias.is_none_or(|b| b.len() == g.c), "depthwise: bias length");
    let work = [g.n, g.oh, g.ow, g.c, g.kh, g.kw]
        .iter()
        .fold(1usize, |a, &v| a.saturating_mul(v));
    let (il, oh) = (g.image_len(), g.oh.max(1));
    for_rows(g, out, work, |r, row| {
        if !row.is_empty() {
            let xi = &x[(r / oh) * il..][..il];
            let op = DwRow::new(g, xi, wt, bias, r % oh, row);
            run_row(isa, op);
        }
        post(r, row);
    });
}

/// im2col rows for output pixels p0..p1 (p = oy*ow + ox) of image `img`: row r = p - p0 of `dst` (length (p1-p0)*k, k = kh*kw*c)
/// holds, for tap t = ky*kw + kx, the c input channels at that tap in dst[r*k + t*c .. r*k + (t+1)*c], zeros where the tap is in the padding.
pub(crate) fn im2col(g: &Window, x: &[f32], img: usize, p0: usize, p1: usize, dst: &mut [f32]) {
    let (c, w, kw) = (g.c, g.w, g.kw);
    let k = g.kh * kw * c;
    debug_assert_eq!(x.len(), g.n * g.image_len(), "im2col: input length");
    debug_assert_eq!(dst.len(), p1.saturating_sub(p0) * k, "im2col: destination length");
    if k == 0 || g.ow == 0 {
        return;
    }
    let il = g.image_len();
    let xi = &x[img * il..][..il];
    let dw = g.dil.1;
    for (r, row) in dst.chunks_exact_mut(k).take(p1.saturating_sub(p0)).enumerate() {
        let p = p0 + r;
        let (oy, ox) = (p / g.ow, p % g.ow);
        let (ky0, ky1) = g.ky_range(oy);
        let (kx0, kx1) = g.kx_range(ox);
        for (ky, seg) in row.chunks_exact_mut(kw * c).enumerate() {
            if ky < ky0 || ky >= ky1 || kx0 == kx1 {
                seg.fill(0.0);
                continue;
            }
            let iy = oy * g.stride.0 + ky * g.dil.0 - g.pad.0;
            let ix0 = ox * g.stride.1 + kx0 * dw - g.pad.1;
            let xr = &xi[iy * w * c..][..w * c];
            seg[..kx0 * c].fill(0.0);
            seg[kx1 * c..].fill(0.0);
            let body = &mut seg[kx0 * c..kx1 * c];
            if dw == 1 {
                // Consecutive taps read consecutive pixels: one run of channels.
                body.copy_from_slice(&xr[ix0 * c..][..body.len()]);
            } else {
                for (j, d) in body.chunks_exact_mut(c).enumerate() {
                    d.copy_from_slice(&xr[(ix0 + j * dw) * c..][..c]);
                }
            }
        }
    }
}

/// MaxPool. Padded taps are skipped (padding never wins); an output whose window holds no input
/// element (only possible with dilation) is `f32::NEG_INFINITY`.
///
/// NaN: an output is NaN when its window holds a NaN (the scalar rule is
/// `if v > m || v.is_nan() { m = v }`; the vector builds take `max(x, m)`, which keeps `m` when
/// either is NaN, and OR a per-lane "saw a NaN" flag into the result at the end). Note that
/// onnxruntime's x86 MLAS pool does not propagate NaN consistently (a later finite value can
/// replace it); this kernel always does.
pub(crate) fn max_pool(g: &Window, x: &[f32], out: &mut [f32]) {
    max_pool_isa(Isa::detect(), g, x, out)
}

fn max_pool_isa(isa: Isa, g: &Window, x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), g.n * g.image_len(), "max_pool: input length");
    debug_assert_eq!(out.len(), g.n * g.oh * g.row_len(), "max_pool: output length");
    let work = [g.n, g.oh, g.ow, g.c, g.kh, g.kw]
        .iter()
        .fold(1usize, |a, &v| a.saturating_mul(v));
    let (il, oh) = (g.image_len(), g.oh.max(1));
    for_rows(g, out, work, |r, row| {
        if !row.is_empty() {
            let xi = &x[(r / oh) * il..][..il];
            run_row(isa, PoolRow::new(g, xi, r % oh, Pool::Max, row));
        }
    });
}

/// AveragePool (ONNX semantics). `count_include_pad = false` divides by the number of in-bounds
/// taps; `true` by the number of taps inside the padded extent `[-pad_begin, len + pad_end)` of
/// each axis (so, with ceil_mode, taps beyond the padded end are not counted). `pad_end` is the
/// (bottom, right) padding. An output with nothing to divide by is NaN (0/0, the mean of an empty
/// set as in ONNX's reference), which valid ONNX geometries without dilation never produce.
pub(crate) fn avg_pool(g: &Window, pad_end: (usize, usize), count_include_pad: bool, x: &[f32], out: &mut [f32]) {
    avg_pool_isa(Isa::detect(), g, pad_end, count_include_pad, x, out)
}

fn avg_pool_isa(isa: Isa, g: &Window, pad_end: (usize, usize), include_pad: bool, x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), g.n * g.image_len(), "avg_pool: input length");
    debug_assert_eq!(out.len(), g.n * g.oh * g.row_len(), "avg_pool: output length");
    let work = [g.n, g.oh, g.ow, g.c, g.kh, g.kw]
        .iter()
        .fold(1usize, |a, &v| a.saturating_mul(v));
    let (il, oh) = (g.image_len(), g.oh.max(1));
    let pool = Pool::Avg {
        pad_end: if include_pad { Some(pad_end) } else { None },
    };
    for_rows(g, out, work, |r, row| {
        if !row.is_empty() {
            let xi = &x[(r / oh) * il..][..il];
            run_row(isa, PoolRow::new(g, xi, r % oh, pool, row));
        }
    });
}

/// GlobalAveragePool over [n, hw, c] -> [n, c] (mean over the hw rows, accumulated in f32 row by
/// row so it vectorizes across c). `hw == 0` gives NaN (0/0).
pub(crate) fn global_avg(n: usize, hw: usize, c: usize, x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), n * hw * c, "global_avg: input length");
    debug_assert_eq!(out.len(), n * c, "global_avg: output length");
    global_avg_isa(Isa::detect(), n, hw, c, x, out)
}

fn global_avg_isa(isa: Isa, n: usize, hw: usize, c: usize, x: &[f32], out: &mut [f32]) {
    if c == 0 {
        return;
    }
    if hw == 0 {
        out.iter_mut().take(n * c).for_each(|o| *o = f32::NAN);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` exists only when the CPU supports AVX-512F.
        Isa::Avx512 => unsafe { global_avg_avx512(n, hw, c, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` exists only when the CPU supports AVX2 and FMA.
        Isa::Avx2 => unsafe { global_avg_avx2(n, hw, c, x, out) },
        Isa::Portable => global_avg_body(n, hw, c, x, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn global_avg_avx512(n: usize, hw: usize, c: usize, x: &[f32], out: &mut [f32]) {
    global_avg_body(n, hw, c, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn global_avg_avx2(n: usize, hw: usize, c: usize, x: &[f32], out: &mut [f32]) {
    global_avg_body(n, hw, c, x, out)
}

/// Needs `hw > 0` and `c > 0`.
#[inline(always)]
fn global_avg_body(n: usize, hw: usize, c: usize, x: &[f32], out: &mut [f32]) {
    let div = hw as f32;
    for (xi, o) in x.chunks_exact(hw * c).zip(out.chunks_exact_mut(c)).take(n) {
        o.fill(0.0);
        for row in xi.chunks_exact(c) {
            for (a, &v) in o.iter_mut().zip(row) {
                *a += v;
            }
        }
        for a in o {
            *a /= div;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels.

/// One output row of one of the window operations, computed either by the portable loop or by the
/// vector body for `S`.
trait RowOp {
    fn window(&self) -> &Window;

    /// The whole row, plain Rust (any CPU).
    fn portable(&mut self);

    /// Output pixels `ox0 .. ox0 + P`, channels `cv .. cv + V * S::L` (`V` vectors; when not
    /// `FULL`, `V` is 1 and only the lanes `m` enables), over the horizontal taps `kx.0 .. kx.1`.
    ///
    /// # Safety
    /// The CPU supports `S`'s instructions; `ox0 + P <= ow`; for every pixel of the block, every
    /// tap in `kx` lands inside the image; `cv + V * S::L <= c` when `FULL`, else `V == 1` and
    /// `m` enables lanes `0 .. c - cv` only.
    unsafe fn pixels<S: Simd, const P: usize, const V: usize, const FULL: bool>(
        &mut self,
        ox0: usize,
        kx: (usize, usize),
        cv: usize,
        m: S::M,
    );
}

/// Runs one row on `isa`.
fn run_row<O: RowOp>(isa: Isa, mut op: O) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` exists only when the CPU supports AVX-512F.
        Isa::Avx512 => unsafe { row_avx512(&mut op) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` exists only when the CPU supports AVX2 and FMA.
        Isa::Avx2 => unsafe { row_avx2(&mut op) },
        Isa::Portable => op.portable(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<O: RowOp>(op: &mut O) {
    // SAFETY: the caller checked that the CPU supports AVX-512F.
    unsafe { drive_row::<x86::Avx512, O>(op) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<O: RowOp>(op: &mut O) {
    // SAFETY: the caller checked that the CPU supports AVX2 and FMA.
    unsafe { drive_row::<x86::Avx2, O>(op) }
}

/// Walks one output row: interior columns in blocks of 8 or 4 pixels over all `kw` taps (two
/// vectors of channels at a time), border columns one at a time over their valid taps (four
/// vectors at a time, for independent FMA chains).
///
/// # Safety
/// The CPU supports `S`'s instructions.
#[inline(always)]
unsafe fn drive_row<S: Simd, O: RowOp>(op: &mut O) {
    let g = *op.window();
    let (a, b) = g.interior_cols();
    let mut ox = 0;
    while ox < g.ow {
        // SAFETY: (for each call) the CPU supports S (our caller's promise); interior blocks lie in
        // [a, b), where all kw taps land in the image; border pixels use their own valid range.
        unsafe {
            if ox >= a && ox + 8 <= b {
                channels::<S, O, 8, 2>(op, &g, ox, (0, g.kw));
                ox += 8;
            } else if ox >= a && ox + 4 <= b {
                channels::<S, O, 4, 2>(op, &g, ox, (0, g.kw));
                ox += 4;
            } else {
                channels::<S, O, 1, 4>(op, &g, ox, g.kx_range(ox));
                ox += 1;
            }
        }
    }
}

/// Runs a pixel block over all channels: groups of `V` whole vectors, then single whole vectors,
/// then a masked tail.
///
/// # Safety
/// As [`RowOp::pixels`] minus the channel conditions, which this establishes.
#[inline(always)]
unsafe fn channels<S: Simd, O: RowOp, const P: usize, const V: usize>(
    op: &mut O,
    g: &Window,
    ox0: usize,
    kx: (usize, usize),
) {
    // SAFETY: the caller's promises plus: whole vectors stay below c, the tail's mask enables
    // exactly the c - cv remaining lanes.
    unsafe {
        let full = S::mask(S::L);
        let mut cv = 0;
        if V > 1 {
            while cv + V * S::L <= g.c {
                op.pixels::<S, P, V, true>(ox0, kx, cv, full);
                cv += V * S::L;
            }
        }
        while cv + S::L <= g.c {
            op.pixels::<S, P, 1, true>(ox0, kx, cv, full);
            cv += S::L;
        }
        if cv < g.c {
            op.pixels::<S, P, 1, false>(ox0, kx, cv, S::mask(g.c - cv));
        }
    }
}

/// Loads a vector at `p`, all lanes (`FULL`) or the lanes `m` enables (the others read as 0).
///
/// # Safety
/// The CPU supports `S`; the lanes loaded are readable.
#[inline(always)]
unsafe fn ld<S: Simd, const FULL: bool>(p: *const f32, m: S::M) -> S::V {
    // SAFETY: forwarded to the caller.
    unsafe {
        if FULL {
            S::load(p)
        } else {
            S::load_m(p, m)
        }
    }
}

/// Stores a vector at `p`, all lanes (`FULL`) or the lanes `m` enables.
///
/// # Safety
/// The CPU supports `S`; the lanes stored are writable.
#[inline(always)]
unsafe fn st<S: Simd, const FULL: bool>(p: *mut f32, v: S::V, m: S::M) {
    // SAFETY: forwarded to the caller.
    unsafe {
        if FULL {
            S::store(p, v)
        } else {
            S::store_m(p, v, m)
        }
    }
}

/// One depthwise output row.
struct DwRow<'a> {
    g: Window,
    /// This image, `h * w * c` floats.
    xi: &'a [f32],
    /// `kh * kw * c` floats.
    wt: &'a [f32],
    /// `c` floats.
    bias: Option<&'a [f32]>,
    oy: usize,
    /// Valid vertical taps of this row.
    ky: (usize, usize),
    /// `ow * c` floats.
    out: &'a mut [f32],
}

impl<'a> DwRow<'a> {
    /// Checks every length the unchecked vector loads rely on.
    fn new(g: &Window, xi: &'a [f32], wt: &'a [f32], bias: Option<&'a [f32]>, oy: usize, out: &'a mut [f32]) -> Self {
        assert!(
            xi.len() == g.image_len()
                && wt.len() >= g.kh * g.kw * g.c
                && bias.is_none_or(|b| b.len() >= g.c)
                && out.len() == g.row_len()
                && oy < g.oh,
            "depthwise: slice lengths do not match the window"
        );
        DwRow {
            g: *g,
            xi,
            wt,
            bias,
            oy,
            ky: g.ky_range(oy),
            out,
        }
    }
}

impl RowOp for DwRow<'_> {
    fn window(&self) -> &Window {
        &self.g
    }

    fn portable(&mut self) {
        let g = &self.g;
        let (c, w, kw) = (g.c, g.w, g.kw);
        for (ox, o) in self.out.chunks_exact_mut(c).enumerate() {
            match self.bias {
                Some(b) => o.copy_from_slice(&b[..c]),
                None => o.fill(0.0),
            }
            let (kx0, kx1) = g.kx_range(ox);
            for ky in self.ky.0..self.ky.1 {
                let iy = self.oy * g.stride.0 + ky * g.dil.0 - g.pad.0;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride.1 + kx * g.dil.1 - g.pad.1;
                    let xs = &self.xi[(iy * w + ix) * c..][..c];
                    let ws = &self.wt[(ky * kw + kx) * c..][..c];
                    for ((o, &xv), &wv) in o.iter_mut().zip(xs).zip(ws) {
                        *o += xv * wv;
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn pixels<S: Simd, const P: usize, const V: usize, const FULL: bool>(
        &mut self,
        ox0: usize,
        kx: (usize, usize),
        cv: usize,
        m: S::M,
    ) {
        let g = &self.g;
        let (c, w, kw, sw, dw) = (g.c, g.w, g.kw, g.stride.1, g.dil.1);
        // SAFETY: the CPU supports S (caller). Bounds: `new` checked xi = h*w*c, wt >= kh*kw*c,
        // bias >= c and out = ow*c floats. Every (iy, ix) read has iy in [0, h) (ky in the row's
        // valid range) and ix in [0, w) (kx valid for each pixel, the caller's promise), so
        // (iy*w + ix)*c + cv + j*L + lanes <= h*w*c as the lanes read stay below c - cv (caller);
        // likewise the weight (ky*kw + kx)*c + cv + j*L, the bias at cv + j*L, and the outputs
        // (ox0 + i)*c + cv + j*L with ox0 + i < ow.
        unsafe {
            let mut init = [S::zero(); V];
            if let Some(b) = self.bias {
                for (j, v) in init.iter_mut().enumerate() {
                    *v = ld::<S, FULL>(b.as_ptr().add(cv + j * S::L), m);
                }
            }
            let mut acc = [init; P];
            for ky in self.ky.0..self.ky.1 {
                let iy = self.oy * g.stride.0 + ky * g.dil.0 - g.pad.0;
                let xr = self.xi.as_ptr().add(iy * w * c + cv);
                let wr = self.wt.as_ptr().add(ky * kw * c + cv);
                for kx in kx.0..kx.1 {
                    let mut wv = [S::zero(); V];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = ld::<S, FULL>(wr.add(kx * c + j * S::L), m);
                    }
                    let ix0 = ox0 * sw + kx * dw - g.pad.1;
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xp = xr.add((ix0 + i * sw) * c);
                        for (j, (a, &wv)) in a.iter_mut().zip(&wv).enumerate() {
                            *a = S::fma(ld::<S, FULL>(xp.add(j * S::L), m), wv, *a);
                        }
                    }
                }
            }
            let o = self.out.as_mut_ptr().add(ox0 * c + cv);
            for (i, a) in acc.iter().enumerate() {
                for (j, &a) in a.iter().enumerate() {
                    st::<S, FULL>(o.add(i * c + j * S::L), a, m);
                }
            }
        }
    }
}

/// Which pool a [`PoolRow`] computes.
#[derive(Clone, Copy, Debug)]
enum Pool {
    Max,
    /// `pad_end`: `Some((bottom, right))` when padded taps count (count_include_pad).
    Avg {
        pad_end: Option<(usize, usize)>,
    },
}

/// One MaxPool or AveragePool output row.
struct PoolRow<'a> {
    g: Window,
    /// This image, `h * w * c` floats.
    xi: &'a [f32],
    oy: usize,
    ky: (usize, usize),
    pool: Pool,
    /// Vertical taps counted by the average's divisor.
    ky_count: usize,
    /// `ow * c` floats.
    out: &'a mut [f32],
}

impl<'a> PoolRow<'a> {
    /// Checks every length the unchecked vector loads rely on.
    fn new(g: &Window, xi: &'a [f32], oy: usize, pool: Pool, out: &'a mut [f32]) -> Self {
        assert!(
            xi.len() == g.image_len() && out.len() == g.row_len() && oy < g.oh,
            "pool: slice lengths do not match the window"
        );
        let ky = g.ky_range(oy);
        let ky_count = match pool {
            Pool::Avg { pad_end: Some((pb, _)) } => padded_taps(oy, g.stride.0, g.dil.0, g.pad.0, g.kh, g.h + pb),
            _ => ky.1 - ky.0,
        };
        PoolRow {
            g: *g,
            xi,
            oy,
            ky,
            pool,
            ky_count,
            out,
        }
    }

    /// The average's divisor for output column `ox`, whose valid horizontal taps are `kx`.
    fn divisor(&self, ox: usize, kx: (usize, usize)) -> f32 {
        let g = &self.g;
        let kx_count = match self.pool {
            Pool::Avg { pad_end: Some((_, pr)) } => padded_taps(ox, g.stride.1, g.dil.1, g.pad.1, g.kw, g.w + pr),
            _ => kx.1 - kx.0,
        };
        (self.ky_count * kx_count) as f32
    }
}

/// Taps whose position `o * stride + k * dil - pad` lies in `[-pad, end)`, i.e. before `end`
/// (`end` = the image length plus the end padding).
fn padded_taps(o: usize, stride: usize, dil: usize, pad: usize, kernel: usize, end: usize) -> usize {
    (end + pad)
        .saturating_sub(o.saturating_mul(stride))
        .div_ceil(dil.max(1))
        .min(kernel)
}

impl RowOp for PoolRow<'_> {
    fn window(&self) -> &Window {
        &self.g
    }

    fn portable(&mut self) {
        let g = self.g;
        let (c, w) = (g.c, g.w);
        for ox in 0..g.ow {
            let kx = g.kx_range(ox);
            let div = self.divisor(ox, kx);
            let o = &mut self.out[ox * c..][..c];
            let init = match self.pool {
                Pool::Max => f32::NEG_INFINITY,
                Pool::Avg { .. } => 0.0,
            };
            o.fill(init);
            for ky in self.ky.0..self.ky.1 {
                let iy = self.oy * g.stride.0 + ky * g.dil.0 - g.pad.0;
                for kx in kx.0..kx.1 {
                    let ix = ox * g.stride.1 + kx * g.dil.1 - g.pad.1;
                    let xs = &self.xi[(iy * w + ix) * c..][..c];
                    match self.pool {
                        Pool::Max => {
                            for (m, &v) in o.iter_mut().zip(xs) {
                                if v > *m || v.is_nan() {
                                    *m = v;
                                }
                            }
                        }
                        Pool::Avg { .. } => {
                            for (s, &v) in o.iter_mut().zip(xs) {
                                *s += v;
                            }
                        }
                    }
                }
            }
            if let Pool::Avg { .. } = self.pool {
                for s in o {
                    *s /= div;
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn pixels<S: Simd, const P: usize, const V: usize, const FULL: bool>(
        &mut self,
        ox0: usize,
        kx: (usize, usize),
        cv: usize,
        m: S::M,
    ) {
        let g = &self.g;
        let (c, w, sw, dw) = (g.c, g.w, g.stride.1, g.dil.1);
        // SAFETY: the CPU supports S (caller). Bounds: `new` checked xi = h*w*c and out = ow*c
        // floats. Every (iy, ix) read has iy in [0, h) (ky in the row's valid range) and ix in
        // [0, w) (kx valid for each pixel, the caller's promise), so (iy*w + ix)*c + cv + j*L +
        // lanes <= h*w*c as the lanes read stay below c - cv (caller); the outputs
        // (ox0 + i)*c + cv + j*L have ox0 + i < ow.
        unsafe {
            let o = self.out.as_mut_ptr().add(ox0 * c + cv);
            match self.pool {
                Pool::Max => {
                    let mut acc = [[S::splat(f32::NEG_INFINITY); V]; P];
                    let mut nan = [[S::no_nan(); V]; P];
                    for ky in self.ky.0..self.ky.1 {
                        let iy = self.oy * g.stride.0 + ky * g.dil.0 - g.pad.0;
                        let xr = self.xi.as_ptr().add(iy * w * c + cv);
                        for kx in kx.0..kx.1 {
                            let ix0 = ox0 * sw + kx * dw - g.pad.1;
                            for (i, (a, f)) in acc.iter_mut().zip(nan.iter_mut()).enumerate() {
                                let xp = xr.add((ix0 + i * sw) * c);
                                for (j, (a, f)) in a.iter_mut().zip(f.iter_mut()).enumerate() {
                                    let xv = ld::<S, FULL>(xp.add(j * S::L), m);
                                    *a = S::max(xv, *a);
                                    *f = S::nan_acc(*f, xv);
                                }
                            }
                        }
                    }
                    for (i, (a, f)) in acc.iter().zip(&nan).enumerate() {
                        for (j, (&a, &f)) in a.iter().zip(f).enumerate() {
                            st::<S, FULL>(o.add(i * c + j * S::L), S::with_nan(a, f), m);
                        }
                    }
                }
                Pool::Avg { .. } => {
                    let mut acc = [[S::zero(); V]; P];
                    for ky in self.ky.0..self.ky.1 {
                        let iy = self.oy * g.stride.0 + ky * g.dil.0 - g.pad.0;
                        let xr = self.xi.as_ptr().add(iy * w * c + cv);
                        for kx in kx.0..kx.1 {
                            let ix0 = ox0 * sw + kx * dw - g.pad.1;
                            for (i, a) in acc.iter_mut().enumerate() {
                                let xp = xr.add((ix0 + i * sw) * c);
                                for (j, a) in a.iter_mut().enumerate() {
                                    *a = S::add(*a, ld::<S, FULL>(xp.add(j * S::L), m));
                                }
                            }
                        }
                    }
                    // Interior blocks share one divisor (all horizontal taps valid); a border
                    // pixel comes alone.
                    let div = S::splat(self.divisor(ox0, kx));
                    for (i, a) in acc.iter().enumerate() {
                        for (j, &a) in a.iter().enumerate() {
                            st::<S, FULL>(o.add(i * c + j * S::L), S::div(a, div), m);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vector back ends.

/// The vector operations the row kernels are written in. Every method is `unsafe`: the CPU must
/// support the instruction set of the implementation, and the pointers must be valid for the
/// lanes accessed.
trait Simd {
    /// Lanes per vector.
    const L: usize;
    type V: Copy;
    /// Lane mask for channel tails.
    type M: Copy;
    /// Per-lane "saw a NaN" flags.
    type F: Copy;
    /// The first `n` lanes (`n <= L`).
    unsafe fn mask(n: usize) -> Self::M;
    unsafe fn load(p: *const f32) -> Self::V;
    /// Loads the lanes `m` enables; the others are 0 and are not read.
    unsafe fn load_m(p: *const f32, m: Self::M) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Stores the lanes `m` enables; the others are not written.
    unsafe fn store_m(p: *mut f32, v: Self::V, m: Self::M);
    unsafe fn zero() -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    /// `a * b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `x > acc ? x : acc` (`acc` when either is NaN).
    unsafe fn max(x: Self::V, acc: Self::V) -> Self::V;
    unsafe fn no_nan() -> Self::F;
    /// `f` with the lanes where `x` is NaN set.
    unsafe fn nan_acc(f: Self::F, x: Self::V) -> Self::F;
    /// `v` with NaN in the lanes `f` flags.
    unsafe fn with_nan(v: Self::V, f: Self::F) -> Self::V;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// 16-lane AVX-512F vectors.
    pub(super) struct Avx512;

    // SAFETY (every method below): each is one or two AVX-512F intrinsics; the trait's contract
    // makes the caller guarantee the CPU supports AVX-512F and that the pointers are valid for
    // the (enabled) lanes. Masked loads and stores do not touch disabled lanes (no fault).
    impl Simd for Avx512 {
        const L: usize = 16;
        type V = __m512;
        type M = __mmask16;
        type F = __mmask16;

        #[inline(always)]
        unsafe fn mask(n: usize) -> __mmask16 {
            if n >= 16 {
                0xffff
            } else {
                ((1u32 << n) - 1) as __mmask16
            }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_m(p: *const f32, m: __mmask16) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_m(p: *mut f32, v: __m512, m: __mmask16) {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_mask_storeu_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(x: __m512, acc: __m512) -> __m512 {
            // SAFETY: see the impl's comment. (vmaxps returns its second operand on NaN.)
            unsafe { _mm512_max_ps(x, acc) }
        }
        #[inline(always)]
        unsafe fn no_nan() -> __mmask16 {
            0
        }
        #[inline(always)]
        unsafe fn nan_acc(f: __mmask16, x: __m512) -> __mmask16 {
            // SAFETY: see the impl's comment.
            f | unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x) }
        }
        #[inline(always)]
        unsafe fn with_nan(v: __m512, f: __mmask16) -> __m512 {
            // SAFETY: see the impl's comment.
            unsafe { _mm512_mask_mov_ps(v, f, _mm512_set1_ps(f32::NAN)) }
        }
    }

    /// 8-lane AVX2 vectors (with FMA).
    pub(super) struct Avx2;

    // SAFETY (every method below): each is one or two AVX/AVX2/FMA intrinsics; the trait's
    // contract makes the caller guarantee the CPU supports AVX2 and FMA and that the pointers are
    // valid for the (enabled) lanes. `vmaskmovps` does not touch disabled lanes (no fault).
    impl Simd for Avx2 {
        const L: usize = 8;
        type V = __m256;
        type M = __m256i;
        type F = __m256;

        #[inline(always)]
        unsafe fn mask(n: usize) -> __m256i {
            // SAFETY: see the impl's comment.
            unsafe {
                _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(n.min(8) as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                )
            }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_m(p: *const f32, m: __m256i) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_maskload_ps(p, m) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_m(p: *mut f32, v: __m256, m: __m256i) {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_maskstore_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(x: __m256, acc: __m256) -> __m256 {
            // SAFETY: see the impl's comment. (vmaxps returns its second operand on NaN.)
            unsafe { _mm256_max_ps(x, acc) }
        }
        #[inline(always)]
        unsafe fn no_nan() -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn nan_acc(f: __m256, x: __m256) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_or_ps(f, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x)) }
        }
        #[inline(always)]
        unsafe fn with_nan(v: __m256, f: __m256) -> __m256 {
            // SAFETY: see the impl's comment.
            unsafe { _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), f) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// xorshift64* (deterministic, no dependencies).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform in `lo..=hi`.
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }
        /// Uniform in [-1, 1).
        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f()).collect()
        }
        fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            v[self.range(0, v.len() - 1)]
        }
    }

    /// A random window (floor or ceil mode) and its end padding (bottom, right).
    fn random_geometry(rng: &mut Rng) -> (Window, (usize, usize)) {
        loop {
            let (h, w) = (rng.range(1, 17), rng.range(1, 17));
            let (kh, kw) = (rng.range(1, 5), rng.range(1, 5));
            let stride = (rng.range(1, 3), rng.range(1, 3));
            let dil = (rng.range(1, 2), rng.range(1, 2));
            let pad = (rng.range(0, kh - 1), rng.range(0, kw - 1));
            let pad_end = (rng.range(0, kh - 1), rng.range(0, kw - 1));
            let oh = (h + pad.0 + pad_end.0) as isize - (dil.0 * (kh - 1)) as isize - 1;
            let ow = (w + pad.1 + pad_end.1) as isize - (dil.1 * (kw - 1)) as isize - 1;
            if oh < 0 || ow < 0 {
                continue;
            }
            // ceil_mode (as ONNX / PyTorch: a last window starting past the image and the
            // leading padding is dropped), so windows can run past the padded end.
            let ceil = rng.range(0, 1) == 1;
            let out_len = |span: usize, s: usize, len: usize, pad: usize| {
                if !ceil {
                    return span / s + 1;
                }
                let o = span.div_ceil(s) + 1;
                if (o - 1) * s >= len + pad {
                    o - 1
                } else {
                    o
                }
            };
            let g = Window {
                n: rng.range(1, 2),
                h,
                w,
                c: rng.pick(&[1, 3, 8, 15, 16, 17, 32, 33, 64, 100]),
                kh,
                kw,
                stride,
                dil,
                pad,
                oh: out_len(oh as usize, stride.0, h, pad.0),
                ow: out_len(ow as usize, stride.1, w, pad.1),
            };
            return (g, pad_end);
        }
    }

    /// Input index of tap (ky, kx) of output (oy, ox), or None in the padding.
    fn tap(g: &Window, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * g.stride.0 + ky * g.dil.0) as isize - g.pad.0 as isize;
        let ix = (ox * g.stride.1 + kx * g.dil.1) as isize - g.pad.1 as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w).then_some((iy as usize, ix as usize))
    }

    fn x_at(g: &Window, x: &[f32], b: usize, iy: usize, ix: usize, ch: usize) -> f32 {
        x[((b * g.h + iy) * g.w + ix) * g.c + ch]
    }

    fn out_index(g: &Window, b: usize, oy: usize, ox: usize, ch: usize) -> usize {
        ((b * g.oh + oy) * g.ow + ox) * g.c + ch
    }

    /// Naive depthwise conv; also returns, per output, the sum of the magnitudes of its terms
    /// (the scale of the rounding error).
    fn naive_depthwise(g: &Window, x: &[f32], wt: &[f32], bias: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        let len = g.n * g.oh * g.ow * g.c;
        let (mut out, mut scale) = (vec![0f32; len], vec![0f32; len]);
        for b in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ch in 0..g.c {
                        let mut acc = bias.map_or(0.0, |b| b[ch]);
                        let mut mag = acc.abs();
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((iy, ix)) = tap(g, oy, ox, ky, kx) {
                                    let t = x_at(g, x, b, iy, ix, ch) * wt[(ky * g.kw + kx) * g.c + ch];
                                    acc += t;
                                    mag += t.abs();
                                }
                            }
                        }
                        let i = out_index(g, b, oy, ox, ch);
                        out[i] = acc;
                        scale[i] = mag;
                    }
                }
            }
        }
        (out, scale)
    }

    fn clamp_row(row: &mut [f32]) {
        for v in row {
            *v = v.clamp(-1.0, 1.0);
        }
    }

    fn close(got: f32, want: f32, scale: f32) -> bool {
        (got.is_nan() && want.is_nan()) || (got - want).abs() <= 1e-5 * scale.max(f32::MIN_POSITIVE)
    }

    fn check_depthwise(isa: Isa, g: &Window, rng: &mut Rng, with_bias: bool) {
        let x = rng.vec(g.n * g.h * g.w * g.c);
        let wt = rng.vec(g.kh * g.kw * g.c);
        let bias = with_bias.then(|| rng.vec(g.c));
        let (mut want, scale) = naive_depthwise(g, &x, &wt, bias.as_deref());
        want.chunks_mut(g.ow * g.c).for_each(clamp_row);
        let calls: Vec<AtomicUsize> = (0..g.n * g.oh).map(|_| AtomicUsize::new(0)).collect();
        let post = |r: usize, row: &mut [f32]| {
            assert_eq!(row.len(), g.ow * g.c, "post: row length");
            calls[r].fetch_add(1, Ordering::Relaxed);
            clamp_row(row);
        };
        let mut got = vec![f32::NAN; want.len()];
        depthwise_isa(isa, g, &x, &wt, bias.as_deref(), &mut got, &post);
        for (r, n) in calls.iter().enumerate() {
            assert_eq!(n.load(Ordering::Relaxed), 1, "{isa:?} {g:?}: post calls for row {r}");
        }
        for (i, ((&a, &b), &s)) in got.iter().zip(&want).zip(&scale).enumerate() {
            assert!(
                close(a, b, s),
                "{isa:?} {g:?} bias {with_bias}: out[{i}] = {a}, want {b}"
            );
        }
    }

    #[test]
    fn nhwc_depthwise_matches_naive() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let (g, _) = random_geometry(&mut rng);
            let with_bias = rng.range(0, 1) == 1;
            for isa in Isa::all() {
                check_depthwise(isa, &g, &mut rng, with_bias);
            }
        }
    }

    #[test]
    fn nhwc_depthwise_parallel_and_mobilenet_shapes() {
        let mut rng = Rng(42);
        let shapes = [
            // (n, h, w, c, k, stride, pad): the first takes the parallel path (1.8M multiply-adds);
            // the others are typical MobileNet / EfficientNet layers.
            (2, 40, 40, 64, 3, 1, 1),
            (1, 28, 28, 144, 3, 2, 1),
            (1, 14, 14, 480, 5, 1, 2),
            (1, 7, 7, 1152, 5, 1, 2),
            (1, 56, 56, 24, 3, 1, 0),
        ];
        for (n, h, w, c, k, s, p) in shapes {
            let o = |len: usize| (len + 2 * p - k) / s + 1;
            let g = Window {
                n,
                h,
                w,
                c,
                kh: k,
                kw: k,
                stride: (s, s),
                dil: (1, 1),
                pad: (p, p),
                oh: o(h),
                ow: o(w),
            };
            for isa in Isa::all() {
                check_depthwise(isa, &g, &mut rng, true);
            }
        }
    }

    #[test]
    fn nhwc_depthwise_dispatch_and_empty_rows() {
        let mut rng = Rng(7);
        let g = Window {
            n: 1,
            h: 9,
            w: 9,
            c: 33,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            dil: (1, 1),
            pad: (1, 1),
            oh: 9,
            ow: 9,
        };
        let x = rng.vec(9 * 9 * 33);
        let wt = rng.vec(9 * 33);
        let (want, scale) = naive_depthwise(&g, &x, &wt, None);
        let mut got = vec![0f32; want.len()];
        depthwise(&g, &x, &wt, None, &mut got, &|_, _| {});
        for ((&a, &b), &s) in got.iter().zip(&want).zip(&scale) {
            assert!(close(a, b, s));
        }
        // No channels: no output, post still sees every (empty) row.
        let g0 = Window { c: 0, ..g };
        let calls = AtomicUsize::new(0);
        depthwise(&g0, &[], &[], None, &mut [], &|_, row| {
            assert!(row.is_empty());
            calls.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(calls.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn nhwc_im2col_matches_naive_exactly() {
        let mut rng = Rng(0x1234_5678);
        for _ in 0..300 {
            let (g, _) = random_geometry(&mut rng);
            let x = rng.vec(g.n * g.h * g.w * g.c);
            let k = g.kh * g.kw * g.c;
            let img = rng.range(0, g.n - 1);
            let pixels = g.oh * g.ow;
            let p0 = rng.range(0, pixels - 1);
            let p1 = rng.range(p0, pixels);
            let mut want = vec![0f32; (p1 - p0) * k];
            for p in p0..p1 {
                let (oy, ox) = (p / g.ow, p % g.ow);
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        for ch in 0..g.c {
                            want[(p - p0) * k + (ky * g.kw + kx) * g.c + ch] =
                                tap(&g, oy, ox, ky, kx).map_or(0.0, |(iy, ix)| x_at(&g, &x, img, iy, ix, ch));
                        }
                    }
                }
            }
            let mut got = vec![f32::NAN; want.len()];
            im2col(&g, &x, img, p0, p1, &mut got);
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{g:?} img {img} pixels {p0}..{p1}"
            );
        }
    }

    fn naive_max(g: &Window, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; g.n * g.oh * g.ow * g.c];
        for b in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ch in 0..g.c {
                        let mut m = f32::NEG_INFINITY;
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((iy, ix)) = tap(g, oy, ox, ky, kx) {
                                    let v = x_at(g, x, b, iy, ix, ch);
                                    if v > m || v.is_nan() {
                                        m = v;
                                    }
                                }
                            }
                        }
                        out[out_index(g, b, oy, ox, ch)] = m;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn nhwc_max_pool_matches_naive() {
        let mut rng = Rng(0xdead_beef);
        for it in 0..300 {
            let (g, _) = random_geometry(&mut rng);
            let mut x = rng.vec(g.n * g.h * g.w * g.c);
            if it % 4 == 0 {
                // A few NaNs: every window holding one must give NaN.
                for _ in 0..3 {
                    let i = rng.range(0, x.len() - 1);
                    x[i] = f32::NAN;
                }
            }
            let want = naive_max(&g, &x);
            for isa in Isa::all() {
                let mut got = vec![0f32; want.len()];
                max_pool_isa(isa, &g, &x, &mut got);
                for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        a == b || (a.is_nan() && b.is_nan()),
                        "{isa:?} {g:?}: out[{i}] = {a}, want {b}"
                    );
                }
            }
        }
        // ResNet's stem pool, on the parallel path.
        let g = Window {
            n: 1,
            h: 112,
            w: 112,
            c: 64,
            kh: 3,
            kw: 3,
            stride: (2, 2),
            dil: (1, 1),
            pad: (1, 1),
            oh: 56,
            ow: 56,
        };
        let x = rng.vec(112 * 112 * 64);
        let want = naive_max(&g, &x);
        let mut got = vec![0f32; want.len()];
        max_pool(&g, &x, &mut got);
        assert_eq!(got, want);
    }

    fn naive_avg(g: &Window, pad_end: (usize, usize), include_pad: bool, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let len = g.n * g.oh * g.ow * g.c;
        let (mut out, mut scale) = (vec![0f32; len], vec![0f32; len]);
        for b in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut count = 0usize;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let y = (oy * g.stride.0 + ky * g.dil.0) as isize - g.pad.0 as isize;
                            let xx = (ox * g.stride.1 + kx * g.dil.1) as isize - g.pad.1 as isize;
                            let counted = if include_pad {
                                y < (g.h + pad_end.0) as isize && xx < (g.w + pad_end.1) as isize
                            } else {
                                tap(g, oy, ox, ky, kx).is_some()
                            };
                            count += counted as usize;
                        }
                    }
                    for ch in 0..g.c {
                        let (mut s, mut mag) = (0f32, 0f32);
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((iy, ix)) = tap(g, oy, ox, ky, kx) {
                                    let v = x_at(g, x, b, iy, ix, ch);
                                    s += v;
                                    mag += v.abs();
                                }
                            }
                        }
                        let i = out_index(g, b, oy, ox, ch);
                        out[i] = s / count as f32;
                        scale[i] = mag / count as f32;
                    }
                }
            }
        }
        (out, scale)
    }

    #[test]
    fn nhwc_avg_pool_matches_naive() {
        let mut rng = Rng(0x0bad_cafe);
        for _ in 0..300 {
            let (g, pad_end) = random_geometry(&mut rng);
            let x = rng.vec(g.n * g.h * g.w * g.c);
            for include_pad in [false, true] {
                let (want, scale) = naive_avg(&g, pad_end, include_pad, &x);
                for isa in Isa::all() {
                    let mut got = vec![0f32; want.len()];
                    avg_pool_isa(isa, &g, pad_end, include_pad, &x, &mut got);
                    for (i, ((&a, &b), &s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                        assert!(
                            close(a, b, s),
                            "{isa:?} {g:?} pad_end {pad_end:?} include_pad {include_pad}: out[{i}] = {a}, want {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nhwc_global_avg_matches_naive() {
        let mut rng = Rng(99);
        for _ in 0..100 {
            let n = rng.range(1, 3);
            let hw = rng.range(1, 200);
            let c = rng.pick(&[1, 3, 8, 15, 16, 17, 32, 33, 64, 100, 1280]);
            let x = rng.vec(n * hw * c);
            for isa in Isa::all() {
                let mut got = vec![0f32; n * c];
                global_avg_isa(isa, n, hw, c, &x, &mut got);
                for b in 0..n {
                    for ch in 0..c {
                        let (mut s, mut mag) = (0f32, 0f32);
                        for p in 0..hw {
                            let v = x[(b * hw + p) * c + ch];
                            s += v;
                            mag += v.abs();
                        }
                        let (a, want) = (got[b * c + ch], s / hw as f32);
                        assert!(
                            close(a, want, mag / hw as f32),
                            "{isa:?} n {n} hw {hw} c {c}: {a} vs {want}"
                        );
                    }
                }
            }
        }
        let mut out = [0f32; 2];
        global_avg(1, 3, 2, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut out);
        assert_eq!(out, [3.0, 4.0]);
    }
}
