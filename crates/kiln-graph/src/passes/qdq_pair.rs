//! A QuantizeLinear read back by a DequantizeLinear with the same per-tensor scale and zero point:
//!
//! ```text
//! q = QuantizeLinear(x, s, z)        s one f32, z one u8 or i8, both constant
//! y = DequantizeLinear(q, s, z)      the same values
//! ```
//!
//! Static QDQ models put such a pair on every quantized activation that a float operator reads (a
//! bias Add after a quantized MatMul, a residual, a LayerNorm input). The DequantizeLinear becomes
//! `ai.kiln QuantizeDequantize(x, s, z)`: `y = (clamp(round_half_even(x / s) + z) - z) * s` in one
//! pass over the floats, without the 8-bit tensor in between. The arithmetic is the pair's (the
//! codes are whole numbers, exact in f32), so the result is bit for bit the same. The
//! QuantizeLinear stays for its other readers (an integer MatMul) and is dropped when it has none.
//! Kiln's own node, so the rule is off under `strict_opsets` (export).

use crate::{DType, Graph, Node, Result, ValueId};

use super::edit::{attr_i, constant, input, make_node, out0, Index};
use super::elementwise_chain::KILN;
use super::{Pass, PassCx};

/// The fused node's op type.
pub const OP: &str = "QuantizeDequantize";

/// Rule `quantize_dequantize_fusion`.
pub struct FuseQuantizeDequantize;

/// `(scale, zero point)` of a per-tensor 8-bit Quantize/DequantizeLinear: one constant f32 scale and
/// one constant u8/i8 zero point, with their values.
fn params(g: &Graph, cx: &PassCx, n: &Node) -> Option<(ValueId, ValueId, f32, Vec<u8>, DType)> {
    let (s, z) = (input(n, 1)?, input(n, 2)?);
    let (st, zt) = (constant(g, cx.options, s)?, constant(g, cx.options, z)?);
    if st.dtype != DType::F32 || st.len() != 1 || zt.len() != 1 || !matches!(zt.dtype, DType::U8 | DType::I8) {
        return None;
    }
    if attr_i(n, "block_size", 0)? != 0 || attr_i(n, "output_dtype", 0)? != 0 {
        return None;
    }
    // QuantizeLinear's `precision` (opset 25) other than f32 changes the division.
    if !matches!(attr_i(n, "precision", 0)?, 0 | 1) {
        return None;
    }
    let scale = f32::from_le_bytes(st.bytes().get(..4)?.try_into().ok()?);
    Some((s, z, scale, zt.bytes().to_vec(), zt.dtype))
}

impl Pass for FuseQuantizeDequantize {
    fn name(&self) -> &'static str {
        "quantize_dequantize_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if cx.options.strict_opsets || !cx.can_emit(KILN, OP, 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for di in 0..g.nodes.len() {
            let dq = &g.nodes[di];
            if !(dq.domain.is_empty() && dq.op_type == "DequantizeLinear") || idx.is_touched(di) {
                continue;
            }
            let found = (|| {
                let y = out0(dq)?;
                let qi = idx.producer_op(g, input(dq, 0)?, "QuantizeLinear")?;
                let q = &g.nodes[qi];
                let x = input(q, 0)?;
                if g.value(x).dtype != Some(DType::F32) || g.value(y).dtype.is_some_and(|d| d != DType::F32) {
                    return None;
                }
                let (qs, qz, qscale, qzero, qdt) = params(g, cx, q)?;
                let (_, _, dscale, dzero, ddt) = params(g, cx, dq)?;
                (qscale.to_bits() == dscale.to_bits() && qzero == dzero && qdt == ddt).then_some((x, qs, qz, y))
            })();
            let Some((x, s, z, y)) = found else { continue };
            let name = format!("{}_qdq", g.nodes[di].name);
            g.nodes[di] = make_node(
                name,
                KILN,
                OP,
                vec![Some(x), Some(s), Some(z)],
                vec![Some(y)],
                Default::default(),
            );
            idx.touch(&[di]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::qdq_conv::tests::{f32s, init, node, value, Kernels};
    use crate::passes::{optimize, OptLevel, Options};

    /// `x -> Q(s, z) -> DQ(s2, z2) -> y`, the Q's codes also a graph output when `codes_out`.
    fn pair(s2: f32, z2: u8, codes_out: bool) -> Graph {
        let mut g = Graph::default();
        let x = value(&mut g, "x", DType::F32);
        g.inputs.push(x);
        let s = init(&mut g, "s", DType::F32, vec![], f32s(&[0.05]));
        let z = init(&mut g, "z", DType::U8, vec![], vec![128]);
        let s2 = init(&mut g, "s2", DType::F32, vec![], f32s(&[s2]));
        let z2 = init(&mut g, "z2", DType::U8, vec![], vec![z2]);
        let (q, y) = (value(&mut g, "q", DType::U8), value(&mut g, "y", DType::F32));
        g.outputs.push(y);
        if codes_out {
            g.outputs.push(q);
        }
        g.nodes = vec![
            node("QuantizeLinear", vec![x, s, z], q, vec![]),
            node("DequantizeLinear", vec![q, s2, z2], y, vec![]),
        ];
        g
    }

    fn run_all(g: &mut Graph) -> crate::passes::Report {
        let options = Options {
            level: OptLevel::All,
            ..Default::default()
        };
        optimize(g, &options, &Kernels).unwrap()
    }

    fn ops(g: &Graph) -> Vec<&str> {
        g.nodes.iter().map(|n| n.op_type.as_str()).collect()
    }

    #[test]
    fn a_matching_pair_becomes_one_node_and_the_codes_stay_while_read() {
        let mut g = pair(0.05, 128, false);
        let report = run_all(&mut g);
        assert_eq!(report.count("quantize_dequantize_fusion"), 1, "{report}");
        assert_eq!(ops(&g), [OP]);
        let names: Vec<&str> = g.nodes[0].inputs.iter().map(|v| g.value_name(v.unwrap())).collect();
        assert_eq!(names, ["x", "s", "z"]);
        assert_eq!(g.value_name(g.nodes[0].outputs[0].unwrap()), "y");

        let mut g = pair(0.05, 128, true);
        run_all(&mut g);
        assert_eq!(ops(&g), ["QuantizeLinear", OP]);
    }

    #[test]
    fn other_parameters_or_export_leave_the_pair() {
        for (s2, z2) in [(0.025, 128), (0.05, 127)] {
            let mut g = pair(s2, z2, false);
            let report = run_all(&mut g);
            assert_eq!(report.count("quantize_dequantize_fusion"), 0, "{report}");
            assert_eq!(ops(&g), ["QuantizeLinear", "DequantizeLinear"]);
        }
        let mut g = pair(0.05, 128, false);
        let options = Options {
            level: OptLevel::All,
            strict_opsets: true,
            ..Default::default()
        };
        optimize(&mut g, &options, &Kernels).unwrap();
        assert_eq!(ops(&g), ["QuantizeLinear", "DequantizeLinear"]);
    }
}
