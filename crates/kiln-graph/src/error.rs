use thiserror::Error;

/// Errors raised while building, checking or transforming a graph.
#[derive(Debug, Error)]
pub enum GraphError {
    #[error("graph '{graph}': value '{value}' is used by node '{node}' ({op}) but nothing produces it")]
    DanglingInput {
        graph: String,
        node: String,
        op: String,
        value: String,
    },
    #[error("graph '{graph}': the nodes form a cycle through node '{node}' ({op})")]
    Cycle { graph: String, node: String, op: String },
    #[error("graph '{graph}': value '{value}' is produced more than once")]
    DuplicateProducer { graph: String, value: String },
    #[error("graph output '{0}' is never produced")]
    MissingOutput(String),
    #[error("tensor '{name}': {reason}")]
    BadTensor { name: String, reason: String },
    #[error("node '{node}' ({op}): {reason}")]
    BadNode { node: String, op: String, reason: String },
    #[error("pass '{pass}': {reason}")]
    Pass { pass: String, reason: String },
}

pub type Result<T> = std::result::Result<T, GraphError>;
