//! Bias + GELU: `Gelu(Add(x, b))` (exact, erf-based GELU: standard `Gelu` without
//! `approximate`, or `com.microsoft` `Gelu`) with a constant 1-D bias `b` becomes one
//! `com.microsoft` `BiasGelu(x, b)`, as ONNX Runtime fuses it. Runs after `gelu_fusion`.

use std::collections::BTreeMap;

use crate::{Attribute, Dim, Graph, Result};

use super::conv_activation::MS;
use super::edit::{constant, input, make_node, other_input, out0, Index};
use super::{Pass, PassCx};

/// Rule `bias_gelu_fusion`.
pub struct FuseBiasGelu;

impl Pass for FuseBiasGelu {
    fn name(&self) -> &'static str {
        "bias_gelu_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit(MS, "BiasGelu", 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for gi in 0..g.nodes.len() {
            let n = &g.nodes[gi];
            let exact = match (n.domain.as_str(), n.op_type.as_str()) {
                ("", "Gelu") => !matches!(n.attr("approximate"), Some(Attribute::String(s)) if s.as_slice() != b"none"),
                (MS, "Gelu") => true,
                _ => false,
            };
            if !exact || idx.is_touched(gi) {
                continue;
            }
            let (Some(s), Some(out)) = (input(n, 0), out0(n)) else {
                continue;
            };
            let Some(ai) = idx.producer_op(g, s, "Add") else {
                continue;
            };
            if idx.sole_reader(s) != Some(gi) {
                continue;
            }
            let add = &g.nodes[ai];
            let found = add.inputs.iter().flatten().copied().find_map(|b| {
                let t = constant(g, cx.options, b)?;
                let x = other_input(add, b)?;
                let last = g.value(x).shape.as_ref().and_then(|sh| sh.0.last().cloned());
                let &[len] = t.dims.as_slice() else { return None };
                let fits = len > 1
                    && g.value(x).dtype.is_none_or(|d| d == t.dtype)
                    && constant(g, cx.options, x).is_none()
                    && match last {
                        Some(Dim::Known(d)) => d == len,
                        // Unknown: the Add broadcast `b` over the last axis, so it equals len(b)
                        // unless it is 1 (Kiln's kernel broadcasts the same way).
                        _ => true,
                    };
                fits.then_some((x, b))
            });
            let Some((x, b)) = found else { continue };
            let fused = make_node(
                format!("{}_biasgelu", n.name),
                MS,
                "BiasGelu",
                vec![Some(x), Some(b)],
                vec![Some(out)],
                BTreeMap::new(),
            );
            g.nodes[gi] = fused;
            idx.remove(&[ai]);
            idx.touch(&[gi]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
