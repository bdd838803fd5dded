//! Graph editing shared by the rules: who produces and reads each value, which values are pinned,
//! constants, fresh names, and node removal.
//!
//! A rule builds an [`Index`] once per sweep, rewrites non-overlapping matches (marking the nodes
//! it touched so later matches in the same sweep skip them), then calls [`Index::finish`] to drop
//! the nodes it replaced. The pass manager's fixed-point loop picks up whatever a sweep skipped.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{Attribute, DType, Graph, Node, Shape, TensorData, ValueId, ValueInfo, ValueKind};

use super::Options;

/// Producers, consumers and pinned values of one graph, plus the sweep's bookkeeping.
pub struct Index {
    pub producer: HashMap<ValueId, usize>,
    /// Nodes reading each value as an explicit input (a node reading it twice appears twice).
    pub consumers: HashMap<ValueId, Vec<usize>>,
    /// Graph inputs, outputs, captures and values read by subgraphs (by name): never rewired.
    pub pinned: HashSet<ValueId>,
    /// Nodes already rewritten or scheduled for removal in this sweep.
    touched: Vec<bool>,
    dead: Vec<bool>,
    /// Value names, collected on the first [`Index::fresh_name`] (most sweeps never need one).
    names: Option<HashSet<String>>,
}

impl Index {
    pub fn new(g: &Graph) -> Self {
        let mut consumers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        let mut pinned: HashSet<ValueId> = HashSet::new();
        pinned.extend(g.inputs.iter().copied());
        pinned.extend(g.outputs.iter().copied());
        pinned.extend(g.captures.iter().copied());
        for (i, n) in g.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                consumers.entry(*v).or_default().push(i);
            }
            pinned.extend(n.implicit_inputs.iter().copied());
        }
        Index {
            producer: g.producers(),
            consumers,
            pinned,
            touched: vec![false; g.nodes.len()],
            dead: vec![false; g.nodes.len()],
            names: None,
        }
    }

    /// Readers of `v` (explicit inputs).
    pub fn readers(&self, v: ValueId) -> &[usize] {
        self.consumers.get(&v).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The one node reading `v`, when exactly one node reads it once and `v` is not pinned: the
    /// value may then disappear into a fusion.
    pub fn sole_reader(&self, v: ValueId) -> Option<usize> {
        match self.readers(v) {
            [one] if !self.pinned.contains(&v) => Some(*one),
            _ => None,
        }
    }

    /// The node producing `v` when its op is `op` (default domain) and it is still untouched.
    pub fn producer_op(&self, g: &Graph, v: ValueId, op: &str) -> Option<usize> {
        let p = *self.producer.get(&v)?;
        let n = g.nodes.get(p)?;
        (n.op_type == op && n.domain.is_empty() && !self.is_touched(p)).then_some(p)
    }

    pub fn is_touched(&self, node: usize) -> bool {
        self.touched.get(node).copied().unwrap_or(true)
    }

    /// Marks nodes as rewritten in this sweep.
    pub fn touch(&mut self, nodes: &[usize]) {
        for &i in nodes {
            if let Some(t) = self.touched.get_mut(i) {
                *t = true;
            }
        }
    }

    /// Schedules nodes for removal (and marks them touched).
    pub fn remove(&mut self, nodes: &[usize]) {
        self.touch(nodes);
        for &i in nodes {
            if let Some(d) = self.dead.get_mut(i) {
                *d = true;
            }
        }
    }

    /// A value name not used in the graph yet, derived from `base`.
    pub fn fresh_name(&mut self, g: &Graph, base: &str) -> String {
        let names = self
            .names
            .get_or_insert_with(|| g.values.iter().map(|v| v.name.clone()).collect());
        unique_name(names, base)
    }

    /// Adds a tensor value with a fresh name.
    pub fn new_value(&mut self, g: &mut Graph, base: &str, dtype: Option<DType>, shape: Option<Shape>) -> ValueId {
        let name = self.fresh_name(g, base);
        g.add_value(ValueInfo {
            name,
            kind: ValueKind::Tensor,
            dtype,
            shape,
        })
    }

    /// Adds an initializer under a fresh name derived from `base`.
    pub fn new_initializer(&mut self, g: &mut Graph, base: &str, mut data: TensorData) -> ValueId {
        let id = self.new_value(g, base, Some(data.dtype), Some(Shape::from_known(&data.dims)));
        data.name = g.value_name(id).to_string();
        g.initializers.insert(id, data);
        id
    }

    /// Appends a node (not touched, not dead) and returns its index.
    pub fn push_node(&mut self, g: &mut Graph, node: Node) -> usize {
        g.nodes.push(node);
        self.touched.push(true);
        self.dead.push(false);
        g.nodes.len() - 1
    }

    /// Drops the nodes scheduled for removal.
    pub fn finish(self, g: &mut Graph) {
        let mut it = self.dead.iter();
        g.nodes.retain(|_| !*it.next().unwrap_or(&false));
    }
}

/// The constant behind `v`: an initializer the caller cannot override.
pub fn constant<'g>(g: &'g Graph, options: &Options, v: ValueId) -> Option<&'g TensorData> {
    let t = g.initializers.get(&v)?;
    if options.overridable_initializers && g.inputs.contains(&v) {
        return None;
    }
    Some(t)
}

/// Constant input `i` of `node`.
pub fn const_input<'g>(g: &'g Graph, options: &Options, node: &Node, i: usize) -> Option<&'g TensorData> {
    constant(g, options, node.inputs.get(i).copied().flatten()?)
}

/// Replaces every explicit read of `old` by `new`. The caller checks `old` is not pinned.
pub fn replace_uses(g: &mut Graph, old: ValueId, new: ValueId) {
    for n in &mut g.nodes {
        for v in n.inputs.iter_mut().flatten() {
            if *v == old {
                *v = new;
            }
        }
    }
}

/// `base`, or `base_K` for the first K that is not in `names`; recorded in `names`.
pub fn unique_name(names: &mut HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 0;
    while names.contains(&name) {
        k += 1;
        name = format!("{base}_{k}");
    }
    names.insert(name.clone());
    name
}

/// The value of a one-element float tensor.
pub fn scalar_f64(t: &TensorData) -> Option<f64> {
    if t.len() != 1 {
        return None;
    }
    match t.dtype {
        DType::F32 => t.values::<f32>()?.first().map(|&v| v as f64),
        DType::F64 => t.values::<f64>()?.first().copied(),
        DType::F16 => t.values::<half::f16>()?.first().map(|v| v.to_f64()),
        DType::BF16 => t.values::<half::bf16>()?.first().map(|v| v.to_f64()),
        _ => None,
    }
}

/// Float values of an f32/f64/f16 tensor as f64.
pub fn float_values(t: &TensorData) -> Option<Vec<f64>> {
    match t.dtype {
        DType::F32 => Some(t.values::<f32>()?.into_iter().map(f64::from).collect()),
        DType::F64 => t.values::<f64>(),
        DType::F16 => Some(t.values::<half::f16>()?.into_iter().map(|v| v.to_f64()).collect()),
        _ => None,
    }
}

/// The other input of a binary node, given one of them.
pub fn other_input(node: &Node, v: ValueId) -> Option<ValueId> {
    match node.inputs.as_slice() {
        [Some(a), Some(b)] if *a == v => Some(*b),
        [Some(a), Some(b)] if *b == v => Some(*a),
        _ => None,
    }
}

/// `true` when a binary node reads `v` and a constant scalar close to `want` (relative 1e-3).
pub fn binary_with_scalar(g: &Graph, options: &Options, node: &Node, v: ValueId, want: f64) -> bool {
    other_input(node, v)
        .and_then(|c| constant(g, options, c))
        .and_then(scalar_f64)
        .is_some_and(|x| (x - want).abs() <= 1e-3 * want.abs().max(1e-6))
}

/// First output of a node.
pub fn out0(node: &Node) -> Option<ValueId> {
    node.outputs.first().copied().flatten()
}

/// Explicit input `i` of a node.
pub fn input(node: &Node, i: usize) -> Option<ValueId> {
    node.inputs.get(i).copied().flatten()
}

/// `true` when only the first output of `node` is used (the others are absent or unread).
pub fn only_first_output_used(idx: &Index, node: &Node) -> bool {
    node.outputs
        .iter()
        .skip(1)
        .flatten()
        .all(|o| idx.readers(*o).is_empty() && !idx.pinned.contains(o))
}

/// A new default-domain (or `domain`) node.
pub fn make_node(
    name: String,
    domain: &str,
    op: &str,
    inputs: Vec<Option<ValueId>>,
    outputs: Vec<Option<ValueId>>,
    attributes: BTreeMap<String, Attribute>,
) -> Node {
    Node {
        name,
        op_type: op.to_string(),
        domain: domain.to_string(),
        inputs,
        outputs,
        attributes,
        implicit_inputs: Vec::new(),
    }
}

/// Operators whose result is not a function of their inputs: never folded or merged.
pub fn is_nondeterministic(node: &Node) -> bool {
    matches!(
        node.op_type.as_str(),
        "RandomNormal" | "RandomUniform" | "RandomNormalLike" | "RandomUniformLike" | "Multinomial" | "Bernoulli"
    ) || (node.op_type == "Dropout" && node.inputs.get(2).copied().flatten().is_some())
}

/// `true` when the node owns a subgraph (If/Loop/Scan bodies).
pub fn has_subgraph(node: &Node) -> bool {
    node.attributes
        .values()
        .any(|a| matches!(a, Attribute::Graph(_) | Attribute::Graphs(_)))
}

/// Axes of a Reduce* node: the `axes` attribute (opset < 18) or constant input 1.
pub fn reduce_axes(g: &Graph, options: &Options, node: &Node) -> Option<Vec<i64>> {
    match node.attr("axes") {
        Some(Attribute::Ints(a)) => Some(a.clone()),
        Some(_) => None,
        None => const_input(g, options, node, 1)?.to_i64_vec(),
    }
}

/// Integer attribute with a default.
pub fn attr_i(node: &Node, name: &str, default: i64) -> Option<i64> {
    match node.attr(name) {
        None => Some(default),
        Some(Attribute::Int(v)) => Some(*v),
        Some(_) => None,
    }
}

/// Turns every top-level `Constant` node holding a tensor (`value`) into an initializer of the same
/// value, so the weight rewrites (quantization, pruning) see filters that an exporter wrote as
/// Constant nodes (Paddle2ONNX does). Constants that are graph outputs stay nodes. Returns how many
/// moved.
pub fn constants_to_initializers(g: &mut Graph) -> usize {
    let mut moved = 0;
    let outputs: HashSet<ValueId> = g.outputs.iter().copied().collect();
    let nodes = std::mem::take(&mut g.nodes);
    for n in nodes {
        let lift = (n.domain.is_empty() && n.op_type == "Constant" && n.attributes.len() == 1)
            .then(|| match (n.attributes.get("value"), n.outputs.as_slice()) {
                (Some(Attribute::Tensor(t)), [Some(out)]) if !outputs.contains(out) => Some((*out, t.clone())),
                _ => None,
            })
            .flatten();
        match lift {
            Some((out, mut t)) => {
                t.name = g.value_name(out).to_string();
                let info = &mut g.values[out.index()];
                info.dtype = Some(t.dtype);
                info.shape = Some(Shape::from_known(&t.dims));
                g.initializers.insert(out, t);
                moved += 1;
            }
            None => g.nodes.push(n),
        }
    }
    moved
}

#[cfg(test)]
mod constant_tests {
    use super::*;

    #[test]
    fn constant_tensors_become_initializers_except_graph_outputs() {
        let mut g = Graph::default();
        let mut value = |name: &str| {
            g.add_value(ValueInfo {
                name: name.into(),
                kind: ValueKind::Tensor,
                dtype: None,
                shape: None,
            })
        };
        let (x, w, y, c) = (value("x"), value("w"), value("y"), value("c"));
        let t = TensorData::from_values("", vec![2, 2], &[1f32, 2.0, 3.0, 4.0]).unwrap();
        let constant = |out: ValueId| {
            make_node(
                "k".into(),
                "",
                "Constant",
                vec![],
                vec![Some(out)],
                BTreeMap::from([("value".to_string(), Attribute::Tensor(t.clone()))]),
            )
        };
        g.nodes = vec![
            constant(w),
            make_node(
                "mm".into(),
                "",
                "MatMul",
                vec![Some(x), Some(w)],
                vec![Some(y)],
                BTreeMap::new(),
            ),
            constant(c),
        ];
        g.inputs = vec![x];
        g.outputs = vec![y, c];
        assert_eq!(constants_to_initializers(&mut g), 1);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["MatMul", "Constant"]);
        let lifted = &g.initializers[&w];
        assert_eq!((lifted.name.as_str(), lifted.dims.as_slice()), ("w", &[2usize, 2][..]));
        assert_eq!(g.value(w).dtype, Some(DType::F32));
    }
}
