//! `ModelProto` -> Kiln IR. Names are resolved to value ids once; subgraph bodies get their
//! outer-scope reads recorded as captures (and as implicit inputs of the node that owns them).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kiln_graph::{Attribute, DType, Dim, Graph, Model, Node, Shape, ValueId, ValueInfo, ValueKind};

use crate::{proto, tensor_from_proto, ModelSource, OnnxError, Result};

/// Imports a decoded model: opsets, main graph, nested graphs; checks structure.
pub fn import_model(m: &proto::ModelProto, source: &ModelSource) -> Result<Model> {
    let gp = m.graph.as_ref().ok_or(OnnxError::NoGraph)?;
    let mut opsets = BTreeMap::new();
    for o in &m.opset_import {
        let d = o.domain.clone().unwrap_or_default();
        let d = if d == "ai.onnx" { String::new() } else { d };
        opsets.insert(d, o.version.unwrap_or(1));
    }
    if opsets.is_empty() {
        opsets.insert(String::new(), 1);
    }
    if !m.functions.is_empty() {
        // Model-local functions are inlined by name; see `FunctionInliner`.
    }
    let funcs = Functions::new(&m.functions);
    let mut cx = ImportCx {
        source,
        funcs: &funcs,
        depth: 0,
        nodes: std::cell::Cell::new(0),
    };
    let (mut graph, captures) = cx.graph(gp, &[])?;
    if !captures.is_empty() {
        return Err(OnnxError::Value {
            name: captures.join(", "),
            reason: "used by the main graph but never defined".into(),
        });
    }
    graph.topological_order()?;
    kiln_graph::infer::infer_shapes(&mut graph);
    Ok(Model {
        graph,
        opsets,
        ir_version: m.ir_version.unwrap_or(0),
        producer: m.producer_name.clone().unwrap_or_default(),
    })
}

struct Functions<'a> {
    by_key: HashMap<(String, String), &'a proto::FunctionProto>,
}

impl<'a> Functions<'a> {
    fn new(fs: &'a [proto::FunctionProto]) -> Self {
        let by_key = fs
            .iter()
            .map(|f| {
                (
                    (f.domain.clone().unwrap_or_default(), f.name.clone().unwrap_or_default()),
                    f,
                )
            })
            .collect();
        Functions { by_key }
    }
}

struct ImportCx<'a> {
    source: &'a ModelSource,
    funcs: &'a Functions<'a>,
    depth: usize,
    /// Nodes imported so far over all graphs (bounded by `LoadLimits::max_nodes`).
    nodes: std::cell::Cell<u64>,
}

/// Name -> id map of one graph under construction.
struct Scope {
    graph: Graph,
    names: HashMap<String, ValueId>,
    /// Names visible from enclosing graphs.
    outer: Vec<String>,
    captures: Vec<String>,
}

impl Scope {
    fn declare(&mut self, info: ValueInfo) -> ValueId {
        if let Some(&id) = self.names.get(&info.name) {
            let v = &mut self.graph.values[id.index()];
            if v.dtype.is_none() {
                v.dtype = info.dtype;
            }
            if v.shape.is_none() {
                v.shape = info.shape;
            }
            if v.kind == ValueKind::Unknown {
                v.kind = info.kind;
            }
            return id;
        }
        let name = info.name.clone();
        let id = self.graph.add_value(info);
        self.names.insert(name, id);
        id
    }

    /// Resolves a name read by a node: local first, then an outer scope (recorded as a capture).
    fn lookup(&mut self, name: &str) -> Option<ValueId> {
        if let Some(&id) = self.names.get(name) {
            return Some(id);
        }
        if self.outer.iter().any(|n| n == name) {
            let id = self.declare(ValueInfo {
                name: name.to_string(),
                kind: ValueKind::Unknown,
                ..Default::default()
            });
            self.graph.captures.push(id);
            self.captures.push(name.to_string());
            return Some(id);
        }
        None
    }
}

impl ImportCx<'_> {
    fn graph(&mut self, gp: &proto::GraphProto, outer: &[String]) -> Result<(Graph, Vec<String>)> {
        let limits = &self.source.limits;
        crate::LoadLimits::check(
            "the subgraph nesting depth",
            self.depth as u128,
            limits.max_nesting,
            "max_nesting",
        )?;
        let mut sc = Scope {
            graph: Graph {
                name: gp.name.clone().unwrap_or_default(),
                ..Default::default()
            },
            names: HashMap::new(),
            outer: outer.to_vec(),
            captures: Vec::new(),
        };
        for vi in &gp.input {
            let id = sc.declare(value_info(vi)?);
            sc.graph.inputs.push(id);
        }
        for t in &gp.initializer {
            let data = tensor_from_proto(t, self.source)?;
            let id = sc.declare(ValueInfo {
                name: data.name.clone(),
                kind: ValueKind::Tensor,
                dtype: Some(data.dtype),
                shape: Some(Shape::from_known(&data.dims)),
            });
            sc.graph.initializers.insert(id, data);
        }
        if !gp.sparse_initializer.is_empty() {
            return Err(OnnxError::Unsupported("sparse initializers".into()));
        }
        for vi in gp.value_info.iter() {
            sc.declare(value_info(vi)?);
        }
        let nodes = self.expand_functions(&gp.node, 0)?;
        self.count_nodes(nodes.len())?;
        // Declare every node output first so that out-of-order nodes still resolve.
        for n in &nodes {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                sc.declare(ValueInfo {
                    name: o.clone(),
                    kind: ValueKind::Unknown,
                    ..Default::default()
                });
            }
        }
        for (i, np) in nodes.iter().enumerate() {
            let node = self.node(np, i, &mut sc)?;
            sc.graph.nodes.push(node);
        }
        for vi in &gp.output {
            let info = value_info(vi)?;
            let id = match sc.lookup(&info.name) {
                Some(id) => {
                    sc.declare(info);
                    id
                }
                None => return Err(kiln_graph::GraphError::MissingOutput(info.name).into()),
            };
            sc.graph.outputs.push(id);
        }
        Ok((sc.graph, sc.captures))
    }

    fn node(&mut self, np: &proto::NodeProto, index: usize, sc: &mut Scope) -> Result<Node> {
        let op_type = np.op_type.clone().unwrap_or_default();
        let name = match np.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("{op_type}_{index}"),
        };
        let domain = match np.domain.as_deref() {
            None | Some("ai.onnx") => String::new(),
            Some(d) => d.to_string(),
        };
        let mut inputs = Vec::with_capacity(np.input.len());
        for i in &np.input {
            if i.is_empty() {
                inputs.push(None);
                continue;
            }
            match sc.lookup(i) {
                Some(id) => inputs.push(Some(id)),
                None => {
                    return Err(kiln_graph::GraphError::DanglingInput {
                        graph: sc.graph.name.clone(),
                        node: name,
                        op: op_type,
                        value: i.clone(),
                    }
                    .into())
                }
            }
        }
        let outputs = np
            .output
            .iter()
            .map(|o| if o.is_empty() { None } else { sc.names.get(o).copied() })
            .collect();
        let mut attributes = BTreeMap::new();
        let mut implicit_names: Vec<String> = Vec::new();
        for a in &np.attribute {
            let aname = a.name.clone().unwrap_or_default();
            let attr = self.attribute(a, &name, &op_type, sc, &mut implicit_names)?;
            attributes.insert(aname, attr);
        }
        let mut implicit_inputs = Vec::new();
        for n in implicit_names {
            if let Some(id) = sc.lookup(&n) {
                if !implicit_inputs.contains(&id) {
                    implicit_inputs.push(id);
                }
            }
        }
        Ok(Node {
            name,
            op_type,
            domain,
            inputs,
            outputs,
            attributes,
            implicit_inputs,
        })
    }

    fn attribute(
        &mut self,
        a: &proto::AttributeProto,
        node: &str,
        op: &str,
        sc: &mut Scope,
        implicit: &mut Vec<String>,
    ) -> Result<Attribute> {
        use proto::attribute_proto::AttributeType as T;
        let aname = a.name.clone().unwrap_or_default();
        let bad = |reason: String| OnnxError::Attribute {
            node: node.to_string(),
            op: op.to_string(),
            attr: aname.clone(),
            reason,
        };
        if a.ref_attr_name.as_deref().is_some_and(|r| !r.is_empty()) {
            return Err(bad("refers to a function attribute outside a function".into()));
        }
        let ty = T::try_from(a.r#type.unwrap_or(0)).unwrap_or(T::Undefined);
        let ty = if ty == T::Undefined { guess_type(a) } else { ty };
        let mut visible: Vec<String> = sc.names.keys().cloned().collect();
        visible.extend(sc.outer.iter().cloned());
        let mut sub = |g: &proto::GraphProto, cx: &mut Self| -> Result<Arc<Graph>> {
            cx.depth += 1;
            let r = cx.graph(g, &visible);
            cx.depth -= 1;
            let (graph, caps) = r?;
            graph.topological_order()?;
            implicit.extend(caps);
            Ok(Arc::new(graph))
        };
        Ok(match ty {
            T::Float => Attribute::Float(a.f.unwrap_or(0.0)),
            T::Int => Attribute::Int(a.i.unwrap_or(0)),
            T::String => Attribute::String(a.s.clone().unwrap_or_default()),
            T::Tensor => Attribute::Tensor(tensor_from_proto(
                a.t.as_ref()
                    .ok_or_else(|| bad("tensor attribute without a tensor".into()))?,
                self.source,
            )?),
            T::Graph => Attribute::Graph(sub(
                a.g.as_ref()
                    .ok_or_else(|| bad("graph attribute without a graph".into()))?,
                self,
            )?),
            T::Floats => Attribute::Floats(a.floats.clone()),
            T::Ints => Attribute::Ints(a.ints.clone()),
            T::Strings => Attribute::Strings(a.strings.clone()),
            T::Tensors => Attribute::Tensors(
                a.tensors
                    .iter()
                    .map(|t| tensor_from_proto(t, self.source))
                    .collect::<Result<_>>()?,
            ),
            T::Graphs => {
                let mut gs = Vec::new();
                for g in &a.graphs {
                    gs.push(sub(g, self)?);
                }
                Attribute::Graphs(gs)
            }
            T::TypeProto => {
                let tp =
                    a.tp.as_ref()
                        .ok_or_else(|| bad("type attribute without a type".into()))?;
                let (kind, dtype, _) = type_of(tp);
                Attribute::Type(kind, dtype)
            }
            T::SparseTensor => {
                let sp = a
                    .sparse_tensor
                    .as_ref()
                    .ok_or_else(|| bad("sparse tensor attribute without a tensor".into()))?;
                Attribute::Tensor(densify(sp, self.source).map_err(|e| bad(e.to_string()))?)
            }
            other => return Err(bad(format!("unsupported attribute type {other:?}"))),
        })
    }

    /// Adds `n` imported nodes to the count, failing past `LoadLimits::max_nodes`.
    fn count_nodes(&self, n: usize) -> Result<()> {
        let total = self.nodes.get().saturating_add(n as u64);
        self.nodes.set(total);
        crate::LoadLimits::check(
            "the node count (all graphs, functions inlined)",
            total.into(),
            self.source.limits.max_nodes,
            "max_nodes",
        )
    }

    /// Inlines calls to model-local functions (recursively, with a depth bound; the node count
    /// is checked as bodies expand, so functions calling functions cannot blow up).
    fn expand_functions(&self, nodes: &[proto::NodeProto], depth: usize) -> Result<Vec<proto::NodeProto>> {
        if self.funcs.by_key.is_empty() {
            return Ok(nodes.to_vec());
        }
        crate::LoadLimits::check(
            "the nesting depth of model-local function calls",
            depth as u128,
            self.source.limits.max_nesting,
            "max_nesting",
        )?;
        // Counted as the expansion goes (what is kept is counted once more by the caller).
        crate::LoadLimits::check(
            "the node count (all graphs, functions inlined)",
            (self.nodes.get() as u128).saturating_add(nodes.len() as u128),
            self.source.limits.max_nodes,
            "max_nodes",
        )?;
        let mut out = Vec::new();
        for (k, n) in nodes.iter().enumerate() {
            let key = (
                n.domain.clone().unwrap_or_default(),
                n.op_type.clone().unwrap_or_default(),
            );
            let Some(f) = self.funcs.by_key.get(&key) else {
                out.push(n.clone());
                continue;
            };
            let prefix = format!("{}__{}_{k}__", n.name.clone().unwrap_or_default(), key.1);
            let mut rename: HashMap<String, String> = HashMap::new();
            for (i, fi) in f.input.iter().enumerate() {
                rename.insert(fi.clone(), n.input.get(i).cloned().unwrap_or_default());
            }
            for (i, fo) in f.output.iter().enumerate() {
                rename.insert(fo.clone(), n.output.get(i).cloned().unwrap_or_default());
            }
            let mut attrs: HashMap<String, proto::AttributeProto> = f
                .attribute_proto
                .iter()
                .map(|a| (a.name.clone().unwrap_or_default(), a.clone()))
                .collect();
            for a in &n.attribute {
                attrs.insert(a.name.clone().unwrap_or_default(), a.clone());
            }
            let mut body = Vec::new();
            for fnode in &f.node {
                let mut c = fnode.clone();
                let map = |s: &String| -> String {
                    if s.is_empty() {
                        return String::new();
                    }
                    rename.get(s).cloned().unwrap_or_else(|| format!("{prefix}{s}"))
                };
                c.input = c.input.iter().map(map).collect();
                c.output = c.output.iter().map(map).collect();
                c.name = Some(format!("{prefix}{}", c.name.clone().unwrap_or_default()));
                let mut new_attrs = Vec::new();
                for a in &c.attribute {
                    match a.ref_attr_name.as_deref() {
                        Some(r) if !r.is_empty() => {
                            if let Some(v) = attrs.get(r) {
                                let mut v = v.clone();
                                v.name = a.name.clone();
                                new_attrs.push(v);
                            }
                        }
                        _ => new_attrs.push(a.clone()),
                    }
                }
                c.attribute = new_attrs;
                body.push(c);
            }
            out.extend(self.expand_functions(&body, depth + 1)?);
            crate::LoadLimits::check(
                "the node count (all graphs, functions inlined)",
                (self.nodes.get() as u128).saturating_add(out.len() as u128),
                self.source.limits.max_nodes,
                "max_nodes",
            )?;
        }
        Ok(out)
    }
}

fn guess_type(a: &proto::AttributeProto) -> proto::attribute_proto::AttributeType {
    use proto::attribute_proto::AttributeType as T;
    if a.f.is_some() {
        T::Float
    } else if a.i.is_some() {
        T::Int
    } else if a.s.is_some() {
        T::String
    } else if a.t.is_some() {
        T::Tensor
    } else if a.g.is_some() {
        T::Graph
    } else if !a.floats.is_empty() {
        T::Floats
    } else if !a.ints.is_empty() {
        T::Ints
    } else if !a.strings.is_empty() {
        T::Strings
    } else if !a.tensors.is_empty() {
        T::Tensors
    } else if !a.graphs.is_empty() {
        T::Graphs
    } else {
        T::Undefined
    }
}

fn densify(sp: &proto::SparseTensorProto, source: &ModelSource) -> Result<kiln_graph::TensorData> {
    let values = sp
        .values
        .as_ref()
        .ok_or_else(|| OnnxError::Unsupported("sparse tensor without values".into()))?;
    let values = tensor_from_proto(values, source)?;
    let indices = sp
        .indices
        .as_ref()
        .ok_or_else(|| OnnxError::Unsupported("sparse tensor without indices".into()))?;
    let indices = tensor_from_proto(indices, source)?;
    let idx = indices
        .to_i64_vec()
        .ok_or_else(|| OnnxError::Unsupported("sparse indices must be integers".into()))?;
    let dims: Vec<usize> = sp.dims.iter().map(|&d| d.max(0) as usize).collect();
    let total: usize = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX);
    let es = values.dtype.size_in_bytes();
    if total > (1 << 28) || es == 0 {
        return Err(OnnxError::Unsupported("sparse tensor too large or of strings".into()));
    }
    let nnz = values.len();
    let rank = dims.len();
    let mut out = vec![0u8; total * es];
    for k in 0..nnz {
        let flat = if indices.dims.len() == 1 {
            idx.get(k).copied().unwrap_or(-1)
        } else {
            let mut f = 0i64;
            for (r, &d) in dims.iter().enumerate() {
                f = f * d as i64 + idx.get(k * rank + r).copied().unwrap_or(-1);
            }
            f
        };
        if flat < 0 || flat as usize >= total {
            return Err(OnnxError::Unsupported("sparse index out of range".into()));
        }
        let f = flat as usize;
        out[f * es..(f + 1) * es].copy_from_slice(&values.bytes()[k * es..(k + 1) * es]);
    }
    Ok(kiln_graph::TensorData::new(
        values.name.clone(),
        values.dtype,
        dims,
        out,
    )?)
}

fn value_info(vi: &proto::ValueInfoProto) -> Result<ValueInfo> {
    let name = vi.name.clone().unwrap_or_default();
    let (kind, dtype, shape) = match &vi.r#type {
        Some(tp) => type_of(tp),
        None => (ValueKind::Unknown, None, None),
    };
    Ok(ValueInfo {
        name,
        kind,
        dtype,
        shape,
    })
}

fn type_of(tp: &proto::TypeProto) -> (ValueKind, Option<DType>, Option<Shape>) {
    use proto::type_proto::Value as V;
    match &tp.value {
        Some(V::TensorType(t)) => {
            let dtype = t.elem_type.and_then(DType::from_onnx);
            let shape = t.shape.as_ref().map(|s| {
                Shape(
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                                Dim::Known(*v as usize)
                            }
                            Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                                Dim::Sym(p.clone())
                            }
                            _ => Dim::Unknown,
                        })
                        .collect(),
                )
            });
            (ValueKind::Tensor, dtype, shape)
        }
        Some(V::SequenceType(s)) => {
            let elem = s.elem_type.as_ref().map(|e| type_of(e).1).unwrap_or(None);
            (ValueKind::Sequence, elem, None)
        }
        Some(V::OptionalType(o)) => {
            let elem = o.elem_type.as_ref().map(|e| type_of(e).1).unwrap_or(None);
            (ValueKind::Optional, elem, None)
        }
        Some(V::MapType(_)) => (ValueKind::Map, None, None),
        _ => (ValueKind::Unknown, None, None),
    }
}
