//! Swish (`x * sigmoid(alpha * x)`) and SwiGLU (`swish(a) * b`).

use super::{from_compute, to_compute};
use crate::ops::common::tin;
use crate::ops::{kernel, out1, NodeCtx, OpKernel};
use crate::{bail, Result, Tensor};

pub(super) fn swish_op(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let alpha = n.attr_f("alpha", 1.0)? as f64;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        out1(swish(x, alpha)?)
    }))
}

pub(super) fn swiglu_op(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let alpha = n.attr_f("alpha", 1.0)? as f64;
    Ok(kernel(move |_, ins| {
        let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
        if a.dims() != b.dims() {
            bail!(
                "SwiGLU inputs must have the same shape: {:?} vs {:?}",
                a.dims(),
                b.dims()
            );
        }
        if a.dtype() != b.dtype() {
            bail!("SwiGLU inputs must have the same dtype");
        }
        let s = swish(a, alpha)?;
        let (sc, dt) = to_compute(&s)?;
        let (bc, _) = to_compute(b)?;
        out1(from_compute(sc.mul(&bc)?, dt)?)
    }))
}

fn swish(x: &Tensor, alpha: f64) -> Result<Tensor> {
    let (c, dt) = to_compute(x)?;
    // x * sigmoid(alpha * x) = x / (1 + exp(-alpha * x))
    let den = c.affine(-alpha, 0.0)?.exp()?.affine(1.0, 1.0)?;
    from_compute(c.div(&den)?, dt)
}
