//! Common-subexpression elimination: two nodes with the same domain, op, attributes and inputs
//! compute the same values, so the second one's readers read the first one's outputs.
//!
//! Skipped: nondeterministic ops (two `RandomNormal`s differ), nodes with subgraphs (bodies are
//! not compared) or implicit inputs, and nodes whose outputs are pinned (graph outputs).

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::{Hash, Hasher};

use crate::{Attribute, Graph, Node, Result};

use super::edit::{has_subgraph, is_nondeterministic, replace_uses, Index};
use super::{Pass, PassCx};

/// Rule `common_subexpression_elimination`.
pub struct EliminateCommonSubexpressions;

impl Pass for EliminateCommonSubexpressions {
    fn name(&self) -> &'static str {
        "common_subexpression_elimination"
    }

    fn run(&self, g: &mut Graph, _cx: &PassCx) -> Result<usize> {
        let Ok(order) = g.topological_order() else { return Ok(0) };
        let mut idx = Index::new(g);
        let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
        let mut count = 0;
        for i in order {
            let n = &g.nodes[i];
            if has_subgraph(n) || is_nondeterministic(n) || !n.implicit_inputs.is_empty() {
                continue;
            }
            let key = node_key(n);
            let twin = seen
                .get(&key)
                .and_then(|cands| cands.iter().copied().find(|&c| same_computation(&g.nodes[c], n)));
            let Some(first) = twin else {
                seen.entry(key).or_default().push(i);
                continue;
            };
            let pairs: Vec<_> = n.outputs.iter().zip(&g.nodes[first].outputs).collect();
            let ok = pairs.iter().all(|(dup, orig)| match (dup, orig) {
                (None, _) => true,
                (Some(d), Some(_)) => !idx.pinned.contains(d),
                (Some(_), None) => false,
            });
            if !ok {
                continue;
            }
            let repl: Vec<_> = pairs.into_iter().filter_map(|(d, o)| Some(((*d)?, (*o)?))).collect();
            for (d, o) in repl {
                replace_uses(g, d, o);
            }
            idx.remove(&[i]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

fn same_computation(a: &Node, b: &Node) -> bool {
    a.op_type == b.op_type
        && a.domain == b.domain
        && a.inputs == b.inputs
        && a.attributes == b.attributes
        && a.outputs.len() == b.outputs.len()
}

/// A hashable summary; equal nodes have equal keys (candidates are then compared exactly).
fn node_key(n: &Node) -> String {
    let mut k = format!("{}::{}|{:?}|", n.domain, n.op_type, n.inputs);
    for (name, a) in &n.attributes {
        let _ = match a {
            Attribute::Tensor(t) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                t.bytes().hash(&mut h);
                t.string_data().hash(&mut h);
                write!(k, "{name}=T{}{:?}{:x};", t.dtype, t.dims, h.finish())
            }
            Attribute::Tensors(ts) => write!(k, "{name}=Ts{};", ts.len()),
            other => write!(k, "{name}={other:?};"),
        };
    }
    k
}
