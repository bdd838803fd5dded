//! `kiln serve`: a model server over Kiln sessions.
//!
//! - [`ModelManager`] owns the model repository (`<repo>/<model>/config.toml`,
//!   `<repo>/<model>/<n>/model.onnx`), loads versions by policy, hot-swaps new ones, and is the
//!   protocol-independent inference entry point ([`InferRequest`] -> [`InferResponse`]).
//! - [`batcher::DynamicBatcher`] queues requests per version (bounded) and runs them, batched
//!   along dim 0, on dedicated OS threads, one per model instance.
//! - [`protocols`] converts KServe v2 HTTP and gRPC and TF-Serving REST and gRPC to and from the core.
//! - [`Server`] binds the ports and shuts down gracefully.

pub mod auth;
pub mod batcher;
pub mod cache;
pub mod config;
mod error;
mod gpu_metrics;
mod infer;
pub mod llm;
pub mod manager;
pub mod metrics;
pub mod protocols;
pub mod repository;
mod server;
pub mod tls;

pub use auth::ControlToken;
pub use config::ModelConfig;
pub use error::{ErrorKind, Result, ServeError};
pub use infer::{InferRequest, InferResponse};
pub use manager::ModelManager;
pub use metrics::Metrics;
pub use server::{Server, ServerConfig};
pub use tls::TlsConfig;

/// Types and client/server stubs generated from `proto/grpc_service.proto` (package `inference`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

/// Types and client/server stubs generated from `proto/tensorflow_serving/apis/` (TensorFlow
/// Serving's `PredictionService` and `ModelService`) and the `tensorflow` messages they carry.
pub mod tf_proto {
    #![allow(clippy::all, missing_docs)]
    /// Package `tensorflow`: `TensorProto`, `TensorShapeProto`, `DataType`, `SignatureDef`.
    pub mod tensorflow {
        tonic::include_proto!("tensorflow");
        /// Package `tensorflow.error`: canonical error codes.
        pub mod error {
            tonic::include_proto!("tensorflow.error");
        }
        /// Package `tensorflow.serving`: the services and their messages.
        pub mod serving {
            tonic::include_proto!("tensorflow.serving");
        }
    }
}
