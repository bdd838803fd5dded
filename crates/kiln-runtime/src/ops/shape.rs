//! Shape and data-movement operators: Reshape, Transpose, Concat, Slice, Gather, Split,
//! Squeeze/Unsqueeze, Flatten, Expand, Tile, Shape, Size, Constant, ConstantOfShape, Range.

use std::sync::Arc;

use candle_core::Tensor as CT;
use kiln_graph::{Attribute, TensorData};

use super::common::{elems, ints_input, norm_axes, norm_axis, tin};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, RuntimeError, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("Reshape", |n| {
        let allowzero = n.attr_i("allowzero", 0)? != 0;
        let attr_shape = n.attr_ints("shape")?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let spec = match ints_input(ins, 1)? {
                Some(s) => s,
                None => attr_shape
                    .clone()
                    .ok_or_else(|| RuntimeError::msg("Reshape needs a shape"))?,
            };
            let dims = reshape_dims(x.dims(), &spec, allowzero)?;
            out1(x.map(|t| t.reshape(dims.as_slice()))?)
        }))
    });
    r.add("Transpose", |n| {
        let perm = n.attr_ints("perm")?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let rank = x.rank();
            let p: Vec<usize> = match &perm {
                Some(p) => norm_axes(p, rank)?,
                None => (0..rank).rev().collect(),
            };
            if p.len() != rank {
                bail!("perm {p:?} does not match rank {rank}");
            }
            // On CUDA one kernel with the layout in its parameters (candle's copy uploads it).
            if let Some(y) = crate::cuda_kernels::permute(x.candle(), &p)? {
                return out1(Tensor::new(y, x.dtype())?);
            }
            if let Some(y) = transpose_tiled(x.candle(), &p) {
                return out1(Tensor::new(y?, x.dtype())?);
            }
            out1(x.map(|t| t.permute(p.as_slice())?.contiguous())?)
        }))
    });
    r.add("Concat", |n| {
        let axis = n.attr_i("axis", 0)?;
        Ok(kernel(move |_, ins| {
            let ts: Vec<&Tensor> = ins.iter().flatten().map(|v| v.as_tensor()).collect::<Result<_>>()?;
            out1(concat(&ts, axis)?)
        }))
    });
    r.add("Shape", |n| {
        let start = n.attr_i("start", 0)?;
        let end = n.attr_i_opt("end")?;
        Ok(kernel(move |cx, ins| {
            let x = super::common::vin(ins, 0)?.as_tensor()?;
            let r = x.rank() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (clampi(start), clampi(end.unwrap_or(r)));
            let dims: Vec<i64> = x.dims()[s..e.max(s)].iter().map(|&d| d as i64).collect();
            let n = dims.len();
            out1(Tensor::from_i64s(dims, &[n], cx.device)?)
        }))
    });
    r.add("Size", |_| {
        Ok(kernel(|cx, ins| {
            let x = tin(ins, 0)?;
            out1(Tensor::from_i64s(vec![x.elem_count() as i64], &[], cx.device)?)
        }))
    });
    r.add("Flatten", |n| {
        let axis = n.attr_i("axis", 1)?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let r = x.rank() as i64;
            let a = if axis < 0 { axis + r } else { axis };
            if a < 0 || a > r {
                bail!("axis {axis} out of range for rank {r}");
            }
            let a = a as usize;
            let outer: usize = x.dims()[..a].iter().product();
            let inner: usize = x.dims()[a..].iter().product();
            out1(x.map(|t| t.reshape((outer, inner)))?)
        }))
    });
    r.add("Squeeze", |n| {
        let attr_axes = n.attr_ints("axes")?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let axes = ints_input(ins, 1)?.or_else(|| attr_axes.clone());
            let rank = x.rank();
            let drop: Vec<usize> = match axes {
                Some(a) => norm_axes(&a, rank)?,
                None => (0..rank).filter(|&i| x.dims()[i] == 1).collect(),
            };
            for &a in &drop {
                if x.dims()[a] != 1 {
                    bail!("cannot squeeze axis {a} of size {}", x.dims()[a]);
                }
            }
            let dims: Vec<usize> = (0..rank).filter(|i| !drop.contains(i)).map(|i| x.dims()[i]).collect();
            out1(x.map(|t| t.reshape(dims.as_slice()))?)
        }))
    });
    r.add("Unsqueeze", |n| {
        let attr_axes = n.attr_ints("axes")?;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let axes = ints_input(ins, 1)?
                .or_else(|| attr_axes.clone())
                .ok_or_else(|| RuntimeError::msg("Unsqueeze needs axes"))?;
            let out_rank = x.rank() + axes.len();
            let mut ax = norm_axes(&axes, out_rank)?;
            ax.sort_unstable();
            let mut dims = Vec::with_capacity(out_rank);
            let mut src = x.dims().iter();
            for i in 0..out_rank {
                if ax.contains(&i) {
                    dims.push(1);
                } else {
                    dims.push(*src.next().ok_or_else(|| RuntimeError::msg("bad axes"))?);
                }
            }
            out1(x.map(|t| t.reshape(dims.as_slice()))?)
        }))
    });
    r.add("Constant", constant);
    r.add("ConstantOfShape", |n| {
        let value = match n.attr_tensor("value")? {
            Some(t) => t.clone(),
            None => TensorData::from_values("value", vec![1], &[0f32]).map_err(RuntimeError::from)?,
        };
        Ok(kernel(move |cx, ins| {
            let shape = tin(ins, 0)?.to_i64_vec()?;
            if shape.iter().any(|&d| d < 0) {
                bail!("negative dim in shape {shape:?}");
            }
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            cx.check_alloc(elems(&dims), value.dtype)?;
            let v = Tensor::from_data(&value, cx.device)?;
            let scalar = v.candle().flatten_all()?.get(0)?;
            out1(Tensor::new(
                scalar.broadcast_as(dims.as_slice())?.contiguous()?,
                value.dtype,
            )?)
        }))
    });
    r.add("Gather", |n| {
        let axis = n.attr_i("axis", 0)?;
        let tied = tied_table(n, axis)?;
        Ok(kernel(move |cx, ins| {
            let idx = tin(ins, 1)?;
            if let (Some(table), None) = (&tied, ins.first().copied().flatten()) {
                return out1(gather_packed_rows(cx, table, idx)?);
            }
            out1(gather(tin(ins, 0)?, idx, axis)?)
        }))
    });
    r.add("Slice", slice);
    r.add("Expand", |_| {
        Ok(kernel(|cx, ins| {
            let x = tin(ins, 0)?;
            let shape = tin(ins, 1)?.to_i64_vec()?;
            if shape.iter().any(|&d| d < 0) {
                bail!("negative dim in shape {shape:?}");
            }
            let target: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let dims = super::common::broadcast_dims(x.dims(), &target)?;
            cx.check_alloc(elems(&dims), x.dtype())?;
            out1(x.map(|t| t.broadcast_as(dims.as_slice())?.contiguous())?)
        }))
    });
    r.add("Tile", |_| {
        Ok(kernel(|cx, ins| {
            let x = tin(ins, 0)?;
            let reps = tin(ins, 1)?.to_i64_vec()?;
            if reps.len() != x.rank() || reps.iter().any(|&r| r < 0) {
                bail!("repeats {reps:?} do not fit rank {}", x.rank());
            }
            let r: Vec<usize> = reps.iter().map(|&v| v as usize).collect();
            let out: Vec<usize> = x.dims().iter().zip(&r).map(|(a, b)| a * b).collect();
            cx.check_alloc(elems(&out), x.dtype())?;
            if out.contains(&0) {
                return out1(Tensor::new(
                    CT::zeros(out.as_slice(), x.candle().dtype(), cx.device)?,
                    x.dtype(),
                )?);
            }
            out1(x.map(|t| t.repeat(r.as_slice()))?)
        }))
    });
    r.add("Split", split);
    r.add("BitCast", |n| {
        let code = n.attr_i("to", 0)?;
        let to = kiln_graph::DType::from_onnx(code as i32)
            .ok_or_else(|| n.err(format!("unsupported target type {code}")))?;
        Ok(kernel(move |cx, ins| {
            let x = tin(ins, 0)?;
            if x.dtype().size_in_bytes() != to.size_in_bytes() || to.size_in_bytes() == 0 {
                bail!("BitCast from {} to {to} needs types of the same size", x.dtype());
            }
            // Reinterpret the little-endian bytes of the logical dtype.
            let data = x.to_data("x")?;
            let cast = TensorData::new("y", to, data.dims.clone(), data.bytes().to_vec())?;
            out1(Tensor::from_data(&cast, cx.device)?)
        }))
    });
    r.add("Range", |_| {
        Ok(kernel(|cx, ins| {
            let (s, l, d) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
            let dt = s.dtype();
            let (start, limit, delta) = (scalar_f64(s)?, scalar_f64(l)?, scalar_f64(d)?);
            if delta == 0.0 {
                bail!("Range delta is zero");
            }
            let n = ((limit - start) / delta).ceil().max(0.0);
            cx.check_alloc(n as u128, dt)?;
            let n = n as usize;
            if dt.is_float() {
                let v: Vec<f64> = (0..n).map(|i| start + i as f64 * delta).collect();
                return out1(Tensor::from_f64s(v, &[n], dt, cx.device)?);
            }
            let (si, di) = (start as i64, delta as i64);
            let v: Vec<i64> = (0..n as i64).map(|i| si + i * di).collect();
            out1(Tensor::from_i64s(v, &[n], cx.device)?.cast(dt)?)
        }))
    });
}

fn scalar_f64(t: &Tensor) -> Result<f64> {
    t.to_f64_vec()?
        .first()
        .copied()
        .ok_or_else(|| RuntimeError::msg("expected a scalar"))
}

/// Resolves a Reshape spec (0 = copy, -1 = infer) against the input dims.
pub fn reshape_dims(input: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut dims = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 => {
                if infer.replace(i).is_some() {
                    bail!("shape {spec:?} has more than one -1");
                }
                dims.push(1);
            }
            0 if !allowzero => dims.push(
                *input
                    .get(i)
                    .ok_or_else(|| RuntimeError::msg(format!("shape {spec:?}: 0 at {i} has no input dim")))?,
            ),
            s if s < 0 => bail!("shape {spec:?} has a negative dim"),
            s => dims.push(usize::try_from(s).map_err(|_| RuntimeError::msg(format!("dim {s} is too large")))?),
        }
    }
    let known = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| RuntimeError::msg(format!("cannot reshape {input:?} to {spec:?}: size overflows")))?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            bail!("cannot reshape {input:?} to {spec:?}");
        }
        dims[i] = total / known;
    } else if known != total {
        bail!("cannot reshape {input:?} ({total} elements) to {spec:?}");
    }
    Ok(dims)
}

pub fn concat(ts: &[&Tensor], axis: i64) -> Result<Tensor> {
    let Some(first) = ts.first() else {
        bail!("Concat needs inputs")
    };
    let rank = first.rank();
    let a = norm_axis(axis, rank)?;
    let dt = first.dtype();
    let parts: Vec<&CT> = ts
        .iter()
        .filter(|t| t.dims().get(a) != Some(&0) || ts.len() == 1)
        .map(|t| t.candle())
        .collect();
    for t in ts {
        if t.dtype() != dt || t.rank() != rank {
            bail!("Concat inputs differ in dtype or rank");
        }
    }
    if parts.is_empty() {
        return Ok((*first).clone());
    }
    Tensor::new(CT::cat(&parts, a)?, dt)
}

pub fn gather(x: &Tensor, idx: &Tensor, axis: i64) -> Result<Tensor> {
    let a = norm_axis(axis, x.rank())?;
    let dim = x.dims()[a] as i64;
    let raw = idx.to_i64_vec()?;
    let mut fixed = Vec::with_capacity(raw.len());
    for v in raw {
        let w = if v < 0 { v + dim } else { v };
        if w < 0 || w >= dim {
            bail!("index {v} is out of bounds for axis {a} of size {dim}");
        }
        fixed.push(w as u32);
    }
    let n = fixed.len();
    let ids = CT::from_vec(fixed, n, x.device())?;
    let picked = x.candle().index_select(&ids, a)?;
    let mut dims: Vec<usize> = x.dims()[..a].to_vec();
    dims.extend_from_slice(idx.dims());
    dims.extend_from_slice(&x.dims()[a + 1..]);
    Tensor::new(picked.reshape(dims.as_slice())?, x.dtype())
}

/// A constant `[V, H]` f32 table gathered along axis 0 that a tied output projection also reads
/// (`ai.kiln::MatMulBias` with `trans_b`, from `kiln_graph::passes::tied_weight`): the Gather reads
/// its rows from the projection's packed copy, shared through the plan, and consumes the input, so
/// the table is held once. `None` otherwise (the Gather reads its input as usual).
fn tied_table(n: &NodeCtx, axis: i64) -> Result<Option<(Arc<crate::sgemm::PackedB>, [usize; 2])>> {
    let Some(table) = n.node.inputs.first().copied().flatten() else {
        return Ok(None);
    };
    if !matches!(axis, 0 | -2) {
        return Ok(None);
    }
    let tied = n.graph.nodes.iter().any(|m| {
        m.domain == "ai.kiln"
            && m.op_type == "MatMulBias"
            && m.inputs.get(1).copied().flatten() == Some(table)
            && matches!(m.attr("trans_b"), Some(Attribute::Int(1)))
    });
    if !tied {
        return Ok(None);
    }
    let Some(shared) = super::matmul::shared_packed(n, 0, true)? else {
        return Ok(None);
    };
    n.consume_input(0);
    Ok(Some(shared))
}

/// `Gather(table, idx)` along axis 0 with the table held as the packed `[H, V]` operand of its tied
/// projection: each index's row is that operand's column.
fn gather_packed_rows(
    cx: &super::RunCx,
    (table, [v, h]): &(Arc<crate::sgemm::PackedB>, [usize; 2]),
    idx: &Tensor,
) -> Result<Tensor> {
    let (v, h) = (*v, *h);
    let ids = idx.to_i64_vec()?;
    let mut dims = idx.dims().to_vec();
    dims.push(h);
    cx.check_alloc(elems(&dims), kiln_graph::DType::F32)?;
    let mut out = vec![0f32; ids.len() * h];
    for (t, &i) in ids.iter().enumerate() {
        let j = if i < 0 { i + v as i64 } else { i };
        if j < 0 || j >= v as i64 {
            bail!("index {i} is out of bounds for axis 0 of size {v}");
        }
        table.column(j as usize, &mut out[t * h..(t + 1) * h]);
    }
    Tensor::new(CT::from_vec(out, dims, cx.device)?, kiln_graph::DType::F32)
}

fn constant(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let data = if let Some(t) = n.attr_tensor("value")? {
        t.clone()
    } else if let Some(v) = n.attr("value_float") {
        let Attribute::Float(f) = v else {
            return Err(n.err("value_float must be a float"));
        };
        TensorData::from_values("value", vec![], &[*f])?
    } else if let Some(v) = n.attr_floats("value_floats")? {
        TensorData::from_values("value", vec![v.len()], &v)?
    } else if let Some(Attribute::Int(i)) = n.attr("value_int") {
        TensorData::from_values("value", vec![], &[*i])?
    } else if let Some(v) = n.attr_ints("value_ints")? {
        TensorData::from_values("value", vec![v.len()], &v)?
    } else {
        return Err(n.err("Constant without a supported value attribute"));
    };
    let dev = n.options.device.clone();
    let t = Tensor::from_data(&data, &dev)?;
    Ok(kernel(move |_, _| out1(t.clone())))
}

fn slice(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    // Opset < 10: starts/ends/axes are attributes.
    let a_starts = n.attr_ints("starts")?;
    let a_ends = n.attr_ints("ends")?;
    let a_axes = n.attr_ints("axes")?;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let starts = ints_input(ins, 1)?
            .or_else(|| a_starts.clone())
            .ok_or_else(|| RuntimeError::msg("no starts"))?;
        let ends = ints_input(ins, 2)?
            .or_else(|| a_ends.clone())
            .ok_or_else(|| RuntimeError::msg("no ends"))?;
        let axes = match ints_input(ins, 3)?.or_else(|| a_axes.clone()) {
            Some(a) => norm_axes(&a, x.rank())?,
            None if starts.len() <= x.rank() => (0..starts.len()).collect(),
            None => bail!("{} starts for a rank-{} input", starts.len(), x.rank()),
        };
        let steps = ints_input(ins, 4)?.unwrap_or_else(|| vec![1; starts.len()]);
        if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            bail!("starts/ends/axes/steps lengths differ");
        }
        // (axis, first index, length, step) per sliced axis, and the output shape.
        let mut plan = Vec::with_capacity(axes.len());
        let mut out_dims = x.dims().to_vec();
        for k in 0..axes.len() {
            let a = axes[k];
            let d = x.dims()[a] as i64;
            let step = steps[k];
            if step == 0 {
                bail!("slice step is 0");
            }
            let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
            let (s, len) = if d == 0 {
                (0, 0)
            } else if step > 0 {
                let s = norm(starts[k]).clamp(0, d);
                let e = norm(ends[k]).clamp(0, d);
                (s, if e > s { (e - s - 1) / step + 1 } else { 0 })
            } else {
                // Negative steps: starts clamp to [0, d-1], ends to [-1, d-1].
                let s = norm(starts[k]).clamp(0, d - 1);
                let e = norm(ends[k]).clamp(-1, d - 1);
                (
                    s,
                    if s > e {
                        ((s - e - 1) as u64 / step.unsigned_abs()) as i64 + 1
                    } else {
                        0
                    },
                )
            };
            out_dims[a] = len as usize;
            plan.push((a, s, len, step));
        }
        if out_dims.contains(&0) {
            // candle's narrow/index_select index into the storage even for empty results.
            return out1(Tensor::new(
                CT::zeros(out_dims, x.candle().dtype(), x.candle().device())?,
                x.dtype(),
            )?);
        }
        let mut t = x.candle().contiguous()?;
        for (a, s, len, step) in plan {
            if step == 1 {
                t = t.narrow(a, s as usize, len as usize)?;
            } else {
                let idx: Vec<u32> = (0..len).map(|i| (s + i * step) as u32).collect();
                t = t
                    .contiguous()?
                    .index_select(&CT::from_vec(idx, len as usize, t.device())?, a)?;
            }
        }
        out1(Tensor::new(t, x.dtype())?)
    }))
}

/// A permutation of `dims` as a batched 2-D transpose `[b, r, c] -> [b, c, r]` (size-1 axes dropped,
/// axes that stay adjacent merged), or `None` when it is something else.
fn as_batched_transpose(dims: &[usize], perm: &[usize]) -> Option<(usize, usize, usize)> {
    let kept: Vec<usize> = perm.iter().copied().filter(|&a| dims[a] != 1).collect();
    // Runs of input axes that stay adjacent and in order in the output.
    let mut runs: Vec<(usize, usize)> = Vec::new(); // (first input axis, product of sizes)
    let mut last: Option<usize> = None;
    let mut order: Vec<usize> = Vec::new(); // the first input axis of each run, in output order
    for &a in &kept {
        match (last, runs.last_mut()) {
            (Some(l), Some(run)) if next_kept(dims, l) == Some(a) => run.1 *= dims[a],
            _ => {
                runs.push((a, dims[a]));
                order.push(a);
            }
        }
        last = Some(a);
    }
    // Runs in input order give the source layout; output order must be (batch?, second, first).
    let mut by_input = runs.clone();
    by_input.sort_unstable();
    match (by_input.as_slice(), order.as_slice()) {
        ([(a0, r), (_, c)], [o0, _]) if *o0 != *a0 => Some((1, *r, *c)),
        ([(a0, b), (a1, r), (_, c)], [o0, o1, _]) if o0 == a0 && o1 != a1 => Some((*b, *r, *c)),
        _ => None,
    }
}

/// The next input axis after `a` whose size is not 1.
fn next_kept(dims: &[usize], a: usize) -> Option<usize> {
    (a + 1..dims.len()).find(|&i| dims[i] != 1)
}

/// Transpose of a contiguous f32, u8 or i16 CPU tensor that is a batched 2-D transpose (NCHW <-> NHWC and
/// the like) in cache-sized tiles; `None` for anything else (candle's strided copy then does it).
fn transpose_tiled(t: &CT, perm: &[usize]) -> Option<Result<CT>> {
    let dims = t.dims().to_vec();
    let (b, r, c) = as_batched_transpose(&dims, perm)?;
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    // 8-bit codes: u8, and i8 stored widened to i16.
    if t.dtype() == candle_core::DType::U8 {
        return crate::fastmath::with_u8(t, |src| {
            let mut out = vec![0u8; src.len()];
            batched_transpose(src, b, r, c, &mut out);
            CT::from_vec(out, out_dims.clone(), t.device()).map_err(Into::into)
        });
    }
    if t.dtype() == candle_core::DType::I16 {
        return crate::fastmath::with_i16(t, |src| {
            let mut out = vec![0i16; src.len()];
            batched_transpose(src, b, r, c, &mut out);
            CT::from_vec(out, out_dims.clone(), t.device()).map_err(Into::into)
        });
    }
    crate::fastmath::with_f32(t, |src| {
        let mut out = crate::fastmath::zeroed(src.len());
        batched_transpose(src, b, r, c, &mut out);
        CT::from_vec(out, out_dims, t.device()).map_err(Into::into)
    })
}

/// `dst[b][j][i] = src[b][i][j]` for `src` `[batches, r, c]`, in 16x16 tiles; parallel over tile rows
/// when there is enough to move.
pub(crate) fn batched_transpose<T: Copy + Send + Sync>(src: &[T], batches: usize, r: usize, c: usize, dst: &mut [T]) {
    const T: usize = 16;
    use rayon::prelude::*;
    debug_assert!(src.len() == batches * r * c && dst.len() == src.len());
    if r * c == 0 {
        return;
    }
    // One task: output rows j0.. of one batch (`out` holds whole rows of r floats), in T x T tiles.
    let task = |bi: usize, j0: usize, out: &mut [T]| {
        let s = &src[bi * r * c..(bi + 1) * r * c];
        let jn = out.len() / r;
        for jt in (0..jn).step_by(T) {
            let jt1 = (jt + T).min(jn);
            for i0 in (0..r).step_by(T) {
                let i1 = (i0 + T).min(r);
                for jj in jt..jt1 {
                    let j = j0 + jj;
                    let row = &mut out[jj * r + i0..jj * r + i1];
                    for (k, v) in row.iter_mut().enumerate() {
                        *v = s[(i0 + k) * c + j];
                    }
                }
            }
        }
    };
    // Output rows per parallel task: about 16K floats, a multiple of the tile.
    let rows = ((1usize << 14) / r).max(1).next_multiple_of(T);
    if src.len() < 1 << 16 {
        dst.chunks_mut(r * c).enumerate().for_each(|(bi, ob)| task(bi, 0, ob));
    } else {
        dst.par_chunks_mut(r * c).enumerate().for_each(|(bi, ob)| {
            ob.par_chunks_mut(rows * r)
                .enumerate()
                .for_each(|(t, o)| task(bi, t * rows, o));
        });
    }
}

fn split(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let axis = n.attr_i("axis", 0)?;
    let attr_split = n.attr_ints("split")?;
    let num_outputs = n.attr_i_opt("num_outputs")?;
    let outs = n.num_outputs();
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let a = norm_axis(axis, x.rank())?;
        let d = x.dims()[a];
        let sizes: Vec<usize> = match ints_input(ins, 1)?.or_else(|| attr_split.clone()) {
            Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
            None => {
                let k = num_outputs.map(|v| v.max(1) as usize).unwrap_or(outs.max(1));
                let chunk = d.div_ceil(k);
                // Every chunk but the last is full; a last chunk that would need a negative size
                // means num_outputs does not fit the axis (ONNX Runtime refuses it too).
                if num_outputs.is_some() && chunk * (k - 1) > d {
                    bail!("Split: num_outputs {k} cannot split an axis of {d} into chunks of {chunk}");
                }
                (0..k).map(|i| chunk.min(d.saturating_sub(i * chunk))).collect()
            }
        };
        if sizes.iter().sum::<usize>() != d {
            bail!("split sizes {sizes:?} do not sum to {d}");
        }
        let mut out = Vec::with_capacity(sizes.len());
        let mut off = 0;
        for s in sizes {
            if x.elem_count() == 0 {
                // candle's narrow indexes into the storage even for an empty tensor.
                let mut dims = x.dims().to_vec();
                dims[a] = s;
                let z = CT::zeros(dims, x.candle().dtype(), x.candle().device())?;
                out.push(Value::Tensor(Tensor::new(z, x.dtype())?));
                continue;
            }
            out.push(Value::Tensor(x.map(|t| t.narrow(a, off, s))?));
            off += s;
        }
        Ok(out)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every permutation of small shapes (size-1 axes included): the tiled path, where it applies,
    /// gives exactly candle's strided copy; NCHW <-> NHWC always takes it (the first shape is large
    /// enough for the parallel tasks).
    #[test]
    fn batched_transposes_match_the_strided_copy() {
        let shapes: [&[usize]; 6] = [
            &[2, 3, 5, 7],
            &[1, 17, 4, 33],
            &[3, 1, 20, 2],
            &[40, 70],
            &[2, 1, 1, 9],
            &[2, 33, 1, 65],
        ];
        let mut fast = 0;
        // f32, and 8-bit codes as stored (u8; i8 widened to i16).
        let dtypes = [candle_core::DType::F32, candle_core::DType::U8, candle_core::DType::I16];
        for (dims, dt) in shapes.iter().flat_map(|d| dtypes.map(|t| (*d, t))) {
            let n: usize = dims.iter().product();
            let t = CT::from_vec(
                (0..n).map(|i| (i % 251) as f32).collect::<Vec<_>>(),
                dims,
                &candle_core::Device::Cpu,
            )
            .unwrap()
            .to_dtype(dt)
            .unwrap();
            let rank = dims.len();
            let mut perm: Vec<usize> = (0..rank).collect();
            // Heap's algorithm over all permutations.
            let mut c = vec![0usize; rank];
            let mut check = |p: &[usize]| {
                let want = t
                    .permute(p)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                if let Some(y) = transpose_tiled(&t, p) {
                    let y = y.unwrap();
                    let out_dims: Vec<usize> = p.iter().map(|&a| dims[a]).collect();
                    assert_eq!(y.dims(), out_dims.as_slice(), "{dims:?} {p:?}");
                    assert_eq!(y.dtype(), dt);
                    assert_eq!(
                        y.flatten_all()
                            .unwrap()
                            .to_dtype(candle_core::DType::F32)
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                        want,
                        "{dims:?} {p:?}"
                    );
                    fast += 1;
                }
            };
            check(&perm);
            let mut i = 0;
            while i < rank {
                if c[i] < i {
                    if i % 2 == 0 {
                        perm.swap(0, i);
                    } else {
                        perm.swap(c[i], i);
                    }
                    check(&perm);
                    c[i] += 1;
                    i = 0;
                } else {
                    c[i] = 0;
                    i += 1;
                }
            }
        }
        assert!(fast > 20, "{fast}");
        assert_eq!(as_batched_transpose(&[2, 16, 9, 9], &[0, 2, 3, 1]), Some((2, 16, 81)));
        assert_eq!(as_batched_transpose(&[1, 9, 9, 16], &[0, 3, 1, 2]), Some((1, 81, 16)));
        assert_eq!(as_batched_transpose(&[2, 4, 8, 16], &[0, 2, 1, 3]), None);
    }
}
