//! `MatMul(X, Transpose(W))` with `W` a constant 2-D f32 initializer becomes `ai.kiln`
//! `MatMulBias(X, W)` with `trans_b = 1` (no bias, no activation): the product reads `W` as it is
//! stored instead of a transposed copy that constant folding would make. Language models with tied
//! embeddings compute their logits this way (`lm_head = Transpose(embed_tokens)`): with the rule
//! the embedding table is one initializer read by both the `Gather` and the product, and the
//! runtime keeps one packed form of it for the two (SmolLM2-135M: 113 MB less). Runs first in each
//! iteration, before `constant_folding` would fold the Transpose; Kiln's own node, so off under
//! `strict_opsets` and when `Options::share_transposed_weights` is off.

use std::collections::BTreeMap;

use crate::{Attribute, DType, Graph, Result};

use super::edit::{constant, input, make_node, out0, Index};
use super::elementwise_chain::KILN;
use super::matmul_bias::OP;
use super::{Pass, PassCx};

/// Rule `transposed_weight_matmul`.
pub struct MatMulTransposedWeight;

impl Pass for MatMulTransposedWeight {
    fn name(&self) -> &'static str {
        "transposed_weight_matmul"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let o = cx.options;
        if o.strict_opsets || !o.fuse_matmul_bias || !o.share_transposed_weights || !cx.can_emit(KILN, OP, 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for mi in 0..g.nodes.len() {
            let mm = &g.nodes[mi];
            if mm.op_type != "MatMul" || !mm.domain.is_empty() || mm.inputs.len() != 2 || idx.is_touched(mi) {
                continue;
            }
            let (Some(a), Some(t), Some(out)) = (input(mm, 0), input(mm, 1), out0(mm)) else {
                continue;
            };
            let Some(ti) = idx.producer_op(g, t, "Transpose") else {
                continue;
            };
            let tr = &g.nodes[ti];
            let perm_ok = match tr.attr("perm") {
                None => true,
                Some(Attribute::Ints(p)) => p.as_slice() == [1, 0],
                _ => false,
            };
            let Some(w) = input(tr, 0) else { continue };
            let ok = tr.domain.is_empty()
                && perm_ok
                && constant(g, o, w).is_some_and(|d| d.dtype == DType::F32 && d.dims.len() == 2)
                && constant(g, o, a).is_none();
            if !ok {
                continue;
            }
            let mut attrs = BTreeMap::new();
            attrs.insert("trans_b".to_string(), Attribute::Int(1));
            // The Transpose goes now if nothing else reads it: left to dead-node elimination, it
            // would first be folded into the very copy this rule avoids.
            let sole = idx.sole_reader(t) == Some(mi) && !g.outputs.contains(&t);
            let name = mm.name.clone();
            g.nodes[mi] = make_node(name, KILN, OP, vec![Some(a), Some(w)], vec![Some(out)], attrs);
            idx.touch(&[mi]);
            if sole {
                idx.remove(&[ti]);
            }
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::{optimize, ConstEval, OptLevel, Options};
    use crate::{Node, TensorData, ValueInfo};

    struct Kernels;
    impl ConstEval for Kernels {
        fn has_kernel(&self, _domain: &str, _op: &str) -> bool {
            true
        }
        fn eval(
            &self,
            _g: &Graph,
            _n: &Node,
            _opset: i64,
            _inputs: &[Option<TensorData>],
            _limit: usize,
        ) -> std::result::Result<Option<Vec<TensorData>>, String> {
            Ok(None)
        }
    }

    fn graph() -> Graph {
        let mut g = Graph::default();
        let mut v = |name: &str, dtype: DType| {
            g.add_value(ValueInfo {
                name: name.into(),
                dtype: Some(dtype),
                ..Default::default()
            })
        };
        let (ids, x, e, emb, et, logits) = (
            v("ids", DType::I64),
            v("x", DType::F32),
            v("e", DType::F32),
            v("emb", DType::F32),
            v("et", DType::F32),
            v("logits", DType::F32),
        );
        g.initializers
            .insert(e, TensorData::from_values("e", vec![10, 4], &[0.5f32; 40]).unwrap());
        let node = |name: &str, op: &str, ins: &[crate::ValueId], out: crate::ValueId| Node {
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: ins.iter().map(|&i| Some(i)).collect(),
            outputs: vec![Some(out)],
            attributes: BTreeMap::new(),
            implicit_inputs: vec![],
        };
        g.nodes = vec![
            node("embed", "Gather", &[e, ids], emb),
            node("tied", "Transpose", &[e], et),
            node("lm_head", "MatMul", &[x, et], logits),
        ];
        g.inputs = vec![ids, x];
        g.outputs = vec![emb, logits];
        g
    }

    /// The tied head reads the embedding itself (transposed by attribute), the Transpose is gone,
    /// and the rule stays off unless asked for.
    #[test]
    fn tied_head_reads_the_embedding_as_stored() {
        let run = |share: bool| {
            let mut g = graph();
            let options = Options {
                level: OptLevel::All,
                share_transposed_weights: share,
                ..Default::default()
            };
            optimize(&mut g, &options, &Kernels).unwrap();
            g
        };
        let g = run(true);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, vec!["Gather", "MatMulBias"]);
        let head = &g.nodes[1];
        assert_eq!(head.domain, KILN);
        assert_eq!(head.attr("trans_b"), Some(&Attribute::Int(1)));
        assert_eq!(head.inputs[1], g.nodes[0].inputs[0], "both read the embedding");
        assert_eq!(g.initializers.len(), 1);
        let off = run(false);
        assert!(off.nodes.iter().any(|n| n.op_type == "Transpose"));
    }
}
