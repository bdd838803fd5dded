//! Broadcasting f32 arithmetic (Add, Sub, Mul, Div) on the CPU.
//!
//! The output shape is collapsed into as few axes as the two operands' broadcast patterns allow
//! (`[N, C, H, W] * [1, C, 1, 1]` becomes `[N*C, H*W]` with the right side constant along the
//! inner axis; `[B, S, H] + [H]` becomes `[B*S, H]`), then every inner row is one tight loop over
//! slices or a slice and a scalar, which LLVM vectorizes. Rows run in parallel on big tensors.
//! candle's generic broadcast path walks an index iterator per element instead.

use candle_core::Tensor as CT;
use rayon::prelude::*;

use crate::fastmath::with_f32;
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// Strides of `dims` read as the trailing axes of `out` (numpy broadcasting); 0 on broadcast axes.
fn bcast_strides(dims: &[usize], out: &[usize]) -> Option<Vec<usize>> {
    if dims.len() > out.len() {
        return None;
    }
    let lead = out.len() - dims.len();
    let mut strides = vec![0usize; out.len()];
    let mut acc = 1usize;
    for i in (0..dims.len()).rev() {
        let d = dims[i];
        if d == out[lead + i] && d != 1 {
            strides[lead + i] = acc;
        } else if d != 1 {
            return None;
        }
        acc *= d;
    }
    Some(strides)
}

/// Collapses axes where both operands keep one pattern: returns (sizes, strides a, strides b).
type Collapsed = (Vec<usize>, Vec<usize>, Vec<usize>);

fn collapse(out: &[usize], sa: &[usize], sb: &[usize]) -> Collapsed {
    let mut sizes: Vec<usize> = Vec::new();
    let mut ra: Vec<usize> = Vec::new();
    let mut rb: Vec<usize> = Vec::new();
    for i in (0..out.len()).rev() {
        if out[i] == 1 {
            continue;
        }
        if let (Some(&n), Some(&a), Some(&b)) = (sizes.last(), ra.last(), rb.last()) {
            let fits = |s: usize, inner: usize| (s == 0 && inner == 0) || (inner != 0 && s == inner * n);
            if fits(sa[i], a) && fits(sb[i], b) {
                if let Some(last) = sizes.last_mut() {
                    *last *= out[i];
                }
                continue;
            }
        }
        sizes.push(out[i]);
        ra.push(sa[i]);
        rb.push(sb[i]);
    }
    sizes.reverse();
    ra.reverse();
    rb.reverse();
    if sizes.is_empty() {
        return (vec![1], vec![0], vec![0]);
    }
    (sizes, ra, rb)
}

fn row(op: BinOp, a: &[f32], a_scalar: Option<f32>, b: &[f32], b_scalar: Option<f32>, dst: &mut [f32]) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if crate::fastmath::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (checked by `has_avx2_fma`).
        unsafe { row_avx2(op, a, a_scalar, b, b_scalar, dst) };
        return;
    }
    row_impl(op, a, a_scalar, b, b_scalar, dst)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(op: BinOp, a: &[f32], a_scalar: Option<f32>, b: &[f32], b_scalar: Option<f32>, dst: &mut [f32]) {
    row_impl(op, a, a_scalar, b, b_scalar, dst)
}

#[inline(always)]
fn row_impl(op: BinOp, a: &[f32], a_scalar: Option<f32>, b: &[f32], b_scalar: Option<f32>, dst: &mut [f32]) {
    macro_rules! go {
        ($f:expr) => {
            match (a_scalar, b_scalar) {
                (None, None) => dst
                    .iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(d, (&x, &y))| *d = $f(x, y)),
                (Some(x), None) => dst.iter_mut().zip(b).for_each(|(d, &y)| *d = $f(x, y)),
                (None, Some(y)) => dst.iter_mut().zip(a).for_each(|(d, &x)| *d = $f(x, y)),
                (Some(x), Some(y)) => dst.iter_mut().for_each(|d| *d = $f(x, y)),
            }
        };
    }
    match op {
        BinOp::Add => go!(|x: f32, y: f32| x + y),
        BinOp::Sub => go!(|x: f32, y: f32| x - y),
        BinOp::Mul => go!(|x: f32, y: f32| x * y),
        BinOp::Div => go!(|x: f32, y: f32| x / y),
    }
}

/// `a op b` with numpy broadcasting; `None` when an operand is not a contiguous f32 CPU tensor
/// or the shapes do not broadcast (the caller's generic path reports the error).
pub(crate) fn binary_f32(op: BinOp, a: &CT, b: &CT) -> Option<Result<CT>> {
    let (ad, bd) = (a.dims(), b.dims());
    let rank = ad.len().max(bd.len());
    let mut out = vec![1usize; rank];
    for i in 0..rank {
        let x = if i + ad.len() >= rank {
            ad[i + ad.len() - rank]
        } else {
            1
        };
        let y = if i + bd.len() >= rank {
            bd[i + bd.len() - rank]
        } else {
            1
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    let total: usize = out.iter().product();
    if total == 0 {
        return None;
    }
    let sa = bcast_strides(ad, &out)?;
    let sb = bcast_strides(bd, &out)?;
    let (sizes, ra, rb) = collapse(&out, &sa, &sb);
    let inner = *sizes.last()?;
    let (ia, ib) = (*ra.last()?, *rb.last()?);
    let outer_sizes = &sizes[..sizes.len() - 1];
    // `[R, C] op [C]` with a short C (channels-last per-channel scales: squeeze-excite, biases): the
    // row vector repeated to a few hundred floats, so one call covers many rows.
    if let ([rows], [oa], [ob], 1, 1) = (outer_sizes, &ra[..1], &rb[..1], ia, ib) {
        let a_rows = *oa == inner && *ob == 0;
        let b_rows = *ob == inner && *oa == 0;
        if inner < REPEAT_BELOW && (a_rows || b_rows) {
            return rows_by_vector(op, a, b, a_rows, *rows, inner, out);
        }
    }
    let r = with_f32(a, |av| {
        with_f32(b, |bv| {
            let mut dst = vec![0f32; total];
            let work = |(ri, d): (usize, &mut [f32])| {
                // Offsets of row `ri` in a and b (odometer over the outer axes).
                let (mut oa, mut ob, mut rem) = (0usize, 0usize, ri);
                for k in (0..outer_sizes.len()).rev() {
                    let idx = rem % outer_sizes[k];
                    rem /= outer_sizes[k];
                    oa += idx * ra[k];
                    ob += idx * rb[k];
                }
                let (xs, x1) = if ia == 0 {
                    (&av[..0], Some(av[oa]))
                } else {
                    (&av[oa..oa + inner], None)
                };
                let (ys, y1) = if ib == 0 {
                    (&bv[..0], Some(bv[ob]))
                } else {
                    (&bv[ob..ob + inner], None)
                };
                row(op, xs, x1, ys, y1, d);
            };
            if total >= 1 << 15 {
                let rows_per_task = ((1 << 14) / inner).max(1);
                dst.par_chunks_mut(inner)
                    .enumerate()
                    .with_min_len(rows_per_task)
                    .for_each(work);
            } else {
                dst.chunks_mut(inner).enumerate().for_each(work);
            }
            dst
        })
    })??;
    Some(CT::from_vec(r, out, a.device()).map_err(Into::into))
}

/// Row length below which a broadcast row vector is repeated (see [`rows_by_vector`]).
const REPEAT_BELOW: usize = 256;

/// `a op b` where one operand is `[rows, inner]` and the other one `[inner]` row (`a_rows`: `a` is
/// the matrix), over chunks of whole rows against the vector repeated to the chunk's length.
fn rows_by_vector(
    op: BinOp,
    a: &CT,
    b: &CT,
    a_rows: bool,
    rows: usize,
    inner: usize,
    out: Vec<usize>,
) -> Option<Result<CT>> {
    let r = with_f32(a, |av| {
        with_f32(b, |bv| {
            let (m, v) = if a_rows { (av, bv) } else { (bv, av) };
            let per = (REPEAT_BELOW / inner).max(1);
            let rep: Vec<f32> = v[..inner].iter().copied().cycle().take(per * inner).collect();
            let mut dst = vec![0f32; rows * inner];
            let work = |(ci, d): (usize, &mut [f32])| {
                let at = ci * per * inner;
                let x = &m[at..at + d.len()];
                let y = &rep[..d.len()];
                if a_rows {
                    row(op, x, None, y, None, d);
                } else {
                    row(op, y, None, x, None, d);
                }
            };
            if rows * inner >= 1 << 15 {
                dst.par_chunks_mut(per * inner)
                    .enumerate()
                    .with_min_len(((1 << 14) / (per * inner)).max(1))
                    .for_each(work);
            } else {
                dst.chunks_mut(per * inner).enumerate().for_each(work);
            }
            dst
        })
    })??;
    Some(CT::from_vec(r, out, a.device()).map_err(Into::into))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(dims: &[usize], seed: usize) -> CT {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 31 + seed * 7) % 23) as f32 * 0.5 - 5.0 + 0.25)
            .collect();
        CT::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn matches_candle_broadcasting() {
        let shapes: &[(&[usize], &[usize])] = &[
            (&[2, 3, 4, 5], &[2, 3, 4, 5]),
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[2, 3, 4, 5], &[3, 1, 1]),
            (&[1, 3, 1, 1], &[2, 3, 4, 5]),
            (&[4, 6, 8], &[8]),
            (&[8], &[4, 6, 8]),
            (&[4, 6, 8], &[]),
            (&[], &[4, 6, 8]),
            (&[4, 1, 8], &[1, 6, 1]),
            (&[2, 1, 3, 1], &[1, 4, 1, 5]),
            (&[5, 1], &[1, 7]),
            (&[3, 200, 300], &[3, 1, 300]),
            (&[1, 1, 1], &[1]),
            // Channels-last per-channel vectors (the repeated-row path, serial and parallel).
            (&[1, 7, 9, 16], &[1, 1, 1, 16]),
            (&[1, 1, 17], &[1, 40, 50, 17]),
            (&[1, 64, 64, 24], &[24]),
            (&[3, 300], &[300]),
        ];
        for &(x, y) in shapes {
            let (a, b) = (t(x, 1), t(y, 2));
            for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
                let got = binary_f32(op, &a, &b).expect("handled").expect("ok");
                let want = match op {
                    BinOp::Add => a.broadcast_add(&b),
                    BinOp::Sub => a.broadcast_sub(&b),
                    BinOp::Mul => a.broadcast_mul(&b),
                    BinOp::Div => a.broadcast_div(&b),
                }
                .expect("candle");
                assert_eq!(got.dims(), want.dims(), "{x:?} {op:?} {y:?}");
                let g: Vec<f32> = got.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
                let w: Vec<f32> = want.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
                assert_eq!(g, w, "{x:?} {op:?} {y:?}");
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let (a, b) = (t(&[2, 3], 1), t(&[4, 3], 2));
        assert!(binary_f32(BinOp::Add, &a, &b).is_none(), "shapes do not broadcast");
        let at = t(&[3, 2], 1).t().expect("view");
        assert!(binary_f32(BinOp::Add, &at, &t(&[2, 3], 2)).is_none(), "not contiguous");
        let z = t(&[0, 3], 1);
        assert!(binary_f32(BinOp::Add, &z, &t(&[3], 2)).is_none(), "empty");
    }
}
