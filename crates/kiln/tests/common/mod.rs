//! Tiny ONNX model builder for tests (prost types; no Python needed).
#![allow(dead_code)]

pub mod refs;

use kiln::internals::onnx::proto;
use prost::Message;

pub fn tensor_type(elem: i32, dims: &[i64]) -> proto::TypeProto {
    proto::TypeProto {
        value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
            elem_type: Some(elem),
            shape: Some(proto::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| proto::tensor_shape_proto::Dimension {
                        value: Some(if d < 0 {
                            proto::tensor_shape_proto::dimension::Value::DimParam("N".into())
                        } else {
                            proto::tensor_shape_proto::dimension::Value::DimValue(d)
                        }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

pub fn value(name: &str, elem: i32, dims: &[i64]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(tensor_type(elem, dims)),
        ..Default::default()
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        data_type: Some(1),
        dims: dims.to_vec(),
        float_data: values.to_vec(),
        ..Default::default()
    }
}

pub fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        data_type: Some(7),
        dims: dims.to_vec(),
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

pub fn model(
    nodes: Vec<proto::NodeProto>,
    inputs: Vec<proto::ValueInfoProto>,
    outputs: Vec<proto::ValueInfoProto>,
    initializers: Vec<proto::TensorProto>,
) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            name: Some("test".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: initializers,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn bytes(m: &proto::ModelProto) -> Vec<u8> {
    m.encode_to_vec()
}

/// y = Relu(x + b) * 2 with x: [N, 4] f32 and b: [4].
pub fn small_model() -> proto::ModelProto {
    model(
        vec![
            node("Add", "add", &["x", "b"], &["s"]),
            node("Relu", "relu", &["s"], &["r"]),
            node("Mul", "mul", &["r", "two"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 4])],
        vec![value("y", 1, &[-1, 4])],
        vec![
            f32_tensor("b", &[4], &[0.5, -1.0, 0.0, 2.0]),
            f32_tensor("two", &[], &[2.0]),
        ],
    )
}

/// Reference output of `small_model` for one row.
pub fn small_model_ref(x: &[f32]) -> Vec<f32> {
    let b = [0.5, -1.0, 0.0, 2.0];
    x.iter()
        .enumerate()
        .map(|(i, v)| (v + b[i % 4]).max(0.0) * 2.0)
        .collect()
}
