//! Helpers shared by kernel families: input access, axes, broadcasting, host fallbacks.

use candle_core::Shape as CShape;
use kiln_graph::DType;

use crate::{bail, Result, RuntimeError, Tensor, Value};

/// Required tensor input `i`.
pub fn tin<'a>(ins: &[Option<&'a Value>], i: usize) -> Result<&'a Tensor> {
    match ins.get(i).copied().flatten() {
        Some(v) => v.as_tensor().map_err(|e| RuntimeError::msg(format!("input {i}: {e}"))),
        None => bail!("input {i} is required"),
    }
}

/// Optional tensor input `i` (absent or an empty name).
pub fn tin_opt<'a>(ins: &[Option<&'a Value>], i: usize) -> Result<Option<&'a Tensor>> {
    match ins.get(i).copied().flatten() {
        Some(v) => v
            .as_tensor()
            .map(Some)
            .map_err(|e| RuntimeError::msg(format!("input {i}: {e}"))),
        None => Ok(None),
    }
}

/// Required value input `i` (tensor, sequence or optional).
pub fn vin<'a>(ins: &[Option<&'a Value>], i: usize) -> Result<&'a Value> {
    match ins.get(i).copied().flatten() {
        Some(v) => Ok(v),
        None => bail!("input {i} is required"),
    }
}

/// Normalizes a possibly negative axis into `0..rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis.saturating_add(r) } else { axis };
    if a < 0 || a >= r {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// Normalizes a list of axes, rejecting duplicates.
pub fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = norm_axis(a, rank)?;
        if out.contains(&n) {
            bail!("axis {a} is repeated");
        }
        out.push(n);
    }
    Ok(out)
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let sa = CShape::from(a.to_vec());
    let sb = CShape::from(b.to_vec());
    Ok(sa.broadcast_shape_binary_op(&sb, "broadcast")?.dims().to_vec())
}

/// Broadcast shape of many.
pub fn broadcast_all(shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        out = broadcast_dims(&out, s)?;
    }
    Ok(out)
}

/// Expands both tensors to their common shape (views, no copy).
pub fn broadcast2(a: &Tensor, b: &Tensor) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    let dims = broadcast_dims(a.dims(), b.dims())?;
    Ok((
        a.candle().broadcast_as(dims.as_slice())?,
        b.candle().broadcast_as(dims.as_slice())?,
    ))
}

/// Both inputs must share a dtype (ONNX's type constraint `T`).
pub fn same_dtype(a: &Tensor, b: &Tensor) -> Result<DType> {
    if a.dtype() != b.dtype() {
        bail!("inputs have different dtypes: {} and {}", a.dtype(), b.dtype());
    }
    Ok(a.dtype())
}

/// Host fallback for element-wise binary ops: broadcasts, computes in f64, casts to `out`.
/// Exact for every dtype Kiln stores except 64-bit integers beyond 2^53.
pub fn host_binary(a: &Tensor, b: &Tensor, out: DType, f: impl Fn(f64, f64) -> f64 + Sync) -> Result<Tensor> {
    let dims = broadcast_dims(a.dims(), b.dims())?;
    let av = bcast_vec(a, &dims)?;
    let bv = bcast_vec(b, &dims)?;
    let v: Vec<f64> = av.iter().zip(&bv).map(|(&x, &y)| f(x, y)).collect();
    Tensor::from_f64s(v, &dims, out, a.device())
}

/// Host fallback for element-wise binary ops on i64 values (exact for all integer dtypes).
pub fn host_binary_i64(a: &Tensor, b: &Tensor, out: DType, f: impl Fn(i64, i64) -> Result<i64>) -> Result<Tensor> {
    let dims = broadcast_dims(a.dims(), b.dims())?;
    let av = Tensor::new(a.candle().broadcast_as(dims.as_slice())?.contiguous()?, a.dtype())?.to_i64_vec()?;
    let bv = Tensor::new(b.candle().broadcast_as(dims.as_slice())?.contiguous()?, b.dtype())?.to_i64_vec()?;
    let v: Vec<i64> = av.iter().zip(&bv).map(|(&x, &y)| f(x, y)).collect::<Result<_>>()?;
    Tensor::from_i64s(v, &dims, a.device())?.cast(out)
}

/// Host fallback for unary ops, computed in f64.
pub fn host_unary(a: &Tensor, out: DType, f: impl Fn(f64) -> f64) -> Result<Tensor> {
    let v: Vec<f64> = a.to_f64_vec()?.into_iter().map(f).collect();
    Tensor::from_f64s(v, a.dims(), out, a.device())
}

fn bcast_vec(t: &Tensor, dims: &[usize]) -> Result<Vec<f64>> {
    Tensor::new(t.candle().broadcast_as(dims)?.contiguous()?, t.dtype())?.to_f64_vec()
}

/// Reads an optional integer-list input (axes, shape...), `None` when absent.
pub fn ints_input(ins: &[Option<&Value>], i: usize) -> Result<Option<Vec<i64>>> {
    tin_opt(ins, i)?.map(Tensor::to_i64_vec).transpose()
}

/// Product of dims as u128, saturating (never overflows, so limit checks stay sound).
pub fn elems(dims: &[usize]) -> u128 {
    dims.iter().fold(1u128, |acc, &d| acc.saturating_mul(d as u128))
}
