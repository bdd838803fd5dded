use std::path::{Path, PathBuf};

use prost::Message;

use crate::{import_model, proto, OnnxError, Result};

/// Where a model came from; external tensor data is resolved relative to `base_dir`.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    pub base_dir: Option<PathBuf>,
}

/// Reads, decodes and imports an ONNX model file into Kiln IR.
pub fn load_model(path: impl AsRef<Path>) -> Result<kiln_graph::Model> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|cause| OnnxError::Io {
        path: path.display().to_string(),
        cause,
    })?;
    let base_dir = path
        .parent()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let source = ModelSource {
        base_dir: base_dir.map(Path::to_path_buf),
    };
    let model = decode_model(&bytes)?;
    import_model(&model, &source)
}

/// Decodes and imports a model from bytes. External data is refused (there is no directory).
pub fn load_model_bytes(bytes: &[u8]) -> Result<kiln_graph::Model> {
    let model = decode_model(bytes)?;
    import_model(&model, &ModelSource::default())
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
