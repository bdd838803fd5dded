//! Constant folding: a node whose inputs are all constants (initializers the caller cannot
//! override) is evaluated once, at load, by the runtime's own kernel ([`super::ConstEval`]), and
//! its outputs become initializers. `Constant` nodes become initializers the same way.
//!
//! Skipped: random and other nondeterministic ops, DequantizeLinear of an int8 MatMul/Gemm weight
//! (folding would undo the quantization; see [`super::quantize`]), nodes with subgraphs or non-tensor outputs,
//! nodes producing a graph output, and nodes whose outputs would be more than
//! [`super::Options::max_fold_growth_bytes`] larger than their inputs (folding must not inflate
//! the model, e.g. `ConstantOfShape` of a large shape).

use crate::{Graph, Result, Shape};

use super::edit::{constant, has_subgraph, is_nondeterministic, Index};
use super::{Pass, PassCx};

/// Rule `constant_folding`.
pub struct FoldConstants;

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        "constant_folding"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.implicit_inputs.is_empty() || has_subgraph(n) || is_nondeterministic(n) {
                continue;
            }
            if super::quantize::is_quantized_weight(g, &idx, n) {
                continue;
            }
            if n.outputs
                .iter()
                .flatten()
                .any(|o| idx.pinned.contains(o) || g.initializers.contains_key(o))
            {
                continue;
            }
            if n.outputs.iter().flatten().next().is_none() {
                continue;
            }
            let mut inputs = Vec::with_capacity(n.inputs.len());
            let mut in_bytes = 0usize;
            let mut all_const = true;
            for v in &n.inputs {
                match v {
                    None => inputs.push(None),
                    Some(v) => match constant(g, cx.options, *v) {
                        Some(t) => {
                            in_bytes += t.bytes().len() + t.string_data().map_or(0, |s| s.iter().map(Vec::len).sum());
                            inputs.push(Some(t.clone()));
                        }
                        None => {
                            all_const = false;
                            break;
                        }
                    },
                }
            }
            if !all_const {
                continue;
            }
            let limit = in_bytes.saturating_add(cx.options.max_fold_growth_bytes);
            // Declared output shapes let big outputs be skipped before evaluating anything.
            let declared: usize = n
                .outputs
                .iter()
                .flatten()
                .filter_map(|o| {
                    let v = g.value(*o);
                    let dims = v.shape.as_ref()?.as_known()?;
                    Some(
                        dims.iter()
                            .fold(1usize, |a, &d| a.saturating_mul(d))
                            .saturating_mul(v.dtype?.size_in_bytes()),
                    )
                })
                .fold(0usize, usize::saturating_add);
            if declared > limit {
                continue;
            }
            let opset = cx.options.opsets.get(&n.domain).copied().unwrap_or(1);
            let Ok(Some(outs)) = cx.eval.eval(g, n, opset, &inputs, limit) else {
                continue;
            };
            let present: Vec<_> = n
                .outputs
                .iter()
                .enumerate()
                .filter_map(|(k, o)| o.map(|o| (k, o)))
                .collect();
            let out_bytes: usize = outs.iter().map(|t| t.bytes().len()).sum();
            if outs.len() != present.len() || out_bytes > limit {
                continue;
            }
            for ((_, o), mut t) in present.into_iter().zip(outs) {
                t.name = g.value_name(o).to_string();
                let info = &mut g.values[o.index()];
                info.dtype = Some(t.dtype);
                info.shape = Some(Shape::from_known(&t.dims));
                info.kind = crate::ValueKind::Tensor;
                g.initializers.insert(o, t);
            }
            idx.remove(&[i]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
