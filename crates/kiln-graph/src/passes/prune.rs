//! Magnitude pruning of MatMul/Gemm/Conv weights (`kiln prune`): the smallest-magnitude values of each
//! constant f32 weight become zero, either a fraction of each tensor (unstructured) or N of every M
//! consecutive values along the reduction axis (`N:M`, the 2:4 pattern sparse tensor cores run). The
//! graph keeps its ops and shapes (the zeros are stored densely), so any runtime runs the result;
//! Kiln's kernels run it as a dense model.

use std::collections::BTreeMap;

use crate::{DType, Graph, GraphError, Result, TensorData, ValueId};

/// What to prune.
#[derive(Debug, Clone, PartialEq)]
pub enum PruneMode {
    /// Zero this fraction (0..1) of each weight's values, smallest magnitudes first.
    Unstructured(f64),
    /// Keep the `n` largest magnitudes of every `m` consecutive values along the reduction axis.
    NOfM { n: usize, m: usize },
}

/// One pruned weight.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunedWeight {
    pub name: String,
    pub dims: Vec<usize>,
    /// Zero values before and after.
    pub zeros_before: usize,
    pub zeros_after: usize,
    /// Nodes reading it as their weight.
    pub readers: usize,
}

/// What [`prune_weights`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneReport {
    pub weights: Vec<PrunedWeight>,
    /// Weights left alone, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl PruneReport {
    /// Zeros over all pruned weights' values, after pruning.
    pub fn sparsity(&self) -> f64 {
        let total: usize = self.weights.iter().map(|w| w.dims.iter().product::<usize>()).sum();
        let zeros: usize = self.weights.iter().map(|w| w.zeros_after).sum();
        zeros as f64 / total.max(1) as f64
    }
}

/// How a weight's values are grouped for N:M: `outer` output units, each a run of `inner` values along
/// the reduction axis, the `k`-th value of unit `o` at `o * a + k * b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    outer: usize,
    inner: usize,
    a: usize,
    b: usize,
}

/// The weight a node reads (input 1) and its reduction layout: MatMul `[K, N]` (K runs down the
/// columns), Gemm `[K, N]` or, with `transB`, `[N, K]`, Conv `[M, C/g, k...]` (one output channel's
/// values contiguous).
fn weight_of(g: &Graph, node: &crate::Node) -> Option<(ValueId, Layout)> {
    if !(node.domain.is_empty() || node.domain == "ai.onnx") {
        return None;
    }
    let w = node.inputs.get(1).copied().flatten()?;
    let t = g.initializers.get(&w)?;
    let d = t.dims.as_slice();
    let layout = match (node.op_type.as_str(), d) {
        ("MatMul", [k, n]) => Layout {
            outer: *n,
            inner: *k,
            a: 1,
            b: *n,
        },
        ("Gemm", [r, c]) => {
            let trans_b = matches!(node.attributes.get("transB"), Some(crate::Attribute::Int(v)) if *v != 0);
            if trans_b {
                Layout {
                    outer: *r,
                    inner: *c,
                    a: *c,
                    b: 1,
                }
            } else {
                Layout {
                    outer: *c,
                    inner: *r,
                    a: 1,
                    b: *c,
                }
            }
        }
        ("Conv", [m, rest @ ..]) if !rest.is_empty() => {
            let inner = rest.iter().product();
            Layout {
                outer: *m,
                inner,
                a: inner,
                b: 1,
            }
        }
        _ => return None,
    };
    Some((w, layout))
}

/// Prunes every constant f32 weight of MatMul/Gemm/Conv nodes (skipping those whose reader's op type
/// or name is in `exclude`, weights also read as something else or as a graph input/output, and,
/// for N:M, weights whose reduction length is not a multiple of M or whose readers group it
/// differently).
pub fn prune_weights(g: &mut Graph, mode: &PruneMode, exclude: &[String]) -> Result<PruneReport> {
    match mode {
        PruneMode::Unstructured(f) if !(0.0..1.0).contains(f) => {
            return Err(bad(format!("amount {f} is not in [0, 1)")))
        }
        PruneMode::NOfM { n, m } if *m == 0 || n >= m => {
            return Err(bad(format!("{n}:{m} is not an N:M pattern with 0 <= N < M")))
        }
        _ => {}
    }
    let mut reads: BTreeMap<ValueId, Vec<(usize, Layout)>> = BTreeMap::new();
    let mut uses: BTreeMap<ValueId, usize> = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for v in n.inputs.iter().flatten().chain(&n.implicit_inputs) {
            *uses.entry(*v).or_default() += 1;
        }
        if let Some((w, layout)) = weight_of(g, n) {
            reads.entry(w).or_default().push((i, layout));
        }
    }
    let pinned: Vec<ValueId> = g.inputs.iter().chain(&g.outputs).copied().collect();
    let mut report = PruneReport::default();
    for (w, readers) in reads {
        let name = g.value_name(w).to_string();
        let skip = |report: &mut PruneReport, why: String| report.skipped.push((name.clone(), why));
        if let Some(&(ni, _)) = readers.iter().find(|&&(ni, _)| {
            let n = &g.nodes[ni];
            exclude.iter().any(|e| *e == n.op_type || *e == n.name)
        }) {
            skip(&mut report, format!("read by excluded node '{}'", g.nodes[ni].name));
            continue;
        }
        if pinned.contains(&w) {
            skip(&mut report, "a graph input or output".into());
            continue;
        }
        if uses.get(&w).copied().unwrap_or(0) != readers.len() {
            skip(&mut report, "also read as something other than a weight".into());
            continue;
        }
        let t = &g.initializers[&w];
        let Some(mut v) = t.values::<f32>().filter(|_| t.dtype == DType::F32) else {
            skip(&mut report, format!("{} weight", t.dtype));
            continue;
        };
        let zeros_before = v.iter().filter(|x| **x == 0.0).count();
        match *mode {
            PruneMode::Unstructured(fraction) => {
                let count = (fraction * v.len() as f64).floor() as usize;
                zero_smallest(&mut v, count);
            }
            PruneMode::NOfM { n, m } => {
                let layout = readers[0].1;
                if readers.iter().any(|r| r.1 != layout) {
                    skip(&mut report, "its readers group it differently".into());
                    continue;
                }
                if layout.inner % m != 0 {
                    skip(
                        &mut report,
                        format!("reduction length {} is not a multiple of {m}", layout.inner),
                    );
                    continue;
                }
                keep_n_of_m(&mut v, layout, n, m);
            }
        }
        let zeros_after = v.iter().filter(|x| **x == 0.0).count();
        let dims = t.dims.clone();
        let pruned = TensorData::from_values(t.name.clone(), dims.clone(), &v)?;
        g.initializers.insert(w, pruned);
        report.weights.push(PrunedWeight {
            name,
            dims,
            zeros_before,
            zeros_after,
            readers: readers.len(),
        });
    }
    Ok(report)
}

fn bad(reason: String) -> GraphError {
    GraphError::Pass {
        pass: "prune".into(),
        reason,
    }
}

/// Zeros the `count` smallest magnitudes (ties: lower index first; NaN counts as largest).
fn zero_smallest(v: &mut [f32], count: usize) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].abs().total_cmp(&v[j].abs()).then(i.cmp(&j)));
    for &i in order.iter().take(count) {
        v[i] = 0.0;
    }
}

/// In every group of `m` consecutive reduction-axis values of every output unit, zeros all but the
/// `n` largest magnitudes (ties: lower index kept).
fn keep_n_of_m(v: &mut [f32], l: Layout, n: usize, m: usize) {
    let mut group: Vec<usize> = Vec::with_capacity(m);
    for o in 0..l.outer {
        for start in (0..l.inner).step_by(m) {
            group.clear();
            group.extend((start..start + m).map(|k| o * l.a + k * l.b));
            group.sort_by(|&i, &j| v[j].abs().total_cmp(&v[i].abs()).then(i.cmp(&j)));
            for &i in &group[n..] {
                v[i] = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::edit::make_node;
    use crate::{Attribute, Shape, ValueInfo, ValueKind};

    fn value(g: &mut Graph, name: &str, dims: &[usize]) -> ValueId {
        g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(DType::F32),
            shape: Some(Shape::from_known(dims)),
        })
    }

    /// x[2, 8] @ w[8, 6] (MatMul), Gemm(x, wt[6, 8], transB=1), and a weight also added elsewhere.
    fn graph() -> (Graph, ValueId, ValueId, ValueId) {
        let mut g = Graph::default();
        let x = value(&mut g, "x", &[2, 8]);
        let w = value(&mut g, "w", &[8, 6]);
        let wt = value(&mut g, "wt", &[6, 8]);
        let shared = value(&mut g, "shared", &[8, 6]);
        let (y1, y2, y3, y4) = (
            value(&mut g, "y1", &[2, 6]),
            value(&mut g, "y2", &[2, 6]),
            value(&mut g, "y3", &[2, 6]),
            value(&mut g, "y4", &[8, 6]),
        );
        let vals = |seed: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 37 + seed * 11) % 97) as f32 - 48.0) / 10.0)
                .collect()
        };
        for (id, name, dims, seed) in [
            (w, "w", [8, 6], 1),
            (wt, "wt", [6, 8], 2),
            (shared, "shared", [8, 6], 3),
        ] {
            g.initializers.insert(
                id,
                TensorData::from_values(name, dims.to_vec(), &vals(seed, 48)).unwrap(),
            );
        }
        let node = |name: &str, op: &str, ins: Vec<ValueId>, out: ValueId, attrs: Vec<(&str, Attribute)>| {
            make_node(
                name.to_string(),
                "",
                op,
                ins.into_iter().map(Some).collect(),
                vec![Some(out)],
                attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            )
        };
        g.nodes.push(node("mm", "MatMul", vec![x, w], y1, vec![]));
        g.nodes.push(node(
            "gemm",
            "Gemm",
            vec![x, wt],
            y2,
            vec![("transB", Attribute::Int(1))],
        ));
        g.nodes.push(node("mm2", "MatMul", vec![x, shared], y3, vec![]));
        g.nodes.push(node("add", "Add", vec![shared, shared], y4, vec![]));
        g.inputs.push(x);
        g.outputs.extend([y1, y2, y3, y4]);
        (g, w, wt, shared)
    }

    #[test]
    fn unstructured_zeros_the_smallest_fraction() {
        let (mut g, w, wt, shared) = graph();
        let before = g.initializers[&w].values::<f32>().unwrap();
        let shared_before = g.initializers[&shared].clone();
        let r = prune_weights(&mut g, &PruneMode::Unstructured(0.5), &[]).unwrap();
        assert_eq!(r.weights.len(), 2);
        assert_eq!(
            r.skipped,
            vec![(
                "shared".to_string(),
                "also read as something other than a weight".into()
            )]
        );
        for id in [w, wt] {
            let v = g.initializers[&id].values::<f32>().unwrap();
            assert!(v.iter().filter(|x| **x == 0.0).count() >= 24);
        }
        // Every kept value is at least as large as every zeroed one.
        let after = g.initializers[&w].values::<f32>().unwrap();
        let kept_min = after
            .iter()
            .filter(|x| **x != 0.0)
            .fold(f32::INFINITY, |m, x| m.min(x.abs()));
        let cut_max = before
            .iter()
            .zip(&after)
            .filter(|(_, a)| **a == 0.0)
            .fold(0f32, |m, (b, _)| m.max(b.abs()));
        assert!(cut_max <= kept_min, "{cut_max} > {kept_min}");
        assert_eq!(
            g.initializers[&shared], shared_before,
            "a weight also read otherwise stays as it was"
        );
        assert!((r.sparsity() - 0.5).abs() < 0.05, "{}", r.sparsity());
    }

    #[test]
    fn conv_weights_group_per_output_channel() {
        let mut g = Graph::default();
        let x = value(&mut g, "x", &[1, 2, 3, 3]);
        let w = value(&mut g, "cw", &[3, 2, 2, 2]);
        let y = value(&mut g, "cy", &[1, 3, 2, 2]);
        let vals: Vec<f32> = (0..24).map(|i| ((i * 7 % 24) as f32 - 11.5) / 4.0).collect();
        g.initializers
            .insert(w, TensorData::from_values("cw", vec![3, 2, 2, 2], &vals).unwrap());
        g.nodes.push(make_node(
            "conv".into(),
            "",
            "Conv",
            vec![Some(x), Some(w)],
            vec![Some(y)],
            Default::default(),
        ));
        g.inputs.push(x);
        g.outputs.push(y);
        let r = prune_weights(&mut g, &PruneMode::NOfM { n: 1, m: 4 }, &[]).unwrap();
        assert_eq!(r.weights.len(), 1);
        // Each output channel's 8 values (C x kh x kw, contiguous) in two groups of 4: one kept each,
        // the largest magnitude of its group.
        let v = g.initializers[&w].values::<f32>().unwrap();
        for (chunk, orig) in v.chunks(4).zip(vals.chunks(4)) {
            let kept: Vec<usize> = (0..4).filter(|&i| chunk[i] != 0.0).collect();
            assert_eq!(kept.len(), 1, "{chunk:?}");
            let max = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(chunk[kept[0]].abs(), max);
        }
    }

    #[test]
    fn two_of_four_along_the_reduction_axis() {
        let (mut g, w, wt, _) = graph();
        let r = prune_weights(&mut g, &PruneMode::NOfM { n: 2, m: 4 }, &["Gemm".to_string()]).unwrap();
        assert_eq!(r.weights.len(), 1, "{r:?}");
        assert!(r.skipped.iter().any(|(n, why)| n == "wt" && why.contains("excluded")));
        // MatMul [K=8, N=6]: per column n, rows 0-3 and 4-7 keep two values each.
        let v = g.initializers[&w].values::<f32>().unwrap();
        for n in 0..6 {
            for start in [0, 4] {
                let nz = (start..start + 4).filter(|k| v[k * 6 + n] != 0.0).count();
                assert_eq!(nz, 2, "column {n} rows {start}..");
            }
        }
        // The excluded Gemm weight is untouched.
        let (mut g2, _, _, _) = graph();
        assert_eq!(g.initializers[&wt], g2.initializers.remove(&wt).unwrap());
        assert!(prune_weights(&mut g, &PruneMode::NOfM { n: 4, m: 4 }, &[]).is_err());
        assert!(prune_weights(&mut g, &PruneMode::Unstructured(1.0), &[]).is_err());
    }
}
