use std::path::Path;

use kiln_graph::TensorData;
use prost::Message;

use crate::{proto, tensor_from_proto, ModelSource, OnnxError, Result};

/// A value stored in an ONNX test-data file: a tensor, a sequence or an optional.
#[derive(Debug, Clone, PartialEq)]
pub enum DataValue {
    Tensor(TensorData),
    Sequence(Vec<DataValue>),
    Optional(Option<Box<DataValue>>),
}

/// Reads a `.pb` file written by ONNX's test-data writer as the given kind.
pub fn read_value_file(path: &Path, kind: &str) -> Result<DataValue> {
    let bytes = std::fs::read(path).map_err(|cause| OnnxError::Io {
        path: path.display().to_string(),
        cause,
    })?;
    let src = ModelSource::default();
    match kind {
        "tensor" => {
            let t = proto::TensorProto::decode(bytes.as_slice()).map_err(|cause| OnnxError::Decode {
                what: "TensorProto",
                cause,
            })?;
            Ok(DataValue::Tensor(tensor_from_proto(&t, &src)?))
        }
        "sequence" => {
            let s = proto::SequenceProto::decode(bytes.as_slice()).map_err(|cause| OnnxError::Decode {
                what: "SequenceProto",
                cause,
            })?;
            sequence(&s, &src)
        }
        "optional" => {
            let o = proto::OptionalProto::decode(bytes.as_slice()).map_err(|cause| OnnxError::Decode {
                what: "OptionalProto",
                cause,
            })?;
            optional(&o, &src)
        }
        other => Err(OnnxError::Unsupported(format!("test value kind '{other}'"))),
    }
}

fn sequence(s: &proto::SequenceProto, src: &ModelSource) -> Result<DataValue> {
    let mut items = Vec::new();
    for t in &s.tensor_values {
        items.push(DataValue::Tensor(tensor_from_proto(t, src)?));
    }
    for q in &s.sequence_values {
        items.push(sequence(q, src)?);
    }
    for o in &s.optional_values {
        items.push(optional(o, src)?);
    }
    if !s.map_values.is_empty() || !s.sparse_tensor_values.is_empty() {
        return Err(OnnxError::Unsupported("sequences of maps or sparse tensors".into()));
    }
    Ok(DataValue::Sequence(items))
}

fn optional(o: &proto::OptionalProto, src: &ModelSource) -> Result<DataValue> {
    if let Some(t) = &o.tensor_value {
        return Ok(DataValue::Optional(Some(Box::new(DataValue::Tensor(
            tensor_from_proto(t, src)?,
        )))));
    }
    if let Some(s) = &o.sequence_value {
        return Ok(DataValue::Optional(Some(Box::new(sequence(s, src)?))));
    }
    if let Some(inner) = &o.optional_value {
        return Ok(DataValue::Optional(Some(Box::new(optional(inner, src)?))));
    }
    Ok(DataValue::Optional(None))
}
