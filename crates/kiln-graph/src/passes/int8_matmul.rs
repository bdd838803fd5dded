//! `MatMul(A, DequantizeLinear(W_int8, scale, axis))` and `Gemm(A, DequantizeLinear(..), C)` ->
//! one `ai.kiln::MatMulInt8Weight` node that keeps `W` in int8 and dequantizes it tile by tile
//! inside the kernel (the runtime's `int8_matmul` family).
//!
//! The weight and its per-output-channel scales move from initializers into the node's
//! `weight` / `scale` tensor attributes, so the compiled plan holds the weight once, at 1 byte
//! per element. Matches: a 2-D int8 weight with a zero point that is absent or all zeros, scales
//! per output channel (axis 1 of `[K, N]`, axis 0 of a `transB` `[N, K]`) or per tensor, no
//! `block_size`, f32 output; Gemm with `transA = 0`. Not part of the optimization levels (the
//! node is Kiln-only, so an exported model must not contain it): sessions run it after
//! optimizing.

use std::collections::BTreeMap;

use crate::{Attribute, DType, Graph, Result, TensorData};

use super::edit::{attr_i, input, make_node, out0, Index};
use super::quantize::is_quantized_weight;
use super::{Pass, PassCx};

/// Domain of Kiln's internal operators.
pub const KILN_DOMAIN: &str = "ai.kiln";
/// The fused operator.
pub const MATMUL_INT8_WEIGHT: &str = "MatMulInt8Weight";

/// Rule `int8_weight_matmul_fusion`.
pub struct FuseInt8WeightMatMul;

/// An int8 weight with one f32 scale per output channel, as the fused node carries it.
struct Weight {
    data: TensorData,
    /// Per-axis scales, or one per-tensor scale.
    scale: Vec<f32>,
    axis: usize,
}

fn dq_weight(g: &Graph, node: &crate::Node) -> Option<Weight> {
    let data = g.initializers.get(&input(node, 0)?)?;
    if data.dtype != DType::I8 || data.dims.len() != 2 {
        return None;
    }
    let scale = g.initializers.get(&input(node, 1)?)?.values::<f32>()?;
    if let Some(zp) = input(node, 2) {
        let zp = g.initializers.get(&zp)?;
        if zp.dtype != DType::I8 || zp.values::<i8>()?.iter().any(|&z| z != 0) {
            return None;
        }
    }
    if attr_i(node, "block_size", 0)? != 0 || attr_i(node, "output_dtype", 1)? != DType::F32.to_onnx() as i64 {
        return None;
    }
    let axis = match attr_i(node, "axis", 1)? {
        a @ 0..=1 => a as usize,
        a @ -2..=-1 => (a + 2) as usize,
        _ => return None,
    };
    let per_axis = scale.len() == data.dims[axis];
    if !(per_axis || scale.len() == 1) || scale.iter().any(|s| !s.is_finite()) {
        return None;
    }
    Some(Weight {
        data: data.clone(),
        scale,
        axis,
    })
}

impl Pass for FuseInt8WeightMatMul {
    fn name(&self) -> &'static str {
        "int8_weight_matmul_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if !cx.eval.has_kernel(KILN_DOMAIN, MATMUL_INT8_WEIGHT) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for di in 0..g.nodes.len() {
            let dq = &g.nodes[di];
            if idx.is_touched(di) || !is_quantized_weight(g, &idx, dq) {
                continue;
            }
            let (Some(w), Some(out)) = (dq_weight(g, dq), out0(dq)) else {
                continue;
            };
            if idx.pinned.contains(&out) {
                continue;
            }
            let readers = idx.readers(out).to_vec();
            let mut fused = Vec::new();
            for &ri in &readers {
                let r = &g.nodes[ri];
                if idx.is_touched(ri) {
                    continue;
                }
                let gemm = r.op_type == "Gemm";
                let trans_b = if gemm { attr_i(r, "transB", 0) } else { Some(0) };
                let trans_a = if gemm { attr_i(r, "transA", 0) } else { Some(0) };
                let (Some(trans_b), Some(0), Some(a), Some(y)) = (trans_b, trans_a, input(r, 0), out0(r)) else {
                    continue;
                };
                // The scales must run along the output channels (N).
                let n_axis = if trans_b != 0 { 0 } else { 1 };
                if w.scale.len() != 1 && w.axis != n_axis {
                    continue;
                }
                let n = w.data.dims[n_axis];
                let scale = if w.scale.len() == 1 {
                    vec![w.scale[0]; n]
                } else {
                    w.scale.clone()
                };
                let mut attrs = BTreeMap::from([
                    ("weight".to_string(), Attribute::Tensor(w.data.clone())),
                    (
                        "scale".to_string(),
                        Attribute::Tensor(TensorData::from_values("scale", vec![n], &scale)?),
                    ),
                    ("transB".to_string(), Attribute::Int(i64::from(trans_b != 0))),
                ]);
                let mut inputs = vec![Some(a)];
                if gemm {
                    for key in ["alpha", "beta"] {
                        if let Some(v) = r.attr(key) {
                            attrs.insert(key.to_string(), v.clone());
                        }
                    }
                    if let Some(c) = input(r, 2) {
                        inputs.push(Some(c));
                    }
                }
                let node = make_node(
                    format!("{}_int8", r.name),
                    KILN_DOMAIN,
                    MATMUL_INT8_WEIGHT,
                    inputs,
                    vec![Some(y)],
                    attrs,
                );
                fused.push((ri, node));
            }
            let all = fused.len() == readers.len();
            for (ri, node) in fused {
                g.nodes[ri] = node;
                idx.touch(&[ri]);
                count += 1;
            }
            if all {
                idx.remove(&[di]);
            }
        }
        idx.finish(g);
        if count > 0 {
            super::dce::drop_unused_initializers(g);
        }
        Ok(count)
    }
}
