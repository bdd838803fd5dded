//! MatMul with a constant weight + its bias (+ GELU): `Add(MatMul(A, W), b)`,
//! `com.microsoft BiasGelu(MatMul(A, W), b)` and `com.microsoft FastGelu(MatMul(A, W), b)` become one
//! `ai.kiln` `MatMulBias(A, W, b)` with attribute `activation` (`""`, `"gelu_erf"`, `"gelu_tanh"`).
//!
//! `W` is a constant 2-D f32 `[K, N]`, `b` a constant f32 of `N` values shaped `[N]` or `[1, .., 1, N]`
//! (a longer one no higher rank than `A`, so the result's shape is the MatMul's). This is the N-D form of
//! `matmul_add_fusion` (which needs 2-D operands to emit a standard `Gemm`): transformer encoders
//! multiply `[batch, seq, hidden]` activations, so their projections end up here. The CPU kernel adds
//! the bias as the GEMM's initial value and applies the GELU to each finished output block while it
//! is in cache, instead of two more passes over the activation. The node is Kiln's own, so under
//! `strict_opsets` (export) the rule stays off.

use std::collections::BTreeMap;

use crate::{Attribute, DType, Dim, Graph, Result};

use super::conv_activation::MS;
use super::edit::{constant, input, make_node, other_input, out0, Index};
use super::elementwise_chain::KILN;
use super::{Pass, PassCx};

/// The fused node's op type.
pub const OP: &str = "MatMulBias";

/// Rule `matmul_bias_fusion`.
pub struct FuseMatMulBias;

impl Pass for FuseMatMulBias {
    fn name(&self) -> &'static str {
        "matmul_bias_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if cx.options.strict_opsets || !cx.options.fuse_matmul_bias || !cx.can_emit(KILN, OP, 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for xi in 0..g.nodes.len() {
            let x = &g.nodes[xi];
            let act = match (x.domain.as_str(), x.op_type.as_str(), x.inputs.len()) {
                ("", "Add", 2) => "",
                (MS, "BiasGelu", 2) => "gelu_erf",
                (MS, "FastGelu", 2) => "gelu_tanh",
                _ => continue,
            };
            if idx.is_touched(xi) {
                continue;
            }
            let Some(out) = out0(x) else { continue };
            // BiasGelu / FastGelu take (x, bias) in that order; Add either way.
            let candidates: Vec<usize> = if act.is_empty() { vec![0, 1] } else { vec![0] };
            let found = candidates.into_iter().find_map(|i| {
                let mm_out = input(x, i)?;
                let mi = idx.producer_op(g, mm_out, "MatMul")?;
                if idx.sole_reader(mm_out) != Some(xi) || idx.is_touched(mi) || !g.nodes[mi].domain.is_empty() {
                    return None;
                }
                let b = other_input(x, mm_out)?;
                let mm = &g.nodes[mi];
                let (a, w) = (input(mm, 0)?, input(mm, 1)?);
                let wt = constant(g, cx.options, w)?;
                let bt = constant(g, cx.options, b)?;
                let &[_, n] = wt.dims.as_slice() else { return None };
                // A's shape may be unknown (symbolic models before shape inference reaches it): a 1-D bias
                // never changes the result's rank, a longer one needs A's rank.
                let a_shape = g.value(a).shape.as_ref().map(|s| s.0.as_slice());
                let bias_ok = bt.dtype == DType::F32
                    && bt.dims.last() == Some(&n)
                    && bt.dims.iter().rev().skip(1).all(|&d| d == 1)
                    && (bt.dims.len() == 1 || a_shape.is_some_and(|s| bt.dims.len() <= s.len()));
                // MatMul needs equal dtypes, so A is f32 like W whenever the model is valid.
                let a_ok = constant(g, cx.options, a).is_none() && g.value(a).dtype.is_none_or(|d| d == DType::F32);
                let last_ok = !matches!(a_shape.and_then(|s| s.last()), Some(Dim::Known(k)) if *k != wt.dims[0]);
                (wt.dtype == DType::F32 && bias_ok && a_ok && last_ok).then_some((mi, a, w, b))
            });
            let Some((mi, a, w, b)) = found else { continue };
            let mut attrs = BTreeMap::new();
            if !act.is_empty() {
                attrs.insert("activation".to_string(), Attribute::String(act.as_bytes().to_vec()));
            }
            let name = format!("{}_bias", g.nodes[mi].name);
            g.nodes[xi] = make_node(name, KILN, OP, vec![Some(a), Some(w), Some(b)], vec![Some(out)], attrs);
            idx.remove(&[mi]);
            idx.touch(&[xi]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
