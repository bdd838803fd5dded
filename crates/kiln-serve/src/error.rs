use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// What kind of failure an error is; each protocol maps it to its own status code
/// (HTTP 400/404/503/504/500, gRPC INVALID_ARGUMENT/NOT_FOUND/UNAVAILABLE/...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (malformed, wrong dtype/shape, unknown input).
    InvalidInput,
    /// No such model or version.
    NotFound,
    /// The server cannot take the request now (queue full, model not ready, shutting down).
    Unavailable,
    /// The request's deadline passed before it ran.
    Timeout,
    /// The model failed while running, or the server itself failed.
    Internal,
}

/// Everything that can go wrong in the server.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("unknown model '{0}'")]
    ModelNotFound(String),
    #[error("model '{model}' has no version {version} being served")]
    VersionNotFound { model: String, version: u64 },
    #[error("model '{model}' is not ready: {reason}")]
    NotReady { model: String, reason: String },
    #[error("model '{model}' version {version}: the request queue is full ({size} requests waiting)")]
    QueueFull { model: String, version: u64, size: usize },
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("model '{model}' version {version}: inference failed: {reason}")]
    Execution {
        model: String,
        version: u64,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("loading model '{model}' version {version}: {reason}")]
    Load {
        model: String,
        version: u64,
        reason: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server task failed: {0}")]
    Server(String),
}

impl ServeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ServeError::InvalidInput(_) => ErrorKind::InvalidInput,
            ServeError::ModelNotFound(_) | ServeError::VersionNotFound { .. } => ErrorKind::NotFound,
            ServeError::NotReady { .. } | ServeError::QueueFull { .. } | ServeError::ShuttingDown => {
                ErrorKind::Unavailable
            }
            ServeError::Timeout(_) => ErrorKind::Timeout,
            ServeError::Execution { .. }
            | ServeError::Config { .. }
            | ServeError::Load { .. }
            | ServeError::Io { .. }
            | ServeError::Bind { .. }
            | ServeError::Server(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        ServeError::InvalidInput(msg.into())
    }
}

/// `Result` with [`ServeError`].
pub type Result<T> = std::result::Result<T, ServeError>;
