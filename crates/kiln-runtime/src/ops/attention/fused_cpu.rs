//! The fused f32 CPU attention: per (batch, head) on the packed GEMM's micro-kernels, without the
//! (B, H, S, T) scores tensor.

use candle_core::{DType as CDType, Tensor as CT};

use crate::{bail, Result};

/// An additive bias broadcast to `target` (4-D) by strides: its f32 values and the element stride of
/// each target dim (0 along broadcast dims).
fn bias_strides(bias: &CT, target: [usize; 4]) -> Result<(Vec<f32>, [usize; 4])> {
    let dims = bias.dims();
    if dims.len() > 4 {
        bail!("attention mask of shape {dims:?} does not broadcast to {target:?}");
    }
    let mut d4 = [1usize; 4];
    d4[4 - dims.len()..].copy_from_slice(dims);
    let mut strides = [0usize; 4];
    let mut acc = 1;
    for i in (0..4).rev() {
        if d4[i] != 1 && d4[i] != target[i] {
            bail!("attention mask of shape {dims:?} does not broadcast to {target:?}");
        }
        strides[i] = if d4[i] == 1 { 0 } else { acc };
        acc *= d4[i];
    }
    let values = bias.to_dtype(CDType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((values, strides))
}

/// Softmax of each row of `t` scores; a row with no attendable key (all -inf) gives zeros.
fn softmax_rows(scores: &mut [f32], t: usize) {
    for row in scores.chunks_mut(t) {
        if row.iter().all(|&x| x == f32::NEG_INFINITY) {
            row.fill(0.0);
        } else {
            crate::fastmath::softmax_row(row);
        }
    }
}

/// Scaled dot-product attention on the CPU in f32, one task per (batch, head): `Q·Kᵀ` with the bias
/// as the product's initial value, a softmax per row (rows with no attendable key give zeros) and
/// `P·V`, through the small in-place kernel where the CPU has AVX-512 (`sgemm::small`), else the
/// packed GEMM's micro-kernels, without materializing the (B, H, S, T) scores.
/// Inputs are (B, H, S, D) / (B, Hk, T, D); returns (B, H, S, Dv). `None` when a tensor is not an
/// f32 CPU tensor.
pub(super) fn fused_cpu_attention(
    q4: &CT,
    k4: &CT,
    v4: &CT,
    bias: Option<&CT>,
    scale: f64,
    reps: usize,
) -> Result<Option<CT>> {
    use crate::fastmath::f32_view;
    use crate::sgemm::{gemm_seq, Bias, MatRef};
    use rayon::prelude::*;
    let (b, hq, s, d) = q4.dims4()?;
    let (_, hk, t, dv) = v4.dims4()?;
    let bias = match bias {
        None => None,
        Some(bb) => Some(bias_strides(bb, [b, hq, s, t])?),
    };
    let (q, k, v) = (q4.contiguous()?, k4.contiguous()?, v4.contiguous()?);
    let (Some(qv), Some(kv), Some(vv)) = (f32_view(&q), f32_view(&k), f32_view(&v)) else {
        return Ok(None);
    };
    let (qs, ks, vs) = (qv.slice(), kv.slice(), vv.slice());
    if qs.len() != b * hq * s * d || ks.len() != b * hk * t * d || vs.len() != b * hk * t * dv {
        bail!("internal: attention operand sizes do not match their shapes");
    }
    let scale = scale as f32;
    let mut y = vec![0f32; b * hq * s * dv];
    y.par_chunks_mut(s * dv)
        .enumerate()
        .try_for_each(|(bh, out)| -> Result<()> {
            let (bi, h) = (bh / hq, bh % hq);
            let kvh = bi * hk + h / reps;
            let qsc: Vec<f32> = qs[bh * s * d..(bh + 1) * s * d].iter().map(|x| x * scale).collect();
            let kh = &ks[kvh * t * d..(kvh + 1) * t * d];
            let vh = &vs[kvh * t * dv..(kvh + 1) * t * dv];
            let mut scores = vec![0f32; s * t];
            let init = match &bias {
                None => Bias::None,
                Some((bv, st)) => {
                    let base = bi * st[0] + h * st[1];
                    if st[2] == 0 && st[3] == 1 {
                        Bias::PerCol(&bv[base..base + t])
                    } else {
                        for (i, row) in scores.chunks_mut(t).enumerate() {
                            for (j, x) in row.iter_mut().enumerate() {
                                *x = bv[base + i * st[2] + j * st[3]];
                            }
                        }
                        Bias::Accumulate
                    }
                }
            };
            if crate::sgemm::small::available() && d > 0 && t > 0 {
                use crate::sgemm::small::{gemm_small, Init};
                // Both products read their operands in place; Kᵀ is built once for the head.
                let mut kt = vec![0f32; d * t];
                for (j, krow) in kh.chunks_exact(d).enumerate() {
                    for (p, &x) in krow.iter().enumerate() {
                        kt[p * t + j] = x;
                    }
                }
                let init = match init {
                    Bias::PerCol(row) => Init::PerCol(row),
                    Bias::Accumulate => Init::Accumulate,
                    _ => Init::Zero,
                };
                gemm_small(&qsc, d, &kt, t, s, d, t, init, &mut scores, t);
                softmax_rows(&mut scores, t);
                gemm_small(&scores, t, vh, dv, s, t, dv, Init::Zero, out, dv);
                return Ok(());
            }
            // Kᵀ as a (D, T) view of K's (T, D) rows.
            let kt = MatRef {
                data: kh,
                rows: d,
                cols: t,
                rs: 1,
                cs: d,
            };
            let err = |e: crate::sgemm::GemmError| crate::RuntimeError::msg(e.to_string());
            gemm_seq(MatRef::row_major(&qsc, s, d), kt, init, &mut scores, t).map_err(err)?;
            softmax_rows(&mut scores, t);
            gemm_seq(
                MatRef::row_major(&scores, s, t),
                MatRef::row_major(vh, t, dv),
                Bias::None,
                out,
                dv,
            )
            .map_err(err)
        })?;
    Ok(Some(CT::from_vec(y, (b, hq, s, dv), q4.device())?))
}
