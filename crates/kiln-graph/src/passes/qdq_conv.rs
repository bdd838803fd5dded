//! A quantized convolution written in QDQ form (what ONNX Runtime's `quantize_static` writes by
//! default, and what quantization-aware training exports):
//!
//! ```text
//! x = DequantizeLinear(x_q, x_scale, x_zp)            x_scale, x_zp per tensor
//! w = DequantizeLinear(W_q, w_scale, w_zp)            W_q a constant 8-bit filter; scale per tensor
//!                                                      or per output channel (axis 0)
//! b = DequantizeLinear(B_q, x_scale * w_scale, 0)     optional: a constant int32 bias
//! y_q = QuantizeLinear(Conv(x, w, b), y_scale, y_zp)  y_scale, y_zp per tensor
//! ```
//!
//! becomes `y_q = QLinearConv(x_q, x_scale, x_zp, W_q, w_scale, w_zp, y_scale, y_zp, B_q)`, the
//! node ONNX Runtime's QDQ transformer forms as well: the product runs on the 8-bit values with
//! i32 sums and one requantization, instead of dequantizing the input, a float convolution and a
//! quantization (the output is the same but for values at a rounding boundary, which the float
//! path puts on either side depending on its f32 rounding).
//!
//! Runs before constant folding (which would turn the filter's DequantizeLinear into a float
//! constant). The DequantizeLinear nodes stay for their other readers; dead-node elimination drops
//! the rest.

use crate::{Attribute, DType, Graph, Result, ValueId};

use super::edit::{attr_i, constant, float_values, input, make_node, out0, Index};
use super::{Pass, PassCx};

/// Rule `qdq_conv_fusion`.
pub struct FuseQdqConv;

/// `(q, scale, zero point)` of a DequantizeLinear (or the inputs of a QuantizeLinear) whose scale
/// is a constant f32 with one value and whose zero point is a constant 8-bit scalar.
fn per_tensor_params(g: &Graph, cx: &PassCx, node: &crate::Node) -> Option<(ValueId, ValueId, ValueId, DType)> {
    let (q, s, z) = (input(node, 0)?, input(node, 1)?, input(node, 2)?);
    let st = constant(g, cx.options, s)?;
    let zt = constant(g, cx.options, z)?;
    let ok = st.dtype == DType::F32 && st.len() == 1 && zt.len() == 1 && matches!(zt.dtype, DType::U8 | DType::I8);
    (ok && attr_i(node, "block_size", 0)? == 0).then_some((q, s, z, zt.dtype))
}

impl Pass for FuseQdqConv {
    fn name(&self) -> &'static str {
        "qdq_conv_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit("", "QLinearConv", 10) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for ci in 0..g.nodes.len() {
            let conv = &g.nodes[ci];
            if !(conv.domain.is_empty() && conv.op_type == "Conv") || idx.is_touched(ci) {
                continue;
            }
            let found = (|| {
                let y = out0(conv)?;
                let qi = idx.sole_reader(y)?;
                let qn = &g.nodes[qi];
                if !(qn.domain.is_empty() && qn.op_type == "QuantizeLinear") || idx.is_touched(qi) || input(qn, 0)? != y
                {
                    return None;
                }
                let (_, ys, yz, _) = per_tensor_params(g, cx, qn)?;
                let y_q = out0(qn)?;
                // The input.
                let xi = idx.producer_op(g, input(conv, 0)?, "DequantizeLinear")?;
                let (xq, xs, xz, xdt) = per_tensor_params(g, cx, &g.nodes[xi])?;
                if g.value(xq).dtype.is_some_and(|d| d != xdt) {
                    return None;
                }
                // The filter: a constant 4-D 8-bit tensor, its scale per tensor or per output channel.
                let wi = idx.producer_op(g, input(conv, 1)?, "DequantizeLinear")?;
                let wn = &g.nodes[wi];
                let (wq, ws, wz) = (input(wn, 0)?, input(wn, 1)?, input(wn, 2)?);
                let wt = constant(g, cx.options, wq)?;
                let m = *wt.dims.first()?;
                if wt.dims.len() != 4 || !matches!(wt.dtype, DType::U8 | DType::I8) || m == 0 {
                    return None;
                }
                let wst = constant(g, cx.options, ws)?;
                let wzt = constant(g, cx.options, wz)?;
                let per_channel = wst.len() != 1;
                if wst.dtype != DType::F32
                    || (per_channel && (wst.len() != m || !matches!(attr_i(wn, "axis", 1)?, 0 | -4)))
                    || wzt.dtype != wt.dtype
                    || (wzt.len() != 1 && wzt.len() != wst.len())
                    || attr_i(wn, "block_size", 0)? != 0
                {
                    return None;
                }
                // The bias: a constant int32 [M] dequantized with scale x_scale * w_scale and zero point 0.
                let bias = match input(conv, 2) {
                    None => None,
                    Some(b) => {
                        let bi = idx.producer_op(g, b, "DequantizeLinear")?;
                        let bn = &g.nodes[bi];
                        let bq = input(bn, 0)?;
                        let bt = constant(g, cx.options, bq)?;
                        if bt.dtype != DType::I32 || bt.dims != [m] {
                            return None;
                        }
                        if let Some(z) = input(bn, 2) {
                            let zt = constant(g, cx.options, z)?;
                            if zt.to_i64_vec()?.iter().any(|&v| v != 0) {
                                return None;
                            }
                        }
                        let bs = float_values(constant(g, cx.options, input(bn, 1)?)?)?;
                        let xsv = float_values(constant(g, cx.options, xs)?)?[0] as f32;
                        let wsv = float_values(wst)?;
                        if bs.len() != 1 && bs.len() != m {
                            return None;
                        }
                        let matches = (0..m).all(|c| {
                            let want = (xsv * wsv[c % wsv.len()] as f32) as f64;
                            (bs[c % bs.len()] - want).abs() <= 1e-6 * want.abs()
                        });
                        if !matches {
                            return None;
                        }
                        Some(bq)
                    }
                };
                Some((qi, y_q, [xq, xs, xz, wq, ws, wz, ys, yz], bias))
            })();
            let Some((qi, y_q, ins, bias)) = found else { continue };
            let conv = &g.nodes[ci];
            let attributes = conv
                .attributes
                .iter()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "auto_pad" | "dilations" | "group" | "kernel_shape" | "pads" | "strides"
                    )
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<String, Attribute>>();
            let mut inputs: Vec<Option<ValueId>> = ins.into_iter().map(Some).collect();
            if let Some(b) = bias {
                inputs.push(Some(b));
            }
            let name = format!("{}_quant", conv.name);
            g.nodes[qi] = make_node(name, "", "QLinearConv", inputs, vec![Some(y_q)], attributes);
            idx.remove(&[ci]);
            idx.touch(&[qi]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

/// Test helpers shared with the other QDQ fusions' tests.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::passes::{optimize, ConstEval, OptLevel, Options};
    use crate::{Node, Shape, TensorData, ValueInfo, ValueKind};

    pub(crate) struct Kernels;
    impl ConstEval for Kernels {
        fn eval(
            &self,
            _: &Graph,
            _: &Node,
            _: i64,
            _: &[Option<TensorData>],
            _: usize,
        ) -> std::result::Result<Option<Vec<TensorData>>, String> {
            Ok(None)
        }
        fn has_kernel(&self, _: &str, _: &str) -> bool {
            true
        }
    }

    pub(crate) fn value(g: &mut Graph, name: &str, dtype: DType) -> ValueId {
        g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(dtype),
            shape: None,
        })
    }

    pub(crate) fn init(g: &mut Graph, name: &str, dtype: DType, dims: Vec<usize>, bytes: Vec<u8>) -> ValueId {
        let v = g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(dtype),
            shape: Some(Shape::from_known(&dims)),
        });
        g.initializers
            .insert(v, TensorData::new(name, dtype, dims, bytes).unwrap());
        v
    }

    pub(crate) fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub(crate) fn node(op: &str, inputs: Vec<ValueId>, out: ValueId, attrs: Vec<(&str, Attribute)>) -> Node {
        make_node(
            format!("{op}_{}", out.0),
            "",
            op,
            inputs.into_iter().map(Some).collect(),
            vec![Some(out)],
            attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        )
    }

    /// `DQ(x) -> Conv(DQ(W), DQ(B)) -> Q` with per-channel filter scales; `bias_scale` lets a test
    /// break the bias-scale rule.
    fn qdq_conv(bias_scale: [f32; 2], w_axis: i64) -> Graph {
        let mut g = Graph::default();
        let xq = value(&mut g, "x_q", DType::U8);
        g.inputs.push(xq);
        let xs = init(&mut g, "xs", DType::F32, vec![], f32s(&[0.5]));
        let xz = init(&mut g, "xz", DType::U8, vec![], vec![128]);
        let wq = init(&mut g, "wq", DType::I8, vec![2, 1, 1, 1], vec![3, 0xfe]);
        let ws = init(&mut g, "ws", DType::F32, vec![2], f32s(&[0.25, 0.125]));
        let wz = init(&mut g, "wz", DType::I8, vec![2], vec![0, 0]);
        let bq = init(
            &mut g,
            "bq",
            DType::I32,
            vec![2],
            [7i32, -9].iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let bs = init(&mut g, "bs", DType::F32, vec![2], f32s(&bias_scale));
        let ys = init(&mut g, "ys", DType::F32, vec![], f32s(&[0.1]));
        let yz = init(&mut g, "yz", DType::U8, vec![], vec![120]);
        let (x, w, b, c, y) = (
            value(&mut g, "x", DType::F32),
            value(&mut g, "w", DType::F32),
            value(&mut g, "b", DType::F32),
            value(&mut g, "c", DType::F32),
            value(&mut g, "y", DType::U8),
        );
        g.outputs.push(y);
        g.nodes = vec![
            node("DequantizeLinear", vec![xq, xs, xz], x, vec![]),
            node(
                "DequantizeLinear",
                vec![wq, ws, wz],
                w,
                vec![("axis", Attribute::Int(w_axis))],
            ),
            node("DequantizeLinear", vec![bq, bs], b, vec![("axis", Attribute::Int(0))]),
            node("Conv", vec![x, w, b], c, vec![("strides", Attribute::Ints(vec![1, 1]))]),
            node("QuantizeLinear", vec![c, ys, yz], y, vec![]),
        ];
        g
    }

    /// The optimizer at level extended with every kernel available.
    pub(crate) fn run(g: &mut Graph) -> crate::passes::Report {
        let options = Options {
            level: OptLevel::Extended,
            ..Default::default()
        };
        optimize(g, &options, &Kernels).unwrap()
    }

    #[test]
    fn a_qdq_convolution_becomes_one_qlinear_conv() {
        let mut g = qdq_conv([0.125, 0.0625], 0);
        let report = run(&mut g);
        assert_eq!(report.count("qdq_conv_fusion"), 1, "{report}");
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["QLinearConv"]);
        let q = &g.nodes[0];
        let names: Vec<&str> = q.inputs.iter().map(|v| g.value_name(v.unwrap())).collect();
        assert_eq!(names, ["x_q", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"]);
        assert_eq!(g.value_name(q.outputs[0].unwrap()), "y");
        assert_eq!(q.attr("strides"), Some(&Attribute::Ints(vec![1, 1])));
    }

    #[test]
    fn a_bias_on_another_scale_or_a_filter_scale_on_another_axis_is_left_alone() {
        for (bias_scale, axis) in [([0.125, 0.07], 0), ([0.125, 0.0625], 1)] {
            let mut g = qdq_conv(bias_scale, axis);
            let report = run(&mut g);
            assert_eq!(report.count("qdq_conv_fusion"), 0, "{report}");
            assert!(g.nodes.iter().any(|n| n.op_type == "Conv"));
        }
    }
}
