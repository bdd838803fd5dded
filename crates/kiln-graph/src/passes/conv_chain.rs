//! Conv + element-wise chain: a `Conv` whose only reader is an `ai.kiln` `ElementwiseChain` (the
//! scale/bias and decomposed HardSwish that PP-LCNet-style CNNs put after most convolutions)
//! becomes one `ai.kiln` `FusedConvChain`, carrying Conv's attributes and the chain's `program`.
//! The runtime applies the chain to the convolution's fresh output in place: no second
//! activation-sized allocation and copy, and the output is still warm in cache.
//!
//! Runs at `All` after `elementwise_chain_fusion` (a later iteration of the fixed point sees the
//! chains it made); off under `strict_opsets`, like the chain itself.

use crate::{Attribute, Graph, Result};

use super::edit::{make_node, out0, Index};
use super::elementwise_chain::OP as CHAIN;
use super::{Pass, PassCx};

pub use super::elementwise_chain::KILN;

/// The fused node's op type.
pub const CONV_CHAIN: &str = "FusedConvChain";

/// Rule `conv_chain_fusion`.
pub struct FuseConvChain;

impl Pass for FuseConvChain {
    fn name(&self) -> &'static str {
        "conv_chain_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if cx.options.strict_opsets || !cx.can_emit(KILN, CONV_CHAIN, 1) {
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
            let Some(ch) = idx.sole_reader(y) else { continue };
            let chain = &g.nodes[ch];
            if idx.is_touched(ch) || chain.domain != KILN || chain.op_type != CHAIN || chain.inputs.len() != 1 {
                continue;
            }
            // Conv outputs have rank >= 3; a chain that widens the rank beyond that stays apart.
            let (Some(Attribute::Floats(program)), min_rank) = (chain.attr("program"), chain.attr("min_rank")) else {
                continue;
            };
            if !matches!(min_rank, None | Some(Attribute::Int(0..=3))) {
                continue;
            }
            let Some(out) = out0(chain) else { continue };
            let mut attrs = conv.attributes.clone();
            attrs.insert("program".into(), Attribute::Floats(program.clone()));
            let fused = make_node(
                conv.name.clone(),
                KILN,
                CONV_CHAIN,
                conv.inputs.clone(),
                vec![Some(out)],
                attrs,
            );
            g.nodes[ci] = fused;
            idx.remove(&[ch]);
            idx.touch(&[ci]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
