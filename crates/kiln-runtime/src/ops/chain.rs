//! `ai.kiln::ElementwiseChain`: a chain of scalar element-wise steps in one pass (see
//! `kiln_graph::passes::elementwise_chain`). On f32 CPU tensors each step runs over a cache-sized
//! block before the next, with the same f32 operations in the same order as the original nodes
//! (bit-identical results); elsewhere the steps run as candle ops.

use candle_core::Tensor as CT;
use kiln_graph::passes::elementwise_chain::{decode, hard_swish, Step, KILN, OP};
use rayon::prelude::*;

use super::common::tin;
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::fastmath::with_f32;
use crate::{Result, Tensor};

pub fn register(r: &mut Registry) {
    r.add_domain(KILN, OP, build);
}

fn build(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let program = n
        .attr_floats("program")?
        .ok_or_else(|| n.err("missing attribute 'program'"))?;
    let steps = decode(&program).ok_or_else(|| n.err("malformed 'program' attribute"))?;
    let min_rank = n.attr_i("min_rank", 0)?;
    if !(0..=8).contains(&min_rank) {
        return Err(n.err(format!("min_rank {min_rank} is out of range 0..=8")));
    }
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        // One-element constants of a higher rank broadcast to leading 1s.
        let mut dims = vec![1usize; (min_rank as usize).saturating_sub(x.dims().len())];
        dims.extend_from_slice(x.dims());
        let fast = with_f32(x.candle(), |src| run_f32(&steps, src));
        let y = match fast {
            Some(v) => CT::from_vec(v, dims, x.candle().device())?,
            None => run_candle(&steps, x.candle())?.reshape(dims)?,
        };
        out1(Tensor::new(y, x.dtype())?)
    }))
}

/// Elements per block: each step sweeps a block while it is in L1/L2.
const BLOCK: usize = 4096;

fn run_f32(steps: &[Step], src: &[f32]) -> Vec<f32> {
    let mut out = src.to_vec();
    run_in_place(steps, &mut out);
    out
}

/// Applies the chain to `data` in place, block by block (blocks in parallel when there are many).
pub(crate) fn run_in_place(steps: &[Step], data: &mut [f32]) {
    let avx2 = crate::fastmath::has_avx2_fma();
    let block = |b: &mut [f32]| {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if avx2 {
            // SAFETY: the CPU has AVX2 (checked by `has_avx2_fma`).
            unsafe { apply_avx2(steps, b) };
            return;
        }
        let _ = avx2;
        apply(steps, b);
    };
    if data.len() <= 4 * BLOCK {
        data.chunks_mut(BLOCK).for_each(block);
    } else {
        data.par_chunks_mut(BLOCK).for_each(block);
    }
}

/// The chain as a candle in-place op on a contiguous f32 CPU tensor (a kernel's fresh output).
pub(crate) struct ChainInPlace<'a>(pub &'a [Step]);

impl candle_core::InplaceOp1 for ChainInPlace<'_> {
    fn name(&self) -> &'static str {
        "elementwise-chain"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("elementwise chain: f32 storage expected")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("elementwise chain: contiguous layout expected")
        };
        let Some(slice) = data.get_mut(start..end) else {
            candle_core::bail!("elementwise chain: layout out of the storage")
        };
        run_in_place(self.0, slice);
        Ok(())
    }
}

/// `apply` compiled for AVX2. Rust never contracts a multiply and an add into an FMA, so the
/// results stay bit-identical to the unfused ops.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
fn apply_avx2(steps: &[Step], x: &mut [f32]) {
    apply(steps, x)
}

#[inline(always)]
fn apply(steps: &[Step], x: &mut [f32]) {
    for s in steps {
        match s {
            Step::Mul(c) => x.iter_mut().for_each(|v| *v *= c),
            Step::Add(c) => x.iter_mut().for_each(|v| *v += c),
            Step::Sub(c) => x.iter_mut().for_each(|v| *v -= c),
            Step::SubFrom(c) => x.iter_mut().for_each(|v| *v = c - *v),
            Step::Div(c) => x.iter_mut().for_each(|v| *v /= c),
            Step::DivInto(c) => x.iter_mut().for_each(|v| *v = c / *v),
            Step::Clip(lo, hi) => x.iter_mut().for_each(|v| {
                // As candle's maximum/minimum: NaN stays NaN.
                let t = if *v < *lo { *lo } else { *v };
                *v = if t > *hi { *hi } else { t };
            }),
            Step::Sigmoid => {
                // The Sigmoid kernel's own f32 function (bit-identical), through a stack copy per block.
                let mut buf = [0f32; BLOCK];
                for xc in x.chunks_mut(BLOCK) {
                    let t = &mut buf[..xc.len()];
                    t.copy_from_slice(xc);
                    crate::fastmath::map_slice(crate::fastmath::Func::Sigmoid, t, xc);
                }
            }
            Step::HardSwish => x.iter_mut().for_each(|v| *v = hard_swish(*v)),
            Step::MulSelf(inner) => {
                // Blocks are at most BLOCK long: the gate fits on the stack.
                let mut buf = [0f32; BLOCK];
                for xc in x.chunks_mut(BLOCK) {
                    let g = &mut buf[..xc.len()];
                    g.copy_from_slice(xc);
                    apply_inner(inner, g);
                    xc.iter_mut().zip(g.iter()).for_each(|(v, f)| *v *= f);
                }
            }
        }
    }
}

/// Nested chains (the gate of `x * f(x)`): a call, as `apply` cannot inline itself.
fn apply_inner(steps: &[Step], x: &mut [f32]) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if crate::fastmath::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (checked by `has_avx2_fma`).
        unsafe { apply_avx2(steps, x) };
        return;
    }
    apply(steps, x)
}

pub(crate) fn run_candle(steps: &[Step], x: &CT) -> Result<CT> {
    let scalar = |c: f32| -> Result<CT> { Ok(CT::new(c, x.device())?.to_dtype(x.dtype())?) };
    let mut y = x.clone();
    for s in steps {
        y = match s {
            Step::Mul(c) => y.broadcast_mul(&scalar(*c)?)?,
            Step::Add(c) => y.broadcast_add(&scalar(*c)?)?,
            Step::Sub(c) => y.broadcast_sub(&scalar(*c)?)?,
            Step::SubFrom(c) => scalar(*c)?.broadcast_sub(&y)?,
            Step::Div(c) => y.broadcast_div(&scalar(*c)?)?,
            Step::DivInto(c) => scalar(*c)?.broadcast_div(&y)?,
            Step::Clip(lo, hi) => {
                let mut t = y;
                if lo.is_finite() {
                    t = t.maximum(f64::from(*lo))?;
                }
                if hi.is_finite() {
                    t = t.minimum(f64::from(*hi))?;
                }
                t
            }
            Step::MulSelf(inner) => y.mul(&run_candle(inner, &y)?)?,
            Step::Sigmoid => {
                let dt = y.dtype();
                let f = y.to_dtype(candle_core::DType::F32)?;
                (f.neg()?.exp()? + 1.0)?.recip()?.to_dtype(dt)?
            }
            Step::HardSwish => {
                let gate = y.affine(1.0 / 6.0, 0.5)?.clamp(0.0, 1.0)?;
                y.mul(&gate)?
            }
        };
    }
    Ok(y)
}
