use std::path::{Path, PathBuf};

use prost::Message;

use crate::{import_model, proto, OnnxError, Result};

/// Where a model came from; external tensor data is resolved relative to `base_dir`.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    pub base_dir: Option<PathBuf>,
    /// Bounds checked while loading.
    pub limits: LoadLimits,
}

/// Bounds on what loading a model may cost, checked before the work they bound (a file's size
/// before reading it, a tensor's declared size before allocating it). The defaults admit any
/// model protobuf can encode whose single tensors fit in 16 GiB; a server taking models from
/// elsewhere sets tighter ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// Largest model file (the protobuf itself; external data files are bounded per tensor).
    /// Default 2 GiB, protobuf's own limit for one message.
    pub max_file_bytes: u64,
    /// Most nodes over all graphs, subgraph bodies and inlined functions included. Default 1M.
    pub max_nodes: u64,
    /// Deepest nesting of subgraphs (If/Loop/Scan bodies) and model-local function calls.
    /// Default 32.
    pub max_nesting: u64,
    /// Largest initializer or constant tensor by its declared dims and dtype, inline or external.
    /// Default 16 GiB.
    pub max_tensor_bytes: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_file_bytes: 2 << 30,
            max_nodes: 1_000_000,
            max_nesting: 32,
            max_tensor_bytes: 16 << 30,
        }
    }
}

impl LoadLimits {
    /// `Err(Limit)` when `value > limit`.
    pub(crate) fn check(what: impl Into<String>, value: u128, limit: u64, field: &'static str) -> Result<()> {
        if value > u128::from(limit) {
            return Err(OnnxError::Limit {
                what: what.into(),
                value,
                limit,
                field,
            });
        }
        Ok(())
    }
}

/// Reads, decodes and imports an ONNX model file into Kiln IR.
pub fn load_model(path: impl AsRef<Path>) -> Result<kiln_graph::Model> {
    load_model_with(path, &LoadLimits::default())
}

/// [`load_model`] within `limits`.
pub fn load_model_with(path: impl AsRef<Path>, limits: &LoadLimits) -> Result<kiln_graph::Model> {
    let path = path.as_ref();
    let io = |cause| OnnxError::Io {
        path: path.display().to_string(),
        cause,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    LoadLimits::check(
        "the model file size in bytes",
        size.into(),
        limits.max_file_bytes,
        "max_file_bytes",
    )?;
    let bytes = std::fs::read(path).map_err(io)?;
    let base_dir = path
        .parent()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let source = ModelSource {
        base_dir: base_dir.map(Path::to_path_buf),
        limits: *limits,
    };
    let model = decode_model(&bytes)?;
    import_model(&model, &source)
}

/// Decodes and imports a model from bytes. External data is refused (there is no directory).
pub fn load_model_bytes(bytes: &[u8]) -> Result<kiln_graph::Model> {
    load_model_bytes_with(bytes, &LoadLimits::default())
}

/// [`load_model_bytes`] within `limits`.
pub fn load_model_bytes_with(bytes: &[u8], limits: &LoadLimits) -> Result<kiln_graph::Model> {
    LoadLimits::check(
        "the model size in bytes",
        bytes.len() as u128,
        limits.max_file_bytes,
        "max_file_bytes",
    )?;
    let model = decode_model(bytes)?;
    let source = ModelSource {
        base_dir: None,
        limits: *limits,
    };
    import_model(&model, &source)
}

/// Decodes a `ModelProto`, with a clear error for garbage and truncated files.
pub fn decode_model(bytes: &[u8]) -> Result<proto::ModelProto> {
    if bytes.is_empty() {
        return Err(OnnxError::Unsupported("the model file is empty".into()));
    }
    proto::ModelProto::decode(bytes).map_err(|cause| OnnxError::Decode {
        what: "ModelProto",
        cause,
    })
}
