//! Dead-node elimination: drops nodes none of whose outputs reach a graph output, and
//! initializers nothing reads any more (folding leaves the inputs of folded nodes behind).

use std::collections::HashSet;

use crate::{Graph, Result, ValueId};

use super::{Pass, PassCx};

/// Rule `dead_node_elimination`.
pub struct EliminateDeadNodes;

impl Pass for EliminateDeadNodes {
    fn name(&self) -> &'static str {
        "dead_node_elimination"
    }

    fn run(&self, graph: &mut Graph, _cx: &PassCx) -> Result<usize> {
        let n = eliminate_dead_nodes(graph);
        drop_unused_initializers(graph);
        Ok(n)
    }
}

/// Removes nodes that do not contribute to any graph output. Returns how many were removed.
pub fn eliminate_dead_nodes(graph: &mut Graph) -> usize {
    let mut live: HashSet<ValueId> = graph.outputs.iter().copied().collect();
    let mut keep = vec![false; graph.nodes.len()];
    // Walk backwards until no change: nodes may be out of order in a freshly imported graph.
    let mut changed = true;
    while changed {
        changed = false;
        for (i, n) in graph.nodes.iter().enumerate().rev() {
            if !keep[i] && n.outputs.iter().flatten().any(|o| live.contains(o)) {
                keep[i] = true;
                changed = true;
                live.extend(n.all_inputs());
            }
        }
    }
    let before = graph.nodes.len();
    let mut it = keep.iter();
    graph.nodes.retain(|_| *it.next().unwrap_or(&true));
    before - graph.nodes.len()
}

/// Removes initializers that are neither graph inputs nor read by any node or output.
pub fn drop_unused_initializers(graph: &mut Graph) -> usize {
    let mut used: HashSet<ValueId> = graph.outputs.iter().copied().collect();
    used.extend(graph.inputs.iter().copied());
    for n in &graph.nodes {
        used.extend(n.all_inputs());
    }
    let before = graph.initializers.len();
    graph.initializers.retain(|k, _| used.contains(k));
    before - graph.initializers.len()
}
