use thiserror::Error;

/// Errors raised while compiling or running a plan.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("node '{node}' ({op}): {reason}")]
    Op { node: String, op: String, reason: String },
    #[error("unsupported operators: {}", list.join(", "))]
    Unsupported {
        /// Entries formatted as `domain::Op (node 'name')`.
        list: Vec<String>,
    },
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// The run passed [`crate::RunOptions::deadline`]; checked before every kernel (and between
    /// the steps of long-running ones).
    #[error("the run passed its deadline (at node '{node}')")]
    DeadlineExceeded { node: String },
    #[error("tensor of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { bytes: u128, limit: u64 },
    #[error("Kiln was built without CUDA support (rebuild with `--features cuda`)")]
    NotCompiledWithCuda,
    #[error("device error: {0}")]
    Device(String),
    /// The device (or its memory pool's limit) ran out of memory during a run; the run's tensors went
    /// back to the pool and the session can run again (with a smaller batch, or a higher limit).
    #[error("node '{node}': device out of memory ({message})")]
    DeviceOutOfMemory { node: String, message: String },
    /// A kernel (or code around it) panicked: a bug in Kiln, caught at the node so the run fails
    /// with this error and the session, its threads and the process carry on. `node`/`op` are
    /// empty when the panic came from outside any kernel.
    #[error("internal error in node '{node}' ({op}): {message}")]
    Internal { node: String, op: String, message: String },
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Graph(#[from] kiln_graph::GraphError),
}

impl RuntimeError {
    /// Wraps an error with the node that raised it (keeps the original message).
    pub fn at_node(self, node: &str, op: &str) -> Self {
        match self {
            RuntimeError::DeadlineExceeded { node: n } if n.is_empty() => {
                RuntimeError::DeadlineExceeded { node: node.to_string() }
            }
            RuntimeError::Candle(e) if crate::device_memory::is_out_of_memory(&candle_message(&e)) => {
                RuntimeError::DeviceOutOfMemory {
                    node: node.to_string(),
                    message: candle_message(&e),
                }
            }
            e @ (RuntimeError::Op { .. }
            | RuntimeError::Internal { .. }
            | RuntimeError::TooLarge { .. }
            | RuntimeError::DeadlineExceeded { .. }
            | RuntimeError::DeviceOutOfMemory { .. }) => e,
            other => RuntimeError::Op {
                node: node.to_string(),
                op: op.to_string(),
                reason: other.to_string(),
            },
        }
    }

    /// The error for a panic caught while running `node` (see [`catch_panic`]).
    pub fn from_panic(node: &str, op: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        RuntimeError::Internal {
            node: node.to_string(),
            op: op.to_string(),
            message: panic_message(payload),
        }
    }

    pub fn msg(s: impl Into<String>) -> Self {
        RuntimeError::Invalid(s.into())
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

/// candle appends a captured backtrace to some error messages; keep the message only.
pub(crate) fn candle_message(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let cut = s.find('\n').or_else(|| s.find("    0: ")).unwrap_or(s.len());
    s[..cut].trim_end().to_string()
}

/// `return Err(RuntimeError::Invalid(format!(..)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::RuntimeError::Invalid(format!($($arg)*))) };
}

/// The text of a panic payload (`panic!("..")` carries a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked (no message)".to_string()
    }
}

/// Runs `f`, turning a panic inside it (a kernel bug, or one rayon re-raised from a worker
/// thread) into [`RuntimeError::Internal`] naming `node` and `op`. Kernels only read their inputs
/// and build new values, so nothing they share is left half-updated when one unwinds.
pub fn catch_panic<T>(node: &str, op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            tracing::error!(node, op, "kernel panicked: {}", panic_message(payload.as_ref()));
            Err(RuntimeError::from_panic(node, op, payload.as_ref()))
        }
    }
}
