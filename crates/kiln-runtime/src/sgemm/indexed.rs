//! `C = A · B (+ bias per column)` with a packed constant `B` (a conv filter as `[K, M]`) and an `A`
//! that is never copied: element `(i, p)` of A is `data[rows[i] + offs[p]]`.
//!
//! A channels-last convolution has exactly this form: output pixel `i` reads its window starting at
//! `rows[i]` (its top-left input pixel), and step `p = (ky*KW + kx)*C + ci` of the reduction is tap
//! `(ky, kx)`, channel `ci`, at a fixed offset `offs[p]` from there (the input zero-padded once, so
//! no tap falls outside). So the micro-kernel broadcasts each A value straight from the image
//! instead of an im2col copy plus the GEMM's packing of it (two passes over `pixels x K` floats),
//! and reads the filter as the packed GEMM does: aligned 16-lane vectors from `kc x 16` panels.
//!
//! Tiles are 6 pixels x 64 channels (24 zmm accumulators; per step 4 filter loads, 6 broadcasts
//! and 24 multiply-adds), narrower at the right edge (masked stores past `n`). Each kc block of the
//! filter runs in runs of [`STEP`] steps so the `STEP x 64` floats of filter a run reads (32 KiB)
//! stay in L1 while every pixel tile of the call uses them. AVX-512F only ([`indexed_available`]).

use rayon::prelude::*;

use super::rows::OutPtr;
use super::{kc_for, GemmError, PackedB, NR};

/// Pixel rows per tile.
const TR: usize = 6;
/// Filter panels (of NR = 16 columns) per tile.
const TP: usize = 4;
/// Reduction steps per run (see the module docs).
const STEP: usize = 128;

/// The left operand: `A[i][p] = data[rows[i] + offs[p]]`.
#[derive(Clone, Copy)]
pub struct IndexedA<'a> {
    pub data: &'a [f32],
    pub rows: &'a [usize],
    pub offs: &'a [usize],
}

/// Whether [`gemm_indexed_a`] runs on this CPU (the packed kernels and AVX-512F).
pub fn indexed_available() -> bool {
    super::available() && super::use_avx512()
}

/// `C = clamp(A · B (+ bias))`; `c` is row-major `[m, n]` with row stride `ldc`, `m = a.rows.len()`.
/// `clamp` `(lo, hi)` is applied in registers as `min(max(x, lo), hi)`. `parallel`: split the column
/// tiles over rayon's threads (for a call that is the whole product); otherwise the calling thread
/// does all of it (one block of a product split by the caller).
pub fn gemm_indexed_a(
    a: IndexedA,
    b: &PackedB,
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    c: &mut [f32],
    ldc: usize,
    parallel: bool,
) -> Result<(), GemmError> {
    if !indexed_available() {
        return Err(GemmError::Unsupported);
    }
    let (m, k, n) = (a.rows.len(), b.k, b.n);
    if a.offs.len() != k {
        return Err(GemmError::Shape(format!("A has {} steps, B has k = {k}", a.offs.len())));
    }
    if k == 0 {
        return Err(GemmError::Shape("empty reduction (k = 0)".into()));
    }
    let far = |v: &[usize]| v.iter().max().copied().unwrap_or(0);
    if m > 0 && far(a.rows).checked_add(far(a.offs)).is_none_or(|r| r >= a.data.len()) {
        return Err(GemmError::Shape("an A element lies past its data".into()));
    }
    if ldc < n || (m > 0 && c.len() < (m - 1) * ldc + n) {
        return Err(GemmError::Shape(format!(
            "output of {} floats is too small for {m}x{n}",
            c.len()
        )));
    }
    if bias.is_some_and(|bv| bv.len() != n) {
        return Err(GemmError::Shape(format!("bias for {n} columns expected")));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let npan = n.div_ceil(NR);
    // The kernel reads whole 16-lane bias vectors: pad to the panels.
    let bias_pad: Option<Vec<f32>> = bias.map(|bv| {
        let mut v = bv.to_vec();
        v.resize(npan * NR, 0.0);
        v
    });
    let col_tiles = npan.div_ceil(TP);
    let out = OutPtr(c.as_mut_ptr());
    let kcb = kc_for(k);
    let blocks = k.div_ceil(kcb);
    let tile = |ct: usize| {
        let p0 = ct * TP;
        let panels = TP.min(npan - p0);
        let j0 = p0 * NR;
        let cols = (n - j0).min(panels * NR);
        let mask = |q: usize| ((1u32 << cols.saturating_sub(q * NR).min(NR)) - 1) as u16;
        let masks: [u16; TP] = std::array::from_fn(mask);
        for pc in 0..blocks {
            let (k0, kc) = (pc * kcb, kcb.min(k - pc * kcb));
            let mut s0 = 0;
            while s0 < kc {
                let steps = STEP.min(kc - s0);
                let first = pc == 0 && s0 == 0;
                let last = pc + 1 == blocks && s0 + steps == kc;
                let bp: [*const f32; TP] =
                    std::array::from_fn(|q| b.panel(pc, p0 + q.min(panels - 1))[s0 * NR..].as_ptr());
                let mut r0 = 0;
                while r0 < m {
                    let mr = TR.min(m - r0);
                    // A short last tile repeats its last row (computed, not stored).
                    let rows: [*const f32; TR] =
                        std::array::from_fn(|i| a.data.as_ptr().wrapping_add(a.rows[r0 + i.min(mr - 1)]));
                    let init = match (&bias_pad, first) {
                        (_, false) => Init::Load,
                        (Some(bv), true) => Init::Row(bv[j0..].as_ptr()),
                        (None, true) => Init::Zero,
                    };
                    let args = Args {
                        steps,
                        rows,
                        offs: a.offs[k0 + s0..].as_ptr(),
                        b: bp,
                        c: out.get().wrapping_add(r0 * ldc + j0),
                        ldc,
                        mr,
                        masks,
                        init,
                        clamp: if last { clamp } else { None },
                    };
                    // SAFETY: every rows[i] + offs[p] is inside `data` (checked above); each of the
                    // `panels` B panels holds kc*NR floats of which steps s0..s0+steps are read (panels
                    // past the last repeat it, their results are masked off); the stores (and `Load`
                    // reads) are the unmasked lanes of rows r0..r0+mr, columns j0..j0+cols of C, inside
                    // it (checked above) and touched by no other task; `Row` points at panels*NR floats.
                    unsafe {
                        match panels {
                            1 => kernel::<1>(&args),
                            2 => kernel::<2>(&args),
                            3 => kernel::<3>(&args),
                            _ => kernel::<TP>(&args),
                        }
                    }
                    r0 += mr;
                }
                s0 += steps;
            }
        }
    };
    let macs = m.saturating_mul(n).saturating_mul(k);
    if parallel && col_tiles > 1 && macs >= super::PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        (0..col_tiles).into_par_iter().for_each(tile);
    } else {
        (0..col_tiles).for_each(tile);
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// One float per column of the tile.
    Row(*const f32),
    /// The tile's current contents (a later run of steps).
    Load,
}

struct Args {
    steps: usize,
    rows: [*const f32; TR],
    offs: *const usize,
    b: [*const f32; TP],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    masks: [u16; TP],
    init: Init,
    clamp: Option<(f32, f32)>,
}

#[cfg(target_arch = "x86_64")]
unsafe fn kernel<const P: usize>(t: &Args) {
    // SAFETY: forwarded; `indexed_available` checked AVX-512F.
    unsafe { kernel_avx512::<P>(t) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const P: usize>(_t: &Args) {
    // `indexed_available` is false off x86-64, so this is never reached.
}

/// One `6 x 16 P` tile over `steps` steps: `acc[i] += A[i][p] * B[p][..]`, A read at
/// `rows[i] + offs[p]`, B from `P` aligned panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const P: usize>(t: &Args) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees `steps` offsets at `offs`, every rows[i] + offs[p]
    // readable, `steps * NR` aligned floats at each b[q], and the unmasked lanes of rows < mr of the
    // tile at `c` readable and writable; `Row` points at 16 P floats.
    unsafe {
        let (c, ldc, mr, masks) = (t.c, t.ldc, t.mr, t.masks);
        let mut acc = [[_mm512_setzero_ps(); P]; TR];
        match t.init {
            Init::Zero => {}
            Init::Row(bias) => {
                let bv: [__m512; P] = std::array::from_fn(|q| _mm512_loadu_ps(bias.add(q * NR)));
                acc = [bv; TR];
            }
            Init::Load => {
                for (i, r) in acc.iter_mut().enumerate().take(mr) {
                    for (q, v) in r.iter_mut().enumerate() {
                        *v = _mm512_maskz_loadu_ps(masks[q], c.add(i * ldc + q * NR));
                    }
                }
            }
        }
        let [r0, r1, r2, r3, r4, r5] = t.rows;
        let mut bp = t.b;
        for p in 0..t.steps {
            let o = *t.offs.add(p);
            let mut bv = [_mm512_setzero_ps(); P];
            for q in 0..P {
                bv[q] = _mm512_load_ps(bp[q]);
                bp[q] = bp[q].add(NR);
            }
            for (i, row) in [r0, r1, r2, r3, r4, r5].into_iter().enumerate() {
                let av = _mm512_set1_ps(*row.add(o));
                for q in 0..P {
                    acc[i][q] = _mm512_fmadd_ps(av, bv[q], acc[i][q]);
                }
            }
        }
        if let Some((lo, hi)) = t.clamp {
            let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
            for r in acc.iter_mut() {
                for v in r.iter_mut() {
                    *v = _mm512_min_ps(_mm512_max_ps(*v, lo), hi);
                }
            }
        }
        for (i, r) in acc.iter().enumerate().take(mr) {
            for (q, v) in r.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(i * ldc + q * NR), masks[q], *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sgemm::MatRef;

    /// Shapes with row and column edges (every panel count, a short last pixel tile), several kc
    /// blocks and step runs, overlapping rows (a conv's windows share inputs), with and without a
    /// bias and a clamp, on one thread and split over three, against a plain f64 loop.
    #[test]
    fn indexed_gemm_matches_naive() {
        if !indexed_available() {
            eprintln!("SKIP indexed_gemm_matches_naive: no AVX-512F on this CPU");
            return;
        }
        for &(m, k, n, stride) in &[
            (1, 1, 1, 1),
            (6, 9, 16, 3),
            (7, 20, 45, 2),
            (13, 5, 17, 40),
            (12, 30, 64, 1),
            (25, 700, 70, 5),
            (5, 300, 130, 9),
            (49, 900, 200, 4),
            (30, 129, 48, 7),
            (18, 1000, 33, 2),
        ] {
            let data: Vec<f32> = (0..m * stride + k * 2 + 5)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let rows: Vec<usize> = (0..m).map(|i| i * stride).collect();
            let offs: Vec<usize> = (0..k).map(|p| p * 2 - p % 2 + 1).collect();
            let bm: Vec<f32> = (0..k * n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let pb = PackedB::pack(MatRef::row_major(&bm, k, n)).unwrap();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
            for (variant, parallel) in [(0, false), (1, true), (2, false), (3, true)] {
                let with_bias = variant % 2 == 0;
                let clamp = (variant >= 2).then_some((-0.5f32, 1.5f32));
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
                pool.install(|| {
                    gemm_indexed_a(
                        IndexedA {
                            data: &data,
                            rows: &rows,
                            offs: &offs,
                        },
                        &pb,
                        with_bias.then_some(bias.as_slice()),
                        clamp,
                        &mut c,
                        ldc,
                        parallel,
                    )
                })
                .unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 = (0..k)
                            .map(|p| f64::from(data[rows[i] + offs[p]]) * f64::from(bm[p * n + j]))
                            .sum();
                        if with_bias {
                            want += f64::from(bias[j]);
                        }
                        let want = clamp.map_or(want, |(lo, hi)| want.clamp(f64::from(lo), f64::from(hi)));
                        let got = f64::from(c[i * ldc + j]);
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "m{m} k{k} n{n} v{variant} ({i},{j}): {got} vs {want}"
                        );
                    }
                    // Columns past n are untouched.
                    assert!(
                        c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
                        "m{m} k{k} n{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn out_of_range_operands_are_errors() {
        if !indexed_available() {
            eprintln!("SKIP out_of_range_operands_are_errors: no AVX-512F on this CPU");
            return;
        }
        let bm = vec![1f32; 4 * 3];
        let pb = PackedB::pack(MatRef::row_major(&bm, 4, 3)).unwrap();
        let data = vec![1f32; 10];
        let mut c = vec![0f32; 2 * 3];
        let a = |rows: &'static [usize], offs: &'static [usize]| IndexedA {
            data: &data,
            rows,
            offs,
        };
        // An element past the data, a step count that is not k, an output too small.
        assert!(gemm_indexed_a(a(&[0, 7], &[0, 1, 2, 3]), &pb, None, None, &mut c, 3, false).is_err());
        assert!(gemm_indexed_a(a(&[0, 1], &[0, 1, 2]), &pb, None, None, &mut c, 3, false).is_err());
        assert!(gemm_indexed_a(a(&[0, 1], &[0, 1, 2, 3]), &pb, None, None, &mut c[..5], 3, false).is_err());
        assert!(gemm_indexed_a(a(&[0, 1], &[0, 1, 2, 3]), &pb, Some(&[0.0; 2]), None, &mut c, 3, false).is_err());
        gemm_indexed_a(a(&[0, 6], &[0, 1, 2, 3]), &pb, None, None, &mut c, 3, false).unwrap();
        assert_eq!(c, vec![4.0; 6]);
    }
}
