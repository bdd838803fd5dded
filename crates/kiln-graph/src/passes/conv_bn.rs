//! Conv + BatchNormalization folding: an inference-mode BatchNormalization whose only input is a
//! Conv with constant f32 weights (and bias) is folded into the Conv:
//! `W'[m] = W[m] * s[m]`, `B'[m] = (B[m] - mean[m]) * s[m] + beta[m]` with
//! `s = gamma / sqrt(var + epsilon)`. The Conv then writes the BatchNormalization's output.

use crate::{Attribute, DType, Graph, Result, TensorData};

use super::edit::{attr_i, const_input, input, only_first_output_used, out0, Index};
use super::{Pass, PassCx};

/// Rule `conv_bn_fusion`.
pub struct FuseConvBatchNorm;

impl Pass for FuseConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv_bn_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let mut idx = Index::new(g);
        let mut count = 0;
        for bi in 0..g.nodes.len() {
            let bn = &g.nodes[bi];
            if bn.op_type != "BatchNormalization" || !bn.domain.is_empty() || idx.is_touched(bi) {
                continue;
            }
            if attr_i(bn, "training_mode", 0) != Some(0)
                || attr_i(bn, "spatial", 1) != Some(1)
                || !only_first_output_used(&idx, bn)
            {
                continue;
            }
            let (Some(y), Some(bn_out)) = (input(bn, 0), out0(bn)) else {
                continue;
            };
            let Some(ci) = idx.producer_op(g, y, "Conv") else {
                continue;
            };
            if idx.sole_reader(y) != Some(bi) {
                continue;
            }
            let eps = match bn.attr("epsilon") {
                Some(Attribute::Float(e)) => *e as f64,
                None => 1e-5,
                _ => continue,
            };
            let conv = &g.nodes[ci];
            let o = cx.options;
            let params: Option<Vec<Vec<f32>>> = (1..5)
                .map(|k| {
                    const_input(g, o, bn, k)
                        .filter(|t| t.dtype == DType::F32)?
                        .values::<f32>()
                })
                .collect();
            let Some(params) = params else { continue };
            let [gamma, beta, mean, var] = params.as_slice() else {
                continue;
            };
            let Some(w) = const_input(g, o, conv, 1).filter(|t| t.dtype == DType::F32 && t.dims.len() >= 3) else {
                continue;
            };
            let Some(&m) = w.dims.first() else { continue };
            if m == 0 || [gamma, beta, mean, var].iter().any(|p| p.len() != m) {
                continue;
            }
            let bias = match input(conv, 2) {
                None => vec![0.0f32; m],
                Some(_) => match const_input(g, o, conv, 2).and_then(|t| t.values::<f32>()) {
                    Some(b) if b.len() == m => b,
                    _ => continue,
                },
            };
            let Some(wv) = w.values::<f32>() else { continue };
            let per = wv.len() / m;
            let s: Vec<f64> = (0..m).map(|k| gamma[k] as f64 / (var[k] as f64 + eps).sqrt()).collect();
            let new_w: Vec<f32> = wv
                .iter()
                .enumerate()
                .map(|(j, &v)| (v as f64 * s[j / per.max(1)]) as f32)
                .collect();
            let new_b: Vec<f32> = (0..m)
                .map(|k| ((bias[k] as f64 - mean[k] as f64) * s[k] + beta[k] as f64) as f32)
                .collect();
            let (Ok(wt), Ok(bt)) = (
                TensorData::from_values("", w.dims.clone(), &new_w),
                TensorData::from_values("", vec![m], &new_b),
            ) else {
                continue;
            };
            let base = conv.name.clone();
            let wid = idx.new_initializer(g, &format!("{base}_W_bn"), wt);
            let bid = idx.new_initializer(g, &format!("{base}_B_bn"), bt);
            let conv = &mut g.nodes[ci];
            let x = conv.inputs.first().copied().flatten();
            conv.inputs = vec![x, Some(wid), Some(bid)];
            conv.outputs = vec![Some(bn_out)];
            idx.remove(&[bi]);
            idx.touch(&[ci]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}
