//! Products with fewer rows than the micro-tile (`m < MR`): a decode step's projections, one row per
//! sequence. The 6 x 16 micro-kernel would multiply five rows of zero padding for one real row;
//! here each packed `kc x NR` B panel is streamed once for all (up to four) rows, accumulating in
//! registers across the whole depth, and the panels are split over the threads: such a product reads
//! its weight once and is bound by memory bandwidth, so one thread cannot keep up with two.
//!
//! Every output starts from its bias (or C, or zero) and accumulates `A[r, p] * B[p, j]` for p in
//! order with one FMA each, exactly as the 6 x 16 micro-kernel does, so a row's result does not
//! depend on how many rows share the product: a request gives the same bits alone or in a batch.

use super::{activate, kc_for, Activation, Bias, MatRef, OutPtr, PackedB, NR};
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
        let (jp0, jp1) = (t * chunk, ((t + 1) * chunk).min(npan));
        if jp0 >= jp1 {
            return; // more tasks than whole chunks (e.g. 5 panels over 4 threads)
        }
        for jp in jp0..jp1 {
            let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
            let mut r0 = 0;
            while r0 < m {
                let rows = GROUP.min(m - r0);
                // The accumulators' initial values, as the micro-kernel's `Init`.
                let mut tile = [[0f32; NR]; GROUP];
                for (i, init) in tile.iter_mut().enumerate().take(rows) {
                    let r = r0 + i;
                    for (j, v) in init.iter_mut().enumerate().take(nr) {
                        *v = match bias {
                            Bias::None => 0.0,
                            // SAFETY: (r, j0 + j) is inside C (`check`).
                            Bias::Accumulate => unsafe { *out.ptr.add(r * out.ldc + j0 + j) },
                            Bias::PerCol(bv) => bv[j0 + j],
                            Bias::PerRow(bv) => bv[r],
                        };
                    }
                }
                let xr = &x[r0 * lda..];
                // SAFETY: `check` made sure the CPU has AVX2 and FMA; `xr` holds `rows` rows of k floats
                // at stride `lda`, and the panels kc x NR floats.
                unsafe {
                    match rows {
                        1 => panel::<1>(b, jp, xr, lda, &mut tile),
                        2 => panel::<2>(b, jp, xr, lda, &mut tile),
                        3 => panel::<3>(b, jp, xr, lda, &mut tile),
                        _ => panel::<4>(b, jp, xr, lda, &mut tile),
                    }
                }
                for (i, acc) in tile.iter().enumerate().take(rows) {
                    // SAFETY: row r0 + i, columns j0..j0+nr of C are inside it (`check`) and only this
                    // task writes them.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add((r0 + i) * out.ldc + j0), nr) };
                    row.copy_from_slice(&acc[..nr]);
                }
                r0 += rows;
            }
        }
        if act != Activation::None {
            // Over the task's whole column range, as the micro-kernel path applies it.
            let (j0, j1) = (jp0 * NR, (jp1 * NR).min(n));
            for r in 0..m {
                // SAFETY: this task's columns of row r, finished above; no other task touches them.
                let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * out.ldc + j0), j1 - j0) };
                activate(act, row);
            }
        }
    };
    if threads == 1 {
        task(0);
    } else {
        (0..threads).into_par_iter().for_each(task);
    }
}

/// `tile[r][0..NR] += sum_p x[r * lda + p] * B[p, panel jp]` for `R` rows over the whole depth, one
/// FMA per p in order (the micro-kernel's summation order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel<const R: usize>(b: &PackedB, jp: usize, x: &[f32], lda: usize, tile: &mut [[f32; NR]; GROUP]) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): every x index is below (R - 1) * lda + k <= x.len() (the caller's rows), the
    // panel holds kc * NR floats, 64-byte aligned (PackedB's buffer), read at multiples of 8.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            *a = [
                _mm256_loadu_ps(tile[r].as_ptr()),
                _mm256_loadu_ps(tile[r].as_ptr().add(8)),
            ];
        }
        let k = b.k;
        let kcb = kc_for(k);
        for pc in 0..k.div_ceil(kcb) {
            let k0 = pc * kcb;
            let bp = b.panel(pc, jp);
            let kc = bp.len() / NR;
            let (bp, xp) = (bp.as_ptr(), x.as_ptr().add(k0));
            for p in 0..kc {
                let b0 = _mm256_load_ps(bp.add(p * NR));
                let b1 = _mm256_load_ps(bp.add(p * NR + 8));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*xp.add(r * lda + p));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile[r].as_mut_ptr(), a[0]);
            _mm256_storeu_ps(tile[r].as_mut_ptr().add(8), a[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panel<const R: usize>(_b: &PackedB, _jp: usize, _x: &[f32], _lda: usize, _tile: &mut [[f32; NR]; GROUP]) {
    // `check` refuses to run without AVX2 + FMA, so this is never reached.
}
