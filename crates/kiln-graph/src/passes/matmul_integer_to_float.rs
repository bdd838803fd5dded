//! The float tail of a dynamically quantized MatMul, as ONNX Runtime's `quantize_dynamic` writes it
//! (QOperator form):
//!
//! ```text
//! y = MatMulInteger(A_q, W_q, a_zp, w_zp)        W_q a constant 2-D 8-bit weight
//! m = Mul(Cast(y, to = FLOAT), Mul(a_scale, w_scale))
//! o = Add(m, bias)                                (optional: a constant f32 [N] bias)
//! ```
//!
//! becomes one `com.microsoft` `MatMulIntegerToFloat(A_q, W_q, a_scale, w_scale, a_zp, w_zp, bias)`
//! (the node ONNX Runtime's own optimizer fuses this into, so a model Kiln writes out still runs
//! there). The runtime's integer GEMM then turns each block of i32 products into floats while it is in
//! cache instead of three more passes (Cast, Mul, Add) over the whole activation, with the same f32
//! operations in the same order, so the result is bit for bit the unfused graph's.
//!
//! Matches: `a_scale` and `a_zp` per tensor (known scalars, or DynamicQuantizeLinear's outputs),
//! `w_scale` a constant f32 with one value or `N`, `w_zp` absent or constant with one value or `N`;
//! the intermediate values read by nothing else.

use crate::{DType, Dim, Graph, Result, ValueId};

use super::conv_activation::MS;
use super::edit::{attr_i, constant, input, make_node, other_input, out0, Index};
use super::{Pass, PassCx};

/// The fused operator (domain `com.microsoft`).
pub const OP: &str = "MatMulIntegerToFloat";

/// Rule `matmul_integer_to_float_fusion`.
pub struct FuseMatMulIntegerToFloat;

/// Whether `v` holds one value: a known shape with every dim 1, or an output of
/// DynamicQuantizeLinear (its scale and zero point are scalars by definition).
fn per_tensor(g: &Graph, idx: &Index, v: ValueId) -> bool {
    if let Some(s) = &g.value(v).shape {
        if s.0.iter().all(|d| matches!(d, Dim::Known(1))) {
            return true;
        }
    }
    idx.producer_op(g, v, "DynamicQuantizeLinear").is_some()
}

/// A constant with one value or `n` values in one dimension.
fn one_or_n(g: &Graph, cx: &PassCx, v: ValueId, n: usize, dtype: Option<DType>) -> bool {
    constant(g, cx.options, v).is_some_and(|t| {
        dtype.is_none_or(|d| t.dtype == d)
            && (t.dims.iter().product::<usize>() == 1 || (t.dims.len() == 1 && t.dims[0] == n))
    })
}

impl Pass for FuseMatMulIntegerToFloat {
    fn name(&self) -> &'static str {
        "matmul_integer_to_float_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit(MS, OP, 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for xi in 0..g.nodes.len() {
            let x = &g.nodes[xi];
            if !(x.domain.is_empty() && x.op_type == "Mul" && x.inputs.len() == 2) || idx.is_touched(xi) {
                continue;
            }
            let Some(x_out) = out0(x) else { continue };
            let found = [0, 1].into_iter().find_map(|ci| {
                let c = input(x, ci)?;
                let cast_i = idx.producer_op(g, c, "Cast")?;
                let cast = &g.nodes[cast_i];
                if attr_i(cast, "to", 0)? != 1 || idx.sole_reader(c) != Some(xi) {
                    return None;
                }
                let y = input(cast, 0)?;
                let mi = idx.producer_op(g, y, "MatMulInteger")?;
                if idx.sole_reader(y) != Some(cast_i) {
                    return None;
                }
                let mm = &g.nodes[mi];
                let (a, w) = (input(mm, 0)?, input(mm, 1)?);
                let wt = constant(g, cx.options, w)?;
                let &[_, n] = wt.dims.as_slice() else { return None };
                if !matches!(wt.dtype, DType::U8 | DType::I8) {
                    return None;
                }
                let (a_zp, w_zp) = (input(mm, 2), input(mm, 3));
                if a_zp.is_some_and(|z| !per_tensor(g, &idx, z)) || w_zp.is_some_and(|z| !one_or_n(g, cx, z, n, None)) {
                    return None;
                }
                // The scale: Mul(a_scale, w_scale), w_scale the constant one.
                let s = other_input(x, c)?;
                let si = idx.producer_op(g, s, "Mul")?;
                let sm = &g.nodes[si];
                let (p, q) = (input(sm, 0)?, input(sm, 1)?);
                let (a_scale, w_scale) = if one_or_n(g, cx, q, n, Some(DType::F32)) {
                    (p, q)
                } else if one_or_n(g, cx, p, n, Some(DType::F32)) {
                    (q, p)
                } else {
                    return None;
                };
                let a_scale_f32 = g.value(a_scale).dtype.is_none_or(|d| d == DType::F32);
                if !a_scale_f32 || !per_tensor(g, &idx, a_scale) {
                    return None;
                }
                Some((cast_i, mi, a, w, a_scale, w_scale, a_zp, w_zp, n))
            });
            let Some((cast_i, mi, a, w, a_scale, w_scale, a_zp, w_zp, n)) = found else {
                continue;
            };
            // An Add of a constant f32 [N] bias right after joins too.
            let bias = idx.sole_reader(x_out).and_then(|ai| {
                let add = &g.nodes[ai];
                if !(add.domain.is_empty() && add.op_type == "Add" && add.inputs.len() == 2) || idx.is_touched(ai) {
                    return None;
                }
                let b = other_input(add, x_out)?;
                let bt = constant(g, cx.options, b)?;
                (bt.dtype == DType::F32 && bt.dims == [n]).then_some((ai, b, out0(add)?))
            });
            let name = format!("{}_to_float", g.nodes[mi].name);
            let mut inputs = vec![Some(a), Some(w), Some(a_scale), Some(w_scale), a_zp, w_zp];
            let (at, out) = match bias {
                Some((ai, b, add_out)) => {
                    inputs.push(Some(b));
                    idx.remove(&[xi]);
                    (ai, add_out)
                }
                None => (xi, x_out),
            };
            g.nodes[at] = make_node(name, MS, OP, inputs, vec![Some(out)], Default::default());
            idx.remove(&[mi, cast_i]);
            idx.touch(&[at]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
