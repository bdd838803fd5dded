//! Kiln IR -> `ModelProto`: the inverse of the importer, used to write optimized models.
//!
//! Initializers are written with `raw_data`; values with a known dtype and shape get a
//! `value_info`; attributes (subgraphs included: a body reads outer values by name) map back to
//! their proto form; a `com.microsoft` opset import is added when a fused node needs it.

use std::collections::{BTreeMap, HashSet};

use kiln_graph::{Attribute, Dim, Graph, Model, Shape, ValueId, ValueInfo, ValueKind};
use prost::Message;

use crate::{proto, tensor_to_proto, OnnxError, Result};

/// Lowest IR version written (IR 7 lets initializers stay out of the input list).
const MIN_IR_VERSION: i64 = 7;

/// Converts a model to a `ModelProto`.
pub fn export_model(model: &Model) -> Result<proto::ModelProto> {
    let mut opsets = model.opsets.clone();
    let mut domains = HashSet::new();
    model.graph.for_each_graph(&mut |g| {
        for n in &g.nodes {
            domains.insert(n.domain.clone());
        }
    });
    for d in domains {
        opsets.entry(d).or_insert(1);
    }
    let opset_import = opsets
        .iter()
        .map(|(d, v)| proto::OperatorSetIdProto {
            domain: Some(d.clone()),
            version: Some(*v),
        })
        .collect();
    Ok(proto::ModelProto {
        ir_version: Some(model.ir_version.max(MIN_IR_VERSION)),
        opset_import,
        producer_name: Some(if model.producer.is_empty() {
            "kiln".to_string()
        } else {
            model.producer.clone()
        }),
        graph: Some(graph_to_proto(&model.graph)?),
        ..Default::default()
    })
}

/// Serializes a model to ONNX bytes.
pub fn export_model_bytes(model: &Model) -> Result<Vec<u8>> {
    Ok(export_model(model)?.encode_to_vec())
}

/// Converts one graph (and its nested bodies).
pub fn graph_to_proto(g: &Graph) -> Result<proto::GraphProto> {
    let order = g.topological_order()?;
    let name = |v: Option<ValueId>| v.map(|v| g.value_name(v).to_string()).unwrap_or_default();
    let mut node = Vec::with_capacity(order.len());
    let mut used: HashSet<ValueId> = HashSet::new();
    for i in order {
        let n = g
            .nodes
            .get(i)
            .ok_or_else(|| OnnxError::Unsupported("node index out of range".into()))?;
        let mut attribute = Vec::with_capacity(n.attributes.len());
        for (k, a) in &n.attributes {
            attribute.push(attribute_to_proto(k, a)?);
        }
        used.extend(n.inputs.iter().flatten().copied());
        used.extend(n.outputs.iter().flatten().copied());
        node.push(proto::NodeProto {
            name: Some(n.name.clone()),
            op_type: Some(n.op_type.clone()),
            domain: Some(n.domain.clone()),
            input: n.inputs.iter().map(|v| name(*v)).collect(),
            output: n.outputs.iter().map(|v| name(*v)).collect(),
            attribute,
            ..Default::default()
        });
    }
    let io: HashSet<ValueId> = g.inputs.iter().chain(&g.outputs).chain(&g.captures).copied().collect();
    let infos: Vec<proto::ValueInfoProto> = (0..g.values.len() as u32)
        .map(ValueId)
        .filter(|v| used.contains(v) && !io.contains(v) && !g.initializers.contains_key(v))
        .filter(|v| g.value(*v).dtype.is_some() && g.value(*v).shape.is_some())
        .map(|v| value_info(g.value(v)))
        .collect();
    Ok(proto::GraphProto {
        name: Some(g.name.clone()),
        node,
        initializer: g.initializers.values().map(tensor_to_proto).collect(),
        input: g.inputs.iter().map(|v| value_info(g.value(*v))).collect(),
        output: g.outputs.iter().map(|v| value_info(g.value(*v))).collect(),
        value_info: infos,
        ..Default::default()
    })
}

fn shape_proto(s: &Shape) -> proto::TensorShapeProto {
    use proto::tensor_shape_proto::{dimension::Value as D, Dimension};
    proto::TensorShapeProto {
        dim: s
            .0
            .iter()
            .map(|d| Dimension {
                value: match d {
                    Dim::Known(n) => Some(D::DimValue(*n as i64)),
                    Dim::Sym(p) => Some(D::DimParam(p.clone())),
                    Dim::Unknown => None,
                },
                ..Default::default()
            })
            .collect(),
    }
}

fn type_proto(kind: ValueKind, dtype: Option<kiln_graph::DType>, shape: Option<&Shape>) -> proto::TypeProto {
    use proto::type_proto::{Optional, Sequence, Tensor, Value as V};
    let tensor = |shape: Option<&Shape>| {
        V::TensorType(Tensor {
            elem_type: dtype.map(|d| d.to_onnx()),
            shape: shape.map(shape_proto),
        })
    };
    let boxed = |v: V| {
        Some(Box::new(proto::TypeProto {
            value: Some(v),
            ..Default::default()
        }))
    };
    let value = match kind {
        ValueKind::Sequence => V::SequenceType(Box::new(Sequence {
            elem_type: boxed(tensor(None)),
        })),
        ValueKind::Optional => V::OptionalType(Box::new(Optional {
            elem_type: boxed(tensor(None)),
        })),
        ValueKind::Map => V::MapType(Box::default()),
        ValueKind::Tensor | ValueKind::Unknown => tensor(shape),
    };
    proto::TypeProto {
        value: Some(value),
        ..Default::default()
    }
}

fn value_info(v: &ValueInfo) -> proto::ValueInfoProto {
    let known = v.dtype.is_some() || v.kind != ValueKind::Unknown;
    proto::ValueInfoProto {
        name: Some(v.name.clone()),
        r#type: known.then(|| type_proto(v.kind, v.dtype, v.shape.as_ref())),
        ..Default::default()
    }
}

fn attribute_to_proto(name: &str, a: &Attribute) -> Result<proto::AttributeProto> {
    use proto::attribute_proto::AttributeType as T;
    let mut p = proto::AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let ty = match a {
        Attribute::Float(f) => {
            p.f = Some(*f);
            T::Float
        }
        Attribute::Int(i) => {
            p.i = Some(*i);
            T::Int
        }
        Attribute::String(s) => {
            p.s = Some(s.clone());
            T::String
        }
        Attribute::Tensor(t) => {
            p.t = Some(tensor_to_proto(t));
            T::Tensor
        }
        Attribute::Graph(g) => {
            p.g = Some(graph_to_proto(g)?);
            T::Graph
        }
        Attribute::Floats(v) => {
            p.floats = v.clone();
            T::Floats
        }
        Attribute::Ints(v) => {
            p.ints = v.clone();
            T::Ints
        }
        Attribute::Strings(v) => {
            p.strings = v.clone();
            T::Strings
        }
        Attribute::Tensors(v) => {
            p.tensors = v.iter().map(tensor_to_proto).collect();
            T::Tensors
        }
        Attribute::Graphs(v) => {
            p.graphs = v.iter().map(|g| graph_to_proto(g)).collect::<Result<_>>()?;
            T::Graphs
        }
        Attribute::Type(kind, dtype) => {
            p.tp = Some(type_proto(*kind, *dtype, None));
            T::TypeProto
        }
    };
    p.r#type = Some(ty as i32);
    Ok(p)
}

/// Node counts by `domain::op` (default domain written bare), for reports.
pub fn op_counts(g: &Graph) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in &g.nodes {
        let k = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}
