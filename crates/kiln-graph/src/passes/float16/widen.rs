//! Widening: runs a model's float16 arithmetic in float32, keeping its float16 inputs and outputs.
//!
//! CPUs without native f16 arithmetic (every x86 core Kiln targets) compute an f16 graph by
//! converting each operand to f32 and each result back, at every node. ONNX Runtime's CPU provider,
//! which has f16 kernels for few operators, inserts Casts around the rest and so computes in f32 as
//! well. [`widen_to_float32`] makes that one decision for the whole graph at load:
//! - every float16 initializer becomes float32 (exact), every value declared float16 is declared
//!   float32, and so are the values of subgraph bodies (If/Loop/Scan), their inputs and outputs;
//! - `Cast(to=FLOAT16)` becomes `Cast(to=FLOAT)` (a no-op the optimizer removes when its input is
//!   already f32), `Constant`/`ConstantOfShape` float16 values become float32, and so do the dtype
//!   attributes of `EyeLike`, the random ops and `DequantizeLinear`'s `output_dtype`;
//! - the main graph's float16 inputs and outputs keep their names and dtype: a Cast after each
//!   input and before each output is the only f16 <-> f32 conversion left.
//!
//! The numbers change only where the original rounded an intermediate result to f16: the widened
//! graph keeps those values in f32 (more precise, never less). bfloat16 is left alone.

use std::collections::HashSet;

use crate::{Attribute, DType, Graph, Node, Result, TensorData, ValueId, ValueInfo, ValueKind};

/// What [`widen_to_float32`] changed (summed over the main graph and every subgraph).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WidenReport {
    /// Value declarations changed from float16 to float32.
    pub values: usize,
    /// Initializers converted to float32.
    pub initializers: usize,
    /// Attributes retargeted (Cast `to`, dtype attributes, Constant values).
    pub attributes: usize,
    /// Casts added at the main graph's float16 inputs and outputs.
    pub boundary_casts: usize,
}

impl WidenReport {
    /// Whether the graph had anything in float16.
    pub fn changed(&self) -> bool {
        self.values + self.initializers + self.attributes + self.boundary_casts > 0
    }
}

impl std::fmt::Display for WidenReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "f16 widened to f32: {} values, {} initializers, {} attributes, {} boundary casts",
            self.values, self.initializers, self.attributes, self.boundary_casts
        )
    }
}

/// Whether `graph` (or a subgraph) declares, stores or produces any float16 tensor.
pub fn has_float16(graph: &Graph) -> bool {
    let mut found = false;
    graph.for_each_graph(&mut |g| {
        found |= g.values.iter().any(|v| v.dtype == Some(DType::F16))
            || g.initializers.values().any(|t| t.dtype == DType::F16)
            || g.nodes.iter().any(node_makes_f16);
    });
    found
}

fn node_makes_f16(n: &Node) -> bool {
    n.attributes.iter().any(|(name, a)| dtype_attr_is_f16(n, name, a))
}

/// `true` for the attributes [`widen_node_attrs`] rewrites.
fn dtype_attr_is_f16(n: &Node, name: &str, a: &Attribute) -> bool {
    let f16 = i64::from(DType::F16.to_onnx());
    let default_domain = n.domain.is_empty() || n.domain == "ai.onnx";
    match (n.op_type.as_str(), name, a) {
        _ if !default_domain => false,
        ("Cast", "to", Attribute::Int(c)) => *c == f16,
        (
            "EyeLike" | "RandomNormal" | "RandomUniform" | "RandomNormalLike" | "RandomUniformLike" | "Bernoulli",
            "dtype",
            Attribute::Int(c),
        ) => *c == f16,
        ("DequantizeLinear", "output_dtype", Attribute::Int(c)) => *c == f16,
        ("Constant" | "ConstantOfShape", "value", Attribute::Tensor(t)) => t.dtype == DType::F16,
        (_, _, Attribute::Type(_, Some(DType::F16))) => true,
        _ => false,
    }
}

fn widen_tensor(t: &TensorData) -> Result<TensorData> {
    let vals: Vec<half::f16> = t.values().ok_or_else(|| crate::GraphError::BadTensor {
        name: t.name.clone(),
        reason: "expected float16 data".into(),
    })?;
    let wide: Vec<f32> = vals.iter().map(|v| v.to_f32()).collect();
    TensorData::from_values(t.name.clone(), t.dims.clone(), &wide)
}

/// Rewrites a node's float16 dtype attributes and constant values to float32; returns the count.
fn widen_node_attrs(n: &mut Node) -> Result<usize> {
    let f32_code = i64::from(DType::F32.to_onnx());
    let names: Vec<String> = n
        .attributes
        .iter()
        .filter(|(name, a)| dtype_attr_is_f16(n, name, a))
        .map(|(name, _)| name.clone())
        .collect();
    for name in &names {
        let new = match n.attributes.get(name) {
            Some(Attribute::Int(_)) => Attribute::Int(f32_code),
            Some(Attribute::Tensor(t)) => Attribute::Tensor(widen_tensor(t)?),
            Some(Attribute::Type(kind, _)) => Attribute::Type(*kind, Some(DType::F32)),
            _ => continue,
        };
        n.attributes.insert(name.clone(), new);
    }
    Ok(names.len())
}

/// Renames, in every subgraph below `g`, the captured outer value called `old` to `new` (captures
/// are bound by name, so a body must follow when its owner's implicit input is replaced).
fn rename_captures(g: &mut Graph, old: &str, new: &str) {
    for n in &mut g.nodes {
        for body in bodies_mut(n) {
            let body = std::sync::Arc::make_mut(body);
            for c in body.captures.clone() {
                if body.values[c.index()].name == old {
                    body.values[c.index()].name = new.to_string();
                }
            }
            rename_captures(body, old, new);
        }
    }
}

/// The subgraph bodies a node owns (If branches, Loop/Scan bodies).
fn bodies_mut(n: &mut Node) -> Vec<&mut std::sync::Arc<Graph>> {
    let mut out = Vec::new();
    for a in n.attributes.values_mut() {
        match a {
            Attribute::Graph(b) => out.push(b),
            Attribute::Graphs(bs) => out.extend(bs.iter_mut()),
            _ => {}
        }
    }
    out
}

/// Every name used anywhere in the model (values of all graphs, node names).
fn all_names(g: &Graph) -> HashSet<String> {
    let mut names = HashSet::new();
    g.for_each_graph(&mut |g| {
        names.extend(g.values.iter().map(|v| v.name.clone()));
        names.extend(g.nodes.iter().map(|n| n.name.clone()));
    });
    names
}

use super::super::edit::unique_name as fresh;

/// Adds an f32 twin of `v` (a fresh name, `v`'s shape), makes every node read it instead of `v`
/// (subgraphs by name included) and returns it.
fn f32_twin(graph: &mut Graph, names: &mut HashSet<String>, v: ValueId) -> ValueId {
    let info = graph.value(v).clone();
    let wide_name = fresh(names, &format!("{}_f32", info.name));
    let wide = graph.add_value(ValueInfo {
        name: wide_name.clone(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::F32),
        shape: info.shape,
    });
    replace_reads(graph, v, wide);
    rename_captures(graph, &info.name, &wide_name);
    wide
}

fn cast(name: String, from: ValueId, to: ValueId, dtype: DType) -> Node {
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert("to".to_string(), Attribute::Int(i64::from(dtype.to_onnx())));
    super::super::edit::make_node(name, "", "Cast", vec![Some(from)], vec![Some(to)], attrs)
}

/// Replaces every read of `old` (explicit and implicit) by `new`.
fn replace_reads(g: &mut Graph, old: ValueId, new: ValueId) {
    for n in &mut g.nodes {
        for v in n.inputs.iter_mut().flatten().chain(n.implicit_inputs.iter_mut()) {
            if *v == old {
                *v = new;
            }
        }
    }
}

/// Rewrites `graph` (a model's main graph) to compute in float32 wherever it computed in float16;
/// its float16 inputs and outputs keep their names and dtype. `overridable_initializers`: an
/// initializer that is also a graph input may be fed by the caller (IR >= 4), so it is treated as
/// an input (Cast after it) rather than converted. A graph without float16 is left unchanged.
pub fn widen_to_float32(graph: &mut Graph, overridable_initializers: bool) -> Result<WidenReport> {
    let mut report = WidenReport::default();
    if !has_float16(graph) {
        return Ok(report);
    }
    let mut names = all_names(graph);
    let is_f16 = |g: &Graph, v: ValueId| {
        g.values[v.index()].dtype == Some(DType::F16) || g.initializers.get(&v).is_some_and(|t| t.dtype == DType::F16)
    };
    // Values whose f16 declaration is the model's interface: left as they are.
    let mut pinned: HashSet<ValueId> = HashSet::new();
    let (mut in_casts, mut out_casts): (Vec<Node>, Vec<Node>) = (Vec::new(), Vec::new());
    for v in graph.inputs.clone() {
        let fed = overridable_initializers || !graph.initializers.contains_key(&v);
        if !fed || !is_f16(graph, v) {
            continue;
        }
        let wide = f32_twin(graph, &mut names, v);
        let cast_name = fresh(&mut names, &format!("{}_widen", graph.value_name(v)));
        in_casts.push(cast(cast_name, v, wide, DType::F32));
        pinned.insert(v);
    }
    let producers = graph.producers();
    for v in graph.outputs.clone() {
        if pinned.contains(&v) || !is_f16(graph, v) {
            continue;
        }
        let Some(&p) = producers.get(&v) else {
            // an initializer returned as an output: it stays f16, readers get an f32 copy
            if let Some(t) = graph.initializers.get(&v).cloned() {
                let wide = f32_twin(graph, &mut names, v);
                let mut data = widen_tensor(&t)?;
                data.name = graph.value_name(wide).to_string();
                graph.initializers.insert(wide, data);
                report.initializers += 1;
                pinned.insert(v);
            }
            continue;
        };
        let wide = f32_twin(graph, &mut names, v);
        for o in graph.nodes[p].outputs.iter_mut().flatten() {
            if *o == v {
                *o = wide;
            }
        }
        let cast_name = fresh(&mut names, &format!("{}_narrow", graph.value_name(v)));
        out_casts.push(cast(cast_name, wide, v, DType::F16));
        pinned.insert(v);
    }
    widen_graph(graph, &pinned, &mut report)?;
    report.boundary_casts = in_casts.len() + out_casts.len();
    // input Casts first, output Casts last: the node list stays in topological order
    let body = std::mem::take(&mut graph.nodes);
    graph.nodes = in_casts.into_iter().chain(body).chain(out_casts).collect();
    Ok(report)
}

/// Retypes every float16 value, initializer and attribute of `g` and its subgraphs, except the
/// `pinned` values of `g` itself.
fn widen_graph(g: &mut Graph, pinned: &HashSet<ValueId>, report: &mut WidenReport) -> Result<()> {
    for (i, v) in g.values.iter_mut().enumerate() {
        if v.dtype == Some(DType::F16) && !pinned.contains(&ValueId(i as u32)) {
            v.dtype = Some(DType::F32);
            report.values += 1;
        }
    }
    for (id, t) in g.initializers.iter_mut() {
        if t.dtype == DType::F16 && !pinned.contains(id) {
            *t = widen_tensor(t)?;
            report.initializers += 1;
        }
    }
    let none = HashSet::new();
    for n in &mut g.nodes {
        report.attributes += widen_node_attrs(n)?;
        for body in bodies_mut(n) {
            if has_float16(body) {
                widen_graph(std::sync::Arc::make_mut(body), &none, report)?;
            }
        }
    }
    Ok(())
}
