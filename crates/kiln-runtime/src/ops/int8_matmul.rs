//! Operator family `int8_matmul`: `ai.kiln::MatMulInt8Weight`, the weight-only int8 MatMul/Gemm
//! that `kiln_graph::passes::int8_matmul` fuses from `DequantizeLinear(int8 const) -> MatMul/Gemm`.
//!
//! Attributes: `weight` (int8 `[K, N]`, or `[N, K]` with `transB = 1`), `scale` (f32 `[N]`, one per
//! output channel), and Gemm's `alpha` / `beta`. Inputs: `A` (`[.., M, K]`, any rank >= 1) and an
//! optional Gemm bias `C` (broadcast to `[.., M, N]`). `Y = alpha * A @ (W * scale) + beta * C`.
//!
//! The weight stays int8 for the life of the plan (1 byte per element; the f32 model needs 4). On the
//! CPU in f32 it is dequantized one block of weight rows (K) at a time into a scratch buffer that
//! stays in cache and multiplied there with `gemm`, accumulating into the output; other devices
//! and dtypes dequantize the whole weight and use the regular MatMul.

use candle_core::{DType as CDType, Tensor as CT};
use gemm::Parallelism;
use kiln_graph::{DType, TensorData};
use rayon::prelude::*;

use super::common::{elems, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::fastmath::with_f32;
use crate::{bail, Result, Tensor};

const KILN: &str = "ai.kiln";

/// Bytes of dequantized weight per block. Measured on bert-base (seq 128, 1 thread): 1 MiB blocks
/// run as fast as the f32 MatMul; dequantizing the whole weight per call was 1.2-1.35x slower.
const TILE_BYTES: usize = 1024 * 1024;
/// Fewer weight rows per block would make the output's read-modify-write dominate.
const MIN_BLOCK_K: usize = 128;
/// Up to this many rows of A (decode steps, batch-1 classifiers) the weight is streamed once and
/// dequantized in registers: a product this thin is bound by reading the weight, which int8 makes a
/// quarter of f32's bytes, while the blocked path writes and rereads a dequantized f32 copy.
const GEMV_ROWS: usize = 4;
/// Output columns (`[N, K]` weights) or weight rows (`[K, N]`) per parallel task of the thin path.
const GEMV_COLS: usize = 256;
const GEMV_ROWS_K: usize = 128;

pub fn register(r: &mut Registry) {
    r.add_domain(KILN, "MatMulInt8Weight", factory);
}

/// The constant part of one node, shared by every run.
struct Int8Weight {
    /// int8 codes as stored in the attribute (`[K, N]` or, with `trans_b`, `[N, K]`).
    codes: TensorData,
    /// alpha * scale, per output channel.
    scale: Vec<f32>,
    k: usize,
    n: usize,
    trans_b: bool,
    beta: f32,
    /// The codes and scales on the GPU, for the fused CUDA kernel.
    device_copy: crate::cuda_kernels::WeightCache,
}

fn factory(nc: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let codes = nc
        .attr_tensor("weight")?
        .ok_or_else(|| nc.err("the 'weight' attribute is required"))?
        .clone();
    let scale = nc
        .attr_tensor("scale")?
        .ok_or_else(|| nc.err("the 'scale' attribute is required"))?
        .values::<f32>()
        .ok_or_else(|| nc.err("'scale' must be a float32 tensor"))?;
    let trans_b = nc.attr_i("transB", 0)? != 0;
    let alpha = nc.attr_f("alpha", 1.0)?;
    let beta = nc.attr_f("beta", 1.0)?;
    if codes.dtype != DType::I8 {
        return Err(nc.err(format!("'weight' must be int8, got {}", codes.dtype)));
    }
    let (k, n) = match (codes.dims.as_slice(), trans_b) {
        ([k, n], false) => (*k, *n),
        ([n, k], true) => (*k, *n),
        (d, _) => return Err(nc.err(format!("'weight' must be 2-D, got shape {d:?}"))),
    };
    if scale.len() != n {
        return Err(nc.err(format!("'scale' has {} values for {n} output channels", scale.len())));
    }
    let w = Int8Weight {
        codes,
        scale: scale.iter().map(|s| s * alpha).collect(),
        k,
        n,
        trans_b,
        beta,
        device_copy: Default::default(),
    };
    Ok(kernel(move |cx, ins| {
        let a = tin(ins, 0)?;
        let c = tin_opt(ins, 1)?;
        out1(w.run(cx, a, c)?)
    }))
}

impl Int8Weight {
    fn run(&self, cx: &RunCx, a: &Tensor, c: Option<&Tensor>) -> Result<Tensor> {
        let dt = a.dtype();
        if !dt.is_float() {
            bail!("MatMulInt8Weight needs a float input, got {dt}");
        }
        let (k, n) = (self.k, self.n);
        let Some((&ka, batch)) = a.dims().split_last() else {
            bail!("MatMulInt8Weight needs an input of rank >= 1, got a scalar");
        };
        if ka != k {
            bail!(
                "input shape {:?} does not fit the weight: K is {k}, the input's last dimension {ka}",
                a.dims()
            );
        }
        let mut out_dims = batch.to_vec();
        out_dims.push(n);
        cx.check_alloc(elems(&out_dims), dt)?;
        let rows: usize = batch.iter().product();
        let weight = crate::cuda_kernels::WeightArgs {
            codes: self.codes.bytes(),
            scale: &self.scale,
            k,
            n,
            trans_b: self.trans_b,
            cache: &self.device_copy,
        };
        let on_gpu = crate::cuda_kernels::int8_gemm(a.candle(), &weight)?;
        let fast = if on_gpu.is_some() {
            None
        } else if dt == DType::F32 {
            let ac = a.candle().contiguous()?;
            with_f32(&ac, |x| self.gemm_f32(x, rows)).transpose()?
        } else {
            None
        };
        let y = match (on_gpu, fast) {
            (Some(y), _) => y,
            (None, Some(y)) => CT::from_vec(y, out_dims.as_slice(), a.candle().device())?,
            (None, None) => {
                let w = self.dequantized(a.candle().device())?.to_dtype(a.candle().dtype())?;
                let a2 = a.candle().reshape((rows, k))?;
                super::matmul::mm_any(&a2.contiguous()?, &w)?.reshape(out_dims.as_slice())?
            }
        };
        let y = match c {
            Some(c) if self.beta != 0.0 => {
                let mut cc = c.candle().to_dtype(y.dtype())?;
                if self.beta != 1.0 {
                    cc = cc.affine(self.beta as f64, 0.0)?;
                }
                y.broadcast_add(&cc).map_err(|e| {
                    crate::RuntimeError::msg(format!(
                        "bias of shape {:?} does not broadcast to the output {out_dims:?}: {e}",
                        c.dims()
                    ))
                })?
            }
            _ => y,
        };
        Tensor::new(y, dt)
    }

    /// The whole weight as f32 `[K, N]` on `device` (the generic path).
    fn dequantized(&self, device: &candle_core::Device) -> Result<CT> {
        let (k, n) = (self.k, self.n);
        let codes = self.codes.bytes();
        let mut w = vec![0f32; k * n];
        for (i, dst) in w.iter_mut().enumerate() {
            let (kk, nn) = (i / n, i % n);
            let at = if self.trans_b { nn * k + kk } else { i };
            *dst = codes.get(at).map_or(0.0, |&b| b as i8 as f32) * self.scale[nn];
        }
        Ok(CT::from_vec(w, (k, n), device)?.to_dtype(CDType::F32)?)
    }

    /// `x [rows, K] @ W` in f32, one block of weight rows at a time.
    fn gemm_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (k, n) = (self.k, self.n);
        let codes = self.codes.bytes();
        if x.len() != rows * k || codes.len() != k * n {
            bail!(
                "internal: MatMulInt8Weight operands have {} and {} elements",
                x.len(),
                codes.len()
            );
        }
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 {
            return Ok(out);
        }
        if k == 0 {
            return Ok(out);
        }
        if rows <= GEMV_ROWS {
            self.gemv_f32(x, rows, &mut out);
            return Ok(out);
        }
        // Blocks of whole weight rows (K): each block's A columns and the output are read in
        // place, so splitting adds only a read-modify-write of the output per block.
        let kc = (TILE_BYTES / (4 * n)).max(MIN_BLOCK_K).min(k);
        let mut scratch = vec![0f32; kc * n];
        let threads = crate::num_threads();
        // The dequantization is spread over rayon's threads too when there are several.
        let par_dequant = threads > 1 && kc * n >= 1 << 16;
        let par = if threads > 1 && rows * kc * n >= 1 << 16 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        let mut k0 = 0;
        while k0 < k {
            let kb = kc.min(k - k0);
            let buf = &mut scratch[..kb * n];
            // Row-major [kb, N] (weight [K, N]) or [N, kb] (weight [N, K]): both read the codes
            // in order.
            let scale = &self.scale;
            let (rhs_cs, rhs_rs) = if self.trans_b {
                let row = |(j, dst): (usize, &mut [f32])| {
                    let src = &codes[j * k + k0..j * k + k0 + kb];
                    let sj = scale[j];
                    dst.iter_mut().zip(src).for_each(|(d, &q)| *d = q as i8 as f32 * sj);
                };
                if par_dequant {
                    buf.par_chunks_exact_mut(kb).enumerate().for_each(row);
                } else {
                    buf.chunks_exact_mut(kb).enumerate().for_each(row);
                }
                (kb as isize, 1isize)
            } else {
                let row = |(r, dst): (usize, &mut [f32])| {
                    let src = &codes[(k0 + r) * n..(k0 + r + 1) * n];
                    dst.iter_mut()
                        .zip(src)
                        .zip(scale)
                        .for_each(|((d, &q), &sj)| *d = q as i8 as f32 * sj);
                };
                if par_dequant {
                    buf.par_chunks_exact_mut(n).enumerate().for_each(row);
                } else {
                    buf.chunks_exact_mut(n).enumerate().for_each(row);
                }
                (1isize, n as isize)
            };
            // SAFETY: dst is the whole row-major [rows, n] output; lhs is columns k0..k0+kb of the
            // row-major [rows, k] input (x.len() == rows*k checked above, k0 + kb <= k); rhs is
            // the kb*n scratch with the strides set for its layout just above. No other
            // reference to them is live during the call.
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    kb,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    k0 > 0,
                    x.as_ptr().add(k0),
                    1,
                    k as isize,
                    buf.as_ptr(),
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            k0 += kb;
        }
        Ok(out)
    }
}

impl Int8Weight {
    /// `out [rows, N] = x [rows, K] @ (W * scale)` for a few rows, each weight element converted and
    /// scaled as it is read (the blocked path's `q * scale` in f32, then multiply-added). The weight
    /// is read in storage order, split over the threads: `[K, N]` by ranges of K (each task sums
    /// whole rows into partial outputs, added at the end), `[N, K]` by ranges of N.
    fn gemv_f32(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        let (len, step) = if self.trans_b { (n, GEMV_COLS) } else { (k, GEMV_ROWS_K) };
        let parts = len.div_ceil(step);
        let parallel = crate::num_threads() > 1 && k * n >= 1 << 16 && parts > 1;
        let part = |p: usize| -> Vec<f32> {
            let (a, b) = (p * step, ((p + 1) * step).min(len));
            let mut acc = vec![0f32; if self.trans_b { rows * (b - a) } else { rows * n }];
            #[cfg(target_arch = "x86_64")]
            if crate::fastmath::has_avx2_fma() {
                // SAFETY: the CPU has the features each build is compiled for (checked here).
                unsafe {
                    if crate::sgemm::use_avx512() {
                        self.gemv_part_avx512(x, rows, a, b, &mut acc)
                    } else {
                        self.gemv_part_avx2(x, rows, a, b, &mut acc)
                    }
                }
                return acc;
            }
            self.gemv_part(x, rows, a, b, &mut acc);
            acc
        };
        let results: Vec<Vec<f32>> = if parallel {
            (0..parts).into_par_iter().map(part).collect()
        } else {
            (0..parts).map(part).collect()
        };
        if self.trans_b {
            for (p, acc) in results.iter().enumerate() {
                let (j0, nb) = (p * step, acc.len() / rows);
                for r in 0..rows {
                    out[r * n + j0..r * n + j0 + nb].copy_from_slice(&acc[r * nb..(r + 1) * nb]);
                }
            }
        } else {
            for acc in &results {
                for (o, &v) in out.iter_mut().zip(acc) {
                    *o += v;
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn gemv_part_avx512(&self, x: &[f32], rows: usize, a: usize, b: usize, acc: &mut [f32]) {
        self.gemv_part(x, rows, a, b, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv_part_avx2(&self, x: &[f32], rows: usize, a: usize, b: usize, acc: &mut [f32]) {
        self.gemv_part(x, rows, a, b, acc)
    }

    /// One part of the thin product: columns `a..b` into `acc` (`[rows, b - a]`) for `[N, K]`,
    /// weight rows `a..b` into the partial sums `acc` (`[rows, N]`) for `[K, N]`.
    #[inline(always)]
    fn gemv_part(&self, x: &[f32], rows: usize, a: usize, b: usize, acc: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        let codes = self.codes.bytes();
        if self.trans_b {
            // W is [N, K]: a dot product per column, summed in 16 lanes (then across them).
            let nb = b - a;
            for (jj, j) in (a..b).enumerate() {
                let (q, s) = (&codes[j * k..(j + 1) * k], self.scale[j]);
                for r in 0..rows {
                    let xr = &x[r * k..(r + 1) * k];
                    let mut lanes = [0f32; 16];
                    let (qc, xc) = (q.chunks_exact(16), xr.chunks_exact(16));
                    let (qt, xt) = (qc.remainder(), xc.remainder());
                    for (qv, xv) in qc.zip(xc) {
                        for l in 0..16 {
                            lanes[l] += xv[l] * (qv[l] as i8 as f32 * s);
                        }
                    }
                    let mut sum: f32 = lanes.iter().sum();
                    for (&qv, &xv) in qt.iter().zip(xt) {
                        sum += xv * (qv as i8 as f32 * s);
                    }
                    acc[r * nb + jj] = sum;
                }
            }
            return;
        }
        // W is [K, N]: each weight row scaled once and added to every row's sums.
        let mut w = vec![0f32; n];
        for kk in a..b {
            let q = &codes[kk * n..(kk + 1) * n];
            for ((d, &qv), &sv) in w.iter_mut().zip(q).zip(&self.scale) {
                *d = qv as i8 as f32 * sv;
            }
            for r in 0..rows {
                let xv = x[r * k + kk];
                for (o, &wv) in acc[r * n..(r + 1) * n].iter_mut().zip(&w) {
                    *o += xv * wv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked kernel against a plain loop, over shapes with one block, several and a partial one.
    #[test]
    fn blocked_gemm_matches_reference() {
        for &(rows, k, n, trans_b) in &[
            (1, 7, 5, false),
            (3, 2000, 300, false),
            (5, 1500, 70, true),
            (0, 4, 4, false),
            (4, 4, 1, true),
            (2, 3000, 200, true),
            (3, 700, 2000, false),
            // The thin path with several column blocks, both layouts, K not a multiple of 16.
            (1, 1280, 1000, true),
            (2, 577, 1000, false),
            (4, 33, 600, true),
            (6, 64, 300, true),
        ] {
            let codes: Vec<i8> = (0..k * n).map(|i| ((i * 31 % 255) as i32 - 127) as i8).collect();
            let scale: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
            let dims = if trans_b { vec![n, k] } else { vec![k, n] };
            let w = Int8Weight {
                codes: TensorData::from_values("w", dims, &codes).unwrap(),
                scale: scale.clone(),
                k,
                n,
                trans_b,
                beta: 1.0,
                device_copy: Default::default(),
            };
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 17 % 29) as f32 - 14.0) / 9.0).collect();
            let got = w.gemm_f32(&x, rows).unwrap();
            for r in 0..rows {
                for j in 0..n {
                    let terms: Vec<f64> = (0..k)
                        .map(|kk| {
                            let q = if trans_b { codes[j * k + kk] } else { codes[kk * n + j] };
                            x[r * k + kk] as f64 * (q as f32 * scale[j]) as f64
                        })
                        .collect();
                    let want: f64 = terms.iter().sum();
                    // f32 accumulation: the error bound scales with the sum of |terms|.
                    let tol = 1e-6 * terms.iter().map(|t| t.abs()).sum::<f64>() + 1e-6;
                    let g = got[r * n + j] as f64;
                    assert!((g - want).abs() <= tol, "{rows}x{k}x{n} [{r},{j}]: {g} vs {want}");
                }
            }
        }
    }
}
