//! A 4-bit weight kept as 4-bit codes (MatMulNBits with `bits = 4`) and the product of a few f32
//! rows by it, reading the codes directly: decode steps of an int4 LLM read an eighth of the f32
//! weight's bytes.
//!
//! Layout (MatMulNBits'): column `n`, block `b` holds `block / 2` bytes of codes, the lower K index
//! in the low nibble. Each block's weight is `code * scale + offset` with `offset = -zero_point *
//! scale`. A product row walks each column's blocks: it expands the block's codes to f32 once and
//! multiplies them into every row of A, so the expansion is paid once per `block` values whatever
//! the row count.

use rayon::prelude::*;

/// Rows of A up to which [`Q4Weight::matmul_rows`] is the product; above it the caller expands the
/// weight and runs the packed f32 GEMM.
pub(crate) const Q4_MAX_ROWS: usize = 16;

/// Columns per parallel task.
const COLS_PER_TASK: usize = 16;

/// A `[K, N]` weight as 4-bit codes with a scale and an offset per block of `block` values along K.
pub(crate) struct Q4Weight {
    pub k: usize,
    pub n: usize,
    pub block: usize,
    /// `[N, k_blocks, block / 2]`
    codes: Vec<u8>,
    /// `[N, k_blocks]`
    scale: Vec<f32>,
    /// `[N, k_blocks]`: `-zero_point * scale`
    offset: Vec<f32>,
}

impl Q4Weight {
    /// From MatMulNBits' codes, scales and one zero point per block (`zero(col, block)`).
    pub fn new(
        k: usize,
        n: usize,
        block: usize,
        codes: &[u8],
        scales: &[f32],
        zero: impl Fn(usize, usize) -> f32,
    ) -> Option<Q4Weight> {
        let kb = k.div_ceil(block);
        if block < 2 || !block.is_multiple_of(2) || codes.len() != n * kb * block / 2 || scales.len() != n * kb {
            return None;
        }
        let offset = (0..n * kb).map(|i| -zero(i / kb, i % kb) * scales[i]).collect();
        Some(Q4Weight {
            k,
            n,
            block,
            codes: codes.to_vec(),
            scale: scales.to_vec(),
            offset,
        })
    }

    fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Expands column `col`, block `b` into `out` (`min(block, K - b * block)` values).
    #[inline(always)]
    fn expand(&self, col: usize, b: usize, out: &mut [f32]) -> usize {
        let kb = self.k_blocks();
        let half = self.block / 2;
        let (s, o) = (self.scale[col * kb + b], self.offset[col * kb + b]);
        let codes = &self.codes[(col * kb + b) * half..][..half];
        for (pair, &byte) in out.chunks_exact_mut(2).zip(codes) {
            pair[0] = f32::from(byte & 0xF) * s + o;
            pair[1] = f32::from(byte >> 4) * s + o;
        }
        self.block.min(self.k - b * self.block)
    }

    /// The weight expanded to f32, `[N, K]` row-major (column `n` of the `[K, N]` weight is row `n`).
    pub fn to_f32_nk(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1)).enumerate().for_each(|(col, row)| {
            let mut buf = vec![0f32; self.block];
            for b in 0..self.k_blocks() {
                let len = self.expand(col, b, &mut buf);
                row[b * self.block..][..len].copy_from_slice(&buf[..len]);
            }
        });
        w
    }

    /// `out = a @ W (+ bias)` for `m` rows of `a` (`[m, K]` row-major) into `out` (`[m, N]`).
    pub fn matmul_rows(&self, a: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        debug_assert!(a.len() >= m * k && out.len() >= m * n);
        let tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(COLS_PER_TASK))
            .into_par_iter()
            .map(|t| {
                let cols = t * COLS_PER_TASK..((t + 1) * COLS_PER_TASK).min(n);
                let mut local = vec![0f32; m * cols.len()];
                self.columns(a, m, cols.clone(), &mut local);
                (cols.start, local)
            })
            .collect();
        for (start, local) in tasks {
            let width = local.len() / m.max(1);
            for r in 0..m {
                out[r * n + start..][..width].copy_from_slice(&local[r * width..][..width]);
            }
        }
        if let Some(bias) = bias {
            for row in out[..m * n].chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
    }

    /// Columns `cols` of the product into `local` (`[m, cols.len()]`).
    fn columns(&self, a: &[f32], m: usize, cols: std::ops::Range<usize>, local: &mut [f32]) {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if crate::fastmath::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
            unsafe { self.columns_avx2(a, m, cols, local) };
            return;
        }
        self.columns_impl::<false>(a, m, cols, local)
    }

    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2,fma")]
    fn columns_avx2(&self, a: &[f32], m: usize, cols: std::ops::Range<usize>, local: &mut [f32]) {
        self.columns_impl::<true>(a, m, cols, local)
    }

    #[inline(always)]
    fn columns_impl<const FMA: bool>(&self, a: &[f32], m: usize, cols: std::ops::Range<usize>, local: &mut [f32]) {
        let width = cols.len();
        let mut buf = vec![0f32; self.block];
        let mut acc = vec![0f32; m];
        for (j, col) in cols.enumerate() {
            acc.iter_mut().for_each(|v| *v = 0.0);
            for b in 0..self.k_blocks() {
                let len = self.expand(col, b, &mut buf);
                let w = &buf[..len];
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc += dot::<FMA>(&a[r * self.k + b * self.block..][..len], w);
                }
            }
            for (r, &v) in acc.iter().enumerate() {
                local[r * width + j] = v;
            }
        }
    }
}

/// `sum(x * y)` with 16 independent lanes (vectorised where the caller's target features allow).
#[inline(always)]
fn dot<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (xs, ys) in xc.zip(yc) {
        for l in 0..16 {
            lanes[l] = if FMA {
                xs[l].mul_add(ys[l], lanes[l])
            } else {
                lanes[l] + xs[l] * ys[l]
            };
        }
    }
    let mut tail = 0f32;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Random codes, scales and zero points; the product against the expanded weight's plain loop.
    #[test]
    fn rows_match_the_expanded_weight() {
        let mut seed = 7u64;
        for &(k, n, block, m) in &[
            (64usize, 5usize, 16usize, 1usize),
            (70, 17, 32, 3),
            (33, 40, 16, 16),
            (256, 33, 64, 2),
            (8, 3, 32, 4),
            (100, 1, 128, 7),
        ] {
            let kb = k.div_ceil(block);
            let codes: Vec<u8> = (0..n * kb * block / 2).map(|_| lcg(&mut seed) as u8).collect();
            let scales: Vec<f32> = (0..n * kb)
                .map(|_| (lcg(&mut seed) % 1000) as f32 / 1e4 + 1e-3)
                .collect();
            let zps: Vec<f32> = (0..n * kb).map(|_| (lcg(&mut seed) % 16) as f32).collect();
            let w = Q4Weight::new(k, n, block, &codes, &scales, |c, b| zps[c * kb + b]).unwrap();
            let nk = w.to_f32_nk();
            // The expansion is the MatMulNBits formula.
            for col in [0, n - 1] {
                for kk in [0, k / 2, k - 1] {
                    let (b, i) = (kk / block, kk % block);
                    let byte = codes[(col * kb + b) * block / 2 + i / 2];
                    let code = if i % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    let want = (f32::from(code) - zps[col * kb + b]) * scales[col * kb + b];
                    assert!((nk[col * k + kk] - want).abs() <= 1e-6 * want.abs().max(1.0));
                }
            }
            let a: Vec<f32> = (0..m * k)
                .map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let mut got = vec![0f32; m * n];
            w.matmul_rows(&a, m, Some(&bias), &mut got);
            for r in 0..m {
                for c in 0..n {
                    let want: f64 = bias[c] as f64
                        + (0..k)
                            .map(|kk| a[r * k + kk] as f64 * nk[c * k + kk] as f64)
                            .sum::<f64>();
                    let g = got[r * n + c] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "k {k} n {n} block {block} m {m} r {r} c {c}: {g} vs {want}"
                    );
                }
            }
        }
        assert!(Q4Weight::new(16, 2, 16, &[0; 15], &[1.0; 2], |_, _| 8.0).is_none());
    }
}
