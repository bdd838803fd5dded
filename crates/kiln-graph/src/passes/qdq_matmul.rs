//! A quantized MatMul written in QDQ form (ONNX Runtime's `quantize_static` default, `kiln quantize
//! --mode static-int8`, quantization-aware training exports):
//!
//! ```text
//! a = DequantizeLinear(A_q, a_scale, a_zp)     a_scale, a_zp per tensor
//! w = DequantizeLinear(W_q, w_scale, w_zp)     W_q a constant 2-D 8-bit [K, N] weight; scale and
//!                                               zero point per tensor or per column (axis 1)
//! y = MatMul(a, w)
//! ```
//!
//! becomes `y = com.microsoft MatMulIntegerToFloat(A_q, W_q, a_scale, w_scale, a_zp, w_zp)`, the
//! node ONNX Runtime's QDQ transformer forms for a MatMul whose output is not quantized, and the
//! one Kiln's integer GEMM runs with the weight packed once: `(A_q - a_zp)(W_q - w_zp)` in i32, then
//! one multiply by `a_scale * w_scale` per element instead of dequantizing both operands to floats
//! and a float product. A QuantizeLinear after the MatMul stays as it is (it reads the float `y`).
//! The result differs from the unfused graph's only by f32 rounding (the integer sums are exact).
//!
//! Runs before constant folding, which would turn the weight's DequantizeLinear into floats. The
//! DequantizeLinear nodes stay for their other readers; dead-node elimination drops the rest.

use crate::{DType, Graph, Node, Result, ValueId};

use super::conv_activation::MS;
use super::edit::{attr_i, constant, input, make_node, out0, Index};
use super::matmul_integer_to_float::OP;
use super::{Pass, PassCx};

/// Rule `qdq_matmul_fusion`.
pub struct FuseQdqMatMul;

/// `(A_q, a_scale, a_zp)` of the activation's DequantizeLinear: a constant f32 scale with one value,
/// a constant 8-bit zero point with one value (or none, for an 8-bit A_q).
fn activation(g: &Graph, cx: &PassCx, dq: &Node) -> Option<(ValueId, ValueId, Option<ValueId>)> {
    let (q, s) = (input(dq, 0)?, input(dq, 1)?);
    let st = constant(g, cx.options, s)?;
    if st.dtype != DType::F32 || st.len() != 1 || attr_i(dq, "block_size", 0)? != 0 {
        return None;
    }
    let z = input(dq, 2);
    let qdt = match z {
        Some(z) => {
            let zt = constant(g, cx.options, z)?;
            (zt.len() == 1).then_some(zt.dtype)?
        }
        None => g.value(q).dtype?,
    };
    if !matches!(qdt, DType::U8 | DType::I8) || g.value(q).dtype.is_some_and(|d| d != qdt) {
        return None;
    }
    Some((q, s, z))
}

/// `(W_q, w_scale, w_zp)` of the weight's DequantizeLinear: a constant 2-D 8-bit tensor, an f32
/// scale with one value or one per column (axis 1), a zero point of W's dtype likewise.
fn weight(g: &Graph, cx: &PassCx, dq: &Node) -> Option<(ValueId, ValueId, Option<ValueId>)> {
    let (q, s) = (input(dq, 0)?, input(dq, 1)?);
    let wt = constant(g, cx.options, q)?;
    let &[_, n] = wt.dims.as_slice() else { return None };
    let st = constant(g, cx.options, s)?;
    let per_column = st.len() != 1;
    if !matches!(wt.dtype, DType::U8 | DType::I8)
        || st.dtype != DType::F32
        || (per_column && (st.len() != n || !matches!(attr_i(dq, "axis", 1)?, 1 | -1)))
        || attr_i(dq, "block_size", 0)? != 0
    {
        return None;
    }
    let z = input(dq, 2);
    if let Some(z) = z {
        let zt = constant(g, cx.options, z)?;
        if zt.dtype != wt.dtype || (zt.len() != 1 && zt.len() != st.len()) {
            return None;
        }
    }
    Some((q, s, z))
}

impl Pass for FuseQdqMatMul {
    fn name(&self) -> &'static str {
        "qdq_matmul_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit(MS, OP, 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for mi in 0..g.nodes.len() {
            let mm = &g.nodes[mi];
            if !(mm.domain.is_empty() && mm.op_type == "MatMul") || idx.is_touched(mi) {
                continue;
            }
            let found = (|| {
                let y = out0(mm)?;
                if g.value(y).dtype.is_some_and(|d| d != DType::F32) {
                    return None;
                }
                let ai = idx.producer_op(g, input(mm, 0)?, "DequantizeLinear")?;
                let wi = idx.producer_op(g, input(mm, 1)?, "DequantizeLinear")?;
                let (aq, a_s, a_z) = activation(g, cx, &g.nodes[ai])?;
                let (wq, w_s, w_z) = weight(g, cx, &g.nodes[wi])?;
                Some((y, [Some(aq), Some(wq), Some(a_s), Some(w_s), a_z, w_z]))
            })();
            let Some((y, inputs)) = found else { continue };
            let mut inputs = inputs.to_vec();
            while inputs.last() == Some(&None) {
                inputs.pop();
            }
            let name = format!("{}_integer", g.nodes[mi].name);
            g.nodes[mi] = make_node(name, MS, OP, inputs, vec![Some(y)], Default::default());
            idx.touch(&[mi]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::qdq_conv::tests::{f32s, init, node, run, value};
    use crate::Attribute;

    /// `DQ(a_q) x DQ(W_q) -> MatMul -> Q`, W [3, 2] int8 with per-column scales on `w_axis`.
    fn qdq_matmul(w_axis: i64, a_scale: &[f32]) -> Graph {
        let mut g = Graph::default();
        let aq = value(&mut g, "a_q", DType::U8);
        g.inputs.push(aq);
        let a_s = init(&mut g, "a_s", DType::F32, vec![a_scale.len()], f32s(a_scale));
        let a_z = init(&mut g, "a_z", DType::U8, vec![], vec![128]);
        let wq = init(&mut g, "wq", DType::I8, vec![3, 2], vec![3, 0xfe, 7, 1, 0x80, 5]);
        let ws = init(&mut g, "ws", DType::F32, vec![2], f32s(&[0.25, 0.125]));
        let wz = init(&mut g, "wz", DType::I8, vec![2], vec![0, 0]);
        let ys = init(&mut g, "ys", DType::F32, vec![], f32s(&[0.1]));
        let yz = init(&mut g, "yz", DType::U8, vec![], vec![120]);
        let (a, w, m, y) = (
            value(&mut g, "a", DType::F32),
            value(&mut g, "w", DType::F32),
            value(&mut g, "m", DType::F32),
            value(&mut g, "y", DType::U8),
        );
        g.outputs.push(y);
        g.nodes = vec![
            node("DequantizeLinear", vec![aq, a_s, a_z], a, vec![]),
            node(
                "DequantizeLinear",
                vec![wq, ws, wz],
                w,
                vec![("axis", Attribute::Int(w_axis))],
            ),
            node("MatMul", vec![a, w], m, vec![]),
            node("QuantizeLinear", vec![m, ys, yz], y, vec![]),
        ];
        g
    }

    #[test]
    fn a_qdq_matmul_becomes_an_integer_matmul_with_float_output() {
        let mut g = qdq_matmul(1, &[0.5]);
        let report = run(&mut g);
        assert_eq!(report.count("qdq_matmul_fusion"), 1, "{report}");
        let ops: Vec<(&str, &str)> = g
            .nodes
            .iter()
            .map(|n| (n.domain.as_str(), n.op_type.as_str()))
            .collect();
        assert_eq!(ops, [(MS, OP), ("", "QuantizeLinear")]);
        let f = &g.nodes[0];
        let names: Vec<&str> = f.inputs.iter().map(|v| g.value_name(v.unwrap())).collect();
        assert_eq!(names, ["a_q", "wq", "a_s", "ws", "a_z", "wz"]);
        assert_eq!(g.value_name(f.outputs[0].unwrap()), "m");
    }

    #[test]
    fn column_scales_on_another_axis_or_a_non_scalar_activation_scale_are_left_alone() {
        for (axis, a_scale) in [(0, &[0.5f32][..]), (1, &[0.5, 0.25][..])] {
            let mut g = qdq_matmul(axis, a_scale);
            let report = run(&mut g);
            assert_eq!(report.count("qdq_matmul_fusion"), 0, "{report}");
            assert!(g.nodes.iter().any(|n| n.op_type == "MatMul"));
        }
    }
}
