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
