//! Conv + per-channel constant Mul / Add folding (ONNX Runtime's ConvMulFusion / ConvAddFusion):
//! a `Mul` or `Add` whose only other input is an f32 constant that is the same for every pixel of
//! an output channel (a scalar, or shaped `[M, 1, 1]` / `[1, M, 1, 1]` against the Conv output
//! `[N, M, H, W]`) is folded into the Conv's constant weights and bias:
//! `Mul c`: `W'[m] = W[m] * c[m]`, `B'[m] = B[m] * c[m]`; `Add c`: `B'[m] = B[m] + c[m]`.
//! Exported models (PaddlePaddle's among them) often write batch normalization this way.
//! The Conv then writes the Mul's / Add's output.

use crate::{DType, Graph, Result, TensorData};

use super::edit::{const_input, constant, input, other_input, out0, Index};
use super::{Pass, PassCx};

/// Rule `conv_scale_fusion`.
pub struct FuseConvScale;

/// The per-channel values of `c` against a Conv output of `rank` axes and `m` channels.
fn per_channel(c: &TensorData, rank: usize, m: usize) -> Option<Vec<f32>> {
    if c.dtype != DType::F32 || c.dims.len() > rank {
        return None;
    }
    let mut dims = vec![1usize; rank - c.dims.len()];
    dims.extend_from_slice(&c.dims);
    let channels = *dims.get(1)?;
    if dims.iter().enumerate().any(|(i, &d)| i != 1 && d != 1) || (channels != 1 && channels != m) {
        return None;
    }
    let v = c.values::<f32>()?;
    match v.len() {
        1 => Some(vec![v[0]; m]),
        n if n == m => Some(v),
        _ => None,
    }
}

impl Pass for FuseConvScale {
    fn name(&self) -> &'static str {
        "conv_scale_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        let mut idx = Index::new(g);
        let mut count = 0;
        let o = cx.options;
        for ai in 0..g.nodes.len() {
            let op = &g.nodes[ai];
            let is_mul = op.op_type == "Mul";
            if !(is_mul || op.op_type == "Add") || !op.domain.is_empty() || idx.is_touched(ai) {
                continue;
            }
            let Some(out) = out0(op) else { continue };
            // The Conv output, whichever side it is on.
            let conv_side = [0, 1].into_iter().find_map(|k| {
                let v = input(op, k)?;
                let ci = idx.producer_op(g, v, "Conv")?;
                (idx.sole_reader(v) == Some(ai)).then_some((v, ci))
            });
            let Some((y, ci)) = conv_side else { continue };
            let Some(cv) = other_input(op, y) else { continue };
            if cv == y {
                continue;
            }
            let Some(c) = constant(g, o, cv) else { continue };
            let conv = &g.nodes[ci];
            let Some(w) = const_input(g, o, conv, 1).filter(|t| t.dtype == DType::F32 && t.dims.len() >= 3) else {
                continue;
            };
            let Some(&m) = w.dims.first() else { continue };
            if m == 0 {
                continue;
            }
            let Some(cvals) = per_channel(c, w.dims.len(), m) else {
                continue;
            };
            let bias = match input(conv, 2) {
                None => vec![0.0f32; m],
                Some(_) => match const_input(g, o, conv, 2).and_then(|t| t.values::<f32>()) {
                    Some(b) if b.len() == m => b,
                    _ => continue,
                },
            };
            let Some(wv) = w.values::<f32>() else { continue };
            let per = (wv.len() / m).max(1);
            let (new_w, new_b): (Vec<f32>, Vec<f32>) = if is_mul {
                (
                    wv.iter().enumerate().map(|(j, &v)| v * cvals[j / per]).collect(),
                    bias.iter().zip(&cvals).map(|(b, s)| b * s).collect(),
                )
            } else {
                (wv, bias.iter().zip(&cvals).map(|(b, s)| b + s).collect())
            };
            let (Ok(wt), Ok(bt)) = (
                TensorData::from_values("", w.dims.clone(), &new_w),
                TensorData::from_values("", vec![m], &new_b),
            ) else {
                continue;
            };
            let base = conv.name.clone();
            let wid = idx.new_initializer(g, &format!("{base}_W_scaled"), wt);
            let bid = idx.new_initializer(g, &format!("{base}_B_scaled"), bt);
            let conv = &mut g.nodes[ci];
            let x = conv.inputs.first().copied().flatten();
            conv.inputs = vec![x, Some(wid), Some(bid)];
            conv.outputs = vec![Some(out)];
            idx.remove(&[ai]);
            idx.touch(&[ci]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_accepts_only_channel_constant_shapes() {
        let t = |dims: Vec<usize>| {
            let n: usize = dims.iter().product();
            TensorData::from_values("c", dims, &(0..n).map(|i| i as f32).collect::<Vec<_>>()).expect("tensor")
        };
        assert_eq!(per_channel(&t(vec![3, 1, 1]), 4, 3), Some(vec![0.0, 1.0, 2.0]));
        assert_eq!(per_channel(&t(vec![1, 3, 1, 1]), 4, 3), Some(vec![0.0, 1.0, 2.0]));
        assert_eq!(per_channel(&t(vec![]), 4, 3), Some(vec![0.0; 3]));
        assert_eq!(per_channel(&t(vec![1]), 4, 3), Some(vec![0.0; 3]));
        assert_eq!(
            per_channel(&t(vec![3]), 4, 3),
            None,
            "[M] broadcasts along W, not channels"
        );
        assert_eq!(per_channel(&t(vec![3, 2, 1]), 4, 3), None);
        assert_eq!(per_channel(&t(vec![2, 3, 1, 1]), 4, 3), None, "per batch");
        assert_eq!(
            per_channel(&t(vec![1, 1, 3, 1, 1]), 4, 3),
            None,
            "rank above the output's"
        );
    }
}
