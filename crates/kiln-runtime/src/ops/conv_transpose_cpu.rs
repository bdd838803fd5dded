//! 2-D f32 `ConvTranspose` on the CPU as one GEMM per image and group plus a col2im scatter:
//! `cols[(m, ky, kx), (iy, ix)] = sum_c W[c, m, ky, kx] * x[c, iy, ix]`, then
//! `y[m, iy*sh + ky*dh - pad_top, ix*sw + kx*dw - pad_left] += cols[...]` (positions outside the
//! output dropped), the output starting from the bias. The GEMM reads the input planes as they
//! are ([`crate::sgemm::gemm_packed_a_rows`], the filter transposed and packed once at plan time
//! for a constant weight); the scatter is one pass over `cols` per output channel, channels in
//! parallel. This replaces the general path's per-tap padded copies and interleaving, which on
//! PP-OCR's detector took 6x ONNX Runtime's time for its two 2x2 stride-2 upsampling layers.

use candle_core::Tensor as CT;
use rayon::prelude::*;

use crate::fastmath::with_f32;
use crate::sgemm::{gemm_packed_a_rows, rows_available, MatRef, PackedA, RowsB};
use crate::{Result, RuntimeError};

/// The weight `[C, M/g, KH, KW]` of each group as the GEMM's left operand `[M/g*KH*KW, C/g]`.
pub(crate) struct PackedTransposed {
    groups: Vec<PackedA>,
}

impl PackedTransposed {
    /// Bytes of the packed groups.
    pub(crate) fn bytes(&self) -> usize {
        self.groups.iter().map(PackedA::bytes).sum()
    }

    /// `None` when the CPU lacks the kernel or the dims do not fit `group`.
    pub(crate) fn new(wv: &[f32], dims: &[usize], group: usize) -> Option<PackedTransposed> {
        if !rows_available() || dims.len() != 4 || group == 0 || !dims[0].is_multiple_of(group) {
            return None;
        }
        let cg = dims[0] / group;
        let rows = dims[1] * dims[2] * dims[3];
        if wv.len() != dims[0] * rows {
            return None;
        }
        let groups = (0..group)
            .map(|gi| {
                let wg = &wv[gi * cg * rows..(gi + 1) * cg * rows];
                // Element (r, ci) of the [rows, cg] operand is wg[ci * rows + r].
                PackedA::pack(MatRef {
                    data: wg,
                    rows,
                    cols: cg,
                    rs: 1,
                    cs: rows,
                })
                .ok()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PackedTransposed { groups })
    }
}

/// Geometry of one 2-D transposed convolution.
pub(crate) struct ConvT2d {
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
    /// Rows / columns cut from the top / left of the full output.
    pub begin: (usize, usize),
    pub oh: usize,
    pub ow: usize,
}

impl ConvT2d {
    /// `None` when the operands are not contiguous f32 CPU tensors or the CPU lacks the kernel.
    pub(crate) fn run(
        &self,
        x: &CT,
        w: &CT,
        bias: Option<&CT>,
        packed: Option<&PackedTransposed>,
    ) -> Option<Result<CT>> {
        if !rows_available() || !x.device().is_cpu() {
            return None;
        }
        let g = self.group;
        let (cg, mg) = (self.c / g, self.m / g);
        let kp = self.kh * self.kw;
        let owned;
        let packed =
            match packed.filter(|p| p.groups.len() == g && p.groups.iter().all(|a| a.m() == mg * kp && a.k() == cg)) {
                Some(p) => p,
                None => {
                    owned = with_f32(w, |wv| PackedTransposed::new(wv, &[self.c, mg, self.kh, self.kw], g))??;
                    &owned
                }
            };
        let bias_v = super::conv_cpu::bias_values(bias, self.m)?;
        let r = with_f32(x, |xs| self.compute(xs, packed, bias_v.as_deref()))?;
        Some(r.and_then(|out| CT::from_vec(out, (self.n, self.m, self.oh, self.ow), x.device()).map_err(Into::into)))
    }

    fn compute(&self, x: &[f32], packed: &PackedTransposed, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let g = self.group;
        let (cg, mg) = (self.c / g, self.m / g);
        let (kh, kw) = (self.kh, self.kw);
        let p = self.h * self.w;
        let (op, kp) = (self.oh * self.ow, kh * kw);
        let mut out = vec![0f32; self.n * self.m * op];
        let mut cols = vec![0f32; mg * kp * p];
        let offs: Vec<usize> = (0..cg).map(|ci| ci * p).collect();
        for b in 0..self.n {
            for (gi, pa) in packed.groups.iter().enumerate() {
                let x0 = (b * self.c + gi * cg) * p;
                let xin = &x[x0..x0 + cg * p];
                gemm_packed_a_rows(
                    pa,
                    RowsB {
                        data: xin,
                        offs: &offs,
                        n: p,
                    },
                    None,
                    None,
                    &mut cols,
                    p,
                )
                .map_err(|e| RuntimeError::msg(e.to_string()))?;
                let dst = &mut out[(b * self.m + gi * mg) * op..(b * self.m + (gi + 1) * mg) * op];
                dst.par_chunks_mut(op).enumerate().for_each(|(mi, plane)| {
                    plane.fill(bias.map_or(0.0, |bs| bs[gi * mg + mi]));
                    self.scatter(&cols[mi * kp * p..(mi + 1) * kp * p], plane);
                });
            }
        }
        Ok(out)
    }

    /// Adds one output channel's `kh*kw` column rows (`[kh*kw, h*w]`) into its plane.
    fn scatter(&self, cols: &[f32], plane: &mut [f32]) {
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dil;
        let (bt, bl) = self.begin;
        // 2-wide taps at stride 2 (the usual x2 upsampling): each output row interleaves two rows.
        let pairs = sw == 2 && self.kw == 2 && dw == 1 && bl == 0 && self.ow >= 2 * self.w;
        for ky in 0..self.kh {
            if pairs {
                let a = &cols[2 * ky * self.h * self.w..][..self.h * self.w];
                let b = &cols[(2 * ky + 1) * self.h * self.w..][..self.h * self.w];
                for iy in 0..self.h {
                    let oy = (iy * sh + ky * dh) as isize - bt as isize;
                    if oy < 0 || oy >= self.oh as isize {
                        continue;
                    }
                    let drow = &mut plane[oy as usize * self.ow..][..2 * self.w];
                    let (ra, rb) = (&a[iy * self.w..][..self.w], &b[iy * self.w..][..self.w]);
                    for ((d, &va), &vb) in drow.chunks_exact_mut(2).zip(ra).zip(rb) {
                        d[0] += va;
                        d[1] += vb;
                    }
                }
                continue;
            }
            for kx in 0..self.kw {
                let rows = &cols[(ky * self.kw + kx) * self.h * self.w..][..self.h * self.w];
                // Input columns ix whose output column ix*sw + kx*dw - bl lies in 0..ow.
                let off = (kx * dw) as isize - bl as isize;
                let lo = if off >= 0 { 0 } else { (-off as usize).div_ceil(sw) };
                let last = self.ow as isize - 1 - off;
                let hi = if last < 0 {
                    0
                } else {
                    (last as usize / sw + 1).min(self.w)
                };
                if lo >= hi {
                    continue;
                }
                for iy in 0..self.h {
                    let oy = (iy * sh + ky * dh) as isize - bt as isize;
                    if oy < 0 || oy >= self.oh as isize {
                        continue;
                    }
                    let src = &rows[iy * self.w..][lo..hi];
                    let drow = &mut plane[oy as usize * self.ow..][..self.ow];
                    let start = (lo as isize * sw as isize + off) as usize;
                    if sw == 1 {
                        drow[start..start + src.len()]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(d, &v)| *d += v);
                    } else {
                        for (d, &v) in drow[start..].iter_mut().step_by(sw).zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the definition (a scatter of every input times every tap in f64), with strides,
    /// dilation, cropping from the top-left, an output larger than the full one, and groups.
    #[test]
    fn matches_definition() {
        if !rows_available() {
            eprintln!("SKIP conv_transpose matches_definition: no AVX-512F on this CPU");
            return;
        }
        let cases = [
            // n, c, h, w, m, kh, kw, group, stride, dil, begin, (oh, ow) = None -> full
            (1, 4, 5, 6, 3, 2, 2, 1, (2, 2), (1, 1), (0, 0), None),
            (2, 6, 4, 3, 4, 3, 3, 2, (2, 1), (1, 2), (1, 1), None),
            (1, 3, 3, 3, 2, 3, 3, 1, (3, 3), (1, 1), (1, 0), Some((9, 12))),
            (1, 8, 7, 9, 8, 4, 4, 4, (2, 2), (1, 1), (1, 1), None),
            // The paired x2 upsampling path, with a crop from the top only and a wider output.
            (2, 5, 3, 4, 3, 2, 2, 1, (2, 2), (1, 1), (1, 0), Some((5, 9))),
            (1, 4, 5, 6, 2, 2, 2, 1, (2, 2), (1, 1), (0, 0), None),
        ];
        for (n, c, h, w, m, kh, kw, group, stride, dil, begin, size) in cases {
            let full = |i: usize, s: usize, k: usize, d: usize| (i - 1) * s + (k - 1) * d + 1;
            let (oh, ow) = size.unwrap_or((
                full(h, stride.0, kh, dil.0) - 2 * begin.0,
                full(w, stride.1, kw, dil.1) - 2 * begin.1,
            ));
            let cv = ConvT2d {
                n,
                c,
                h,
                w,
                m,
                kh,
                kw,
                group,
                stride,
                dil,
                begin,
                oh,
                ow,
            };
            let mg = m / group;
            let xv: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 31 % 19) as f32 - 9.0) / 5.0).collect();
            let wv: Vec<f32> = (0..c * mg * kh * kw)
                .map(|i| ((i * 17 % 13) as f32 - 6.0) / 4.0)
                .collect();
            let bv: Vec<f32> = (0..m).map(|i| i as f32 * 0.3 - 0.5).collect();
            let mut want = vec![0f64; n * m * oh * ow];
            for b in 0..n {
                for oc in 0..m {
                    for v in &mut want[(b * m + oc) * oh * ow..(b * m + oc + 1) * oh * ow] {
                        *v = f64::from(bv[oc]);
                    }
                    let (gi, ml) = (oc / mg, oc % mg);
                    for cl in 0..c / group {
                        let ci = gi * (c / group) + cl;
                        for iy in 0..h {
                            for ix in 0..w {
                                for ky in 0..kh {
                                    for kx in 0..kw {
                                        let oy = (iy * stride.0 + ky * dil.0) as isize - begin.0 as isize;
                                        let ox = (ix * stride.1 + kx * dil.1) as isize - begin.1 as isize;
                                        if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                            continue;
                                        }
                                        let xi = ((b * c + ci) * h + iy) * w + ix;
                                        let wi = ((ci * mg + ml) * kh + ky) * kw + kx;
                                        want[((b * m + oc) * oh + oy as usize) * ow + ox as usize] +=
                                            f64::from(xv[xi]) * f64::from(wv[wi]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let dev = Device::Cpu;
            let x = CT::from_vec(xv, (n, c, h, w), &dev).unwrap();
            let wt = CT::from_vec(wv, (c, mg, kh, kw), &dev).unwrap();
            let bt = CT::from_vec(bv, m, &dev).unwrap();
            let got = cv.run(&x, &wt, Some(&bt), None).expect("handled").expect("ok");
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "case c{c} m{m} at {i}: {a} vs {b}"
                );
            }
        }
    }
}
