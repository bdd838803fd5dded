//! Conv + residual Add + activation: `Act(Add(Conv(x, W, B), z))` (also a two-input `Sum`, in
//! either operand order) becomes one `com.microsoft` `FusedConv(x, W, B, z)` with the activation,
//! the residual-block tail of ResNet-style CNNs. The runtime adds `z` to the convolution's fresh
//! output and activates it in place.
//!
//! ONNX Runtime's FusedConv needs `z` of exactly the Conv output's shape, which Kiln cannot prove
//! without full shape inference, so under `strict_opsets` (export) this rule stays off; in memory
//! Kiln's kernel broadcasts `z` exactly as the Add did.

use crate::{Attribute, Graph, Result};

use super::conv_activation::{activation, MS};
use super::edit::{make_node, other_input, out0, Index};
use super::{Pass, PassCx};

/// Rule `conv_add_activation_fusion`.
pub struct FuseConvAddActivation;

impl Pass for FuseConvAddActivation {
    fn name(&self) -> &'static str {
        "conv_add_activation_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if cx.options.strict_opsets || !cx.can_emit(MS, "FusedConv", 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for ci in 0..g.nodes.len() {
            let conv = &g.nodes[ci];
            if conv.op_type != "Conv" || !conv.domain.is_empty() || idx.is_touched(ci) || conv.inputs.len() > 3 {
                continue;
            }
            let Some(y) = out0(conv) else { continue };
            let Some(ai) = idx.sole_reader(y) else { continue };
            let add = &g.nodes[ai];
            let is_add = add.domain.is_empty()
                && (add.op_type == "Add" || add.op_type == "Sum")
                && add.inputs.len() == 2
                && !idx.is_touched(ai);
            if !is_add {
                continue;
            }
            let Some(z) = other_input(add, y) else { continue };
            // The same value twice (`y + y`) is not a residual.
            if z == y {
                continue;
            }
            let Some(s) = out0(add) else { continue };
            let Some(acti) = idx.sole_reader(s) else { continue };
            if idx.is_touched(acti) {
                continue;
            }
            let Some((name, params)) = activation(g, cx, &g.nodes[acti]) else {
                continue;
            };
            let Some(out) = out0(&g.nodes[acti]) else { continue };
            let mut attrs = conv.attributes.clone();
            attrs.insert("activation".into(), Attribute::String(name.as_bytes().to_vec()));
            if !params.is_empty() {
                attrs.insert("activation_params".into(), Attribute::Floats(params));
            }
            let mut inputs = conv.inputs.clone();
            inputs.resize(3, None);
            inputs.push(Some(z));
            let fused = make_node(conv.name.clone(), MS, "FusedConv", inputs, vec![Some(out)], attrs);
            g.nodes[ci] = fused;
            idx.remove(&[ai, acti]);
            idx.touch(&[ci]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
