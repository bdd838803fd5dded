//! A 4-bit weight kept as 4-bit codes (MatMulNBits with `bits = 4`) and the product of a few f32
//! rows by it, reading the codes directly: decode steps of an int4 LLM read an eighth of the f32
//! weight's bytes.
//!
//! Layout (MatMulNBits'): column `n`, block `b` holds `block / 2` bytes of codes, the lower K index
//! in the low nibble. Each block's weight is `code * scale + offset` with `offset = -zero_point *
//! scale`. A product walks each column's blocks: it widens the block's codes to f32 once and
//! multiplies them into every row of A, so the widening is paid once per `block` values whatever
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
    /// Bytes of the codes, scales and offsets.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scale.len() + self.offset.len())
    }

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
        if block < 16 || !block.is_power_of_two() || codes.len() != n * kb * block / 2 || scales.len() != n * kb {
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
    ///
    /// Per row and block, A is laid out once per call as the block's even-K values then its odd-K
    /// values (zero-padded past K), the order of a block's low and high nibbles; with `w = code *
    /// scale + offset`, a block contributes `scale * dot(code, a) + offset * sum(a)`, so the codes
    /// are widened and scaled without interleaving and the lane sums are reduced once per column.
    pub fn matmul_rows(&self, a: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let (k, n, block) = (self.k, self.n, self.block);
        debug_assert!(a.len() >= m * k && out.len() >= m * n);
        let kb = self.k_blocks();
        let half = block / 2;
        let mut split = vec![0f32; m * kb * block];
        let mut sums = vec![0f32; m * kb];
        for r in 0..m {
            for b in 0..kb {
                let dst = &mut split[(r * kb + b) * block..][..block];
                let src = &a[r * k + b * block..r * k + (b * block + block).min(k)];
                for (i, &v) in src.iter().enumerate() {
                    dst[(i % 2) * half + i / 2] = v;
                }
                sums[r * kb + b] = src.iter().sum();
            }
        }
        let tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(COLS_PER_TASK))
            .into_par_iter()
            .map(|t| {
                let cols = t * COLS_PER_TASK..((t + 1) * COLS_PER_TASK).min(n);
                let mut local = vec![0f32; m * cols.len()];
                self.columns(&split, &sums, m, cols.clone(), &mut local);
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

    /// Columns `cols` of the product into `local` (`[m, cols.len()]`), from A split per block
    /// (`split`, see [`Q4Weight::matmul_rows`]) and A's block sums.
    fn columns(&self, split: &[f32], sums: &[f32], m: usize, cols: std::ops::Range<usize>, local: &mut [f32]) {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if crate::fastmath::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked by `has_avx2_fma`).
            unsafe { self.columns_avx2(split, sums, m, cols, local) };
            return;
        }
        self.columns_impl::<false>(split, sums, m, cols, local)
    }

    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2,fma")]
    fn columns_avx2(&self, split: &[f32], sums: &[f32], m: usize, cols: std::ops::Range<usize>, local: &mut [f32]) {
        if !self.block.is_multiple_of(32) {
            return self.columns_impl::<true>(split, sums, m, cols, local);
        }
        #[cfg(target_arch = "x86")]
        use std::arch::x86::*;
        #[cfg(target_arch = "x86_64")]
        use std::arch::x86_64::*;
        let (block, kb) = (self.block, self.k_blocks());
        let half = block / 2;
        let width = cols.len();
        let mask = _mm_set1_epi8(0x0F);
        for (j, col) in cols.enumerate() {
            for r in 0..m {
                let mut lanes = _mm256_setzero_ps();
                let mut off = 0f32;
                for b in 0..kb {
                    let (s, o) = (self.scale[col * kb + b], self.offset[col * kb + b]);
                    let codes = &self.codes[(col * kb + b) * half..][..half];
                    let a = &split[(r * kb + b) * block..][..block];
                    let (ae, ao) = a.split_at(half);
                    let mut acc = _mm256_setzero_ps();
                    // 16 code bytes: low nibbles pair with 16 even-K values of A, high with 16 odd.
                    for ((bytes, xe), xo) in codes.chunks_exact(16).zip(ae.chunks_exact(16)).zip(ao.chunks_exact(16)) {
                        // SAFETY: `bytes` has 16 bytes and `xe`, `xo` 16 floats each (chunks_exact).
                        unsafe {
                            let v = _mm_loadu_si128(bytes.as_ptr().cast());
                            let lo = _mm_and_si128(v, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
                            let wide = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
                            acc = _mm256_fmadd_ps(wide(lo), _mm256_loadu_ps(xe.as_ptr()), acc);
                            acc = _mm256_fmadd_ps(
                                wide(_mm_srli_si128::<8>(lo)),
                                _mm256_loadu_ps(xe.as_ptr().add(8)),
                                acc,
                            );
                            acc = _mm256_fmadd_ps(wide(hi), _mm256_loadu_ps(xo.as_ptr()), acc);
                            acc = _mm256_fmadd_ps(
                                wide(_mm_srli_si128::<8>(hi)),
                                _mm256_loadu_ps(xo.as_ptr().add(8)),
                                acc,
                            );
                        }
                    }
                    lanes = _mm256_fmadd_ps(_mm256_set1_ps(s), acc, lanes);
                    off += o * sums[r * kb + b];
                }
                let mut out = [0f32; 8];
                // SAFETY: `out` holds 8 floats.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), lanes) };
                local[r * width + j] = out.iter().sum::<f32>() + off;
            }
        }
    }

    #[inline(always)]
    fn columns_impl<const FMA: bool>(
        &self,
        split: &[f32],
        sums: &[f32],
        m: usize,
        cols: std::ops::Range<usize>,
        local: &mut [f32],
    ) {
        const L: usize = 8;
        let (block, kb) = (self.block, self.k_blocks());
        let half = block / 2;
        let width = cols.len();
        let (mut lo, mut hi) = (vec![0f32; half], vec![0f32; half]);
        let mut lanes = vec![[0f32; L]; m];
        let mut offs = vec![0f32; m];
        for (j, col) in cols.enumerate() {
            lanes.iter_mut().for_each(|l| *l = [0.0; L]);
            offs.iter_mut().for_each(|o| *o = 0.0);
            for b in 0..kb {
                let (s, o) = (self.scale[col * kb + b], self.offset[col * kb + b]);
                let codes = &self.codes[(col * kb + b) * half..][..half];
                for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(codes) {
                    *l = f32::from(byte & 0xF) * s;
                    *h = f32::from(byte >> 4) * s;
                }
                for (r, lane) in lanes.iter_mut().enumerate() {
                    let a = &split[(r * kb + b) * block..][..block];
                    let (ae, ao) = a.split_at(half);
                    // In registers: half is a multiple of 8 (block is a power of two >= 16).
                    let mut acc = *lane;
                    let weights = lo.chunks_exact(L).zip(hi.chunks_exact(L));
                    for ((wl, wh), (xe, xo)) in weights.zip(ae.chunks_exact(L).zip(ao.chunks_exact(L))) {
                        let (wl, wh): (&[f32; L], &[f32; L]) = (wl.try_into().unwrap(), wh.try_into().unwrap());
                        let (xe, xo): (&[f32; L], &[f32; L]) = (xe.try_into().unwrap(), xo.try_into().unwrap());
                        for l in 0..L {
                            acc[l] = if FMA {
                                wh[l].mul_add(xo[l], wl[l].mul_add(xe[l], acc[l]))
                            } else {
                                acc[l] + wl[l] * xe[l] + wh[l] * xo[l]
                            };
                        }
                    }
                    *lane = acc;
                    offs[r] += o * sums[r * kb + b];
                }
            }
            for r in 0..m {
                local[r * width + j] = lanes[r].iter().sum::<f32>() + offs[r];
            }
        }
    }
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
        assert!(Q4Weight::new(16, 2, 8, &[0; 8], &[1.0; 4], |_, _| 8.0).is_none());
    }
}
