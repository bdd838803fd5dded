use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::{DType, GraphError, Result, Shape, TensorData};

/// Index of a value inside one [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What kind of thing flows through a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueKind {
    #[default]
    Tensor,
    Sequence,
    Optional,
    Map,
    /// Declared type not given (intermediate values without value_info).
    Unknown,
}

/// Static facts about a value: its name, and dtype/shape where known.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueInfo {
    pub name: String,
    pub kind: ValueKind,
    pub dtype: Option<DType>,
    pub shape: Option<Shape>,
}

/// A node attribute, decoded from the model once at import.
#[derive(Debug, Clone, PartialEq)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(TensorData),
    Graph(Arc<Graph>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<TensorData>),
    Graphs(Vec<Arc<Graph>>),
    /// A type proto attribute (e.g. `Optional`'s `type`); kept as element dtype and kind.
    Type(ValueKind, Option<DType>),
}

impl Attribute {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Attribute::Float(_) => "float",
            Attribute::Int(_) => "int",
            Attribute::String(_) => "string",
            Attribute::Tensor(_) => "tensor",
            Attribute::Graph(_) => "graph",
            Attribute::Floats(_) => "floats",
            Attribute::Ints(_) => "ints",
            Attribute::Strings(_) => "strings",
            Attribute::Tensors(_) => "tensors",
            Attribute::Graphs(_) => "graphs",
            Attribute::Type(..) => "type",
        }
    }
}

/// One operator application.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// Operator domain; `""` is the default ONNX domain (`ai.onnx`).
    pub domain: String,
    /// Positional inputs; `None` marks an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    /// Positional outputs; `None` marks an unused optional output.
    pub outputs: Vec<Option<ValueId>>,
    pub attributes: BTreeMap<String, Attribute>,
    /// Outer-scope values read by this node's subgraphs (If/Loop/Scan bodies), by id in this graph.
    pub implicit_inputs: Vec<ValueId>,
}

impl Node {
    pub fn attr(&self, name: &str) -> Option<&Attribute> {
        self.attributes.get(name)
    }

    /// Every value this node reads: explicit inputs then implicit (subgraph) ones.
    pub fn all_inputs(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.inputs
            .iter()
            .flatten()
            .copied()
            .chain(self.implicit_inputs.iter().copied())
    }
}

/// A computation graph. Subgraphs (bodies of If/Loop/Scan) are graphs too; values they read from
/// an enclosing scope are listed in `captures` and bound by name when the body runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub values: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    pub initializers: BTreeMap<ValueId, TensorData>,
    pub captures: Vec<ValueId>,
}

impl Graph {
    pub fn value(&self, id: ValueId) -> &ValueInfo {
        &self.values[id.index()]
    }

    pub fn value_name(&self, id: ValueId) -> &str {
        &self.values[id.index()].name
    }

    /// Adds a value and returns its id.
    pub fn add_value(&mut self, info: ValueInfo) -> ValueId {
        self.values.push(info);
        ValueId((self.values.len() - 1) as u32)
    }

    /// Inputs the caller must feed: graph inputs that are not also initializers.
    pub fn runtime_inputs(&self) -> Vec<ValueId> {
        self.inputs
            .iter()
            .copied()
            .filter(|v| !self.initializers.contains_key(v))
            .collect()
    }

    /// Node index producing each value.
    pub fn producers(&self) -> HashMap<ValueId, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                m.insert(*o, i);
            }
        }
        m
    }

    /// Checks that every value read has a source, nothing is produced twice, and the nodes are
    /// acyclic; returns the node indices in a topological order (stable w.r.t. the file order).
    pub fn topological_order(&self) -> Result<Vec<usize>> {
        let mut producer: HashMap<ValueId, usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                if producer.insert(*o, i).is_some() || self.initializers.contains_key(o) && self.inputs.contains(o) {
                    return Err(GraphError::DuplicateProducer {
                        graph: self.name.clone(),
                        value: self.value_name(*o).to_string(),
                    });
                }
            }
        }
        let mut sourced = vec![false; self.values.len()];
        for v in self
            .inputs
            .iter()
            .chain(self.initializers.keys())
            .chain(self.captures.iter())
        {
            sourced[v.index()] = true;
        }
        let mut deps: Vec<usize> = vec![0; self.nodes.len()];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.all_inputs() {
                if let Some(&p) = producer.get(&v) {
                    deps[i] += 1;
                    users[p].push(i);
                } else if !sourced[v.index()] {
                    return Err(GraphError::DanglingInput {
                        graph: self.name.clone(),
                        node: n.name.clone(),
                        op: n.op_type.clone(),
                        value: self.value_name(v).to_string(),
                    });
                }
            }
        }
        // Kahn's algorithm with a min-heap keeps the original order when it is already valid.
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..self.nodes.len())
            .filter(|&i| deps[i] == 0)
            .map(std::cmp::Reverse)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(i);
            for &u in &users[i] {
                deps[u] -= 1;
                if deps[u] == 0 {
                    ready.push(std::cmp::Reverse(u));
                }
            }
        }
        if order.len() != self.nodes.len() {
            let stuck = (0..self.nodes.len()).find(|&i| deps[i] > 0).unwrap_or(0);
            let n = &self.nodes[stuck];
            return Err(GraphError::Cycle {
                graph: self.name.clone(),
                node: n.name.clone(),
                op: n.op_type.clone(),
            });
        }
        for o in &self.outputs {
            if !producer.contains_key(o) && !sourced[o.index()] {
                return Err(GraphError::MissingOutput(self.value_name(*o).to_string()));
            }
        }
        Ok(order)
    }

    /// Visits this graph and every nested subgraph.
    pub fn for_each_graph(&self, f: &mut dyn FnMut(&Graph)) {
        f(self);
        for n in &self.nodes {
            for a in n.attributes.values() {
                match a {
                    Attribute::Graph(g) => g.for_each_graph(f),
                    Attribute::Graphs(gs) => gs.iter().for_each(|g| g.for_each_graph(f)),
                    _ => {}
                }
            }
        }
    }

    /// Number of parameters stored in initializers (elements, all dtypes).
    pub fn parameter_count(&self) -> usize {
        self.initializers.values().map(TensorData::len).sum()
    }
}

/// A whole model: the main graph plus the operator set versions it was written against.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    pub graph: Graph,
    /// Domain -> opset version; the default domain is `""`.
    pub opsets: BTreeMap<String, i64>,
    pub ir_version: i64,
    pub producer: String,
}

impl Model {
    /// Opset version for a domain (`""` and `ai.onnx` are the same domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let d = if domain == "ai.onnx" { "" } else { domain };
        self.opsets.get(d).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, inputs: &[u32], outputs: &[u32]) -> Node {
        Node {
            name: name.into(),
            op_type: "Relu".into(),
            domain: String::new(),
            inputs: inputs.iter().map(|&i| Some(ValueId(i))).collect(),
            outputs: outputs.iter().map(|&i| Some(ValueId(i))).collect(),
            attributes: BTreeMap::new(),
            implicit_inputs: vec![],
        }
    }

    fn graph(nodes: Vec<Node>, nvalues: usize) -> Graph {
        Graph {
            name: "g".into(),
            values: (0..nvalues)
                .map(|i| ValueInfo {
                    name: format!("v{i}"),
                    ..Default::default()
                })
                .collect(),
            nodes,
            inputs: vec![ValueId(0)],
            outputs: vec![ValueId(nvalues as u32 - 1)],
            ..Default::default()
        }
    }

    #[test]
    fn sorts_out_of_order_nodes() {
        let g = graph(vec![node("b", &[1], &[2]), node("a", &[0], &[1])], 3);
        assert_eq!(g.topological_order().unwrap(), vec![1, 0]);
    }

    #[test]
    fn detects_cycles() {
        let g = graph(vec![node("a", &[0, 2], &[1]), node("b", &[1], &[2])], 3);
        let e = g.topological_order().unwrap_err();
        assert!(matches!(e, GraphError::Cycle { .. }), "{e}");
    }

    #[test]
    fn detects_dangling_inputs() {
        let g = graph(vec![node("a", &[3], &[1]), node("b", &[1], &[2])], 4);
        let e = g.topological_order().unwrap_err().to_string();
        assert!(e.contains("'v3'") && e.contains("node 'a'"), "{e}");
    }
}
