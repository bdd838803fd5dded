//! Scaled-dot-product attention -> one `Attention` node (the standard opset-23 op, 4-D form):
//!
//! ```text
//! S = MatMul(Q, Kt); S' = Div(S, c) | Mul(S, c) | S; A = Add(S', mask) | S'
//! Y = MatMul(Softmax(A, axis=-1), V)
//! ```
//!
//! with `Q`, `Kt` and `V` known to be 4-D (`[B, H, S, D]`, `Kt = [B, H, D, T]`), a constant
//! scalar `c`, and every intermediate read only inside the pattern. `K` is recovered as
//! `Transpose(Kt, [0, 1, 3, 2])`, which `transpose_merge` then folds into the Transpose that made
//! `Kt`. The scale is always written explicitly (`1/c`, `c` or 1). The mask must broadcast to the
//! scores' shape, as it did in the Add.

use std::collections::BTreeMap;

use crate::{Attribute, Graph, Result, ValueId};

use super::edit::{constant, input, make_node, other_input, out0, scalar_f64, Index};
use super::{Options, Pass, PassCx};

/// Rule `attention_fusion`.
pub struct FuseAttention;

/// `true` when `v` is known to be 4-D: a declared/inferred rank, or the output of a 4-D Transpose.
fn is_4d(g: &Graph, idx: &Index, v: ValueId) -> bool {
    if let Some(s) = &g.value(v).shape {
        return s.rank() == 4;
    }
    idx.producer.get(&v).and_then(|&p| g.nodes.get(p)).is_some_and(|n| {
        n.op_type == "Transpose"
            && n.domain.is_empty()
            && matches!(n.attr("perm"), Some(Attribute::Ints(p)) if p.len() == 4)
    })
}

struct Match {
    nodes: Vec<usize>,
    q: ValueId,
    kt: ValueId,
    v: ValueId,
    mask: Option<ValueId>,
    scale: f64,
    out: ValueId,
    last: usize,
}

fn match_at(g: &Graph, o: &Options, idx: &Index, m2_i: usize) -> Option<Match> {
    let m2 = &g.nodes[m2_i];
    if m2.op_type != "MatMul" || !m2.domain.is_empty() || idx.is_touched(m2_i) {
        return None;
    }
    let (p, v, out) = (input(m2, 0)?, input(m2, 1)?, out0(m2)?);
    let sm_i = idx.producer_op(g, p, "Softmax")?;
    let sm = &g.nodes[sm_i];
    let axis = match sm.attr("axis") {
        None => -1,
        Some(Attribute::Int(a)) => *a,
        _ => return None,
    };
    if !(axis == -1 || axis == 3) || idx.sole_reader(p) != Some(m2_i) {
        return None;
    }
    let mut nodes = vec![sm_i, m2_i];
    let mut cur = input(sm, 0)?;
    let mut mask = None;
    if let Some(a_i) = idx.producer_op(g, cur, "Add") {
        let a = &g.nodes[a_i];
        // The scores side is the operand produced by the scale or the first MatMul.
        let scores = a.inputs.iter().flatten().copied().find(|&x| {
            ["Div", "Mul", "MatMul"]
                .iter()
                .any(|op| idx.producer_op(g, x, op).is_some())
                && other_input(a, x).is_some_and(|m| idx.producer_op(g, m, "MatMul").is_none())
        })?;
        if idx.sole_reader(cur) != Some(sm_i) {
            return None;
        }
        mask = Some(other_input(a, scores)?);
        nodes.push(a_i);
        cur = scores;
    }
    let mut scale = 1.0;
    for (op, inv) in [("Div", true), ("Mul", false)] {
        if let Some(s_i) = idx.producer_op(g, cur, op) {
            let s = &g.nodes[s_i];
            let scalar_at = |k: usize| input(s, k).and_then(|v| constant(g, o, v)).and_then(scalar_f64);
            // Div(S, c), Mul(S, c) or Mul(c, S).
            let (x, c) = match (scalar_at(1), scalar_at(0)) {
                (Some(c), _) => (input(s, 0)?, c),
                (None, Some(c)) if !inv => (input(s, 1)?, c),
                _ => return None,
            };
            if c == 0.0 || idx.sole_reader(cur).is_none() {
                return None;
            }
            scale = if inv { 1.0 / c } else { c };
            nodes.push(s_i);
            cur = x;
            break;
        }
    }
    let m1_i = idx.producer_op(g, cur, "MatMul")?;
    idx.sole_reader(cur)?;
    nodes.push(m1_i);
    let m1 = &g.nodes[m1_i];
    let (q, kt) = (input(m1, 0)?, input(m1, 1)?);
    if !(is_4d(g, idx, q) && is_4d(g, idx, kt) && is_4d(g, idx, v)) {
        return None;
    }
    if nodes.iter().any(|&n| idx.is_touched(n) && n != m2_i) {
        return None;
    }
    Some(Match {
        nodes,
        q,
        kt,
        v,
        mask,
        scale,
        out,
        last: m2_i,
    })
}

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        "attention_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit("", "Attention", 23) || !cx.can_emit("", "Transpose", 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let Some(m) = match_at(g, cx.options, &idx, i) else {
                continue;
            };
            let base = g.nodes[m.last].name.clone();
            let kinfo = g.value(m.kt).clone();
            let k = idx.new_value(g, &format!("{base}_K"), kinfo.dtype, None);
            let mut tattrs = BTreeMap::new();
            tattrs.insert("perm".to_string(), Attribute::Ints(vec![0, 1, 3, 2]));
            let t = make_node(
                format!("{base}_K_transpose"),
                "",
                "Transpose",
                vec![Some(m.kt)],
                vec![Some(k)],
                tattrs,
            );
            idx.push_node(g, t);
            let mut attrs = BTreeMap::new();
            attrs.insert("scale".to_string(), Attribute::Float(m.scale as f32));
            let mut inputs = vec![Some(m.q), Some(k), Some(m.v)];
            if let Some(mask) = m.mask {
                inputs.push(Some(mask));
            }
            let fused = make_node(
                format!("{base}_attention"),
                "",
                "Attention",
                inputs,
                vec![Some(m.out)],
                attrs,
            );
            let others: Vec<usize> = m.nodes.iter().copied().filter(|&n| n != m.last).collect();
            idx.remove(&others);
            idx.touch(&[m.last]);
            g.nodes[m.last] = fused;
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
