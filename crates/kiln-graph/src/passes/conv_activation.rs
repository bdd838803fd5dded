//! Conv + activation: a Conv whose only reader is `Relu`, `LeakyRelu`, `Sigmoid`, `Tanh`,
//! `HardSigmoid` or a `Clip` with constant bounds becomes one `com.microsoft` `FusedConv` with the
//! `activation` (and `activation_params`) attributes ONNX Runtime uses; the runtime applies the
//! activation to the convolution's output in place.

use crate::{Attribute, Graph, Result};

use super::edit::{const_input, input, make_node, out0, scalar_f64, Index};
use super::{Pass, PassCx};

/// Rule `conv_activation_fusion`.
pub struct FuseConvActivation;

pub const MS: &str = "com.microsoft";

fn float_attr(n: &crate::Node, name: &str, default: f32) -> Option<f32> {
    match n.attr(name) {
        None => Some(default),
        Some(Attribute::Float(v)) => Some(*v),
        _ => None,
    }
}

/// The `(activation, activation_params)` of a supported activation node.
pub fn activation(g: &Graph, cx: &PassCx, n: &crate::Node) -> Option<(&'static str, Vec<f32>)> {
    if !n.domain.is_empty() {
        return None;
    }
    Some(match n.op_type.as_str() {
        "Relu" => ("Relu", vec![]),
        "Sigmoid" => ("Sigmoid", vec![]),
        "Tanh" => ("Tanh", vec![]),
        "LeakyRelu" => ("LeakyRelu", vec![float_attr(n, "alpha", 0.01)?]),
        "HardSigmoid" => (
            "HardSigmoid",
            vec![float_attr(n, "alpha", 0.2)?, float_attr(n, "beta", 0.5)?],
        ),
        "Clip" => {
            let bound = |k: usize, attr: &str, default: f32| -> Option<f32> {
                if n.attr(attr).is_some() {
                    return float_attr(n, attr, default);
                }
                match input(n, k) {
                    None => Some(default),
                    Some(_) => const_input(g, cx.options, n, k).and_then(scalar_f64).map(|v| v as f32),
                }
            };
            ("Clip", vec![bound(1, "min", f32::MIN)?, bound(2, "max", f32::MAX)?])
        }
        _ => return None,
    })
}

impl Pass for FuseConvActivation {
    fn name(&self) -> &'static str {
        "conv_activation_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.can_emit(MS, "FusedConv", 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for ci in 0..g.nodes.len() {
            let conv = &g.nodes[ci];
            if conv.op_type != "Conv" || !conv.domain.is_empty() || idx.is_touched(ci) {
                continue;
            }
            let Some(y) = out0(conv) else { continue };
            let Some(ai) = idx.sole_reader(y) else { continue };
            if idx.is_touched(ai) {
                continue;
            }
            let act = &g.nodes[ai];
            let Some((name, params)) = activation(g, cx, act) else {
                continue;
            };
            let Some(out) = out0(act) else { continue };
            let mut attrs = conv.attributes.clone();
            attrs.insert("activation".into(), Attribute::String(name.as_bytes().to_vec()));
            if !params.is_empty() {
                attrs.insert("activation_params".into(), Attribute::Floats(params));
            }
            let fused = make_node(
                conv.name.clone(),
                MS,
                "FusedConv",
                conv.inputs.clone(),
                vec![Some(out)],
                attrs,
            );
            g.nodes[ci] = fused;
            idx.remove(&[ai]);
            idx.touch(&[ci]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
