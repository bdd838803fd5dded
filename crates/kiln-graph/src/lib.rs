//! Kiln's typed intermediate representation.
//!
//! The ONNX importer (`kiln-onnx`) produces a [`Model`]; the runtime compiles it into an
//! execution plan. Nothing here knows about protobuf, candle or devices.

mod dtype;
mod error;
mod graph;
pub mod infer;
pub mod passes;
mod shape;
mod tensor;

pub use dtype::DType;
pub use error::{GraphError, Result};
pub use graph::{Attribute, Graph, Model, Node, ValueId, ValueInfo, ValueKind};
pub use shape::{Dim, Shape};
pub use tensor::{Element, TensorData};
