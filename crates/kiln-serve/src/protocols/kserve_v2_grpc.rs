//! KServe v2 over gRPC (`inference.GRPCInferenceService`), including `raw_input_contents` /
//! `raw_output_contents` and Triton's repository RPCs.

use std::sync::Arc;

use kiln::DType;
use tonic::{Request, Response, Status};

use super::{dims_from_wire, metadata_shape, parse_datatype, tensor_from_raw, tensor_to_raw, wire_name};
use crate::error::{ErrorKind, ServeError};
use crate::infer::InferRequest;
use crate::manager::{ModelManager, VersionState};
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::{
    model_infer_response, model_metadata_response, repository_index_response, InferTensorContents, ModelInferRequest,
    ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest, RepositoryModelLoadResponse,
    RepositoryModelUnloadRequest, RepositoryModelUnloadResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};

pub use crate::proto::grpc_inference_service_server::GrpcInferenceServiceServer;

/// The gRPC service over a [`ModelManager`].
pub struct KServeGrpc {
    manager: Arc<ModelManager>,
    control_token: Option<crate::auth::ControlToken>,
}

impl KServeGrpc {
    pub fn new(manager: Arc<ModelManager>) -> Self {
        KServeGrpc {
            manager,
            control_token: None,
        }
    }

    /// Repository load/unload then need `authorization: Bearer <token>` metadata.
    pub fn with_control_token(mut self, token: Option<crate::auth::ControlToken>) -> Self {
        self.control_token = token;
        self
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let presented = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if crate::auth::allowed(self.control_token.as_ref(), presented) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "repository control needs 'authorization: Bearer <token>' metadata (the server's --control-token)",
            ))
        }
    }
}

/// The gRPC status for a server error.
pub fn status_of(e: ServeError) -> Status {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::InvalidInput => Status::invalid_argument(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::Unavailable => Status::unavailable(msg),
        ErrorKind::Timeout => Status::deadline_exceeded(msg),
        ErrorKind::Internal => Status::internal(msg),
    }
}

fn version_of(v: &str) -> Result<Option<u64>, Status> {
    if v.is_empty() {
        return Ok(None);
    }
    super::parse_version(v).map(Some).map_err(status_of)
}

fn bad(msg: String) -> Status {
    Status::invalid_argument(msg)
}

/// Builds one input from typed `contents` (FP16/BF16 need raw contents).
fn tensor_from_contents(
    name: &str,
    dtype: DType,
    dims: Vec<usize>,
    c: &InferTensorContents,
) -> Result<kiln::TensorData, ServeError> {
    let mut bytes: Vec<u8> = Vec::new();
    let range = |name: &str, v: i64, lo: i64, hi: i64| -> Result<i64, ServeError> {
        if v < lo || v > hi {
            Err(ServeError::invalid(format!(
                "input '{name}': {v} is out of range for {}",
                wire_name(dtype)
            )))
        } else {
            Ok(v)
        }
    };
    match dtype {
        DType::Bool => bytes.extend(c.bool_contents.iter().map(|&b| u8::from(b))),
        DType::I8 => {
            for &v in &c.int_contents {
                bytes.extend((range(name, v.into(), i8::MIN.into(), i8::MAX.into())? as i8).to_le_bytes());
            }
        }
        DType::I16 => {
            for &v in &c.int_contents {
                bytes.extend((range(name, v.into(), i16::MIN.into(), i16::MAX.into())? as i16).to_le_bytes());
            }
        }
        DType::I32 => c.int_contents.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        DType::I64 => c.int64_contents.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        DType::U8 => {
            for &v in &c.uint_contents {
                bytes.extend((range(name, v.into(), 0, u8::MAX.into())? as u8).to_le_bytes());
            }
        }
        DType::U16 => {
            for &v in &c.uint_contents {
                bytes.extend((range(name, v.into(), 0, u16::MAX.into())? as u16).to_le_bytes());
            }
        }
        DType::U32 => c.uint_contents.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        DType::U64 => c.uint64_contents.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        DType::F32 => c.fp32_contents.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        DType::F64 => c.fp64_contents.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
        DType::String => {
            let count = super::element_count(name, &dims)?;
            if c.bytes_contents.len() != count {
                return Err(ServeError::invalid(format!(
                    "input '{name}': shape {dims:?} needs {count} elements, the contents have {}",
                    c.bytes_contents.len()
                )));
            }
            return kiln::TensorData::strings(name, dims, c.bytes_contents.clone())
                .map_err(|e| ServeError::invalid(e.to_string()));
        }
        other => {
            return Err(ServeError::invalid(format!(
                "input '{name}': {} data must be sent as raw_input_contents",
                wire_name(other)
            )))
        }
    }
    // Element counts are checked by the byte length against the shape.
    tensor_from_raw(name, dtype, dims, &bytes)
}

/// Converts a `ModelInferRequest` (typed `contents` or `raw_input_contents`) to the core request.
/// Public for the decoder fuzz tests.
#[doc(hidden)]
pub fn to_infer_request(r: ModelInferRequest) -> Result<InferRequest, Status> {
    let version = version_of(&r.model_version)?;
    let raw = !r.raw_input_contents.is_empty();
    if raw && r.raw_input_contents.len() != r.inputs.len() {
        return Err(bad(format!(
            "{} inputs but {} raw_input_contents entries",
            r.inputs.len(),
            r.raw_input_contents.len()
        )));
    }
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for (i, input) in r.inputs.iter().enumerate() {
        let dtype = parse_datatype(&input.datatype).map_err(status_of)?;
        let dims = dims_from_wire(&input.name, &input.shape).map_err(status_of)?;
        let t = match (raw, &input.contents) {
            (true, Some(_)) => {
                return Err(bad(format!(
                    "input '{}': contents and raw_input_contents are both set",
                    input.name
                )))
            }
            (true, None) => {
                let bytes = r
                    .raw_input_contents
                    .get(i)
                    .ok_or_else(|| bad(format!("input '{}' has no raw contents", input.name)))?;
                tensor_from_raw(&input.name, dtype, dims, bytes)
            }
            (false, Some(c)) => tensor_from_contents(&input.name, dtype, dims, c),
            (false, None) => return Err(bad(format!("input '{}' has no contents", input.name))),
        }
        .map_err(status_of)?;
        inputs.push(t);
    }
    Ok(InferRequest {
        model: r.model_name,
        version,
        id: (!r.id.is_empty()).then_some(r.id),
        inputs,
        outputs: r.outputs.into_iter().map(|o| o.name).collect(),
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for KServeGrpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.manager.is_ready(),
        }))
    }

    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let version = version_of(&r.version)?;
        let ready = match self.manager.served(&r.name, version) {
            Ok(sv) => sv.is_ready(),
            Err(ServeError::ModelNotFound(m)) => return Err(status_of(ServeError::ModelNotFound(m))),
            Err(_) => false,
        };
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "kiln".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: super::kserve_v2_http::EXTENSIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let sv = self
            .manager
            .served(&r.name, version_of(&r.version)?)
            .map_err(status_of)?;
        let tensors = |ios: &[kiln::IoInfo]| {
            ios.iter()
                .map(|io| model_metadata_response::TensorMetadata {
                    name: io.name.clone(),
                    datatype: io.dtype.map(wire_name).unwrap_or("FP32").to_string(),
                    shape: metadata_shape(io, sv.max_batch_size()),
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: sv.model.clone(),
            versions: self
                .manager
                .versions(&sv.model)
                .unwrap_or_default()
                .iter()
                .map(u64::to_string)
                .collect(),
            platform: "onnx".into(),
            inputs: tensors(&sv.inputs),
            outputs: tensors(&sv.outputs),
        }))
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let request = to_infer_request(req.into_inner())?;
        let resp = self.manager.infer(request).await.map_err(status_of)?;
        let mut outputs = Vec::with_capacity(resp.outputs.len());
        let mut raw = Vec::with_capacity(resp.outputs.len());
        for t in &resp.outputs {
            outputs.push(model_infer_response::InferOutputTensor {
                name: t.name.clone(),
                datatype: wire_name(t.dtype).to_string(),
                shape: t.dims.iter().map(|&d| d as i64).collect(),
                parameters: Default::default(),
                contents: None,
            });
            raw.push(tensor_to_raw(t));
        }
        Ok(Response::new(ModelInferResponse {
            model_name: resp.model,
            model_version: resp.version.to_string(),
            id: resp.id.unwrap_or_default(),
            parameters: Default::default(),
            outputs,
            raw_output_contents: raw,
        }))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let only_ready = req.into_inner().ready;
        let models = self
            .manager
            .index()
            .into_iter()
            .filter(|e| !only_ready || e.state == VersionState::Ready)
            .map(|e| repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.map(|v| v.to_string()).unwrap_or_default(),
                state: e.state.as_str().to_string(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.authorize(&req)?;
        let name = req.into_inner().model_name;
        let manager = self.manager.clone();
        tokio::task::spawn_blocking(move || manager.load_model(&name))
            .await
            .map_err(|e| Status::internal(format!("load task failed: {e}")))?
            .map_err(|e| match e.kind() {
                ErrorKind::Internal => Status::invalid_argument(e.to_string()),
                _ => status_of(e),
            })?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.authorize(&req)?;
        self.manager
            .unload_model(&req.into_inner().model_name)
            .map_err(status_of)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_infer_request::InferInputTensor;

    /// BYTES with typed contents and a shape whose element count overflows `usize` (found by
    /// `tests/fuzz_decoders.rs`; a multiply-overflow panic before).
    #[test]
    fn bytes_contents_with_overflowing_shape() {
        let req = ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![InferInputTensor {
                name: "s".into(),
                datatype: "BYTES".into(),
                shape: vec![1 << 32, 1 << 32],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![b"a".to_vec()],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = to_infer_request(req).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("overflows"), "{}", e.message());
    }
}
