//! LayerNorm subgraph -> `LayerNormalization`. Matches the decomposed form exporters emit:
//!
//! ```text
//! mu = ReduceMean(x, [-1]); d = Sub(x, mu); v = ReduceMean(Pow(d, 2) | Mul(d, d), [-1])
//! y  = Div(d, Sqrt(Add(v, eps))) * gamma [+ beta]
//! ```
//!
//! with constant `eps`, `gamma` and `beta`, reductions over the last axis only (`keepdims` 1),
//! and every intermediate read only inside the pattern.

use std::collections::BTreeMap;

use crate::{Attribute, Graph, Result, ValueId};

use super::edit::{
    attr_i, binary_with_scalar, constant, input, make_node, other_input, out0, reduce_axes, scalar_f64, Index,
};
use super::{Options, Pass, PassCx};

/// Rule `layer_norm_fusion`.
pub struct FuseLayerNorm;

/// The input of a last-axis `ReduceMean` producing `v`.
fn mean_last_axis(g: &Graph, o: &Options, idx: &Index, v: ValueId) -> Option<(usize, ValueId)> {
    let i = idx.producer_op(g, v, "ReduceMean")?;
    let n = &g.nodes[i];
    let x = input(n, 0)?;
    let axes = reduce_axes(g, o, n)?;
    let rank = g.value(x).shape.as_ref().map(|s| s.rank() as i64);
    let last = matches!(axes.as_slice(), [-1]) || (rank.is_some() && axes.as_slice() == [rank? - 1]);
    (last && attr_i(n, "keepdims", 1) == Some(1)).then_some((i, x))
}

struct Match {
    nodes: Vec<usize>,
    x: ValueId,
    eps: f64,
    gamma: ValueId,
    beta: Option<ValueId>,
    out: ValueId,
    last: usize,
}

fn match_at(g: &Graph, o: &Options, idx: &Index, mul_i: usize) -> Option<Match> {
    let mul = &g.nodes[mul_i];
    if mul.op_type != "Mul" || !mul.domain.is_empty() || idx.is_touched(mul_i) {
        return None;
    }
    // Mul(Div(..), gamma) in either order.
    let (div_i, nrm) = mul
        .inputs
        .iter()
        .flatten()
        .find_map(|&v| Some((idx.producer_op(g, v, "Div")?, v)))?;
    let gamma = other_input(mul, nrm)?;
    constant(g, o, gamma)?;
    if idx.sole_reader(nrm) != Some(mul_i) {
        return None;
    }
    let div = &g.nodes[div_i];
    let (d, s) = (input(div, 0)?, input(div, 1)?);
    let sqrt_i = idx.producer_op(g, s, "Sqrt")?;
    let ve = input(&g.nodes[sqrt_i], 0)?;
    let add_i = idx.producer_op(g, ve, "Add")?;
    let add = &g.nodes[add_i];
    let v = add
        .inputs
        .iter()
        .flatten()
        .copied()
        .find(|&v| idx.producer_op(g, v, "ReduceMean").is_some())?;
    let eps = scalar_f64(constant(g, o, other_input(add, v)?)?)?;
    let (rv_i, p) = mean_last_axis(g, o, idx, v)?;
    let sq_i = *idx.producer.get(&p)?;
    let sq = &g.nodes[sq_i];
    let is_square = !idx.is_touched(sq_i)
        && sq.domain.is_empty()
        && ((sq.op_type == "Pow" && input(sq, 0) == Some(d) && binary_with_scalar(g, o, sq, d, 2.0))
            || (sq.op_type == "Mul" && input(sq, 0) == Some(d) && input(sq, 1) == Some(d)));
    if !is_square {
        return None;
    }
    let sub_i = idx.producer_op(g, d, "Sub")?;
    let sub = &g.nodes[sub_i];
    let (x, mu) = (input(sub, 0)?, input(sub, 1)?);
    let (rm_i, x2) = mean_last_axis(g, o, idx, mu)?;
    if x2 != x {
        return None;
    }
    // Intermediates read only inside the pattern.
    let d_readers: Vec<usize> = idx.readers(d).to_vec();
    let d_ok = !idx.pinned.contains(&d) && d_readers.iter().all(|&r| r == sq_i || r == div_i);
    let sole = |v: ValueId, r: usize| idx.sole_reader(v) == Some(r);
    if !(d_ok && sole(mu, sub_i) && sole(p, rv_i) && sole(v, add_i) && sole(ve, sqrt_i) && sole(s, div_i)) {
        return None;
    }
    let mut nodes = vec![rm_i, sub_i, sq_i, rv_i, add_i, sqrt_i, div_i, mul_i];
    let mut out = out0(mul)?;
    let mut last = mul_i;
    let mut beta = None;
    if let Some(bi) = idx.sole_reader(out) {
        let b = &g.nodes[bi];
        if b.op_type == "Add" && b.domain.is_empty() && !idx.is_touched(bi) {
            if let Some(bv) = other_input(b, out).filter(|&bv| constant(g, o, bv).is_some()) {
                beta = Some(bv);
                out = out0(b)?;
                last = bi;
                nodes.push(bi);
            }
        }
    }
    if nodes.iter().any(|&n| idx.is_touched(n)) {
        return None;
    }
    Some(Match {
        nodes,
        x,
        eps,
        gamma,
        beta,
        out,
        last,
    })
}

impl Pass for FuseLayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit("", "LayerNormalization", 17) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let Some(m) = match_at(g, cx.options, &idx, i) else {
                continue;
            };
            let mut attrs = BTreeMap::new();
            attrs.insert("axis".to_string(), Attribute::Int(-1));
            attrs.insert("epsilon".to_string(), Attribute::Float(m.eps as f32));
            let mut inputs = vec![Some(m.x), Some(m.gamma)];
            if let Some(b) = m.beta {
                inputs.push(Some(b));
            }
            let name = format!("{}_layernorm", g.nodes[m.last].name);
            let fused = make_node(name, "", "LayerNormalization", inputs, vec![Some(m.out)], attrs);
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
