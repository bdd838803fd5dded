//! Products with fewer rows than the micro-tile (`m < MR`): a decode step's projections, one row per
//! sequence. The 6 x 16 micro-kernel would multiply five rows of zero padding for one real row;
//! here each packed `kc x NR` B panel is streamed once for all (up to four) rows, accumulating in
//! registers across the whole depth, and the panels are split over the threads: such a product reads
//! its weight once and is bound by memory bandwidth, so one thread cannot keep up with two.

use super::{act1, activate, kc_for, Activation, Bias, MatRef, OutPtr, PackedB, NR};
use rayon::prelude::*;

/// Weight floats (`k x n`, padded to whole panels) from which the panels are split over threads: a
/// 256 KiB weight takes about 20 us to stream, several times the cost of waking rayon's workers.
const PARALLEL_MIN_WEIGHT: usize = 1 << 16;

/// Rows streamed together through one panel (8 accumulators, 2 B vectors, 1 broadcast).
const GROUP: usize = 4;

/// `C = act(A · B + bias)` for `m < MR` rows; `A` any strides, `C` row stride `out.ldc`.
pub(super) fn run(a: MatRef, b: &PackedB, bias: Bias, act: Activation, out: OutPtr, parallel: bool) {
    let (m, k, n) = (a.rows, b.k, b.n);
    // Rows read in place when their elements are contiguous (a decode step's activations), else copied.
    let copied: Vec<f32>;
    let (x, lda): (&[f32], usize) = if a.cs == 1 {
        (a.data, a.rs)
    } else {
        copied = (0..m)
            .flat_map(|i| (0..k).map(move |p| a.data[i * a.rs + p * a.cs]))
            .collect();
        (&copied, k)
    };
    let npan = n.div_ceil(NR);
    let threads = if parallel && k * npan * NR >= PARALLEL_MIN_WEIGHT {
        rayon::current_num_threads().clamp(1, npan)
    } else {
        1
    };
    let chunk = npan.div_ceil(threads);
    let task = |t: usize| {
        let out: OutPtr = out; // the whole (Sync) pointer, not its field
        for jp in t * chunk..((t + 1) * chunk).min(npan) {
            let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
            let mut r0 = 0;
            while r0 < m {
                let rows = GROUP.min(m - r0);
                let mut tile = [[0f32; NR]; GROUP];
                let xr = &x[r0 * lda..];
                // SAFETY: `check` made sure the CPU has AVX2 and FMA; `xr` holds `rows` rows of k floats
                // at stride `lda`, and the panels kc x NR floats.
                unsafe {
                    match rows {
                        1 => panel::<1, 2>(b, jp, xr, lda, &mut tile),
                        2 => panel::<2, 2>(b, jp, xr, lda, &mut tile),
                        3 => panel::<3, 1>(b, jp, xr, lda, &mut tile),
                        _ => panel::<4, 1>(b, jp, xr, lda, &mut tile),
                    }
                }
                for (i, acc) in tile.iter().enumerate().take(rows) {
                    let r = r0 + i;
                    // SAFETY: row r, columns j0..j0+nr of C are inside it (`check`) and only this task
                    // writes them.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * out.ldc + j0), nr) };
                    for (j, y) in row.iter_mut().enumerate() {
                        let init = match bias {
                            Bias::None => 0.0,
                            Bias::Accumulate => *y,
                            Bias::PerCol(bv) => bv[j0 + j],
                            Bias::PerRow(bv) => bv[r],
                        };
                        *y = init + acc[j];
                    }
                    if act != Activation::None {
                        if nr == NR {
                            activate(act, row);
                        } else {
                            row.iter_mut().for_each(|y| *y = act1(act, *y));
                        }
                    }
                }
                r0 += rows;
            }
        }
    };
    if threads == 1 {
        task(0);
    } else {
        (0..threads).into_par_iter().for_each(task);
    }
}

/// `tile[r][0..NR] = sum_p x[r * lda + p] * B[p, panel jp]` for `R` rows, over the whole depth, with
/// `U` independent accumulator sets (one or two rows alone leave too few FMA chains otherwise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel<const R: usize, const U: usize>(
    b: &PackedB,
    jp: usize,
    x: &[f32],
    lda: usize,
    tile: &mut [[f32; NR]; GROUP],
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): every x index is below (R - 1) * lda + k <= x.len() (the caller's rows), the
    // panel holds kc * NR floats, 64-byte aligned (PackedB's buffer), read at multiples of 8.
    unsafe {
        let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
        let k = b.k;
        let kcb = kc_for(k);
        for pc in 0..k.div_ceil(kcb) {
            let k0 = pc * kcb;
            let bp = b.panel(pc, jp);
            let kc = bp.len() / NR;
            let (bp, xp) = (bp.as_ptr(), x.as_ptr().add(k0));
            let mut p = 0;
            while p + U <= kc {
                for (u, set) in acc.iter_mut().enumerate() {
                    let b0 = _mm256_load_ps(bp.add((p + u) * NR));
                    let b1 = _mm256_load_ps(bp.add((p + u) * NR + 8));
                    for (r, row) in set.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*xp.add(r * lda + p + u));
                        row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                        row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                    }
                }
                p += U;
            }
            while p < kc {
                let b0 = _mm256_load_ps(bp.add(p * NR));
                let b1 = _mm256_load_ps(bp.add(p * NR + 8));
                for (r, row) in acc[0].iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*xp.add(r * lda + p));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
                p += 1;
            }
        }
        for r in 0..R {
            let (mut s0, mut s1) = (acc[0][r][0], acc[0][r][1]);
            for set in acc.iter().skip(1) {
                s0 = _mm256_add_ps(s0, set[r][0]);
                s1 = _mm256_add_ps(s1, set[r][1]);
            }
            _mm256_storeu_ps(tile[r].as_mut_ptr(), s0);
            _mm256_storeu_ps(tile[r].as_mut_ptr().add(8), s1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panel<const R: usize, const U: usize>(
    _b: &PackedB,
    _jp: usize,
    _x: &[f32],
    _lda: usize,
    _tile: &mut [[f32; NR]; GROUP],
) {
    // `check` refuses to run without AVX2 + FMA, so this is never reached.
}
