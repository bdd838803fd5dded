//! Static dtype and shape inference for the common operators.
//!
//! Inference fills `ValueInfo::dtype`/`shape` where the importer left them unknown. It is
//! best-effort: an operator it does not know leaves its outputs unknown, never guesses.

use crate::{Attribute, DType, Dim, Graph, Shape};

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

/// Runs one forward sweep of inference over `graph` (nodes must be in topological order).
pub fn infer_shapes(graph: &mut Graph) {
    for i in 0..graph.nodes.len() {
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
                } else {
                    ins.first().and_then(|v| v.dtype).or(first.dtype)
                };
                (dtype, shape)
            }
            "Cast" => match node.attr("to") {
                Some(Attribute::Int(code)) => (DType::from_onnx(*code as i32), input(0).and_then(|v| v.shape)),
                _ => continue,
            },
            "Shape" => (
                Some(DType::I64),
                input(0).and_then(|v| v.shape).map(|s| Shape::from_known(&[s.rank()])),
            ),
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
