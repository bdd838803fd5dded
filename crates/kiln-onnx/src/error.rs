use thiserror::Error;

/// Errors raised while reading or importing an ONNX model.
#[derive(Debug, Error)]
pub enum OnnxError {
    #[error("cannot read '{path}': {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("not a valid ONNX protobuf ({what}): {cause}")]
    Decode {
        what: &'static str,
        cause: prost::DecodeError,
    },
    #[error("the model has no graph")]
    NoGraph,
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    #[error("tensor '{name}': external data location '{location}' {reason}")]
    ExternalData {
        name: String,
        location: String,
        reason: String,
    },
    #[error("node '{node}' ({op}): attribute '{attr}': {reason}")]
    Attribute {
        node: String,
        op: String,
        attr: String,
        reason: String,
    },
    #[error("value '{name}': {reason}")]
    Value { name: String, reason: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The model is over one of the [`crate::LoadLimits`].
    #[error("the model exceeds a load limit: {what} is {value}, the limit is {limit} (LoadLimits::{field})")]
    Limit {
        what: String,
        value: u128,
        limit: u64,
        field: &'static str,
    },
    #[error(transparent)]
    Graph(#[from] kiln_graph::GraphError),
}

pub type Result<T> = std::result::Result<T, OnnxError>;
