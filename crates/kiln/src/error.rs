use thiserror::Error;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Onnx(#[from] kiln_onnx::OnnxError),
    #[error(transparent)]
    Graph(#[from] kiln_graph::GraphError),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::RuntimeError),
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// `Result` with Kiln's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
