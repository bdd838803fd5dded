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
    /// Static quantization could not measure activation ranges (no samples, unknown tensor).
    #[error("calibration: {0}")]
    Calibration(String),
    /// A panic (a bug in Kiln) outside any kernel, while building a session (a graph pass) or
    /// around a run; caught so the caller's thread carries on. Panics inside a kernel are
    /// [`kiln_runtime::RuntimeError::Internal`], naming the node.
    #[error("internal error while {stage}: {message}")]
    Internal { stage: &'static str, message: String },
}

/// `Result` with Kiln's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Runs `f`, turning a panic into [`Error::Internal`] for `stage`.
pub(crate) fn catch_panic<T>(stage: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = kiln_runtime::panic_message(payload.as_ref());
        tracing::error!(stage, "{message}");
        Err(Error::Internal { stage, message })
    })
}
