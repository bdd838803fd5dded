//! No-op elimination: removes nodes whose output equals their input.
//!
//! Matches `Identity`; `Dropout` in inference (no `training_mode`, or a constant false one, and an
//! unread mask); `Cast` to the input's own dtype; `Reshape` to the input's own static shape;
//! `Transpose` with the identity permutation. Readers of the output read the input instead; when
//! the output is a graph output, the input's producer writes the output directly instead (and the
//! input's other readers read the output).

use crate::{Attribute, DType, Graph, Result, ValueId};

use super::edit::{const_input, input, only_first_output_used, out0, replace_uses, Index};
use super::{Options, Pass, PassCx};

/// Rule `noop_elimination`.
pub struct EliminateNoOps;

impl Pass for EliminateNoOps {
    fn name(&self) -> &'static str {
        "noop_elimination"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            if idx.is_touched(i) || !is_noop(g, cx.options, &idx, i) {
                continue;
            }
            let n = &g.nodes[i];
            let (Some(src), Some(dst)) = (input(n, 0), out0(n)) else {
                continue;
            };
            if bypass(g, &mut idx, i, src, dst) {
                count += 1;
            }
        }
        idx.finish(g);
        Ok(count)
    }
}

fn is_noop(g: &Graph, options: &Options, idx: &Index, i: usize) -> bool {
    let n = &g.nodes[i];
    if !n.domain.is_empty() || !n.implicit_inputs.is_empty() {
        return false;
    }
    let (Some(src), Some(_)) = (input(n, 0), out0(n)) else {
        return false;
    };
    let info = g.value(src);
    match n.op_type.as_str() {
        "Identity" => true,
        "Dropout" => {
            let training = match input(n, 2) {
                None => false,
                Some(_) => match const_input(g, options, n, 2).and_then(|t| t.to_i64_vec()) {
                    Some(v) => v.iter().any(|&x| x != 0),
                    None => true,
                },
            };
            !training && only_first_output_used(idx, n)
        }
        "Cast" => match (n.attr("to"), info.dtype) {
            (Some(Attribute::Int(to)), Some(d)) => DType::from_onnx(*to as i32) == Some(d) && d != DType::String,
            _ => false,
        },
        "Reshape" => {
            let Some(dims) = info.shape.as_ref().and_then(|s| s.as_known()) else {
                return false;
            };
            let Some(target) = const_input(g, options, n, 1).and_then(|t| t.to_i64_vec()) else {
                return false;
            };
            let allowzero = matches!(n.attr("allowzero"), Some(Attribute::Int(1)));
            reshape_is_identity(&dims, &target, allowzero)
        }
        "Transpose" => match n.attr("perm") {
            Some(Attribute::Ints(p)) => p.iter().enumerate().all(|(k, &v)| v == k as i64),
            // Without `perm` the axes are reversed: a no-op only for rank <= 1.
            None => info.shape.as_ref().is_some_and(|s| s.rank() <= 1),
            _ => false,
        },
        _ => false,
    }
}

/// `true` when reshaping `dims` to `target` (ONNX rules for 0 and -1) gives `dims` back.
pub fn reshape_is_identity(dims: &[usize], target: &[i64], allowzero: bool) -> bool {
    // With a zero-sized dim a -1 cannot be inferred (the Reshape fails): keep the node.
    if dims.len() != target.len() || (target.contains(&-1) && dims.contains(&0)) {
        return false;
    }
    let mut infer = None;
    for (k, (&d, &t)) in dims.iter().zip(target).enumerate() {
        match t {
            0 if !allowzero => {}
            -1 if infer.is_none() => infer = Some(k),
            t if t >= 0 && t as usize == d => {}
            _ => return false,
        }
    }
    // A single -1 takes the one remaining size, which is the input's own dim.
    true
}

/// Removes node `i` whose output `dst` equals its input `src`. Returns `false` (and changes
/// nothing) when both ends are pinned.
pub fn bypass(g: &mut Graph, idx: &mut Index, i: usize, src: ValueId, dst: ValueId) -> bool {
    let dst_readers = idx.readers(dst).to_vec();
    let src_producer = idx.producer.get(&src).copied();
    if !idx.pinned.contains(&dst) {
        replace_uses(g, dst, src);
        idx.remove(&[i]);
        idx.touch(&dst_readers);
        if let Some(p) = src_producer {
            idx.touch(&[p]);
        }
        return true;
    }
    // dst is a graph output: let src's producer write dst, and src's other readers read dst (the
    // same values). A src read by name in a subgraph is pinned (it would need the body renamed).
    let Some(p) = src_producer else { return false };
    let others: Vec<usize> = idx.readers(src).iter().copied().filter(|&r| r != i).collect();
    if idx.pinned.contains(&src) || idx.is_touched(p) || others.iter().any(|&r| idx.is_touched(r)) {
        return false;
    }
    let Some(slot) = g.nodes[p].outputs.iter_mut().flatten().find(|o| **o == src) else {
        return false;
    };
    *slot = dst;
    replace_uses(g, src, dst);
    idx.touch(&others);
    let info = g.value(src).clone();
    let d = &mut g.values[dst.index()];
    if d.dtype.is_none() {
        d.dtype = info.dtype;
    }
    if d.shape.is_none() {
        d.shape = info.shape;
    }
    idx.remove(&[i]);
    idx.touch(&[p]);
    true
}

#[cfg(test)]
mod tests {
    use super::reshape_is_identity;

    #[test]
    fn reshape_identity_rules() {
        assert!(reshape_is_identity(&[2, 3, 4], &[2, 3, 4], false));
        assert!(reshape_is_identity(&[2, 3, 4], &[0, -1, 4], false));
        assert!(!reshape_is_identity(&[2, 3, 4], &[0, -1, 4], true));
        assert!(!reshape_is_identity(&[2, 3, 4], &[2, -1, -1], false));
        assert!(!reshape_is_identity(&[2, 3, 4], &[6, 4], false));
        assert!(!reshape_is_identity(&[2, 0], &[2, -1], false));
        assert!(reshape_is_identity(&[2, 0], &[2, 0], true));
    }
}
