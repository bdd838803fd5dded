//! MatMul + Add -> Gemm: `Add(MatMul(A, B), C)` (either Add operand order) becomes
//! `Gemm(A, B, C)` when `A` and `B` are known to be 2-D floats and `C` broadcasts one-way to the
//! `[M, N]` result (`[N]`, `[1, N]`, `[M, 1]`, `[M, N]` or a scalar). N-D MatMuls are left alone.

use std::collections::BTreeMap;

use crate::{Dim, Graph, Result, Shape};

use super::edit::{input, make_node, other_input, out0, Index};
use super::{Pass, PassCx};

/// Rule `matmul_add_fusion`.
pub struct FuseMatMulAdd;

fn dims2(g: &Graph, v: crate::ValueId) -> Option<(Dim, Dim)> {
    match g.value(v).shape.as_ref().map(|s: &Shape| s.0.as_slice()) {
        Some([a, b]) => Some((a.clone(), b.clone())),
        _ => None,
    }
}

/// `true` when `c` (dims) broadcasts one-way to `[m, n]`.
fn fits(c: &[Dim], m: &Dim, n: &Dim) -> bool {
    let ok = |d: &Dim, want: &Dim| d == &Dim::Known(1) || (d == want && !matches!(d, Dim::Unknown));
    match c {
        [] => true,
        [x] => ok(x, n),
        [x, y] => ok(x, m) && ok(y, n),
        _ => false,
    }
}

impl Pass for FuseMatMulAdd {
    fn name(&self) -> &'static str {
        "matmul_add_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit("", "Gemm", 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for ai in 0..g.nodes.len() {
            let add = &g.nodes[ai];
            if add.op_type != "Add" || !add.domain.is_empty() || idx.is_touched(ai) {
                continue;
            }
            let Some(out) = out0(add) else { continue };
            let found = add.inputs.iter().flatten().find_map(|&v| {
                let mi = idx.producer_op(g, v, "MatMul")?;
                (idx.sole_reader(v) == Some(ai)).then_some((mi, v))
            });
            let Some((mi, mm_out)) = found else { continue };
            let Some(c) = other_input(add, mm_out) else { continue };
            let mm = &g.nodes[mi];
            let (Some(a), Some(b)) = (input(mm, 0), input(mm, 1)) else {
                continue;
            };
            let (Some((m, _)), Some((_, n))) = (dims2(g, a), dims2(g, b)) else {
                continue;
            };
            let float = g.value(a).dtype.is_some_and(|d| d.is_float()) && g.value(a).dtype == g.value(c).dtype;
            let Some(cs) = g.value(c).shape.clone() else { continue };
            if !float || !fits(&cs.0, &m, &n) {
                continue;
            }
            let gemm = make_node(
                format!("{}_gemm", mm.name),
                "",
                "Gemm",
                vec![Some(a), Some(b), Some(c)],
                vec![Some(out)],
                BTreeMap::new(),
            );
            g.nodes[ai] = gemm;
            idx.remove(&[mi]);
            idx.touch(&[ai]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
