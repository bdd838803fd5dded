//! Operator family `ml`: the `ai.onnx.ml` domain (tree ensembles, linear models, scalers...).
//! String-valued inputs, outputs and labels are refused (Kiln has no string tensors).

use std::collections::HashMap;

use candle_core::Tensor as CT;
use kiln_graph::{Attribute, DType, TensorData};
use rayon::prelude::*;

use super::common::tin;
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor, Value};

const ML: &str = "ai.onnx.ml";

pub fn register(r: &mut Registry) {
    r.add_domain(ML, "Binarizer", binarizer);
    r.add_domain(ML, "ArrayFeatureExtractor", array_feature_extractor);
    r.add_domain(ML, "TreeEnsemble", tree_ensemble);
    r.add_domain(ML, "TreeEnsembleRegressor", tree_ensemble_regressor);
    r.add_domain(ML, "TreeEnsembleClassifier", tree_ensemble_classifier);
    r.add_domain(ML, "LinearRegressor", linear_regressor);
    r.add_domain(ML, "LinearClassifier", linear_classifier);
    r.add_domain(ML, "Normalizer", normalizer);
    r.add_domain(ML, "Scaler", scaler);
    r.add_domain(ML, "Imputer", imputer);
    r.add_domain(ML, "LabelEncoder", label_encoder);
    r.add_domain(ML, "OneHotEncoder", one_hot_encoder);
    r.add_domain(ML, "FeatureVectorizer", feature_vectorizer);
    r.add_domain(ML, "SVMRegressor", svm_regressor);
    r.add_domain(ML, "SVMClassifier", svm_classifier);
}

// ---------------------------------------------------------------------------------------------
// Attribute helpers

/// Numeric values of an attribute tensor as f64.
fn td_f64(t: &TensorData) -> Option<Vec<f64>> {
    Some(match t.dtype {
        DType::F32 => t.values::<f32>()?.into_iter().map(f64::from).collect(),
        DType::F64 => t.values::<f64>()?,
        DType::F16 => t.values::<half::f16>()?.into_iter().map(f64::from).collect(),
        DType::BF16 => t.values::<half::bf16>()?.into_iter().map(f64::from).collect(),
        _ => t.to_i64_vec()?.into_iter().map(|v| v as f64).collect(),
    })
}

fn tensor_attr_f64(n: &NodeCtx, name: &str) -> Result<Option<Vec<f64>>> {
    match n.attr_tensor(name)? {
        None => Ok(None),
        Some(t) => td_f64(t)
            .map(Some)
            .ok_or_else(|| n.err(format!("attribute '{name}' is not a numeric tensor"))),
    }
}

/// `name` (floats) or `name_as_tensor` (tensor), as f64.
fn floats_or_tensor(n: &NodeCtx, name: &str) -> Result<Option<Vec<f64>>> {
    if let Some(v) = n.attr_floats(name)? {
        return Ok(Some(v.into_iter().map(f64::from).collect()));
    }
    tensor_attr_f64(n, &format!("{name}_as_tensor"))
}

fn attr_strings(n: &NodeCtx, name: &str) -> Result<Option<Vec<String>>> {
    match n.attr(name) {
        None => Ok(None),
        Some(Attribute::Strings(v)) => Ok(Some(
            v.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect(),
        )),
        Some(a) => Err(n.err(format!("attribute '{name}' should be strings, found {}", a.kind_name()))),
    }
}

/// A floats attribute, also accepting ints (some exporters write integral values as ints).
fn floats_attr(n: &NodeCtx, name: &str) -> Result<Option<Vec<f32>>> {
    match n.attr(name) {
        Some(Attribute::Ints(v)) => Ok(Some(v.iter().map(|&i| i as f32).collect())),
        _ => n.attr_floats(name),
    }
}

fn to_usize(n: &NodeCtx, v: i64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| n.err(format!("{what} {v} is negative")))
}

/// X as rows of f64: [N, F] (a 1-D input is one row).
fn rows_f64(x: &Tensor) -> Result<(usize, usize, Vec<f64>)> {
    let (n, f) = match x.dims() {
        [f] => (1, *f),
        [n, f] => (*n, *f),
        d => bail!("input must be [N, F] or [F], got {d:?}"),
    };
    Ok((n, f, x.to_f64_vec()?))
}

// ---------------------------------------------------------------------------------------------
// Post transforms

#[derive(Clone, Copy, PartialEq, Debug)]
enum Post {
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
    Probit,
}

impl Post {
    fn from_name(n: &NodeCtx, s: &str) -> Result<Post> {
        Ok(match s {
            "" | "NONE" => Post::None,
            "SOFTMAX" => Post::Softmax,
            "LOGISTIC" => Post::Logistic,
            "SOFTMAX_ZERO" => Post::SoftmaxZero,
            "PROBIT" => Post::Probit,
            o => return Err(n.err(format!("unknown post_transform '{o}'"))),
        })
    }

    fn from_code(n: &NodeCtx, c: i64) -> Result<Post> {
        Ok(match c {
            0 => Post::None,
            1 => Post::Softmax,
            2 => Post::Logistic,
            3 => Post::SoftmaxZero,
            4 => Post::Probit,
            o => return Err(n.err(format!("unknown post_transform {o}"))),
        })
    }

    /// Applies the transform to one row of scores in place.
    fn apply(self, row: &mut [f64]) {
        match self {
            Post::None => {}
            Post::Logistic => row.iter_mut().for_each(|v| *v = logistic(*v)),
            Post::Probit => row.iter_mut().for_each(|v| *v = probit(*v)),
            Post::Softmax => {
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut s = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    s += *v;
                }
                row.iter_mut().for_each(|v| *v /= s);
            }
            Post::SoftmaxZero => {
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e = (-m).exp();
                let mut s = 0.0;
                for v in row.iter_mut() {
                    if *v > 1e-7 || *v < -1e-7 {
                        *v = (*v - m).exp();
                    } else {
                        *v *= e;
                    }
                    s += *v;
                }
                if s == 0.0 {
                    row.iter_mut().for_each(|v| *v = 0.5);
                } else {
                    row.iter_mut().for_each(|v| *v /= s);
                }
            }
        }
    }
}

fn logistic(v: f64) -> f64 {
    let e = 1.0 / (1.0 + (-v.abs()).exp());
    if v < 0.0 {
        1.0 - e
    } else {
        e
    }
}

fn erf_inv(x: f64) -> f64 {
    let sgn = if x < 0.0 { -1.0 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    if x == 0.0 {
        return 0.0;
    }
    let log = x.ln();
    let v = 2.0 / (std::f64::consts::PI * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147 * log;
    let v3 = -v + (v * v - v2).sqrt();
    sgn * v3.sqrt()
}

fn probit(v: f64) -> f64 {
    std::f64::consts::SQRT_2 * erf_inv(v * 2.0 - 1.0)
}

// ---------------------------------------------------------------------------------------------
// Binarizer, ArrayFeatureExtractor

fn binarizer(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let thr = n.attr_f("threshold", 0.0)? as f64;
    Ok(kernel(move |_cx, ins| {
        let x = tin(ins, 0)?;
        let dt = x.dtype();
        let c = x.candle();
        let t = if dt.is_float() {
            let s = CT::new(thr, c.device())?.to_dtype(c.dtype())?;
            c.broadcast_gt(&s)?
        } else if dt.is_int() {
            // For integers, x > t <=> x > floor(t).
            let f = thr.floor();
            if f >= i64::MAX as f64 {
                c.zeros_like()?.to_dtype(candle_core::DType::U8)?
            } else {
                let lo = (f.max(i64::MIN as f64)) as i64;
                let s = CT::new(lo, c.device())?;
                c.to_dtype(candle_core::DType::I64)?.broadcast_gt(&s)?
            }
        } else {
            bail!("Binarizer does not support {dt}");
        };
        out1(Tensor::new(t, DType::Bool)?.cast(dt)?)
    }))
}

fn array_feature_extractor(_n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    Ok(kernel(move |_cx, ins| {
        let x = tin(ins, 0)?;
        let idx = tin(ins, 1)?.to_i64_vec()?;
        let rank = x.rank();
        if rank == 0 {
            bail!("ArrayFeatureExtractor needs an input of rank >= 1");
        }
        let last = x.dims()[rank - 1];
        for &i in &idx {
            if i < 0 || i as usize >= last {
                bail!("index {i} is out of range for a last axis of {last}");
            }
        }
        let ids = CT::from_vec(idx.clone(), idx.len(), x.device())?;
        let y = x.map(|c| c.contiguous()?.index_select(&ids, rank - 1))?;
        if rank == 1 {
            return out1(y.map(|c| c.unsqueeze(0))?);
        }
        out1(y)
    }))
}

// ---------------------------------------------------------------------------------------------
// Tree ensembles

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Member,
}

#[derive(Clone, Copy, Debug)]
enum Next {
    Node(usize),
    Leaf(usize),
}

struct Branch {
    feature: usize,
    mode: Mode,
    split: f64,
    set: Vec<f64>,
    tracks_true: bool,
    t: Next,
    f: Next,
}

impl Branch {
    fn test(&self, x: f64) -> bool {
        if self.tracks_true && x.is_nan() {
            return true;
        }
        match self.mode {
            Mode::Leq => x <= self.split,
            Mode::Lt => x < self.split,
            Mode::Gte => x >= self.split,
            Mode::Gt => x > self.split,
            Mode::Eq => x == self.split,
            Mode::Neq => x != self.split,
            Mode::Member => self.set.contains(&x),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Agg {
    Sum,
    Average,
    Min,
    Max,
}

struct Ensemble {
    branches: Vec<Branch>,
    /// Each leaf's (target, weight) contributions.
    leaves: Vec<Vec<(usize, f64)>>,
    roots: Vec<Next>,
    n_targets: usize,
    n_features: usize,
    agg: Agg,
    base: Vec<f64>,
}

impl Ensemble {
    fn leaf_of(&self, root: Next, row: &[f64]) -> Result<usize> {
        let mut cur = root;
        for _ in 0..=self.branches.len() {
            match cur {
                Next::Leaf(l) => return Ok(l),
                Next::Node(i) => {
                    let Some(b) = self.branches.get(i) else {
                        bail!("tree node {i} does not exist");
                    };
                    let x = row.get(b.feature).copied().unwrap_or(f64::NAN);
                    cur = if b.test(x) { b.t } else { b.f };
                }
            }
        }
        bail!("the tree has a cycle")
    }

    /// Aggregated scores [N, n_targets] (before any post transform), base values added.
    fn scores(&self, n: usize, f: usize, xs: &[f64]) -> Result<Vec<f64>> {
        if f < self.n_features {
            bail!("the trees read feature {} but the input has {f}", self.n_features - 1);
        }
        let nt = self.n_targets;
        let mut out = vec![0f64; n * nt];
        if nt == 0 {
            return Ok(out);
        }
        out.par_chunks_mut(nt)
            .enumerate()
            .try_for_each(|(r, o)| -> Result<()> {
                let row = xs.get(r * f..(r + 1) * f).unwrap_or(&[]);
                let mut hit = vec![false; nt];
                for &root in &self.roots {
                    let l = self.leaf_of(root, row)?;
                    for &(t, w) in self.leaves.get(l).map(Vec::as_slice).unwrap_or(&[]) {
                        let (Some(v), Some(h)) = (o.get_mut(t), hit.get_mut(t)) else {
                            bail!("target {t} is out of range");
                        };
                        *v = match self.agg {
                            Agg::Sum | Agg::Average => *v + w,
                            Agg::Min if *h => v.min(w),
                            Agg::Max if *h => v.max(w),
                            Agg::Min | Agg::Max => w,
                        };
                        *h = true;
                    }
                }
                if self.agg == Agg::Average && !self.roots.is_empty() {
                    let k = self.roots.len() as f64;
                    o.iter_mut().for_each(|v| *v /= k);
                }
                for (v, b) in o.iter_mut().zip(&self.base) {
                    *v += b;
                }
                Ok(())
            })?;
        Ok(out)
    }
}

fn agg_from_name(n: &NodeCtx, s: &str) -> Result<Agg> {
    Ok(match s {
        "SUM" => Agg::Sum,
        "AVERAGE" => Agg::Average,
        "MIN" => Agg::Min,
        "MAX" => Agg::Max,
        o => return Err(n.err(format!("unknown aggregate_function '{o}'"))),
    })
}

fn mode_from_code(n: &NodeCtx, c: i64) -> Result<Mode> {
    Ok(match c {
        0 => Mode::Leq,
        1 => Mode::Lt,
        2 => Mode::Gte,
        3 => Mode::Gt,
        4 => Mode::Eq,
        5 => Mode::Neq,
        6 => Mode::Member,
        o => return Err(n.err(format!("unknown node mode {o}"))),
    })
}

fn req_ints(n: &NodeCtx, name: &str) -> Result<Vec<i64>> {
    n.attr_ints(name)?
        .ok_or_else(|| n.err(format!("missing attribute '{name}'")))
}

/// TreeEnsemble (ai.onnx.ml opset 5): nodes_* and leaf_* arrays, tree_roots.
fn tree_ensemble(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let splits = tensor_attr_f64(n, "nodes_splits")?.ok_or_else(|| n.err("missing attribute 'nodes_splits'"))?;
    let features = req_ints(n, "nodes_featureids")?;
    let modes = n
        .attr_tensor("nodes_modes")?
        .and_then(TensorData::to_i64_vec)
        .ok_or_else(|| n.err("missing or non-integer attribute 'nodes_modes'"))?;
    let tids = req_ints(n, "nodes_truenodeids")?;
    let fids = req_ints(n, "nodes_falsenodeids")?;
    let tleaf = req_ints(n, "nodes_trueleafs")?;
    let fleaf = req_ints(n, "nodes_falseleafs")?;
    let tracks = n.attr_ints("nodes_missing_value_tracks_true")?.unwrap_or_default();
    let leaf_targets = req_ints(n, "leaf_targetids")?;
    let leaf_weights = tensor_attr_f64(n, "leaf_weights")?.ok_or_else(|| n.err("missing attribute 'leaf_weights'"))?;
    let roots = req_ints(n, "tree_roots")?;
    let members = tensor_attr_f64(n, "membership_values")?.unwrap_or_default();
    let n_targets = to_usize(n, n.attr_i("n_targets", 0)?, "n_targets")?;
    let agg = match n.attr_i("aggregate_function", 1)? {
        0 => Agg::Average,
        1 => Agg::Sum,
        2 => Agg::Min,
        3 => Agg::Max,
        o => return Err(n.err(format!("unknown aggregate_function {o}"))),
    };
    let post = Post::from_code(n, n.attr_i("post_transform", 0)?)?;
    let nn = splits.len();
    if [
        features.len(),
        modes.len(),
        tids.len(),
        fids.len(),
        tleaf.len(),
        fleaf.len(),
    ]
    .iter()
    .any(|&l| l != nn)
    {
        return Err(n.err("the nodes_* attributes have different lengths"));
    }
    if !tracks.is_empty() && tracks.len() != nn {
        return Err(n.err("nodes_missing_value_tracks_true has the wrong length"));
    }
    if leaf_targets.len() != leaf_weights.len() {
        return Err(n.err("leaf_targetids and leaf_weights have different lengths"));
    }
    let mut leaves = Vec::with_capacity(leaf_targets.len());
    for (&t, &w) in leaf_targets.iter().zip(&leaf_weights) {
        let t = to_usize(n, t, "leaf target id")?;
        if t >= n_targets {
            return Err(n.err(format!("leaf target id {t} is not below n_targets {n_targets}")));
        }
        leaves.push(vec![(t, w)]);
    }
    let next = |id: i64, is_leaf: i64| -> Result<Next> {
        let i = to_usize(n, id, "node id")?;
        if is_leaf != 0 {
            if i >= leaves.len() {
                return Err(n.err(format!("leaf {i} does not exist")));
            }
            Ok(Next::Leaf(i))
        } else {
            if i >= nn {
                return Err(n.err(format!("node {i} does not exist")));
            }
            Ok(Next::Node(i))
        }
    };
    let mut member_iter = members.into_iter();
    let mut branches = Vec::with_capacity(nn);
    let mut n_features = 0usize;
    for i in 0..nn {
        let mode = mode_from_code(n, modes[i])?;
        let mut set = Vec::new();
        if mode == Mode::Member {
            for v in member_iter.by_ref() {
                if v.is_nan() {
                    break;
                }
                set.push(v);
            }
        }
        let feature = to_usize(n, features[i], "feature id")?;
        // Leaf-only roots may carry any feature id; count it only for real branches.
        let degenerate = tleaf[i] != 0 && fleaf[i] != 0 && tids[i] == fids[i];
        if !degenerate {
            n_features = n_features.max(feature + 1);
        }
        branches.push(Branch {
            feature,
            mode,
            split: splits[i],
            set,
            tracks_true: tracks.get(i).copied().unwrap_or(0) != 0,
            t: next(tids[i], tleaf[i])?,
            f: next(fids[i], fleaf[i])?,
        });
    }
    let mut root_next = Vec::with_capacity(roots.len());
    for &r in &roots {
        let ri = to_usize(n, r, "tree root")?;
        if ri >= nn {
            return Err(n.err(format!("tree root {ri} does not exist")));
        }
        let degenerate = tleaf[ri] != 0 && fleaf[ri] != 0 && tids[ri] == fids[ri];
        root_next.push(if degenerate { next(tids[ri], 1)? } else { Next::Node(ri) });
    }
    let ens = Ensemble {
        branches,
        leaves,
        roots: root_next,
        n_targets,
        n_features,
        agg,
        base: Vec::new(),
    };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let (rows, f, xs) = rows_f64(x)?;
        cx.check_alloc(rows as u128 * ens.n_targets as u128, DType::F64)?;
        let mut s = ens.scores(rows, f, &xs)?;
        if post != Post::None && ens.n_targets > 0 {
            s.par_chunks_mut(ens.n_targets).for_each(|r| post.apply(r));
        }
        let dt = if x.dtype().is_float() { x.dtype() } else { DType::F32 };
        out1(Tensor::from_f64s(s, &[rows, ens.n_targets], dt, cx.device)?)
    }))
}

/// Builds an ensemble from the older attribute form (TreeEnsembleRegressor/Classifier).
/// `prefix` is "target" or "class".
fn old_ensemble(n: &NodeCtx, prefix: &str, n_targets: usize, agg: Agg) -> Result<Ensemble> {
    let treeids = req_ints(n, "nodes_treeids")?;
    let nodeids = req_ints(n, "nodes_nodeids")?;
    let features = req_ints(n, "nodes_featureids")?;
    let modes = attr_strings(n, "nodes_modes")?.ok_or_else(|| n.err("missing attribute 'nodes_modes'"))?;
    let values = floats_or_tensor(n, "nodes_values")?.unwrap_or_default();
    let tids = req_ints(n, "nodes_truenodeids")?;
    let fids = req_ints(n, "nodes_falsenodeids")?;
    let tracks = n.attr_ints("nodes_missing_value_tracks_true")?.unwrap_or_default();
    let nn = treeids.len();
    if [nodeids.len(), features.len(), modes.len(), tids.len(), fids.len()]
        .iter()
        .any(|&l| l != nn)
        || (!values.is_empty() && values.len() != nn)
    {
        return Err(n.err("the nodes_* attributes have different lengths"));
    }
    let t_tree = req_ints(n, &format!("{prefix}_treeids"))?;
    let t_node = req_ints(n, &format!("{prefix}_nodeids"))?;
    let t_ids = req_ints(n, &format!("{prefix}_ids"))?;
    let t_w = floats_or_tensor(n, &format!("{prefix}_weights"))?.unwrap_or_default();
    if t_node.len() != t_tree.len() || t_ids.len() != t_tree.len() || t_w.len() != t_tree.len() {
        return Err(n.err(format!("the {prefix}_* attributes have different lengths")));
    }
    let mut index: HashMap<(i64, i64), usize> = HashMap::with_capacity(nn);
    for (i, (&t, &id)) in treeids.iter().zip(&nodeids).enumerate() {
        index.entry((t, id)).or_insert(i);
    }
    // Slots: branch index or leaf index for each node.
    let mut slot = Vec::with_capacity(nn);
    let (mut nb, mut nl) = (0usize, 0usize);
    for m in &modes {
        if m == "LEAF" {
            slot.push(Next::Leaf(nl));
            nl += 1;
        } else {
            slot.push(Next::Node(nb));
            nb += 1;
        }
    }
    let mut leaves: Vec<Vec<(usize, f64)>> = vec![Vec::new(); nl];
    for j in 0..t_tree.len() {
        let Some(&i) = index.get(&(t_tree[j], t_node[j])) else {
            return Err(n.err(format!(
                "{prefix} refers to missing node ({}, {})",
                t_tree[j], t_node[j]
            )));
        };
        let Next::Leaf(l) = slot[i] else {
            return Err(n.err(format!("{prefix} refers to node {i}, which is not a leaf")));
        };
        let t = to_usize(n, t_ids[j], "target id")?;
        if t >= n_targets {
            return Err(n.err(format!("target id {t} is not below {n_targets}")));
        }
        leaves[l].push((t, t_w[j]));
    }
    let mut branches = Vec::with_capacity(nb);
    let mut n_features = 0usize;
    for i in 0..nn {
        let mode = match modes[i].as_str() {
            "LEAF" => continue,
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            o => return Err(n.err(format!("unknown node mode '{o}'"))),
        };
        let resolve = |id: i64| -> Result<Next> {
            index
                .get(&(treeids[i], id))
                .map(|&k| slot[k])
                .ok_or_else(|| n.err(format!("node ({}, {id}) does not exist", treeids[i])))
        };
        let feature = to_usize(n, features[i], "feature id")?;
        n_features = n_features.max(feature + 1);
        branches.push(Branch {
            feature,
            mode,
            split: values.get(i).copied().unwrap_or(0.0),
            set: Vec::new(),
            tracks_true: tracks.get(i).copied().unwrap_or(0) != 0,
            t: resolve(tids[i])?,
            f: resolve(fids[i])?,
        });
    }
    let mut tree_list: Vec<i64> = treeids.clone();
    tree_list.sort_unstable();
    tree_list.dedup();
    let roots = tree_list
        .iter()
        .filter_map(|t| treeids.iter().position(|x| x == t).map(|i| slot[i]))
        .collect();
    let base = floats_or_tensor(n, "base_values")?.unwrap_or_default();
    if !base.is_empty() && base.len() != n_targets {
        return Err(n.err(format!("base_values has {} values, expected {n_targets}", base.len())));
    }
    Ok(Ensemble {
        branches,
        leaves,
        roots,
        n_targets,
        n_features,
        agg,
        base,
    })
}

fn tree_ensemble_regressor(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let n_targets = to_usize(n, n.attr_i("n_targets", 1)?, "n_targets")?;
    let agg = agg_from_name(n, &n.attr_s("aggregate_function", "SUM")?)?;
    let post = Post::from_name(n, &n.attr_s("post_transform", "NONE")?)?;
    let ens = old_ensemble(n, "target", n_targets, agg)?;
    Ok(kernel(move |cx, ins| {
        let (rows, f, xs) = rows_f64(tin(ins, 0)?)?;
        cx.check_alloc(rows as u128 * ens.n_targets as u128, DType::F64)?;
        let mut s = ens.scores(rows, f, &xs)?;
        if post != Post::None && ens.n_targets > 0 {
            s.par_chunks_mut(ens.n_targets).for_each(|r| post.apply(r));
        }
        out1(Tensor::from_f64s(s, &[rows, ens.n_targets], DType::F32, cx.device)?)
    }))
}

fn int_labels(n: &NodeCtx) -> Result<Vec<i64>> {
    if n.attr("classlabels_strings").is_some() {
        return Err(n.err("string class labels are not supported"));
    }
    n.attr_ints("classlabels_int64s")?
        .or(n.attr_ints("classlabels_ints")?)
        .ok_or_else(|| n.err("missing class labels"))
}

fn tree_ensemble_classifier(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let labels = int_labels(n)?;
    let n_classes = labels.len();
    let post = Post::from_name(n, &n.attr_s("post_transform", "NONE")?)?;
    let ens = old_ensemble(n, "class", n_classes, Agg::Sum)?;
    let class_ids = req_ints(n, "class_ids")?;
    let binary = !class_ids.is_empty() && class_ids.iter().all(|&c| c == class_ids[0]);
    let width = if binary && n_classes == 1 { 2 } else { n_classes };
    if binary && width < 2 {
        return Err(n.err("a binary classifier needs two score columns"));
    }
    Ok(kernel(move |cx, ins| {
        let (rows, f, xs) = rows_f64(tin(ins, 0)?)?;
        cx.check_alloc(rows as u128 * width as u128, DType::F64)?;
        let raw = ens.scores(rows, f, &xs)?;
        let mut scores = vec![0f64; rows * width];
        let mut out_labels = vec![0i64; rows];
        for (r, label) in out_labels.iter_mut().enumerate() {
            let src = raw.get(r * n_classes..(r + 1) * n_classes).unwrap_or(&[]);
            let row = scores.get_mut(r * width..(r + 1) * width).unwrap_or(&mut []);
            if binary {
                let v = src.first().copied().unwrap_or(0.0);
                if n_classes > 1 {
                    row.iter_mut().zip(src).for_each(|(d, &v)| *d = v);
                }
                if let [r0, r1, ..] = row {
                    *r1 = v;
                    *r0 = if matches!(post, Post::None | Post::Probit) {
                        1.0 - v
                    } else {
                        -v
                    };
                }
            } else {
                row.iter_mut().zip(src).for_each(|(d, &v)| *d = v);
            }
            post.apply(row);
            let mut best = 0usize;
            for (k, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = k;
                }
            }
            *label = if n_classes == 1 {
                if labels[0] == 1 {
                    i64::from(best == 1)
                } else {
                    bail!("a single class label other than 1 is not supported");
                }
            } else {
                labels.get(best).copied().unwrap_or(0)
            };
        }
        Ok(vec![
            Value::Tensor(Tensor::from_i64s(out_labels, &[rows], cx.device)?),
            Value::Tensor(Tensor::from_f64s(scores, &[rows, width], DType::F32, cx.device)?),
        ])
    }))
}

// ---------------------------------------------------------------------------------------------
// Linear models, Normalizer, Scaler

/// X as an f32 candle matrix [N, F].
fn as_matrix_f32(x: &Tensor) -> Result<CT> {
    let c = match x.dtype() {
        DType::F32 => x.candle().clone(),
        _ => x.cast(DType::F32)?.into_candle(),
    };
    Ok(match c.rank() {
        1 => c.unsqueeze(0)?,
        2 => c,
        r => bail!("input must be [N, F] or [F], got rank {r}"),
    })
}

/// scores = X @ coef^T + intercepts, coef given row-major as [k, F].
fn linear_scores(x: &Tensor, coef: &[f32], intercepts: &[f32]) -> Result<CT> {
    let xm = as_matrix_f32(x)?;
    let f = xm.dims()[1];
    if f == 0 || !coef.len().is_multiple_of(f) {
        bail!("{} coefficients do not divide into rows of {f} features", coef.len());
    }
    let k = coef.len() / f;
    let w = CT::from_vec(coef.to_vec(), (k, f), xm.device())?;
    let mut s = xm.contiguous()?.matmul(&w.t()?)?;
    if !intercepts.is_empty() {
        if intercepts.len() != k {
            bail!("{} intercepts for {k} outputs", intercepts.len());
        }
        let b = CT::from_vec(intercepts.to_vec(), (1, k), xm.device())?;
        s = s.broadcast_add(&b)?;
    }
    Ok(s)
}

fn linear_regressor(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let coef = floats_attr(n, "coefficients")?.unwrap_or_default();
    let intercepts = floats_attr(n, "intercepts")?.unwrap_or_default();
    let targets = to_usize(n, n.attr_i("targets", 1)?, "targets")?;
    let post = Post::from_name(n, &n.attr_s("post_transform", "NONE")?)?;
    if targets == 0 || !coef.len().is_multiple_of(targets) {
        return Err(n.err(format!("{} coefficients for {targets} targets", coef.len())));
    }
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let s = linear_scores(x, &coef, &intercepts)?;
        if s.dims()[1] != targets {
            bail!("the input has the wrong number of features for {targets} targets");
        }
        if post == Post::None {
            return out1(Tensor::new(s, DType::F32)?);
        }
        let rows = s.dims()[0];
        let mut v: Vec<f64> = Tensor::new(s, DType::F32)?.to_f64_vec()?;
        v.chunks_mut(targets).for_each(|r| post.apply(r));
        out1(Tensor::from_f64s(v, &[rows, targets], DType::F32, cx.device)?)
    }))
}

fn linear_classifier(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    if n.attr("classlabels_strings").is_some() {
        return Err(n.err("string class labels are not supported"));
    }
    let labels = n.attr_ints("classlabels_ints")?;
    let coef = floats_attr(n, "coefficients")?.unwrap_or_default();
    let intercepts = floats_attr(n, "intercepts")?.unwrap_or_default();
    let post = Post::from_name(n, &n.attr_s("post_transform", "NONE")?)?;
    let n_classes = labels.as_ref().map_or(0, Vec::len);
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let s = linear_scores(x, &coef, &intercepts)?;
        let (rows, k) = (s.dims()[0], s.dims()[1]);
        let raw: Vec<f64> = Tensor::new(s, DType::F32)?.to_f64_vec()?;
        let expand = k == 1 && n_classes == 2;
        let width = if expand { 2 } else { k };
        let mut scores = Vec::with_capacity(rows * width);
        for r in raw.chunks(k.max(1)) {
            if expand {
                let v = r.first().copied().unwrap_or(0.0);
                scores.extend_from_slice(&[-v, v]);
            } else {
                scores.extend_from_slice(r);
            }
        }
        if width > 0 {
            scores.chunks_mut(width).for_each(|r| post.apply(r));
        }
        let mut out_labels = Vec::with_capacity(rows);
        for row in scores.chunks(width.max(1)).take(rows) {
            if width > 1 {
                let mut best = 0usize;
                for (j, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = j;
                    }
                }
                out_labels.push(match &labels {
                    Some(l) => match l.get(best) {
                        Some(&v) => v,
                        None => bail!("class {best} has no label"),
                    },
                    None => best as i64,
                });
            } else {
                let thr = if post == Post::None { 0.0 } else { 0.5 };
                let pos = row.first().copied().unwrap_or(0.0) >= thr;
                out_labels.push(match &labels {
                    Some(l) => {
                        if pos {
                            l.first().copied().unwrap_or(1)
                        } else {
                            0
                        }
                    }
                    None => i64::from(pos),
                });
            }
        }
        Ok(vec![
            Value::Tensor(Tensor::from_i64s(out_labels, &[rows], cx.device)?),
            Value::Tensor(Tensor::from_f64s(scores, &[rows, width], DType::F32, cx.device)?),
        ])
    }))
}

fn normalizer(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let norm = n.attr_s("norm", "MAX")?;
    if !matches!(norm.as_str(), "MAX" | "L1" | "L2") {
        return Err(n.err(format!("unknown norm '{norm}'")));
    }
    Ok(kernel(move |_cx, ins| {
        let x = tin(ins, 0)?;
        let one_d = x.rank() == 1;
        let m = as_matrix_f32(x)?;
        let d = match norm.as_str() {
            "MAX" => m.abs()?.max_keepdim(1)?,
            "L1" => m.abs()?.sum_keepdim(1)?,
            _ => m.sqr()?.sum_keepdim(1)?.sqrt()?,
        };
        let d = d.maximum(1e-30)?;
        let mut y = m.broadcast_div(&d)?;
        if one_d {
            y = y.squeeze(0)?;
        }
        out1(Tensor::new(y, DType::F32)?)
    }))
}

fn scaler(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let offset = floats_attr(n, "offset")?.unwrap_or_else(|| vec![0.0]);
    let scale = floats_attr(n, "scale")?.unwrap_or_else(|| vec![1.0]);
    Ok(kernel(move |_cx, ins| {
        let x = tin(ins, 0)?;
        let c = match x.dtype() {
            DType::F32 => x.candle().clone(),
            _ => x.cast(DType::F32)?.into_candle(),
        };
        let last = c.dims().last().copied().unwrap_or(1);
        let vec_for = |v: &[f32], what: &str| -> Result<CT> {
            if v.len() == 1 {
                Ok(CT::new(v[0], c.device())?)
            } else if v.len() == last && c.rank() > 0 {
                Ok(CT::from_vec(v.to_vec(), last, c.device())?)
            } else {
                bail!("{what} has {} values for a last axis of {last}", v.len())
            }
        };
        let o = vec_for(&offset, "offset")?;
        let s = vec_for(&scale, "scale")?;
        let y = c.broadcast_sub(&o)?.broadcast_mul(&s)?;
        out1(Tensor::new(y, DType::F32)?)
    }))
}

// ---------------------------------------------------------------------------------------------
// Imputer, LabelEncoder, OneHotEncoder, FeatureVectorizer

fn imputer(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let fl = floats_attr(n, "imputed_value_floats")?.unwrap_or_default();
    let il = n.attr_ints("imputed_value_int64s")?.unwrap_or_default();
    let (values, replace): (Vec<f64>, f64) = if !fl.is_empty() {
        (
            fl.iter().map(|&v| f64::from(v)).collect(),
            f64::from(n.attr_f("replaced_value_float", 0.0)?),
        )
    } else if !il.is_empty() {
        (
            il.iter().map(|&v| v as f64).collect(),
            n.attr_i("replaced_value_int64", 0)? as f64,
        )
    } else {
        return Err(n.err("Imputer needs imputed_value_floats or imputed_value_int64s"));
    };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let c = match x.dims().last() {
            Some(&c) => c,
            None => bail!("Imputer needs an input of rank >= 1"),
        };
        if values.len() != 1 && values.len() != c {
            bail!("{} imputed values for {c} features", values.len());
        }
        let pick = |i: usize| values.get(i % c.max(1)).or(values.first()).copied().unwrap_or(0.0);
        if x.dtype().is_float() {
            let mut v = x.to_f64_vec()?;
            for (i, e) in v.iter_mut().enumerate() {
                if (replace.is_nan() && e.is_nan()) || *e == replace {
                    *e = pick(i);
                }
            }
            out1(Tensor::from_f64s(v, x.dims(), x.dtype(), cx.device)?)
        } else {
            let mut v = x.to_i64_vec()?;
            let r = replace as i64;
            for (i, e) in v.iter_mut().enumerate() {
                if !replace.is_nan() && *e == r {
                    *e = pick(i) as i64;
                }
            }
            out1(Tensor::from_i64s(v, x.dims(), cx.device)?.cast(x.dtype())?)
        }
    }))
}

/// A lookup key: integers as themselves, floats by canonical bits (NaN matches NaN, -0 matches 0).
fn float_key(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

fn label_encoder(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    for s in ["keys_strings", "values_strings", "classes_strings", "default_string"] {
        if n.attr(s).is_some() {
            return Err(n.err("string keys or values are not supported"));
        }
    }
    // Keys: (is_float, raw values).
    let (key_float, keys): (bool, Vec<f64>) = if let Some(k) = n.attr_ints("keys_int64s")? {
        (false, k.iter().map(|&v| v as f64).collect())
    } else if let Some(k) = n.attr_floats("keys_floats")? {
        (true, k.iter().map(|&v| f64::from(v)).collect())
    } else if let Some(t) = n.attr_tensor("keys_tensor")? {
        if t.dtype == DType::String {
            return Err(n.err("string keys are not supported"));
        }
        (t.dtype.is_float(), td_f64(t).ok_or_else(|| n.err("bad keys_tensor"))?)
    } else {
        return Err(n.err("LabelEncoder needs keys"));
    };
    let key_ints: Option<Vec<i64>> = if key_float {
        None
    } else if let Some(k) = n.attr_ints("keys_int64s")? {
        Some(k)
    } else {
        n.attr_tensor("keys_tensor")?.and_then(TensorData::to_i64_vec)
    };
    // Values and default, as (dtype, f64 values, i64 values).
    let (out_dt, vals_f, vals_i, def_f, def_i): (DType, Vec<f64>, Vec<i64>, f64, i64) =
        if let Some(v) = n.attr_ints("values_int64s")? {
            let d = n.attr_i("default_int64", -1)?;
            (DType::I64, v.iter().map(|&x| x as f64).collect(), v, d as f64, d)
        } else if let Some(v) = n.attr_floats("values_floats")? {
            let d = f64::from(n.attr_f("default_float", -0.0)?);
            (
                DType::F32,
                v.iter().map(|&x| f64::from(x)).collect(),
                vec![0; v.len()],
                d,
                0,
            )
        } else if let Some(t) = n.attr_tensor("values_tensor")? {
            if t.dtype == DType::String {
                return Err(n.err("string values are not supported"));
            }
            let vf = td_f64(t).ok_or_else(|| n.err("bad values_tensor"))?;
            let vi = t.to_i64_vec().unwrap_or_else(|| vec![0; vf.len()]);
            let (df, di) = match n.attr_tensor("default_tensor")? {
                Some(d) => (
                    td_f64(d).and_then(|v| v.first().copied()).unwrap_or(0.0),
                    d.to_i64_vec().and_then(|v| v.first().copied()).unwrap_or(0),
                ),
                None if t.dtype.is_float() => (-0.0, 0),
                None => (-1.0, -1),
            };
            (t.dtype, vf, vi, df, di)
        } else {
            return Err(n.err("LabelEncoder needs values"));
        };
    if keys.len() != vals_f.len() {
        return Err(n.err(format!("{} keys for {} values", keys.len(), vals_f.len())));
    }
    let mut map: HashMap<u64, usize> = HashMap::with_capacity(keys.len());
    for (i, &k) in keys.iter().enumerate() {
        let key = match &key_ints {
            Some(ki) => ki.get(i).copied().unwrap_or(k as i64) as u64,
            None => float_key(k),
        };
        map.entry(key).or_insert(i);
    }
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        if x.dtype().is_float() != key_float {
            bail!("input dtype {} does not match the key type", x.dtype());
        }
        let idx: Vec<Option<usize>> = if key_float {
            x.to_f64_vec()?
                .into_iter()
                .map(|v| map.get(&float_key(v)).copied())
                .collect()
        } else {
            x.to_i64_vec()?
                .into_iter()
                .map(|v| map.get(&(v as u64)).copied())
                .collect()
        };
        if out_dt.is_float() {
            let v: Vec<f64> = idx
                .iter()
                .map(|i| i.and_then(|i| vals_f.get(i).copied()).unwrap_or(def_f))
                .collect();
            out1(Tensor::from_f64s(v, x.dims(), out_dt, cx.device)?)
        } else {
            let v: Vec<i64> = idx
                .iter()
                .map(|i| i.and_then(|i| vals_i.get(i).copied()).unwrap_or(def_i))
                .collect();
            out1(Tensor::from_i64s(v, x.dims(), cx.device)?.cast(out_dt)?)
        }
    }))
}

fn one_hot_encoder(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    if n.attr("cats_strings").is_some() && n.attr("cats_int64s").is_none() {
        return Err(n.err("string categories are not supported"));
    }
    let cats = n
        .attr_ints("cats_int64s")?
        .filter(|c| !c.is_empty())
        .ok_or_else(|| n.err("OneHotEncoder needs cats_int64s"))?;
    let zeros = n.attr_i("zeros", 1)? != 0;
    let mut map: HashMap<i64, usize> = HashMap::with_capacity(cats.len());
    for (i, &c) in cats.iter().enumerate() {
        map.entry(c).or_insert(i);
    }
    let k = cats.len();
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let vals = x.to_i64_vec()?;
        cx.check_alloc(vals.len() as u128 * k as u128, DType::F32)?;
        let mut out = vec![0f32; vals.len() * k];
        for (i, v) in vals.iter().enumerate() {
            match map.get(v) {
                Some(&j) => {
                    if let Some(o) = out.get_mut(i * k + j) {
                        *o = 1.0;
                    }
                }
                None if !zeros => bail!("value {v} is not a known category"),
                None => {}
            }
        }
        let mut dims = x.dims().to_vec();
        dims.push(k);
        out1(Tensor::new(CT::from_vec(out, dims.as_slice(), cx.device)?, DType::F32)?)
    }))
}

fn feature_vectorizer(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let dims_attr = n.attr_ints("inputdimensions")?.unwrap_or_default();
    let mut widths = Vec::with_capacity(dims_attr.len());
    for &d in &dims_attr {
        widths.push(to_usize(n, d, "input dimension")?);
    }
    let n_in = n.num_inputs();
    if widths.len() < n_in {
        return Err(n.err(format!("{} inputdimensions for {n_in} inputs", widths.len())));
    }
    Ok(kernel(move |cx, ins| {
        let mut parts = Vec::with_capacity(n_in);
        let mut rows = None;
        for (i, &w) in widths.iter().enumerate().take(n_in) {
            let x = tin(ins, i)?;
            let m = as_matrix_f32(x)?;
            // A 1-D input is a column of N rows.
            let m = if x.rank() == 1 { m.t()? } else { m };
            let (r, c) = (m.dims()[0], m.dims()[1]);
            if rows.is_some_and(|n| n != r) {
                bail!("inputs have different row counts");
            }
            rows = Some(r);
            let m = if c > w {
                m.narrow(1, 0, w)?
            } else if c < w {
                CT::cat(
                    &[m.clone(), CT::zeros((r, w - c), candle_core::DType::F32, cx.device)?],
                    1,
                )?
            } else {
                m
            };
            parts.push(m);
        }
        if parts.is_empty() {
            bail!("FeatureVectorizer needs inputs");
        }
        out1(Tensor::new(CT::cat(&parts, 1)?, DType::F32)?)
    }))
}

// ---------------------------------------------------------------------------------------------
// Support vector machines (following the ONNX reference implementation)

#[derive(Clone, Copy, PartialEq)]
enum SvmKernel {
    Linear,
    Poly,
    Rbf,
    Sigmoid,
}

struct KernelFn {
    kind: SvmKernel,
    gamma: f64,
    coef0: f64,
    degree: i32,
}

impl KernelFn {
    fn from_node(n: &NodeCtx) -> Result<KernelFn> {
        let kind = match n.attr_s("kernel_type", "LINEAR")?.to_ascii_uppercase().as_str() {
            "LINEAR" => SvmKernel::Linear,
            "POLY" => SvmKernel::Poly,
            "RBF" => SvmKernel::Rbf,
            "SIGMOID" => SvmKernel::Sigmoid,
            o => return Err(n.err(format!("unknown kernel_type '{o}'"))),
        };
        let p = floats_attr(n, "kernel_params")?.unwrap_or_default();
        Ok(KernelFn {
            kind,
            gamma: p.first().map_or(0.0, |&v| f64::from(v)),
            coef0: p.get(1).map_or(0.0, |&v| f64::from(v)),
            degree: p.get(2).map_or(0, |&v| v as i32),
        })
    }

    fn eval(&self, kind: SvmKernel, a: &[f64], b: &[f64]) -> f64 {
        let dot = || a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        match kind {
            SvmKernel::Linear => dot(),
            SvmKernel::Poly => (dot() * self.gamma + self.coef0).powi(self.degree),
            SvmKernel::Sigmoid => (dot() * self.gamma + self.coef0).tanh(),
            SvmKernel::Rbf => {
                let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
                (-self.gamma * d).exp()
            }
        }
    }
}

fn f64_list(n: &NodeCtx, name: &str) -> Result<Vec<f64>> {
    Ok(floats_attr(n, name)?
        .unwrap_or_default()
        .into_iter()
        .map(f64::from)
        .collect())
}

fn svm_regressor(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let kf = KernelFn::from_node(n)?;
    let coef = f64_list(n, "coefficients")?;
    let rho = f64_list(n, "rho")?.first().copied().unwrap_or(0.0);
    let sv = f64_list(n, "support_vectors")?;
    let n_sup = to_usize(n, n.attr_i("n_supports", 0)?, "n_supports")?;
    let one_class = n.attr_i("one_class", 0)? != 0;
    let post = Post::from_name(n, &n.attr_s("post_transform", "NONE")?)?;
    if n_sup > 0 && (coef.len() < n_sup || sv.is_empty() || sv.len() % n_sup != 0) {
        return Err(n.err("support_vectors/coefficients do not match n_supports"));
    }
    let feat = sv.len().checked_div(n_sup).unwrap_or(coef.len());
    Ok(kernel(move |cx, ins| {
        let (rows, f, xs) = rows_f64(tin(ins, 0)?)?;
        if f != feat {
            bail!("the model has {feat} features, the input {f}");
        }
        let mut out = vec![0f64; rows];
        out.par_iter_mut().enumerate().for_each(|(r, o)| {
            let x = xs.get(r * f..(r + 1) * f).unwrap_or(&[]);
            let mut s = if n_sup > 0 {
                sv.chunks(feat.max(1))
                    .zip(&coef)
                    .map(|(v, c)| c * kf.eval(kf.kind, x, v))
                    .sum::<f64>()
            } else {
                kf.eval(SvmKernel::Linear, x, &coef)
            } + rho;
            if one_class {
                s = if s > 0.0 { 1.0 } else { -1.0 };
            }
            post.apply(std::slice::from_mut(&mut s));
            *o = s;
        });
        out1(Tensor::from_f64s(out, &[rows, 1], DType::F32, cx.device)?)
    }))
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if v.get(best).is_some_and(|&b| x > b) {
            best = i;
        }
    }
    best
}

/// Pairwise coupling of libsvm (`multiclass_probability`); `r` is k x k row-major.
fn multiclass_probability(k: usize, r: &[f64]) -> Vec<f64> {
    let at = |i: usize, j: usize| r.get(i * k + j).copied().unwrap_or(0.0);
    let mut q = vec![0f64; k * k];
    let mut p = vec![1.0 / k as f64; k];
    let mut qp = vec![0f64; k];
    let eps = 0.005 / k as f64;
    for t in 0..k {
        let mut d = 0.0;
        for j in 0..t {
            d += at(j, t) * at(j, t);
            q[t * k + j] = q[j * k + t];
        }
        for j in t + 1..k {
            d += at(j, t) * at(j, t);
            q[t * k + j] = -at(j, t) * at(t, j);
        }
        q[t * k + t] = d;
    }
    for _ in 0..k.max(100) {
        for t in 0..k {
            qp[t] = (0..k).map(|j| q[t * k + j] * p[j]).sum();
        }
        let mut pqp: f64 = p.iter().zip(&qp).map(|(a, b)| a * b).sum();
        let max_err = qp.iter().map(|&v| (v - pqp).abs()).fold(0.0, f64::max);
        if max_err < eps {
            break;
        }
        for t in 0..k {
            let qtt = q[t * k + t];
            let diff = (-qp[t] + pqp) / qtt;
            p[t] += diff;
            pqp = (pqp + diff * (diff * qtt + 2.0 * qp[t])) / ((1.0 + diff) * (1.0 + diff));
            p.iter_mut().for_each(|v| *v /= 1.0 + diff);
            for j in 0..k {
                qp[j] = (qp[j] + diff * q[t * k + j]) / (1.0 + diff);
            }
        }
    }
    p
}

struct SvmClassifier {
    kf: KernelFn,
    labels: Vec<i64>,
    class_count: usize,
    coef: Vec<f64>,
    rho: Vec<f64>,
    prob_a: Vec<f64>,
    prob_b: Vec<f64>,
    sv: Vec<f64>,
    vectors_per_class: Vec<usize>,
    starts: Vec<usize>,
    vector_count: usize,
    features: usize,
    all_positive: bool,
    post: Post,
}

impl SvmClassifier {
    /// (label, scores) for one row.
    fn row(&self, x: &[f64]) -> Result<(i64, Vec<f64>)> {
        let cc = self.class_count;
        let rho0 = self.rho.first().copied().unwrap_or(0.0);
        let (votes, scores) = if self.vector_count == 0 {
            let s: Vec<f64> = (0..cc)
                .map(|j| {
                    let c = self.coef.get(j * self.features..(j + 1) * self.features).unwrap_or(&[]);
                    rho0 + self.kf.eval(SvmKernel::Linear, x, c)
                })
                .collect();
            (None, s)
        } else {
            let vc = self.vector_count;
            let kern: Vec<f64> = self
                .sv
                .chunks(self.features.max(1))
                .take(vc)
                .map(|v| self.kf.eval(self.kf.kind, x, v))
                .collect();
            let dot = |row: usize, start: usize, len: usize| -> f64 {
                let c = self.coef.get(row * vc + start..row * vc + start + len).unwrap_or(&[]);
                let k = kern.get(start..start + len).unwrap_or(&[]);
                c.iter().zip(k).map(|(a, b)| a * b).sum()
            };
            let mut votes = vec![0f64; cc];
            let mut scores = Vec::with_capacity(cc * cc.saturating_sub(1) / 2);
            let mut evals = 0usize;
            for i in 0..cc {
                let (si, ni) = (self.starts[i], self.vectors_per_class[i]);
                for j in i + 1..cc {
                    let (sj, nj) = (self.starts[j], self.vectors_per_class[j]);
                    let s = self.rho.get(evals).copied().unwrap_or(0.0) + dot(j - 1, si, ni) + dot(i, sj, nj);
                    scores.push(s);
                    if s > 0.0 {
                        votes[i] += 1.0;
                    } else {
                        votes[j] += 1.0;
                    }
                    evals += 1;
                }
            }
            (Some(votes), scores)
        };
        let has_proba = !self.prob_a.is_empty() && self.vector_count > 0;
        let scores = if has_proba {
            let mut r = vec![0f64; cc * cc];
            let mut idx = 0usize;
            for i in 0..cc {
                for j in i + 1..cc {
                    let v = scores.get(idx).copied().unwrap_or(0.0) * self.prob_a.get(idx).copied().unwrap_or(0.0)
                        + self.prob_b.get(idx).copied().unwrap_or(0.0);
                    let v1 = (1.0 - logistic(v)).clamp(1e-7, 1.0 - 1e-7);
                    r[i * cc + j] = v1;
                    r[j * cc + i] = 1.0 - v1;
                    idx += 1;
                }
            }
            multiclass_probability(cc, &r)
        } else {
            scores
        };
        let (max_class, max_weight) = match &votes {
            Some(v) if !v.is_empty() => {
                let m = argmax(v);
                (m, v[m])
            }
            _ => {
                let m = argmax(&scores);
                (m, scores.get(m).copied().unwrap_or(0.0))
            }
        };
        let mut add = -1;
        let label = if self.rho.len() == 1 {
            if self.labels.len() == 2 {
                add = 2;
                if !has_proba && self.all_positive && max_weight >= 0.5 {
                    self.labels[1]
                } else {
                    self.labels.get(max_class).copied().unwrap_or(0)
                }
            } else if max_weight > 0.0 {
                1
            } else {
                0
            }
        } else if !self.labels.is_empty() {
            self.labels.get(max_class).copied().unwrap_or(0)
        } else {
            max_class as i64
        };
        let post = self.post;
        let out = match scores.len() {
            0 => bail!("the SVM produced no scores"),
            1 => {
                let s = scores[0];
                if post == Post::Probit {
                    vec![probit(s)]
                } else if add == 0 || add == 1 {
                    vec![1.0 - s, s]
                } else if add == 2 || add == 3 {
                    let mut v = vec![-s, s];
                    post.apply(&mut v);
                    v
                } else {
                    vec![s]
                }
            }
            _ => {
                let mut v = scores;
                post.apply(&mut v);
                v
            }
        };
        Ok((label, out))
    }
}

fn svm_classifier(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    if n.attr("classlabels_strings").is_some() {
        return Err(n.err("string class labels are not supported"));
    }
    let labels = n.attr_ints("classlabels_ints")?.unwrap_or_default();
    let class_count = labels.len().max(1);
    let coef = f64_list(n, "coefficients")?;
    let sv = f64_list(n, "support_vectors")?;
    let mut vectors_per_class = Vec::new();
    let mut starts = Vec::new();
    let mut vector_count = 0usize;
    for &v in &n.attr_ints("vectors_per_class")?.unwrap_or_default() {
        let v = to_usize(n, v, "vectors_per_class")?;
        starts.push(vector_count);
        vectors_per_class.push(v);
        vector_count += v;
    }
    let features = if vector_count > 0 {
        if vectors_per_class.len() < class_count {
            return Err(n.err("vectors_per_class has fewer entries than classes"));
        }
        if sv.is_empty() || sv.len() % vector_count != 0 || coef.len() < (class_count - 1) * vector_count {
            return Err(n.err("support_vectors/coefficients do not match vectors_per_class"));
        }
        sv.len() / vector_count
    } else {
        if coef.is_empty() || coef.len() % class_count != 0 {
            return Err(n.err("coefficients do not divide into classes"));
        }
        coef.len() / class_count
    };
    let op = SvmClassifier {
        kf: KernelFn::from_node(n)?,
        labels,
        class_count,
        all_positive: coef.iter().all(|&c| c >= 0.0),
        coef,
        rho: f64_list(n, "rho")?,
        prob_a: f64_list(n, "prob_a")?,
        prob_b: f64_list(n, "prob_b")?,
        sv,
        vectors_per_class,
        starts,
        vector_count,
        features,
        post: Post::from_name(n, &n.attr_s("post_transform", "NONE")?)?,
    };
    Ok(kernel(move |cx, ins| {
        let (rows, f, xs) = rows_f64(tin(ins, 0)?)?;
        if f != op.features {
            bail!("the model has {} features, the input {f}", op.features);
        }
        let res: Vec<(i64, Vec<f64>)> = (0..rows)
            .into_par_iter()
            .map(|r| op.row(xs.get(r * f..(r + 1) * f).unwrap_or(&[])))
            .collect::<Result<_>>()?;
        let width = res.first().map_or(op.class_count, |(_, s)| s.len());
        let mut labels = Vec::with_capacity(rows);
        let mut scores = Vec::with_capacity(rows * width);
        for (l, s) in res {
            if s.len() != width {
                bail!("rows produced different score widths");
            }
            labels.push(l);
            scores.extend(s);
        }
        Ok(vec![
            Value::Tensor(Tensor::from_i64s(labels, &[rows], cx.device)?),
            Value::Tensor(Tensor::from_f64s(scores, &[rows, width], DType::F32, cx.device)?),
        ])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_transforms() {
        let mut r = vec![1.0, 2.0, 3.0];
        Post::Softmax.apply(&mut r);
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12 && r[2] > r[1]);
        let mut z = vec![0.0, 0.0];
        Post::SoftmaxZero.apply(&mut z);
        assert_eq!(z, vec![0.5, 0.5]);
        assert!((logistic(0.0) - 0.5).abs() < 1e-12 && logistic(-50.0) < 1e-20);
        assert!(probit(0.5).abs() < 1e-9 && probit(0.9) > 1.2 && probit(0.9) < 1.35);
    }

    #[test]
    fn pairwise_coupling_gives_a_distribution() {
        // Class 0 beats 1 and 2 with probability 0.8; 1 vs 2 is even.
        let r = [0.0, 0.8, 0.8, 0.2, 0.0, 0.5, 0.2, 0.5, 0.0];
        let p = multiclass_probability(3, &r);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(p[0] > 0.6 && (p[1] - p[2]).abs() < 1e-2);
    }

    #[test]
    fn cyclic_tree_is_an_error() {
        let b = |t, f| Branch {
            feature: 0,
            mode: Mode::Leq,
            split: 0.0,
            set: vec![],
            tracks_true: false,
            t,
            f,
        };
        let e = Ensemble {
            branches: vec![b(Next::Node(1), Next::Leaf(0)), b(Next::Node(0), Next::Leaf(0))],
            leaves: vec![vec![(0, 1.0)]],
            roots: vec![Next::Node(0)],
            n_targets: 1,
            n_features: 1,
            agg: Agg::Sum,
            base: vec![],
        };
        assert!(e.scores(1, 1, &[-1.0]).is_err());
        assert_eq!(e.scores(1, 1, &[1.0]).unwrap(), vec![1.0]);
        assert!(e.scores(1, 0, &[]).is_err());
    }
}
