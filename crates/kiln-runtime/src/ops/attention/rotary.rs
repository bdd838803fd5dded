//! ONNX `RotaryEmbedding`: rotates the first `rotary_embedding_dim` features of each head by the
//! cos/sin caches (optionally gathered by `position_ids`), interleaved or half-split.

use candle_core::Tensor as CT;

use super::{from_compute, to_compute};
use crate::ops::common::{tin, tin_opt};
use crate::ops::{kernel, out1, NodeCtx, OpKernel};
use crate::{bail, Result};

pub(super) fn rotary(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let interleaved = n.attr_i("interleaved", 0)? != 0;
    let rot_dim = n.attr_i("rotary_embedding_dim", 0)?;
    let num_heads = n.attr_i("num_heads", 0)?;
    if rot_dim < 0 || num_heads < 0 {
        return Err(n.err("rotary_embedding_dim and num_heads must be nonnegative"));
    }
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let (cos, sin) = (tin(ins, 1)?, tin(ins, 2)?);
        let pos = tin_opt(ins, 3)?;
        let (xc, dt) = to_compute(x)?;
        let (cc, _) = to_compute(cos)?;
        let (sc, _) = to_compute(sin)?;
        // Work in (B, S, H, D) for 3-D inputs, (B, H, S, D) for 4-D ones.
        let (x4, b, sq) = match xc.rank() {
            4 => {
                let (b, _, s, _) = xc.dims4()?;
                (xc.clone(), b, s)
            }
            3 => {
                let (b, s, hid) = xc.dims3()?;
                if num_heads == 0 || hid % num_heads as usize != 0 {
                    bail!("hidden size {hid} is not divisible by num_heads {num_heads}");
                }
                let h = num_heads as usize;
                (xc.reshape((b, s, h, hid / h))?, b, s)
            }
            r => bail!("RotaryEmbedding input must be 3-D or 4-D, got rank {r}"),
        };
        let hd = x4.dim(3)?;
        let rd = if rot_dim == 0 { hd } else { rot_dim as usize };
        if rd > hd || rd % 2 != 0 {
            bail!("rotary_embedding_dim {rd} is invalid for head size {hd}");
        }
        let half = rd / 2;
        // cos/sin as (B, S, half)
        let (cg, sg) = match pos {
            Some(p) => {
                let ids = p.to_i64_vec()?;
                if cc.rank() != 2 || sc.rank() != 2 {
                    bail!("cos_cache and sin_cache must be 2-D when position_ids is given");
                }
                let maxp = cc.dim(0)?.min(sc.dim(0)?);
                if ids.len() != b * sq {
                    bail!(
                        "position_ids shape {:?} does not match (batch, seq) = ({b}, {sq})",
                        p.dims()
                    );
                }
                let idx: Vec<u32> = ids
                    .iter()
                    .map(|&i| {
                        if i < 0 || i as usize >= maxp {
                            bail!("position id {i} is out of range for cache length {maxp}");
                        }
                        Ok(i as u32)
                    })
                    .collect::<Result<_>>()?;
                let it = CT::from_vec(idx, ids.len(), xc.device())?;
                (
                    cc.index_select(&it, 0)?.reshape((b, sq, cc.dim(1)?))?,
                    sc.index_select(&it, 0)?.reshape((b, sq, sc.dim(1)?))?,
                )
            }
            None => (cc.clone(), sc.clone()),
        };
        if cg.rank() != 3 || sg.rank() != 3 || cg.dim(2)? != half || sg.dim(2)? != half {
            bail!("cos/sin cache last dimension must be rotary_embedding_dim/2 = {half}");
        }
        // Broadcast shape for cos/sin against x4's (.., .., .., half).
        let (cg, sg) = if xc.rank() == 4 {
            (cg.unsqueeze(1)?, sg.unsqueeze(1)?)
        } else {
            (cg.unsqueeze(2)?, sg.unsqueeze(2)?)
        };
        let xr = x4.narrow(3, 0, rd)?;
        let (x1, x2) = if interleaved {
            let d = xr.dims().to_vec();
            let pairs = xr.reshape((d[0], d[1], d[2], half, 2))?;
            (pairs.narrow(4, 0, 1)?.squeeze(4)?, pairs.narrow(4, 1, 1)?.squeeze(4)?)
        } else {
            (xr.narrow(3, 0, half)?, xr.narrow(3, half, half)?)
        };
        let real = x1.broadcast_mul(&cg)?.sub(&x2.broadcast_mul(&sg)?)?;
        let imag = x1.broadcast_mul(&sg)?.add(&x2.broadcast_mul(&cg)?)?;
        let rot = if interleaved {
            let d = real.dims().to_vec();
            CT::stack(&[&real, &imag], 4)?.reshape((d[0], d[1], d[2], rd))?
        } else {
            CT::cat(&[&real, &imag], 3)?
        };
        let out = if rd < hd {
            CT::cat(&[&rot, &x4.narrow(3, rd, hd - rd)?], 3)?
        } else {
            rot
        };
        let out = out.reshape(xc.dims())?;
        out1(from_compute(out, dt)?)
    }))
}
