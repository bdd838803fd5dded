//! Static shape folding: `Shape` (with `start`/`end`) and `Size` of a value whose inferred or
//! declared shape is fully static become constants. Constant folding then evaluates the usual
//! `Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape` chains that follow.

use crate::{Attribute, DType, Graph, Result, Shape, TensorData};

use super::edit::{input, out0, Index};
use super::{Pass, PassCx};

/// Rule `shape_folding`.
pub struct FoldStaticShapes;

impl Pass for FoldStaticShapes {
    fn name(&self) -> &'static str {
        "shape_folding"
    }

    fn run(&self, g: &mut Graph, _cx: &PassCx) -> Result<usize> {
        let mut idx = Index::new(g);
        let mut count = 0;
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if !n.domain.is_empty() || !(n.op_type == "Shape" || n.op_type == "Size") {
                continue;
            }
            let (Some(x), Some(out)) = (input(n, 0), out0(n)) else {
                continue;
            };
            if idx.pinned.contains(&out) || g.initializers.contains_key(&out) {
                continue;
            }
            let Some(dims) = g.value(x).shape.as_ref().and_then(Shape::as_known) else {
                continue;
            };
            let name = g.value_name(out).to_string();
            let data = if n.op_type == "Size" {
                let Some(size) = dims
                    .iter()
                    .try_fold(1i64, |a, &d| a.checked_mul(i64::try_from(d).ok()?))
                else {
                    continue;
                };
                TensorData::from_values(name, vec![], &[size])
            } else {
                let r = dims.len() as i64;
                let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) } as usize;
                let start = match n.attr("start") {
                    Some(Attribute::Int(s)) => clamp(*s),
                    _ => 0,
                };
                let end = match n.attr("end") {
                    Some(Attribute::Int(e)) => clamp(*e),
                    _ => dims.len(),
                };
                let vals: Vec<i64> = dims
                    .get(start..end.max(start))
                    .unwrap_or(&[])
                    .iter()
                    .map(|&d| d as i64)
                    .collect();
                TensorData::from_values(name, vec![vals.len()], &vals)
            };
            let Ok(data) = data else { continue };
            let info = &mut g.values[out.index()];
            info.dtype = Some(DType::I64);
            info.shape = Some(Shape::from_known(&data.dims));
            g.initializers.insert(out, data);
            idx.remove(&[i]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
