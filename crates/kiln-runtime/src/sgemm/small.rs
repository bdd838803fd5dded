//! Small products with both operands read in place (AVX-512): `C = A · B + init` for a row-major
//! `A` (`m x k`) and a row-major `B` (`k x n`), the shapes of one attention head (`Q·Kᵀ` with `Kᵀ`
//! built once per head, `P·V`). At 64 x 32 x 64 the packed GEMM spends more time packing both
//! operands than multiplying; here a block of up to 6 rows x 64 columns of C stays in 24 registers
//! while `k` steps each broadcast one element of A per row and load up to four vectors of one row
//! of B, so nothing is copied. Columns past a multiple of 16 go through masked loads and stores.
//!
//! Each output starts from its initial value and accumulates `A[r, p] * B[p, j]` for p in order
//! with one FMA each.

/// Rows of C per block.
const R: usize = 6;
/// 16-lane vectors of C per block row.
const V: usize = 4;

/// The initial value of each output.
#[derive(Clone, Copy)]
pub(crate) enum Init<'a> {
    Zero,
    /// One value per column (`n` values).
    PerCol(&'a [f32]),
    /// C already holds the initial values.
    Accumulate,
}

/// Whether [`gemm_small`] runs on this CPU.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::use_avx512() && crate::fastmath::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m x n] (row stride ldc) = init + A[m x k] (row stride lda) · B[k x n] (row stride ldb)` on
/// the calling thread. Panics when a slice is too short for its shape or [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_small(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    m: usize,
    k: usize,
    n: usize,
    init: Init,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(available(), "gemm_small needs AVX-512");
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && ldb >= n && ldc >= n);
    assert!(k == 0 || (a.len() >= (m - 1) * lda + k && b.len() >= (k - 1) * ldb + n));
    assert!(c.len() >= (m - 1) * ldc + n);
    if let Init::PerCol(v) = init {
        assert!(v.len() >= n);
    }
    #[cfg(target_arch = "x86_64")]
    for r0 in (0..m).step_by(R) {
        let rows = R.min(m - r0);
        for j0 in (0..n).step_by(16 * V) {
            let cols = (16 * V).min(n - j0);
            let blk = Blk {
                a: a[r0 * lda..].as_ptr(),
                lda,
                b: b[j0..].as_ptr(),
                ldb,
                k,
                c: c[r0 * ldc + j0..].as_mut_ptr(),
                ldc,
                cols,
                init: match init {
                    Init::Zero => Start::Zero,
                    Init::PerCol(v) => Start::Row(v[j0..].as_ptr()),
                    Init::Accumulate => Start::C,
                },
            };
            // SAFETY: AVX-512 is present (asserted). The block reads rows r0..r0+rows of A
            // (k values each), rows 0..k of B at columns j0..j0+cols, and reads/writes rows
            // r0..r0+rows of C at those columns: all inside the slices (asserted above). Every
            // B, init and C access is masked to the block's `cols` columns.
            unsafe {
                macro_rules! dispatch {
                    ($($r:literal),*) => {
                        match rows {
                            $($r => match cols.div_ceil(16) {
                                1 => block::<$r, 1>(&blk),
                                2 => block::<$r, 2>(&blk),
                                3 => block::<$r, 3>(&blk),
                                _ => block::<$r, 4>(&blk),
                            },)*
                            _ => unreachable!("rows per block are 1..=R"),
                        }
                    };
                }
                dispatch!(1, 2, 3, 4, 5, 6)
            }
        }
    }
}

/// Where a block's outputs start.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Start {
    Zero,
    Row(*const f32),
    C,
}

/// One block of C: pointers at its top-left element of A's rows, B's columns and C.
#[cfg(target_arch = "x86_64")]
struct Blk {
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    init: Start,
}

/// `RR` rows x `VV` vectors of C (the last vector masked to `cols`).
///
/// # Safety
/// AVX-512F; the pointers cover the block as [`gemm_small`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block<const RR: usize, const VV: usize>(x: &Blk) {
    use std::arch::x86_64::*;
    let tail = x.cols - 16 * (VV - 1);
    let masks: [u16; VV] = std::array::from_fn(|v| {
        if v + 1 == VV {
            ((1u32 << tail) - 1) as u16
        } else {
            0xffff
        }
    });
    // SAFETY (all accesses below): masked to the block's columns and rows < RR, k, inside the
    // operands (caller).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); VV]; RR];
        match x.init {
            Start::Zero => {}
            Start::Row(p) => {
                let row: [__m512; VV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], p.add(16 * v)));
                acc = [row; RR];
            }
            Start::C => {
                for (r, ar) in acc.iter_mut().enumerate() {
                    for (v, a) in ar.iter_mut().enumerate() {
                        *a = _mm512_maskz_loadu_ps(masks[v], x.c.add(r * x.ldc + 16 * v));
                    }
                }
            }
        }
        for p in 0..x.k {
            let brow = x.b.add(p * x.ldb);
            let bv: [__m512; VV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], brow.add(16 * v)));
            for (r, ar) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*x.a.add(r * x.lda + p));
                for (a, &b) in ar.iter_mut().zip(&bv) {
                    *a = _mm512_fmadd_ps(av, b, *a);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (v, &a) in ar.iter().enumerate() {
                _mm512_mask_storeu_ps(x.c.add(r * x.ldc + 16 * v), masks[v], a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_plain_product_on_every_block_shape_and_edge() {
        assert!(available() || !super::super::use_avx512(), "AVX-512 without AVX2/FMA");
        if !available() {
            // This CPU has no AVX-512: attention takes the packed GEMM, tested with it.
            assert!(!super::super::use_avx512());
            return;
        }
        let mut seed = 17u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut cases = 0;
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 32, 64),
            (7, 3, 17),
            (13, 64, 65),
            (64, 32, 64),
            (5, 0, 9),
            (3, 70, 130),
        ] {
            for init in 0..3 {
                let (lda, ldb, ldc) = (k + 2, n + 3, n + 1);
                let a: Vec<f32> = (0..m * lda).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..k.max(1) * ldb).map(|_| rnd()).collect();
                let row: Vec<f32> = (0..n).map(|_| rnd()).collect();
                let c0: Vec<f32> = (0..m * ldc).map(|_| rnd()).collect();
                let mut want = c0.clone();
                for i in 0..m {
                    for j in 0..n {
                        let mut s = match init {
                            0 => 0.0,
                            1 => row[j],
                            _ => c0[i * ldc + j],
                        };
                        for p in 0..k {
                            s = a[i * lda + p].mul_add(b[p * ldb + j], s);
                        }
                        want[i * ldc + j] = s;
                    }
                }
                let mut c = c0.clone();
                let it = match init {
                    0 => Init::Zero,
                    1 => Init::PerCol(&row),
                    _ => Init::Accumulate,
                };
                gemm_small(&a, lda, &b, ldb, m, k, n, it, &mut c, ldc);
                // Same FMAs in the same order: identical bits; the padding between rows untouched.
                assert!(
                    c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{k}x{n} init {init}"
                );
                cases += 1;
            }
        }
        assert_eq!(cases, 21);
    }
}
