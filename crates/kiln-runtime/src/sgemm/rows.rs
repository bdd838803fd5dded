//! `C = A · B (+ per-row bias)` with a packed constant `A` (a conv filter, `[M, K]`) and a `B`
//! that is never packed: row `p` of `B` is the contiguous run `data[offs[p] ..][.. n]`.
//!
//! A convolution's im2col has exactly this form once its input is laid out as zero-padded,
//! stride-phase-split planes (`conv_cpu.rs`): row `(ci, ky, kx)` of the column matrix is the plane
//! of channel `ci` and phase `(ky*dh % sh, kx*dw % sw)`, shifted by the tap. A pointwise conv
//! needs no copy at all (row `ci` is the input plane). So the micro-kernel loads its B vectors
//! straight from the image (one table lookup per k) instead of packing `K x N` floats per call,
//! which for convs with few output channels cost as much as the multiply-adds.
//!
//! The kernel is [`super::kernel_avx512`]'s 6 x 32 tile with masked loads and stores at the right
//! edge and at most `mr` rows stored at the bottom, so every tile of any `M x N` runs on it.
//! AVX-512F only; callers keep the packing path elsewhere.

use rayon::prelude::*;

use super::{kc_for, GemmError, PackedA, MR, NR, PARALLEL_MIN_MACS};

/// The right operand: `B[p][j] = data[offs[p] + j]` for `j < n`.
#[derive(Clone, Copy)]
pub struct RowsB<'a> {
    pub data: &'a [f32],
    pub offs: &'a [usize],
    pub n: usize,
}

/// Whether [`gemm_packed_a_rows`] runs on this CPU (the packed kernels and AVX-512F).
pub fn rows_available() -> bool {
    super::available() && super::use_avx512()
}

/// `C = clamp(A · B (+ bias per row))`; `c` is row-major `[m, n]` with row stride `ldc`. `clamp`
/// `(lo, hi)` is applied to the finished tile in registers, as `min(max(x, lo), hi)` (a NaN becomes
/// `lo`, as Rust's `f32::max` gives): a fused Relu or Clip costs no pass over C.
pub fn gemm_packed_a_rows(
    a: &PackedA,
    b: RowsB,
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    c: &mut [f32],
    ldc: usize,
) -> Result<(), GemmError> {
    if !rows_available() {
        return Err(GemmError::Unsupported);
    }
    let (m, k, n) = (a.m, a.k, b.n);
    if b.offs.len() != k {
        return Err(GemmError::Shape(format!("B has {} rows, A has k = {k}", b.offs.len())));
    }
    let reach = b.offs.iter().max().copied().unwrap_or(0).checked_add(n);
    if reach.is_none_or(|r| r > b.data.len()) {
        return Err(GemmError::Shape("a B row reaches past its data".into()));
    }
    if ldc < n || (m > 0 && c.len() < (m - 1) * ldc + n) {
        return Err(GemmError::Shape(format!(
            "output of {} floats is too small for {m}x{n}",
            c.len()
        )));
    }
    if bias.is_some_and(|b| b.len() != m) {
        return Err(GemmError::Shape(format!("bias for {m} rows expected")));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let mpan = m.div_ceil(MR);
    // The kernel reads MR bias values per panel: pad the last one.
    let bias_pad: Option<Vec<f32>> = bias.map(|bv| {
        let mut v = bv.to_vec();
        v.resize(mpan * MR, 0.0);
        v
    });
    let out = OutPtr(c.as_mut_ptr());
    let tw = 2 * NR;
    let tiles = n.div_ceil(tw);
    let threads = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // A few tasks per thread so a slow core does not hold the others up.
    let per_task = tiles.div_ceil(threads * 4).max(1);
    let tasks = tiles.div_ceil(per_task);
    let kcb = kc_for(k);
    let blocks = k.div_ceil(kcb);
    let task = |t: usize| {
        for tile in t * per_task..((t + 1) * per_task).min(tiles) {
            let j0 = tile * tw;
            let cols = (n - j0).min(tw);
            let mask = |lanes: usize| ((1u32 << lanes.min(NR)) - 1) as u16;
            let masks = (mask(cols), mask(cols.saturating_sub(NR)));
            for pc in 0..blocks {
                let (k0, kc) = (pc * kcb, kcb.min(k - pc * kcb));
                for ip in 0..mpan {
                    let r0 = ip * MR;
                    let init = match (&bias_pad, pc) {
                        (_, 1..) => Init::Load,
                        (Some(bv), 0) => Init::Col(bv[r0..].as_ptr()),
                        (None, 0) => Init::Zero,
                    };
                    // SAFETY: the panel holds kc*MR floats; every unmasked load reads data[offs[p] + j]
                    // with j < n (checked above against data's length); the tile's unmasked stores are
                    // rows r0..r0+mr, columns j0..j0+cols of C, inside it (checked above) and written
                    // by no other task; `init` points at MR bias values.
                    unsafe {
                        kernel_rows(
                            kc,
                            a.panel(pc, ip).as_ptr(),
                            b.data.as_ptr().add(j0),
                            b.offs[k0..k0 + kc].as_ptr(),
                            masks,
                            out.get().add(r0 * ldc + j0),
                            ldc,
                            MR.min(m - r0),
                            init,
                            if pc + 1 == blocks { clamp } else { None },
                        )
                    }
                }
            }
        }
    };
    if tasks == 1 || threads == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column tiles of one buffer that outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper and not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// `MR` floats, one per row.
    Col(*const f32),
    /// The tile's current contents (a later kc block).
    Load,
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_rows(
    kc: usize,
    a: *const f32,
    b: *const f32,
    offs: *const usize,
    masks: (u16, u16),
    c: *mut f32,
    ldc: usize,
    mr: usize,
    init: Init,
    clamp: Option<(f32, f32)>,
) {
    // SAFETY: forwarded; `rows_available` checked AVX-512F.
    unsafe { kernel_rows_avx512(kc, a, b, offs, masks, c, ldc, mr, init, clamp) }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_rows(
    _kc: usize,
    _a: *const f32,
    _b: *const f32,
    _offs: *const usize,
    _masks: (u16, u16),
    _c: *mut f32,
    _ldc: usize,
    _mr: usize,
    _init: Init,
    _clamp: Option<(f32, f32)>,
) {
    // `rows_available` is false off x86-64, so this is never reached.
}

/// One 6 x 32 tile: `acc[i] += a[p*MR + i] * b[offs[p] .. + 32]` over `kc` steps; rows `>= mr` and
/// masked-off columns are neither loaded nor stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_rows_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    offs: *const usize,
    masks: (u16, u16),
    c: *mut f32,
    ldc: usize,
    mr: usize,
    init: Init,
    clamp: Option<(f32, f32)>,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees kc*MR floats at `a`, kc offsets at `offs`, the
    // unmasked lanes of `b + offs[p]` (+ 16) readable, and the unmasked lanes of rows < mr of the tile
    // at `c` writable; `Col` points at MR floats.
    unsafe {
        let (m0, m1) = masks;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        match init {
            Init::Zero => {}
            Init::Col(bias) => {
                for (i, r) in acc.iter_mut().enumerate() {
                    let v = _mm512_set1_ps(*bias.add(i));
                    *r = [v, v];
                }
            }
            Init::Load => {
                for (i, r) in acc.iter_mut().enumerate() {
                    if i < mr {
                        let row = c.add(i * ldc);
                        *r = [_mm512_maskz_loadu_ps(m0, row), _mm512_maskz_loadu_ps(m1, row.add(NR))];
                    }
                }
            }
        }
        let mut ap = a;
        for p in 0..kc {
            let row = b.add(*offs.add(p));
            let v0 = _mm512_maskz_loadu_ps(m0, row);
            let v1 = _mm512_maskz_loadu_ps(m1, row.add(NR));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                r[0] = _mm512_fmadd_ps(av, v0, r[0]);
                r[1] = _mm512_fmadd_ps(av, v1, r[1]);
            }
            ap = ap.add(MR);
        }
        if let Some((lo, hi)) = clamp {
            let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
            for r in acc.iter_mut() {
                for v in r.iter_mut() {
                    *v = _mm512_min_ps(_mm512_max_ps(*v, lo), hi);
                }
            }
        }
        for (i, r) in acc.iter().enumerate() {
            if i < mr {
                let row = c.add(i * ldc);
                _mm512_mask_storeu_ps(row, m0, r[0]);
                _mm512_mask_storeu_ps(row.add(NR), m1, r[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sgemm::MatRef;

    /// Random-ish shapes against a plain triple loop, including row and column edges, several kc
    /// blocks, shifted (overlapping) rows and a bias.
    #[test]
    fn rows_gemm_matches_naive() {
        if !rows_available() {
            eprintln!("SKIP rows_gemm_matches_naive: no AVX-512F on this CPU");
            return;
        }
        for &(m, k, n, shift) in &[
            (1, 1, 1, 0),
            (6, 9, 32, 1),
            (7, 20, 45, 3),
            (24, 864, 100, 7),
            (13, 5, 17, 40),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let data: Vec<f32> = (0..k * shift + n + 3)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let offs: Vec<usize> = (0..k).map(|p| p * shift + p % 3).collect();
            let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.5).collect();
            let ldc = n + 5;
            let mut c = vec![f32::NAN; m * ldc];
            let pa = PackedA::pack(MatRef::row_major(&a, m, k)).unwrap();
            let clamp = (m % 2 == 1).then_some((-0.5f32, 1.5f32));
            gemm_packed_a_rows(
                &pa,
                RowsB {
                    data: &data,
                    offs: &offs,
                    n,
                },
                Some(&bias),
                clamp,
                &mut c,
                ldc,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = bias[i] as f64
                        + (0..k)
                            .map(|p| a[i * k + p] as f64 * data[offs[p] + j] as f64)
                            .sum::<f64>();
                    let want = clamp.map_or(want, |(lo, hi)| want.clamp(f64::from(lo), f64::from(hi)));
                    let want = clamp.map_or(want, |(lo, hi)| want.clamp(f64::from(lo), f64::from(hi)));
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "m{m} k{k} n{n} ({i},{j}): {got} vs {want}"
                    );
                }
                // Columns past n are untouched.
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
            }
        }
    }
}
