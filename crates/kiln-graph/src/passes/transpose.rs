//! Transpose pairs: `Transpose(Transpose(x, p1), p2)` becomes `Transpose(x, p)` with
//! `p[i] = p1[p2[i]]`; when `p` is the identity, no-op elimination then removes it, so a pair
//! that cancels disappears. The inner Transpose dies if nothing else reads it.

use crate::{Attribute, Graph, Result};

use super::edit::{input, Index};
use super::{Pass, PassCx};

/// Rule `transpose_merge`.
pub struct MergeTransposes;

fn perm(n: &crate::Node) -> Option<&Vec<i64>> {
    match n.attr("perm") {
        Some(Attribute::Ints(p)) => Some(p),
        _ => None,
    }
}

impl Pass for MergeTransposes {
    fn name(&self) -> &'static str {
        "transpose_merge"
    }

    fn run(&self, g: &mut Graph, _cx: &PassCx) -> Result<usize> {
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if n.op_type != "Transpose" || !n.domain.is_empty() || idx.is_touched(i) {
                continue;
            }
            let Some(p2) = perm(n) else { continue };
            let Some(mid) = input(n, 0) else { continue };
            let Some(p) = idx.producer_op(g, mid, "Transpose") else {
                continue;
            };
            let inner = &g.nodes[p];
            let (Some(p1), Some(x)) = (perm(inner), input(inner, 0)) else {
                continue;
            };
            if p1.len() != p2.len() {
                continue;
            }
            let merged: Option<Vec<i64>> = p2
                .iter()
                .map(|&k| usize::try_from(k).ok().and_then(|k| p1.get(k).copied()))
                .collect();
            let Some(merged) = merged else { continue };
            let node = &mut g.nodes[i];
            if let Some(slot) = node.inputs.first_mut() {
                *slot = Some(x);
            }
            node.attributes.insert("perm".into(), Attribute::Ints(merged));
            idx.touch(&[i, p]);
            count += 1;
        }
        Ok(count)
    }
}
