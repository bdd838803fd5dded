//! Reshape chains: `Reshape(Reshape(x, s1), s2)` reads `x` directly when `s2` is a constant without
//! `0` entries (a `0` would copy a dim of the intermediate shape). The same holds when the inner
//! node is another pure view op (`Flatten`, `Squeeze`, `Unsqueeze`): only the element count, which
//! views keep, matters to the outer Reshape. The inner node dies if nothing else reads it.

use crate::{Attribute, Graph, Result};

use super::edit::{const_input, input, Index};
use super::{Pass, PassCx};

/// Rule `reshape_chain`.
pub struct MergeReshapes;

const VIEWS: &[&str] = &["Reshape", "Flatten", "Squeeze", "Unsqueeze"];

impl Pass for MergeReshapes {
    fn name(&self) -> &'static str {
        "reshape_chain"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if n.op_type != "Reshape" || !n.domain.is_empty() {
                continue;
            }
            let Some(shape) = const_input(g, cx.options, n, 1).and_then(|t| t.to_i64_vec()) else {
                continue;
            };
            let allowzero = matches!(n.attr("allowzero"), Some(Attribute::Int(1)));
            if !allowzero && shape.contains(&0) {
                continue;
            }
            let Some(mid) = input(n, 0) else { continue };
            let Some(&p) = idx.producer.get(&mid) else { continue };
            let inner = &g.nodes[p];
            if !inner.domain.is_empty() || !VIEWS.contains(&inner.op_type.as_str()) {
                continue;
            }
            let Some(x) = input(inner, 0) else { continue };
            if let Some(slot) = g.nodes[i].inputs.first_mut() {
                *slot = Some(x);
                count += 1;
            }
        }
        Ok(count)
    }
}
