//! Static dtype and shape inference for the common operators.
//!
//! Inference fills `ValueInfo::dtype`/`shape` where the importer left them unknown. It is
//! best-effort: an operator it does not know leaves its outputs unknown, never guesses.

use crate::{Attribute, DType, Dim, Graph, Shape, ValueId};

/// Broadcasts two shapes with numpy rules; `None` when they are incompatible.
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.rank() >= rank {
            &a.0[i + a.rank() - rank]
        } else {
            &Dim::Known(1)
        };
        let db = if i + b.rank() >= rank {
            &b.0[i + b.rank() - rank]
        } else {
            &Dim::Known(1)
        };
        out.push(match (da, db) {
            (Dim::Known(1), d) | (d, Dim::Known(1)) => d.clone(),
            (Dim::Known(x), Dim::Known(y)) if x != y => return None,
            (x, y) if x == y => x.clone(),
            (Dim::Known(x), _) | (_, Dim::Known(x)) => Dim::Known(*x),
            _ => Dim::Unknown,
        });
    }
    Some(Shape(out))
}

const SAME_AS_INPUT: &[&str] = &[
    // ai.kiln: a QuantizeLinear read back by its DequantizeLinear (f32 in, f32 out).
    "QuantizeDequantize",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Neg",
    "Abs",
    "Sqrt",
    "Erf",
    "Gelu",
    "Softmax",
    "LogSoftmax",
    "LeakyRelu",
    "Elu",
    "Selu",
    "HardSigmoid",
    "Identity",
    "Dropout",
    "Clip",
    "LayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "Floor",
    "Ceil",
    "Round",
    "Reciprocal",
    "Sin",
    "Cos",
    "Softplus",
    "Softsign",
    "HardSwish",
    "Mish",
    "Sign",
];
/// Ops whose (first) output has the first input's dtype; their shapes are not inferred here.
const DTYPE_AS_INPUT: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "FusedConv",
    "FusedConvChain",
    "ConvNhwc",
    "MaxPoolNhwc",
    "AveragePoolNhwc",
    "GlobalAveragePoolNhwc",
    "ElementwiseChain",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    // com.microsoft QOperator ops: codes of the first input's 8-bit type.
    "QLinearAdd",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "MatMul",
    "Gemm",
    // Data movement: the output is (a rearrangement of) the data input's values.
    "Concat",
    "Resize",
    "Upsample",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Expand",
    "Tile",
    "Pad",
    "Gather",
    "GatherElements",
    "GatherND",
    "DepthToSpace",
    "SpaceToDepth",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL2",
    "TopK",
];
/// Ops all of whose outputs have the first input's dtype (shapes not inferred).
const DTYPE_AS_INPUT_ALL_OUTPUTS: &[&str] = &["Split"];
const BROADCAST: &[&str] = &["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "PRelu", "Where"];
const COMPARE: &[&str] = &[
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
];

/// Runs one forward sweep of inference over `graph` in topological order, filling dtypes and
/// shapes the model did not declare. Declared facts are never overwritten.
pub fn infer_shapes(graph: &mut Graph) {
    let order = match graph.topological_order() {
        Ok(o) => o,
        Err(_) => return,
    };
    for i in order {
        let node = &graph.nodes[i];
        let input = |k: usize| node.inputs.get(k).copied().flatten().map(|v| graph.value(v).clone());
        let (dtype, shape) = match node.op_type.as_str() {
            op if SAME_AS_INPUT.contains(&op) => match input(0) {
                Some(v) => (v.dtype, v.shape),
                None => continue,
            },
            op if BROADCAST.contains(&op) || COMPARE.contains(&op) => {
                let ins: Vec<_> = node.inputs.iter().flatten().map(|v| graph.value(*v).clone()).collect();
                let Some(first) = ins.last() else { continue };
                let mut shape = first.shape.clone();
                for v in &ins {
                    shape = match (shape, &v.shape) {
                        (Some(a), Some(b)) => broadcast_shapes(&a, b),
                        _ => None,
                    };
                }
                let dtype = if COMPARE.contains(&op) {
                    Some(DType::Bool)
                } else if op == "Where" {
                    // Where(cond, x, y): the condition is bool, the result has x's type.
                    ins.get(1).and_then(|v| v.dtype)
                } else {
                    ins.first().and_then(|v| v.dtype).or(first.dtype)
                };
                (dtype, shape)
            }
            op if DTYPE_AS_INPUT.contains(&op) => match input(0) {
                Some(v) => (v.dtype, None),
                None => continue,
            },
            "Cast" => match node.attr("to") {
                Some(Attribute::Int(code)) => (DType::from_onnx(*code as i32), input(0).and_then(|v| v.shape)),
                _ => continue,
            },
            // The scale's type (or `output_dtype`), the input's shape.
            "DequantizeLinear" => {
                let dtype = match node.attr("output_dtype") {
                    Some(Attribute::Int(code)) if *code != 0 => DType::from_onnx(*code as i32),
                    _ => input(1).and_then(|v| v.dtype),
                };
                (dtype, input(0).and_then(|v| v.shape))
            }
            // `output_dtype`, else the zero point's type (u8 without one); the input's shape.
            "QuantizeLinear" => {
                let dtype = match node.attr("output_dtype") {
                    Some(Attribute::Int(code)) if *code != 0 => DType::from_onnx(*code as i32),
                    _ if node.inputs.get(2).copied().flatten().is_some() => input(2).and_then(|v| v.dtype),
                    _ => Some(DType::U8),
                };
                (dtype, input(0).and_then(|v| v.shape))
            }
            // The output zero point's type, else X's (its shape is a conv's, not inferred here).
            "QLinearConv" | "QLinearConvNhwc" => {
                let dtype = match node.inputs.get(7).copied().flatten() {
                    Some(_) => input(7).and_then(|v| v.dtype),
                    None => input(0).and_then(|v| v.dtype),
                };
                (dtype, None)
            }
            // com.microsoft: the float type of the activation scale.
            "MatMulIntegerToFloat" => (input(2).and_then(|v| v.dtype), None),
            "Shape" => (
                Some(DType::I64),
                input(0).and_then(|v| v.shape).map(|s| Shape::from_known(&[s.rank()])),
            ),
            op if DTYPE_AS_INPUT_ALL_OUTPUTS.contains(&op) => {
                let Some(dtype) = input(0).and_then(|v| v.dtype) else {
                    continue;
                };
                let outs: Vec<_> = graph.nodes[i].outputs.iter().flatten().copied().collect();
                for o in outs {
                    let info = &mut graph.values[o.index()];
                    if info.dtype.is_none() {
                        info.dtype = Some(dtype);
                    }
                }
                continue;
            }
            "If" => {
                // Output k has a dtype when both branches declare the same one for their output k.
                let (Some(Attribute::Graph(t)), Some(Attribute::Graph(e))) =
                    (node.attr("then_branch"), node.attr("else_branch"))
                else {
                    continue;
                };
                let branch = |b: &Graph, k: usize| b.outputs.get(k).and_then(|v| b.value(*v).dtype);
                let facts: Vec<(ValueId, DType)> = node
                    .outputs
                    .iter()
                    .enumerate()
                    .filter_map(|(k, o)| match (o, branch(t, k), branch(e, k)) {
                        (Some(o), Some(a), Some(b)) if a == b => Some((*o, a)),
                        _ => None,
                    })
                    .collect();
                for (o, d) in facts {
                    let info = &mut graph.values[o.index()];
                    if info.dtype.is_none() {
                        info.dtype = Some(d);
                    }
                }
                continue;
            }
            _ => continue,
        };
        let out = graph.nodes[i].outputs.first().copied().flatten();
        if let Some(o) = out {
            let info = &mut graph.values[o.index()];
            if info.dtype.is_none() {
                info.dtype = dtype;
            }
            if info.shape.is_none() {
                info.shape = shape;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_rules() {
        let a = Shape(vec![Dim::Sym("N".into()), Dim::Known(3), Dim::Known(1)]);
        let b = Shape::from_known(&[4]);
        assert_eq!(
            broadcast_shapes(&a, &b).unwrap(),
            Shape(vec![Dim::Sym("N".into()), Dim::Known(3), Dim::Known(4)])
        );
        assert!(broadcast_shapes(&Shape::from_known(&[3]), &Shape::from_known(&[4])).is_none());
    }
}

#[cfg(test)]
mod graph_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{Node, ValueId, ValueInfo, ValueKind};

    #[test]
    fn fills_unknown_intermediates_in_topological_order() {
        let v = |name: &str, dtype: Option<DType>, shape: Option<Shape>| ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype,
            shape,
        };
        let n = |op: &str, ins: &[u32], out: u32| Node {
            name: op.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: ins.iter().map(|&i| Some(ValueId(i))).collect(),
            outputs: vec![Some(ValueId(out))],
            attributes: BTreeMap::new(),
            implicit_inputs: vec![],
        };
        let x = Shape(vec![Dim::Sym("N".into()), Dim::Known(4)]);
        let mut g = Graph {
            name: "g".into(),
            values: vec![
                v("x", Some(DType::F32), Some(x.clone())),
                v("b", Some(DType::F32), Some(Shape::from_known(&[4]))),
                v("s", None, None),
                v("r", None, None),
                v("m", None, None),
            ],
            // Listed out of order on purpose.
            nodes: vec![n("Relu", &[2], 3), n("Add", &[0, 1], 2), n("Less", &[3, 1], 4)],
            inputs: vec![ValueId(0), ValueId(1)],
            outputs: vec![ValueId(4)],
            ..Default::default()
        };
        infer_shapes(&mut g);
        assert_eq!(g.values[3].dtype, Some(DType::F32));
        assert_eq!(g.values[3].shape.as_ref(), Some(&x));
        assert_eq!(g.values[4].dtype, Some(DType::Bool));
        assert_eq!(g.values[4].shape.as_ref(), Some(&x));
    }

    #[test]
    fn where_takes_the_dtype_of_its_values_not_the_condition() {
        let v = |name: &str, dtype: Option<DType>| ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype,
            shape: Some(Shape::from_known(&[3])),
        };
        let mut g = Graph {
            name: "g".into(),
            values: vec![
                v("c", Some(DType::Bool)),
                v("x", Some(DType::F32)),
                v("y", Some(DType::F32)),
                v("w", None),
            ],
            nodes: vec![Node {
                name: "where".into(),
                op_type: "Where".into(),
                domain: String::new(),
                inputs: vec![Some(ValueId(0)), Some(ValueId(1)), Some(ValueId(2))],
                outputs: vec![Some(ValueId(3))],
                attributes: BTreeMap::new(),
                implicit_inputs: vec![],
            }],
            inputs: vec![ValueId(0), ValueId(1), ValueId(2)],
            outputs: vec![ValueId(3)],
            ..Default::default()
        };
        infer_shapes(&mut g);
        assert_eq!(g.values[3].dtype, Some(DType::F32));
    }

    /// Data movement keeps the data's dtype: every output of a Split, a Concat of them, a Resize
    /// (YOLO-style necks), so the convs after them are known to be f32.
    #[test]
    fn split_concat_and_resize_keep_the_data_dtype() {
        let v = |name: &str, dtype: Option<DType>| ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype,
            shape: None,
        };
        let node = |op: &str, ins: &[u32], outs: &[u32]| Node {
            name: op.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: ins.iter().map(|&i| Some(ValueId(i))).collect(),
            outputs: outs.iter().map(|&o| Some(ValueId(o))).collect(),
            attributes: BTreeMap::new(),
            implicit_inputs: vec![],
        };
        let mut g = Graph {
            name: "g".into(),
            values: vec![
                v("x", Some(DType::F32)),
                v("a", None),
                v("b", None),
                v("c", None),
                v("scales", Some(DType::F32)),
                v("r", None),
                v("idx", Some(DType::I64)),
                v("gathered", None),
            ],
            nodes: vec![
                node("Split", &[0], &[1, 2]),
                node("Concat", &[2, 1], &[3]),
                node("Resize", &[3, 4], &[5]),
                node("Gather", &[5, 6], &[7]),
            ],
            inputs: vec![ValueId(0), ValueId(4), ValueId(6)],
            outputs: vec![ValueId(7)],
            ..Default::default()
        };
        infer_shapes(&mut g);
        for i in [1, 2, 3, 5, 7] {
            assert_eq!(g.values[i].dtype, Some(DType::F32), "{}", g.values[i].name);
        }
    }

    /// QuantizeLinear gives its zero point's type (u8 without one), QLinearConv its output zero
    /// point's (X's without one), so a channels-last region knows its quantized inputs are 8-bit.
    #[test]
    fn quantizers_and_quantized_convs_give_their_zero_points_type() {
        let v = |name: &str, dtype: Option<DType>| ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype,
            shape: None,
        };
        let node = |op: &str, ins: &[Option<u32>], out: u32| Node {
            name: format!("{op}{out}"),
            op_type: op.into(),
            domain: String::new(),
            inputs: ins.iter().map(|i| i.map(ValueId)).collect(),
            outputs: vec![Some(ValueId(out))],
            attributes: BTreeMap::new(),
            implicit_inputs: vec![],
        };
        let mut g = Graph {
            name: "g".into(),
            values: vec![
                v("x", Some(DType::F32)),
                v("s", Some(DType::F32)),
                v("z_i8", Some(DType::I8)),
                v("q_i8", None),
                v("q_u8", None),
                v("w", Some(DType::I8)),
                v("y_zp_u8", Some(DType::U8)),
                v("conv_u8", None),
                v("conv_as_x", None),
            ],
            nodes: vec![
                node("QuantizeLinear", &[Some(0), Some(1), Some(2)], 3),
                node("QuantizeLinear", &[Some(0), Some(1)], 4),
                node(
                    "QLinearConv",
                    &[Some(3), Some(1), Some(2), Some(5), Some(1), Some(2), Some(1), Some(6)],
                    7,
                ),
                node(
                    "QLinearConv",
                    &[Some(3), Some(1), Some(2), Some(5), Some(1), Some(2), Some(1)],
                    8,
                ),
            ],
            inputs: [0, 1, 2, 5, 6].map(ValueId).to_vec(),
            outputs: vec![ValueId(7), ValueId(8)],
            ..Default::default()
        };
        infer_shapes(&mut g);
        let dt = |i: usize| g.values[i].dtype;
        assert_eq!(
            (dt(3), dt(4), dt(7), dt(8)),
            (Some(DType::I8), Some(DType::U8), Some(DType::U8), Some(DType::I8))
        );
    }
}
