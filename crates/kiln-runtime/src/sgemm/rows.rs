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
//! The kernel runs 6 x 64 tiles (12 x 32 when N < 64) with masked loads and stores at the right
//! edge and at most `mr` rows stored at the bottom, so every tile of any `M x N` runs on it. Tasks
//! are column tiles, and row blocks as well when a small feature map gives too few tiles.
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
    // Wide products run 6 x 64 tiles (each A value loaded feeds 4 vectors), narrow ones (a 7x7 or
    // 14x14 feature map) 12 x 32 tiles (each B vector feeds 12 rows) so the right edge wastes less.
    let wide = n >= 4 * NR;
    let (tw, unit) = if wide { (4 * NR, 1) } else { (2 * NR, 2) };
    let tiles = n.div_ceil(tw);
    let threads = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // A few tasks per thread so a slow core does not hold the others up: column tiles first, and
    // when there are too few of them (a small feature map) row blocks as well.
    let want = threads * 4;
    let units = mpan.div_ceil(unit);
    let row_splits = if threads == 1 {
        1
    } else {
        want.div_ceil(tiles).min(units)
    };
    let panels_per_split = units.div_ceil(row_splits) * unit;
    let row_splits = mpan.div_ceil(panels_per_split);
    let per_task = tiles.div_ceil(want.div_ceil(row_splits)).max(1);
    let tasks = tiles.div_ceil(per_task) * row_splits;
    let kcb = kc_for(k);
    let blocks = k.div_ceil(kcb);
    // Wide products over many columns take each kc block in runs of 128 steps, so the 128 x 64
    // floats of B (32 KiB) a run reads stay in L1 while every panel of the tile reads them
    // (`examples/sgemm.rs`, best of 4 alternating rounds: 64x576x3136 92 -> 100 GFLOP/s,
    // 128x1152x784 103 -> 109; with N <= 196 it measured 6% slower, so narrower products do not).
    let step_len = if wide && n >= 512 { 128 } else { usize::MAX };
    let task = |t: usize| {
        let (tile_group, split) = (t / row_splits, t % row_splits);
        let panels = split * panels_per_split..((split + 1) * panels_per_split).min(mpan);
        for tile in tile_group * per_task..((tile_group + 1) * per_task).min(tiles) {
            let j0 = tile * tw;
            let cols = (n - j0).min(tw);
            let mask = |lanes: usize| ((1u32 << lanes.min(NR)) - 1) as u16;
            let masks = [
                mask(cols),
                mask(cols.saturating_sub(NR)),
                mask(cols.saturating_sub(2 * NR)),
                mask(cols.saturating_sub(3 * NR)),
            ];
            for pc in 0..blocks {
                let (k0, kc) = (pc * kcb, kcb.min(k - pc * kcb));
                // The B rows of one step range stay in L1 while every panel of the tile reads them.
                let mut s0 = 0;
                while s0 < kc {
                    let steps = step_len.min(kc - s0);
                    let last = pc + 1 == blocks && s0 + steps == kc;
                    let mut ip = panels.start;
                    while ip < panels.end {
                        let pair = !wide && ip + 1 < panels.end;
                        let r0 = ip * MR;
                        let init = match (&bias_pad, pc == 0 && s0 == 0) {
                            (_, false) => Init::Load,
                            (Some(bv), true) => Init::Col(bv[r0..].as_ptr()),
                            (None, true) => Init::Zero,
                        };
                        let args = RowsArgs {
                            kc: steps,
                            panel: kc * MR,
                            a: a.panel(pc, ip)[s0 * MR..].as_ptr(),
                            b: b.data.as_ptr().wrapping_add(j0),
                            offs: b.offs[k0 + s0..k0 + s0 + steps].as_ptr(),
                            masks,
                            c: out.get().wrapping_add(r0 * ldc + j0),
                            ldc,
                            mr: (if pair { 2 * MR } else { MR }).min(m - r0),
                            init,
                            clamp: if last { clamp } else { None },
                        };
                        // SAFETY: panel ip (and ip + 1 when `pair`, stored right after it) holds kc*MR
                        // floats, of which steps s0..s0+steps are read; every unmasked load reads
                        // data[offs[p] + j] with j < n (checked above against data's length); the tile's
                        // unmasked stores are rows r0..r0+mr, columns j0..j0+cols of C, inside it (checked
                        // above) and written by no other task; `init` points at MR (2 MR when `pair`)
                        // bias values (padded above).
                        unsafe {
                            match (wide, pair) {
                                (true, _) => kernel_rows::<MR, 4>(&args),
                                (false, true) => kernel_rows::<{ 2 * MR }, 2>(&args),
                                (false, false) => kernel_rows::<MR, 2>(&args),
                            }
                        }
                        ip += if pair { 2 } else { 1 };
                    }
                    s0 += steps;
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

/// The output of a GEMM whose tasks write disjoint tiles (also used by `indexed.rs`).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint tiles of one buffer that outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper and not the raw field).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// One float per row of the tile.
    Col(*const f32),
    /// The tile's current contents (a later kc block).
    Load,
}

/// One tile's operands: `kc` steps of the A panel(s) at `a` (`ROWS / MR` consecutive `kc x MR`
/// panels), B rows `b + offs[p]`, the `16 V` columns at `c` (row stride `ldc`) of which `masks` are
/// live, `mr` rows stored.
struct RowsArgs {
    kc: usize,
    /// Floats from one A panel to the next (the packed kc block's `kc * MR`).
    panel: usize,
    a: *const f32,
    b: *const f32,
    offs: *const usize,
    masks: [u16; 4],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    init: Init,
    clamp: Option<(f32, f32)>,
}

#[cfg(target_arch = "x86_64")]
unsafe fn kernel_rows<const ROWS: usize, const V: usize>(t: &RowsArgs) {
    // SAFETY: forwarded; `rows_available` checked AVX-512F.
    unsafe { kernel_rows_avx512::<ROWS, V>(t) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_rows<const ROWS: usize, const V: usize>(_t: &RowsArgs) {
    // `rows_available` is false off x86-64, so this is never reached.
}

/// One `ROWS x 16 V` tile (6 x 64 or 12 x 32): `acc[i] += A[i][p] * b[offs[p] .. + 16 V]` over `kc` steps,
/// row `i` of A at `a[(i / MR) * kc * MR + p * MR + i % MR]`; rows `>= mr` and masked-off columns
/// are neither loaded nor stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_rows_avx512<const ROWS: usize, const V: usize>(t: &RowsArgs) {
    use std::arch::x86_64::*;
    let masks = t.masks;
    let (kc, c, ldc, mr) = (t.kc, t.c, t.ldc, t.mr);
    // SAFETY (whole body): the caller guarantees ROWS / MR panels of kc*MR floats at `a`, kc
    // offsets at `offs`, the unmasked lanes of `b + offs[p]` (+ 16 j) readable, and the unmasked lanes
    // of rows < mr of the tile at `c` writable; `Col` points at ROWS floats.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
        match t.init {
            Init::Zero => {}
            Init::Col(bias) => {
                for (i, r) in acc.iter_mut().enumerate() {
                    let v = _mm512_set1_ps(*bias.add(i));
                    *r = [v; V];
                }
            }
            Init::Load => {
                for (i, r) in acc.iter_mut().enumerate() {
                    if i < mr {
                        let row = c.add(i * ldc);
                        for (j, x) in r.iter_mut().enumerate() {
                            *x = _mm512_maskz_loadu_ps(masks[j], row.add(j * NR));
                        }
                    }
                }
            }
        }
        let second = t.panel;
        let mut ap = t.a;
        for p in 0..kc {
            let row = t.b.add(*t.offs.add(p));
            let mut bv = [_mm512_setzero_ps(); V];
            for (j, x) in bv.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(masks[j], row.add(j * NR));
            }
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add((i / MR) * second + i % MR));
                for (x, b) in r.iter_mut().zip(bv) {
                    *x = _mm512_fmadd_ps(av, b, *x);
                }
            }
            ap = ap.add(MR);
        }
        if let Some((lo, hi)) = t.clamp {
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
                for (j, x) in r.iter().enumerate() {
                    _mm512_mask_storeu_ps(row.add(j * NR), masks[j], *x);
                }
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
            (12, 30, 33, 2),
            (25, 700, 70, 5),
            // Large enough to run in parallel: few column tiles, so row blocks are split as well
            // (narrow 12 x 32 tiles, then wide 6 x 64 ones).
            (130, 800, 49, 3),
            (70, 500, 130, 1),
            // Wide and long: each kc block runs in steps of 128 (bias first, clamp last).
            (9, 300, 600, 1),
            (13, 900, 520, 2),
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
            let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            pool.install(|| {
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
            })
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = bias[i] as f64
                        + (0..k)
                            .map(|p| a[i * k + p] as f64 * data[offs[p] + j] as f64)
                            .sum::<f64>();
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
