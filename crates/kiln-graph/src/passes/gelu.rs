//! GELU subgraphs -> one node.
//!
//! Erf form: `x * 0.5 * (1 + Erf(x / sqrt(2)))` (also `x * (1/sqrt(2))`), with the two `Mul`s in
//! any of the three orders exporters produce. Tanh form:
//! `x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))` with `x^3` as `Pow(x, 3)` or
//! `x * (x * x)`.
//!
//! Emits the standard `Gelu` (opset 20; `approximate="tanh"` for the tanh form) when it may, or
//! else `com.microsoft` `Gelu` / `FastGelu`.

use std::collections::BTreeMap;

use crate::{Attribute, Graph, Result, ValueId};

use super::conv_activation::MS;
use super::edit::{binary_with_scalar, input, make_node, other_input, out0, Index};
use super::{Options, Pass, PassCx};

/// Rule `gelu_fusion`.
pub struct FuseGelu;

const SQRT2: f64 = std::f64::consts::SQRT_2;
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// A default-domain binary node `op` reading `v` and a constant scalar ~`c`, read by nobody else.
fn scalar_op(g: &Graph, o: &Options, idx: &Index, v: ValueId, op: &str, c: f64) -> Option<usize> {
    let r = idx.sole_reader(v)?;
    let n = &g.nodes[r];
    (n.op_type == op && n.domain.is_empty() && !idx.is_touched(r) && binary_with_scalar(g, o, n, v, c)).then_some(r)
}

/// `t = x / sqrt(2)` or `x * (1/sqrt(2))`: returns x.
fn erf_head(g: &Graph, o: &Options, idx: &Index, t: ValueId) -> Option<(ValueId, Vec<usize>)> {
    let p = *idx.producer.get(&t)?;
    let n = &g.nodes[p];
    if idx.is_touched(p) || !n.domain.is_empty() || idx.sole_reader(t).is_none() {
        return None;
    }
    let x = input(n, 0)?;
    let ok = match n.op_type.as_str() {
        "Div" => binary_with_scalar(g, o, n, x, SQRT2) && input(n, 1) != Some(x),
        "Mul" => [x, input(n, 1)?]
            .iter()
            .any(|&v| binary_with_scalar(g, o, n, v, 1.0 / SQRT2)),
        _ => false,
    };
    if !ok {
        return None;
    }
    // For Mul the variable operand may be either input.
    let x = if n.op_type == "Mul" && binary_with_scalar(g, o, n, x, 1.0 / SQRT2) {
        x
    } else if n.op_type == "Mul" {
        input(n, 1)?
    } else {
        x
    };
    Some((x, vec![p]))
}

/// `t = sqrt(2/pi) * (x + 0.044715 * x^3)`: returns x.
fn tanh_head(g: &Graph, o: &Options, idx: &Index, t: ValueId) -> Option<(ValueId, Vec<usize>)> {
    let scale_i = idx.producer_op(g, t, "Mul")?;
    let scale = &g.nodes[scale_i];
    let inner = scale
        .inputs
        .iter()
        .flatten()
        .copied()
        .find(|&v| binary_with_scalar(g, o, scale, v, SQRT_2_OVER_PI))?;
    let add_i = idx.producer_op(g, inner, "Add")?;
    let add = &g.nodes[add_i];
    for &x in add.inputs.iter().flatten() {
        let Some(k) = other_input(add, x) else { continue };
        let Some(km_i) = idx.producer_op(g, k, "Mul") else {
            continue;
        };
        let km = &g.nodes[km_i];
        let Some(cube) = km
            .inputs
            .iter()
            .flatten()
            .copied()
            .find(|&v| binary_with_scalar(g, o, km, v, 0.044715))
        else {
            continue;
        };
        let Some(c_i) = idx.producer.get(&cube).copied().filter(|&c| !idx.is_touched(c)) else {
            continue;
        };
        let c = &g.nodes[c_i];
        let mut nodes = vec![c_i, km_i, add_i, scale_i];
        let is_cube = match c.op_type.as_str() {
            "Pow" => input(c, 0) == Some(x) && binary_with_scalar(g, o, c, x, 3.0),
            "Mul" => {
                let sq = other_input(c, x);
                match sq.and_then(|s| idx.producer_op(g, s, "Mul").map(|si| (s, si))) {
                    Some((s, si)) if input(&g.nodes[si], 0) == Some(x) && input(&g.nodes[si], 1) == Some(x) => {
                        nodes.push(si);
                        idx.sole_reader(s) == Some(c_i)
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        let sole = idx.sole_reader(cube) == Some(km_i)
            && idx.sole_reader(k) == Some(add_i)
            && idx.sole_reader(inner) == Some(scale_i)
            && idx.sole_reader(t).is_some();
        if is_cube && sole && c.domain.is_empty() {
            return Some((x, nodes));
        }
    }
    None
}

/// From `f = Erf(..)`/`Tanh(..)`: `0.5 * x * (1 + f)` in three Mul orders; returns the nodes and
/// the final output.
fn tail(g: &Graph, o: &Options, idx: &Index, f: ValueId, x: ValueId) -> Option<(Vec<usize>, ValueId)> {
    let a_i = scalar_op(g, o, idx, f, "Add", 1.0)?;
    let a = out0(&g.nodes[a_i])?;
    let m1_i = idx.sole_reader(a)?;
    let m1 = &g.nodes[m1_i];
    if m1.op_type != "Mul" || !m1.domain.is_empty() || idx.is_touched(m1_i) {
        return None;
    }
    let m1_out = out0(m1)?;
    let other = other_input(m1, a)?;
    if other == x {
        // (x * (1 + f)) * 0.5
        let m2_i = scalar_op(g, o, idx, m1_out, "Mul", 0.5)?;
        return Some((vec![a_i, m1_i, m2_i], out0(&g.nodes[m2_i])?));
    }
    if binary_with_scalar(g, o, m1, a, 0.5) {
        // x * ((1 + f) * 0.5)
        let m2_i = idx.sole_reader(m1_out)?;
        let m2 = &g.nodes[m2_i];
        let ok = m2.op_type == "Mul" && m2.domain.is_empty() && !idx.is_touched(m2_i);
        return (ok && other_input(m2, m1_out) == Some(x)).then_some((vec![a_i, m1_i, m2_i], out0(m2)?));
    }
    // (x * 0.5) * (1 + f)
    let h_i = idx.producer_op(g, other, "Mul")?;
    let h = &g.nodes[h_i];
    (binary_with_scalar(g, o, h, x, 0.5) && idx.sole_reader(other) == Some(m1_i))
        .then_some((vec![h_i, a_i, m1_i], m1_out))
}

impl Pass for FuseGelu {
    fn name(&self) -> &'static str {
        "gelu_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let std_gelu = cx.can_emit("", "Gelu", 20);
        let ms_gelu = cx.can_emit(MS, "Gelu", 1);
        let ms_fast = cx.can_emit(MS, "FastGelu", 1);
        if !std_gelu && !ms_gelu && !ms_fast {
            return Ok(0);
        }
        let o = cx.options;
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.domain.is_empty() || idx.is_touched(i) {
                continue;
            }
            let erf = match n.op_type.as_str() {
                "Erf" => true,
                "Tanh" => false,
                _ => continue,
            };
            let (Some(t), Some(f)) = (input(n, 0), out0(n)) else {
                continue;
            };
            let head = if erf {
                erf_head(g, o, &idx, t)
            } else {
                tanh_head(g, o, &idx, t)
            };
            let Some((x, mut nodes)) = head else { continue };
            let Some((tail_nodes, out)) = tail(g, o, &idx, f, x) else {
                continue;
            };
            nodes.push(i);
            nodes.extend(tail_nodes);
            if nodes.iter().any(|&k| idx.is_touched(k)) || nodes.iter().any(|&k| out0(&g.nodes[k]) == Some(x)) {
                continue;
            }
            let mut attrs = BTreeMap::new();
            let (domain, op) = if std_gelu {
                if !erf {
                    attrs.insert("approximate".to_string(), Attribute::String(b"tanh".to_vec()));
                }
                ("", "Gelu")
            } else if erf && ms_gelu {
                (MS, "Gelu")
            } else if !erf && ms_fast {
                (MS, "FastGelu")
            } else {
                continue;
            };
            let Some(&last) = nodes.last() else { continue };
            let name = format!("{}_gelu", g.nodes[last].name);
            let fused = make_node(name, domain, op, vec![Some(x)], vec![Some(out)], attrs);
            let others: Vec<usize> = nodes.iter().copied().filter(|&k| k != last).collect();
            idx.remove(&others);
            idx.touch(&[last]);
            g.nodes[last] = fused;
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
