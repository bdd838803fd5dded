//! Depthwise 2-D convolution (one input channel per group, channel multiplier 1), NCHW f32: the
//! 3x3 and 5x5 convs of mobile CNNs (MobileNet, EfficientNet, ShuffleNet, PP-OCR's LCNet).
//!
//! Each plane is first copied into a zero-padded scratch buffer split into `stride_w` column
//! phases (phase `r` of padded row `y` holds padded columns `r, r + sw, r + 2 sw, ...`), so every
//! tap of every output row reads one contiguous run and the borders need no tests, for any
//! stride, dilation and padding. Output rows are then computed in blocks of up to 64 columns
//! held in registers (four 16-lane AVX-512 accumulators, masked at the row's end) over all
//! `kh * kw` taps and stored once: per 16 outputs and tap one load and one FMA, where a
//! row-at-a-time loop loads and stores the output row once per tap. Without AVX-512 a portable
//! loop over the same buffer computes the same sums.
//!
//! Planes (image x channel) run in parallel; `post` sees each finished plane while it is in
//! cache (a fused activation).

use rayon::prelude::*;

use super::conv_cpu::Conv2d;

/// The padded, phase-split copy of one input plane.
struct Phases {
    /// Column phases (the horizontal stride).
    sw: usize,
    /// Padded rows the outputs read.
    hp: usize,
    /// Floats per phase row.
    pw: usize,
}

impl Phases {
    fn new(cv: &Conv2d) -> Phases {
        let sw = cv.stride.1;
        let hp = (cv.oh - 1) * cv.stride.0 + (cv.kh - 1) * cv.dil.0 + 1;
        let wp = (cv.ow - 1) * sw + (cv.kw - 1) * cv.dil.1 + 1;
        Phases {
            sw,
            hp,
            pw: wp.div_ceil(sw),
        }
    }

    fn len(&self) -> usize {
        self.hp * self.sw * self.pw
    }

    /// Offset of phase `r` of padded row `py` in the buffer.
    fn at(&self, py: usize, r: usize) -> usize {
        (py * self.sw + r) * self.pw
    }

    /// Copies plane `src` (`h x w`) into `buf` (resized to `len()` floats): padded column `q * sw + r`
    /// of padded row `py` is input `(py - pad_top, q * sw + r - pad_left)`, `pad` outside the image.
    /// `buf` is meant to be reused for the planes of one call (same geometry and `pad`): at stride 1
    /// the padding is written when the buffer is first sized and only the image rows after that.
    fn fill(&self, cv: &Conv2d, src: &[f32], buf: &mut Vec<f32>, pad: f32) {
        let (h, w) = (cv.h, cv.w);
        let (pt, pl) = cv.pad;
        if buf.len() != self.len() {
            buf.clear();
            buf.resize(self.len(), pad);
        }
        #[cfg(target_arch = "x86_64")]
        if self.sw == 2 && crate::sgemm::use_avx512() {
            // As at stride 1, the padding stays from the first fill: only the image's values are
            // written, each row split into its two phases in registers.
            let ranges = [0, 1].map(|r| {
                let (lo, hi) = super::conv_cpu::valid_range(r as isize - pl as isize, 2, w, self.pw);
                (r, lo, hi, (lo * 2 + r).wrapping_sub(pl))
            });
            for iy in 0..h {
                let py = iy + pt;
                if py >= self.hp {
                    break;
                }
                let srow = &src[iy * w..(iy + 1) * w];
                for &(r, lo, hi, start) in &ranges {
                    if lo < hi {
                        let at = self.at(py, r);
                        // SAFETY: `use_avx512` checked the CPU.
                        unsafe { super::conv_cpu::evens_masked(&srow[start..], &mut buf[at + lo..at + hi]) };
                    }
                }
            }
            return;
        }
        if self.sw == 1 {
            let lo = pl.min(self.pw);
            let n = w.min(self.pw - lo);
            for iy in 0..h {
                let py = iy + pt;
                if py >= self.hp {
                    break;
                }
                let at = self.at(py, 0) + lo;
                copy_short(&mut buf[at..at + n], &src[iy * w..iy * w + n]);
            }
            return;
        }
        for py in 0..self.hp {
            let iy = py as isize - pt as isize;
            for r in 0..self.sw {
                let at = self.at(py, r);
                let dst = &mut buf[at..at + self.pw];
                if iy < 0 || iy >= h as isize {
                    dst.fill(pad);
                    continue;
                }
                let srow = &src[iy as usize * w..][..w];
                super::conv_cpu::phase_row(srow, dst, self.sw, r, pl);
                if pad != 0.0 {
                    // phase_row zero-fills the columns outside the image.
                    let (lo, hi) = super::conv_cpu::valid_range(r as isize - pl as isize, self.sw, w, self.pw);
                    dst[..lo].fill(pad);
                    dst[hi..].fill(pad);
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, with rows of up to 16 floats as one masked vector move instead of
/// a `memcpy` call (7x7 and 14x14 planes copy thousands of such rows per conv).
fn copy_short(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_short: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if dst.len() <= 16 && crate::sgemm::use_avx512() {
        #[target_feature(enable = "avx512f")]
        fn masked(dst: &mut [f32], src: &[f32]) {
            use std::arch::x86_64::*;
            let mask = ((1u32 << dst.len()) - 1) as __mmask16;
            // SAFETY: both slices hold dst.len() <= 16 floats and only those lanes are enabled.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, src.as_ptr());
                _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, v);
            }
        }
        // SAFETY: `use_avx512` checked the CPU.
        unsafe { masked(dst, src) };
        return;
    }
    dst.copy_from_slice(src);
}

/// Runs on each finished output plane: `(channel, plane)`.
pub(crate) type PlanePost<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

impl Conv2d {
    /// Depthwise conv of `x` (`[N, C, H, W]`) with `wv` (`[C, 1, KH, KW]`) and an optional bias;
    /// `post(channel, plane)` runs on each finished output plane.
    pub(crate) fn depthwise_conv(
        &self,
        x: &[f32],
        wv: &[f32],
        bias: Option<&[f32]>,
        post: Option<PlanePost>,
    ) -> Vec<f32> {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        let (kh, kw) = (self.kh, self.kw);
        let mut out = vec![0f32; self.n * self.m * oh * ow];
        let ph = Phases::new(self);
        let offs = self.dw_tap_offsets(&ph);
        let wide = crate::sgemm::use_avx512();
        let one = |(buf, flat): &mut (Vec<f32>, Vec<f32>), (plane, dst): (usize, &mut [f32])| {
            let ch = plane % self.c;
            let src = &x[plane * h * w..(plane + 1) * h * w];
            let wk = &wv[ch * kh * kw..(ch + 1) * kh * kw];
            let b = bias.map_or(0.0, |b| b[ch]);
            ph.fill(self, src, buf, 0.0);
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: `use_avx512` checked the CPU; `buf` holds the filled phases, `dst` oh*ow floats.
                unsafe { self.dw_plane_avx512(&ph, &offs, buf, wk, b, dst, flat) };
                if let Some(post) = post {
                    post(ch, dst);
                }
                return;
            }
            let _ = wide;
            self.dw_plane(&ph, buf, wk, b, dst);
            if let Some(post) = post {
                post(ch, dst);
            }
        };
        // Small planes: one task per few planes, not per plane.
        let per_task = (4096 / (oh * ow).max(1)).max(1);
        out.par_chunks_mut(oh * ow * per_task)
            .enumerate()
            .for_each_init(Default::default, |bufs, (t, chunk)| {
                for (i, dst) in chunk.chunks_mut(oh * ow).enumerate() {
                    one(bufs, (t * per_task + i, dst));
                }
            });
        out
    }

    /// 2-D max pooling of `x` (`[N, C, H, W]`) with this geometry (`m == c`, no weights): the same
    /// padded phase planes, filled with -inf outside the image, and a running maximum per output
    /// row over the window's taps. A NaN in a window gives NaN where it is the newer operand of a
    /// comparison (`v > acc` is false for NaN), as a plain loop of comparisons would.
    pub(crate) fn max_pool(&self, x: &[f32]) -> Vec<f32> {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        let mut out = vec![0f32; self.n * self.c * oh * ow];
        let ph = Phases::new(self);
        let offs = self.dw_tap_offsets(&ph);
        let row_step = ph.at(self.stride.0, 0);
        let per_task = (4096 / (oh * ow).max(1)).max(1);
        out.par_chunks_mut(oh * ow * per_task)
            .enumerate()
            .for_each_init(Vec::new, |buf: &mut Vec<f32>, (t, chunk)| {
                for (i, dst) in chunk.chunks_mut(oh * ow).enumerate() {
                    let plane = t * per_task + i;
                    ph.fill(self, &x[plane * h * w..(plane + 1) * h * w], buf, f32::NEG_INFINITY);
                    for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                        max_row(&buf[oy * row_step..], &offs, row);
                    }
                }
            });
        out
    }

    /// One output plane, portable.
    fn dw_plane(&self, ph: &Phases, buf: &[f32], wk: &[f32], b: f32, dst: &mut [f32]) {
        let (oh, ow, kh, kw) = (self.oh, self.ow, self.kh, self.kw);
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dil;
        for oy in 0..oh {
            let row = &mut dst[oy * ow..(oy + 1) * ow];
            row.fill(b);
            for ky in 0..kh {
                let py = oy * sh + ky * dh;
                for kx in 0..kw {
                    let c = kx * dw;
                    let src = &buf[ph.at(py, c % sw) + c / sw..][..ow];
                    let wt = wk[ky * kw + kx];
                    row.iter_mut().zip(src).for_each(|(d, &v)| *d += wt * v);
                }
            }
        }
    }

    /// Offset of each tap `(ky, kx)` (row-major) from its output row's first read in the buffer:
    /// output `(oy, ox)` reads `buf[oy * sh * sw * pw + ox + offset]`.
    fn dw_tap_offsets(&self, ph: &Phases) -> Vec<usize> {
        let (sw, (dh, dw)) = (self.stride.1, self.dil);
        let mut offs = Vec::with_capacity(self.kh * self.kw);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let c = kx * dw;
                offs.push(ph.at(ky * dh, c % sw) + c / sw);
            }
        }
        offs
    }

    /// One output plane, blocks of up to 4 x 16 columns in zmm registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dw_plane_avx512(
        &self,
        ph: &Phases,
        offs: &[usize],
        buf: &[f32],
        wk: &[f32],
        b: f32,
        dst: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let ow = self.ow;
        let row_step = ph.at(self.stride.0, 0);
        if self.stride.1 == 1 && ow < 32 && self.oh > 1 {
            // Narrow planes at stride 1 (7x7, 14x14 maps): the output rows run on as one sequence over
            // the padded row width (row_step), so the vectors are filled across row ends; the
            // columns past ow are computed, then dropped while the rows are copied into place.
            let len = (self.oh - 1) * row_step + ow;
            let mut flat = std::mem::take(scratch);
            flat.resize(len, 0.0);
            {
                let mut j = 0;
                while j < len {
                    let left = len - j;
                    let at = Block {
                        // SAFETY (for the block below): reads buf[j + lane + offset] for j + lane < len,
                        // i.e. output (oy, ox) with ox < row_step, whose taps lie inside the padded plane
                        // (`Phases::new` sized it for row oh - 1's last column; a junk column ox >= ow
                        // of an earlier row reads the start of a later padded row).
                        src: unsafe { buf.as_ptr().add(j) },
                        row_step: 0,
                        out: unsafe { flat.as_mut_ptr().add(j) },
                        ow: 0,
                        left,
                    };
                    // SAFETY: as above; the writes are flat[j .. j + min(left, 64)].
                    unsafe {
                        match left.div_ceil(16) {
                            1 => dw_block::<1, 1>(offs, wk, b, at),
                            2 => dw_block::<2, 1>(offs, wk, b, at),
                            3 => dw_block::<3, 1>(offs, wk, b, at),
                            _ => dw_block::<4, 1>(offs, wk, b, at),
                        }
                    }
                    j += left.min(64);
                }
                for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                    copy_short(row, &flat[oy * row_step..oy * row_step + ow]);
                }
                *scratch = flat;
                return;
            }
        }
        // Column blocks of up to 4 vectors; several output rows per block, so that at least 4 (up to 8)
        // independent accumulator chains hide the FMA latency (each chain has kh*kw dependent FMAs).
        let mut ox = 0;
        while ox < ow {
            let left = ow - ox;
            let nv = left.div_ceil(16).min(4);
            let rows = if nv <= 2 { 4 } else { 2 };
            let mut oy = 0;
            while oy < self.oh {
                let r = if self.oh - oy >= rows { rows } else { 1 };
                // SAFETY: every read is `buf[(oy + i) * row_step + ox + lane + offset]` for an output
                // (oy + i, ox + lane) of the plane, which `Phases::new` sized the buffer for; the writes
                // are those outputs in `dst` (oh * ow floats).
                unsafe {
                    let src = buf.as_ptr().add(oy * row_step + ox);
                    let out = dst.as_mut_ptr().add(oy * ow + ox);
                    let at = Block {
                        src,
                        row_step,
                        out,
                        ow,
                        left,
                    };
                    match (nv, r) {
                        (1, 4) => dw_block::<1, 4>(offs, wk, b, at),
                        (1, _) => dw_block::<1, 1>(offs, wk, b, at),
                        (2, 4) => dw_block::<2, 4>(offs, wk, b, at),
                        (2, _) => dw_block::<2, 1>(offs, wk, b, at),
                        (3, 2) => dw_block::<3, 2>(offs, wk, b, at),
                        (3, _) => dw_block::<3, 1>(offs, wk, b, at),
                        (_, 2) => dw_block::<4, 2>(offs, wk, b, at),
                        _ => dw_block::<4, 1>(offs, wk, b, at),
                    }
                }
                oy += r;
            }
            ox += left.min(64);
        }
    }
}

/// `row[j] = max over taps of src[off + j]` (taps in order, each comparison as `_mm_max_ps(acc, v)`
/// is in ONNX Runtime's pooling: a NaN input is taken, a later number replaces it).
fn max_row(src: &[f32], offs: &[usize], row: &mut [f32]) {
    let n = row.len();
    assert!(
        offs.iter().all(|&o| o + n <= src.len()),
        "max_row: a tap reads past the buffer"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::use_avx512() {
        // SAFETY: `use_avx512` checked the CPU; the assert above bounds every read.
        unsafe { max_row_avx512(src, offs, row) };
        return;
    }
    row.fill(f32::NEG_INFINITY);
    for &off in offs {
        for (d, &v) in row.iter_mut().zip(&src[off..off + n]) {
            *d = if *d > v { *d } else { v };
        }
    }
}

/// # Safety
/// The CPU has AVX-512F and `src[off + j]` exists for every tap offset and `j < row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_row_avx512(src: &[f32], offs: &[usize], row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let mut j = 0;
    while j < n {
        let lanes = (n - j).min(16);
        let mask = ((1u32 << lanes) - 1) as __mmask16;
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        for &off in offs {
            // SAFETY: lanes j..j+lanes of this tap are inside `src` (the caller's contract).
            let v = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().add(off + j)) };
            acc = _mm512_max_ps(acc, v);
        }
        // SAFETY: lanes j..j+lanes are inside `row`.
        unsafe { _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), mask, acc) };
        j += lanes;
    }
}

/// Where one register block reads and writes.
#[derive(Clone, Copy)]
struct Block {
    /// The first output's first read (tap offset 0) in the phase buffer.
    src: *const f32,
    /// Buffer floats between consecutive output rows' reads.
    row_step: usize,
    /// The first output.
    out: *mut f32,
    /// Output row stride.
    ow: usize,
    /// Output columns left in the row from here (the block takes at most 16 V).
    left: usize,
}

/// Outputs `(i, j)` for rows `i < R` and columns `j < min(left, 16 V)`:
/// `b + sum over taps t of wk[t] * src[i * row_step + offs[t] + j]`.
///
/// # Safety
/// The CPU has AVX-512F; those reads are inside the buffer and those outputs writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_block<const V: usize, const R: usize>(offs: &[usize], wk: &[f32], b: f32, at: Block) {
    use std::arch::x86_64::*;
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let n = at.left.saturating_sub(16 * v).min(16);
        ((1u32 << n) - 1) as __mmask16
    });
    let mut acc = [[_mm512_set1_ps(b); V]; R];
    for (&off, &w) in offs.iter().zip(wk) {
        let wt = _mm512_set1_ps(w);
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, a) in row.iter_mut().enumerate() {
                // SAFETY: see the function's contract; masked-off lanes are not read.
                let x = unsafe { _mm512_maskz_loadu_ps(masks[v], at.src.add(i * at.row_step + off + 16 * v)) };
                *a = _mm512_fmadd_ps(wt, x, *a);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: see the function's contract; masked-off lanes are not written.
            unsafe { _mm512_mask_storeu_ps(at.out.add(i * at.ow + 16 * v), masks[v], *a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(
        c: usize,
        (h, w): (usize, usize),
        k: usize,
        s: (usize, usize),
        d: usize,
        pad: (usize, usize),
    ) -> Conv2d {
        let out = |n: usize, st: usize, p: usize| (n + 2 * p - (k - 1) * d - 1) / st + 1;
        Conv2d {
            n: 1,
            c,
            h,
            w,
            m: c,
            kh: k,
            kw: k,
            group: c,
            stride: s,
            dil: (d, d),
            pad,
            oh: out(h, s.0, pad.0),
            ow: out(w, s.1, pad.1),
        }
    }

    /// Both the portable loop and the AVX-512 blocks (where the CPU has it) against a direct f64
    /// sum, over row widths that leave 1-4 vectors and a partial one, strides, dilation, 5x5.
    #[test]
    fn plane_paths_match_direct_sum() {
        let cases = [
            geometry(3, (9, 70), 3, (1, 1), 1, (1, 1)),
            geometry(2, (11, 13), 5, (2, 2), 1, (2, 2)),
            geometry(2, (20, 33), 3, (2, 1), 2, (2, 2)),
            geometry(1, (7, 130), 3, (1, 2), 1, (0, 1)),
            geometry(2, (1, 1), 3, (1, 1), 1, (1, 1)),
            // Narrow planes at stride 1 (rows run on as one sequence): 7x7, 14x14 5x5, dilated, stride (2, 1).
            geometry(3, (7, 7), 3, (1, 1), 1, (1, 1)),
            geometry(2, (14, 14), 5, (1, 1), 1, (2, 2)),
            geometry(2, (9, 11), 3, (1, 1), 2, (2, 1)),
            geometry(2, (12, 10), 3, (2, 1), 1, (1, 1)),
        ];
        for cv in cases {
            let x: Vec<f32> = (0..cv.c * cv.h * cv.w)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let wv: Vec<f32> = (0..cv.c * cv.kh * cv.kw)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
                .collect();
            let ph = Phases::new(&cv);
            for ch in 0..cv.c {
                let src = &x[ch * cv.h * cv.w..(ch + 1) * cv.h * cv.w];
                let wk = &wv[ch * cv.kh * cv.kw..(ch + 1) * cv.kh * cv.kw];
                let mut want = vec![0f32; cv.oh * cv.ow];
                for oy in 0..cv.oh {
                    for ox in 0..cv.ow {
                        let mut acc = 0.5f64;
                        for ky in 0..cv.kh {
                            for kx in 0..cv.kw {
                                let iy = (oy * cv.stride.0 + ky * cv.dil.0) as isize - cv.pad.0 as isize;
                                let ix = (ox * cv.stride.1 + kx * cv.dil.1) as isize - cv.pad.1 as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < cv.h && (ix as usize) < cv.w {
                                    acc += f64::from(wk[ky * cv.kw + kx])
                                        * f64::from(src[iy as usize * cv.w + ix as usize]);
                                }
                            }
                        }
                        want[oy * cv.ow + ox] = acc as f32;
                    }
                }
                let mut buf = vec![0f32; ph.len()];
                ph.fill(&cv, src, &mut buf, 0.0);
                let mut got = vec![f32::NAN; cv.oh * cv.ow];
                cv.dw_plane(&ph, &buf, wk, 0.5, &mut got);
                let close = |g: &[f32], what: &str| {
                    for (i, (a, b)) in g.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{what} {cv:?} ch {ch} at {i}: {a} vs {b}"
                        );
                    }
                };
                close(&got, "portable");
                #[cfg(target_arch = "x86_64")]
                if crate::sgemm::use_avx512() {
                    let offs = cv.dw_tap_offsets(&ph);
                    let mut got = vec![f32::NAN; cv.oh * cv.ow];
                    // SAFETY: the CPU has AVX-512F; `buf` is the filled plane.
                    unsafe { cv.dw_plane_avx512(&ph, &offs, &buf, wk, 0.5, &mut got, &mut Vec::new()) };
                    close(&got, "avx512");
                }
            }
        }
    }
}
