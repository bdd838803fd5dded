//! Dead-node elimination: drops nodes none of whose outputs reach a graph output.

use std::collections::HashSet;

use crate::{Graph, ValueId};

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
