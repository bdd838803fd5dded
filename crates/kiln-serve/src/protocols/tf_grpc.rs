//! TensorFlow Serving's gRPC API (`tensorflow.serving.PredictionService` `Predict` and
//! `GetModelMetadata`, `tensorflow.serving.ModelService` `GetModelStatus`) on the gRPC port beside
//! KServe v2, so code written against TF Serving's Python client (`predict_pb2`,
//! `prediction_service_pb2_grpc`) runs unchanged against Kiln.
//!
//! An ONNX model is one signature, `serving_default`, whose inputs and outputs are the graph's.
//! Tensors arrive as `tensor_content` (little-endian bytes) or in the dtype's typed `*_val` field
//! (TensorFlow's rule: fewer values than the shape holds repeat the last one); answers carry
//! `tensor_content` (`string_val` for strings). Classify, Regress and MultiInference take
//! `tf.Example` inputs, which ONNX models do not: calls to them get UNIMPLEMENTED.

use std::collections::HashMap;
use std::sync::Arc;

use kiln::{DType, IoInfo, TensorData};
use prost::Message;
use tonic::{Request, Response, Status};

use super::kserve_v2_grpc::status_of;
use super::{element_count, metadata_shape, tensor_from_raw};
use crate::error::ServeError;
use crate::infer::InferRequest;
use crate::manager::{ModelManager, ServedVersion, VersionState};
use crate::tf_proto::tensorflow::error::Code;
use crate::tf_proto::tensorflow::serving::model_service_server::ModelService;
use crate::tf_proto::tensorflow::serving::prediction_service_server::PredictionService;
use crate::tf_proto::tensorflow::serving::{
    model_spec, model_version_status, GetModelMetadataRequest, GetModelMetadataResponse, GetModelStatusRequest,
    GetModelStatusResponse, ModelSpec, ModelVersionStatus, PredictRequest, PredictResponse, SignatureDefMap,
    StatusProto,
};
use crate::tf_proto::tensorflow::{
    tensor_shape_proto, DataType, SignatureDef, TensorInfo, TensorProto, TensorShapeProto,
};

pub use crate::tf_proto::tensorflow::serving::model_service_server::ModelServiceServer;
pub use crate::tf_proto::tensorflow::serving::prediction_service_server::PredictionServiceServer;

/// The one signature every model has.
pub const SIGNATURE: &str = "serving_default";
const PREDICT_METHOD: &str = "tensorflow/serving/predict";
const SIGNATURE_DEF_MAP_URL: &str = "type.googleapis.com/tensorflow.serving.SignatureDefMap";

/// TF Serving's two gRPC services over a [`ModelManager`].
#[derive(Clone)]
pub struct TfServingGrpc {
    manager: Arc<ModelManager>,
    /// Bound on a decoded input's bytes: typed values may be fewer than the shape holds (the last
    /// one repeats), so the message size alone does not bound the tensor.
    max_tensor_bytes: usize,
}

impl TfServingGrpc {
    pub fn new(manager: Arc<ModelManager>, max_tensor_bytes: usize) -> Self {
        TfServingGrpc {
            manager,
            max_tensor_bytes,
        }
    }
}

/// TensorFlow's dtype for a Kiln dtype (`DT_INVALID` for dtypes TensorFlow has no name for).
pub fn data_type(d: Option<DType>) -> DataType {
    match d {
        Some(DType::F32) => DataType::DtFloat,
        Some(DType::F64) => DataType::DtDouble,
        Some(DType::F16) => DataType::DtHalf,
        Some(DType::BF16) => DataType::DtBfloat16,
        Some(DType::I8) => DataType::DtInt8,
        Some(DType::I16) => DataType::DtInt16,
        Some(DType::I32) => DataType::DtInt32,
        Some(DType::I64) => DataType::DtInt64,
        Some(DType::U8) => DataType::DtUint8,
        Some(DType::U16) => DataType::DtUint16,
        Some(DType::U32) => DataType::DtUint32,
        Some(DType::U64) => DataType::DtUint64,
        Some(DType::Bool) => DataType::DtBool,
        Some(DType::String) => DataType::DtString,
        _ => DataType::DtInvalid,
    }
}

fn kiln_dtype(name: &str, raw: i32) -> Result<DType, ServeError> {
    let dt = DataType::try_from(raw).unwrap_or(DataType::DtInvalid);
    Ok(match dt {
        DataType::DtFloat => DType::F32,
        DataType::DtDouble => DType::F64,
        DataType::DtHalf => DType::F16,
        DataType::DtBfloat16 => DType::BF16,
        DataType::DtInt8 => DType::I8,
        DataType::DtInt16 => DType::I16,
        DataType::DtInt32 => DType::I32,
        DataType::DtInt64 => DType::I64,
        DataType::DtUint8 => DType::U8,
        DataType::DtUint16 => DType::U16,
        DataType::DtUint32 => DType::U32,
        DataType::DtUint64 => DType::U64,
        DataType::DtBool => DType::Bool,
        DataType::DtString => DType::String,
        _ => {
            return Err(ServeError::invalid(format!(
                "input '{name}': dtype {} is not supported",
                DataType::try_from(raw).map_or_else(|_| raw.to_string(), |d| d.as_str_name().to_string())
            )))
        }
    })
}

/// Values from a typed field, repeated to `count` the way TensorFlow reads a `TensorProto`: fewer
/// values than elements repeat the last one; none at all for a non-empty shape is refused (it is
/// almost always the wrong field for the dtype).
fn fill<T: Clone>(name: &str, field: &str, vals: &[T], count: usize) -> Result<Vec<T>, ServeError> {
    match vals.last() {
        _ if vals.len() > count => Err(ServeError::invalid(format!(
            "input '{name}': {} values in {field} for a shape of {count} elements",
            vals.len()
        ))),
        None if count > 0 => Err(ServeError::invalid(format!(
            "input '{name}': no values (neither tensor_content nor {field} is set)"
        ))),
        None => Ok(Vec::new()),
        Some(last) => {
            let mut out = vals.to_vec();
            out.resize(count, last.clone());
            Ok(out)
        }
    }
}

fn narrow<T: TryFrom<i32>>(name: &str, v: i32, dtype: DType) -> Result<T, ServeError> {
    T::try_from(v).map_err(|_| ServeError::invalid(format!("input '{name}': {v} is out of range for {dtype:?}")))
}

/// Decodes one `TensorProto` (the input's name is the map key).
pub fn tensor_from_proto(name: &str, t: &TensorProto, max_bytes: usize) -> Result<TensorData, ServeError> {
    let dtype = kiln_dtype(name, t.dtype)?;
    let shape = t
        .tensor_shape
        .as_ref()
        .ok_or_else(|| ServeError::invalid(format!("input '{name}': tensor_shape is missing")))?;
    if shape.unknown_rank {
        return Err(ServeError::invalid(format!(
            "input '{name}': the shape has unknown rank"
        )));
    }
    let dims = shape
        .dim
        .iter()
        .map(|d| {
            usize::try_from(d.size)
                .map_err(|_| ServeError::invalid(format!("input '{name}': dimension {} is negative", d.size)))
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let count = element_count(name, &dims)?;
    let bytes = dtype.packed_size(count).filter(|&b| b <= max_bytes).ok_or_else(|| {
        ServeError::invalid(format!(
            "input '{name}': shape {dims:?} is larger than the server's limit of {max_bytes} bytes"
        ))
    })?;
    if !t.tensor_content.is_empty() {
        if dtype == DType::String {
            return Err(ServeError::invalid(format!(
                "input '{name}': DT_STRING values go in string_val, not tensor_content"
            )));
        }
        return tensor_from_raw(name, dtype, dims, &t.tensor_content);
    }
    let mut out: Vec<u8> = Vec::with_capacity(bytes);
    macro_rules! le {
        ($vals:expr) => {
            $vals.into_iter().for_each(|v| out.extend(v.to_le_bytes()))
        };
    }
    match dtype {
        DType::F32 => le!(fill(name, "float_val", &t.float_val, count)?),
        DType::F64 => le!(fill(name, "double_val", &t.double_val, count)?),
        DType::I32 => le!(fill(name, "int_val", &t.int_val, count)?),
        DType::I64 => le!(fill(name, "int64_val", &t.int64_val, count)?),
        DType::U32 => le!(fill(name, "uint32_val", &t.uint32_val, count)?),
        DType::U64 => le!(fill(name, "uint64_val", &t.uint64_val, count)?),
        DType::I8 | DType::I16 | DType::U8 | DType::U16 => {
            for v in fill(name, "int_val", &t.int_val, count)? {
                match dtype {
                    DType::I8 => out.extend(narrow::<i8>(name, v, dtype)?.to_le_bytes()),
                    DType::I16 => out.extend(narrow::<i16>(name, v, dtype)?.to_le_bytes()),
                    DType::U8 => out.extend(narrow::<u8>(name, v, dtype)?.to_le_bytes()),
                    _ => out.extend(narrow::<u16>(name, v, dtype)?.to_le_bytes()),
                }
            }
        }
        // half and bfloat16 travel as their 16 bits in half_val.
        DType::F16 | DType::BF16 => {
            for v in fill(name, "half_val", &t.half_val, count)? {
                out.extend(narrow::<u16>(name, v, dtype)?.to_le_bytes());
            }
        }
        DType::Bool => out.extend(fill(name, "bool_val", &t.bool_val, count)?.into_iter().map(u8::from)),
        DType::String => {
            let strings = fill(name, "string_val", &t.string_val, count)?;
            let total: usize = strings.iter().map(Vec::len).sum();
            if total > max_bytes {
                return Err(ServeError::invalid(format!(
                    "input '{name}': {total} bytes of strings exceed the server's limit of {max_bytes}"
                )));
            }
            return TensorData::strings(name, dims, strings).map_err(|e| ServeError::invalid(e.to_string()));
        }
        other => {
            return Err(ServeError::invalid(format!(
                "input '{name}': dtype {other:?} is not supported"
            )))
        }
    }
    TensorData::new(name, dtype, dims, out).map_err(|e| ServeError::invalid(e.to_string()))
}

/// Encodes one output: `tensor_content` for numbers, `string_val` for strings.
pub fn tensor_to_proto(t: &TensorData) -> Result<TensorProto, ServeError> {
    let dtype = data_type(Some(t.dtype));
    if dtype == DataType::DtInvalid {
        return Err(ServeError::Server(format!(
            "output '{}' has dtype {:?}, which TensorFlow Serving's API cannot carry",
            t.name, t.dtype
        )));
    }
    let mut proto = TensorProto {
        dtype: dtype as i32,
        tensor_shape: Some(shape_proto(t.dims.iter().map(|&d| d as i64), false)),
        ..Default::default()
    };
    match t.string_data() {
        Some(strings) => proto.string_val = strings.to_vec(),
        None => proto.tensor_content = t.bytes().to_vec(),
    }
    Ok(proto)
}

fn shape_proto(dims: impl Iterator<Item = i64>, unknown_rank: bool) -> TensorShapeProto {
    TensorShapeProto {
        dim: dims
            .map(|size| tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank,
    }
}

/// The model, version and signature a `ModelSpec` names.
fn target(spec: Option<&ModelSpec>) -> Result<(String, Option<u64>), Status> {
    let spec = spec.ok_or_else(|| Status::invalid_argument("model_spec is missing"))?;
    if spec.name.is_empty() {
        return Err(Status::invalid_argument("model_spec.name is empty"));
    }
    if !spec.signature_name.is_empty() && spec.signature_name != SIGNATURE {
        return Err(Status::invalid_argument(format!(
            "model '{}' has no signature '{}' (an ONNX model is served as the one signature '{SIGNATURE}')",
            spec.name, spec.signature_name
        )));
    }
    let version = match &spec.version_choice {
        None => None,
        Some(model_spec::VersionChoice::Version(v)) => {
            Some(u64::try_from(*v).map_err(|_| Status::invalid_argument(format!("model version {v} is negative")))?)
        }
        Some(model_spec::VersionChoice::VersionLabel(l)) => {
            return Err(Status::invalid_argument(format!(
                "version labels are not supported (got '{l}'): give a version number or none for the latest"
            )))
        }
    };
    Ok((spec.name.clone(), version))
}

fn answered_spec(sv: &ServedVersion) -> ModelSpec {
    ModelSpec {
        name: sv.model.clone(),
        signature_name: SIGNATURE.to_string(),
        version_choice: Some(model_spec::VersionChoice::Version(sv.version as i64)),
    }
}

/// The model's one signature: its graph inputs and outputs.
pub fn signature_def(sv: &ServedVersion) -> SignatureDef {
    let infos = |ios: &[IoInfo]| -> HashMap<String, TensorInfo> {
        ios.iter()
            .map(|io| {
                let info = TensorInfo {
                    dtype: data_type(io.dtype) as i32,
                    tensor_shape: Some(shape_proto(
                        metadata_shape(io, sv.max_batch_size()).into_iter(),
                        io.shape.is_none(),
                    )),
                    encoding: Some(crate::tf_proto::tensorflow::tensor_info::Encoding::Name(
                        io.name.clone(),
                    )),
                };
                (io.name.clone(), info)
            })
            .collect()
    };
    SignatureDef {
        inputs: infos(&sv.inputs),
        outputs: infos(&sv.outputs),
        method_name: PREDICT_METHOD.to_string(),
        defaults: HashMap::new(),
    }
}

#[tonic::async_trait]
impl PredictionService for TfServingGrpc {
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        let req = request.into_inner();
        let (model, version) = target(req.model_spec.as_ref())?;
        let sv = self.manager.served(&model, version).map_err(status_of)?;
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for (name, t) in &req.inputs {
            inputs.push(tensor_from_proto(name, t, self.max_tensor_bytes).map_err(status_of)?);
        }
        let resp = self
            .manager
            .infer(InferRequest {
                model,
                version: Some(sv.version),
                id: None,
                inputs,
                outputs: req.output_filter,
            })
            .await
            .map_err(status_of)?;
        let outputs = resp
            .outputs
            .iter()
            .map(|o| Ok((o.name.clone(), tensor_to_proto(o)?)))
            .collect::<Result<HashMap<_, _>, ServeError>>()
            .map_err(status_of)?;
        Ok(Response::new(PredictResponse {
            model_spec: Some(answered_spec(&sv)),
            outputs,
        }))
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let req = request.into_inner();
        let (model, version) = target(req.model_spec.as_ref())?;
        if req.metadata_field.iter().any(|f| f != "signature_def") || req.metadata_field.is_empty() {
            return Err(Status::invalid_argument(format!(
                "metadata_field must be [\"signature_def\"] (got {:?})",
                req.metadata_field
            )));
        }
        let sv = self.manager.served(&model, version).map_err(status_of)?;
        let map = SignatureDefMap {
            signature_def: HashMap::from([(SIGNATURE.to_string(), signature_def(&sv))]),
        };
        let any = prost_types::Any {
            type_url: SIGNATURE_DEF_MAP_URL.to_string(),
            value: map.encode_to_vec(),
        };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: Some(answered_spec(&sv)),
            metadata: HashMap::from([("signature_def".to_string(), any)]),
        }))
    }
}

#[tonic::async_trait]
impl ModelService for TfServingGrpc {
    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let req = request.into_inner();
        let (model, version) = target(req.model_spec.as_ref())?;
        let rows = self.manager.model_status(&model).map_err(status_of)?;
        let list: Vec<ModelVersionStatus> = rows
            .iter()
            .filter(|r| version.is_none() || r.version == version)
            .map(|r| {
                let ok = r.state == VersionState::Ready;
                ModelVersionStatus {
                    version: r.version.map_or(0, |v| v as i64),
                    state: if ok {
                        model_version_status::State::Available
                    } else {
                        model_version_status::State::End
                    } as i32,
                    status: Some(StatusProto {
                        error_code: if ok { Code::Ok } else { Code::Unknown } as i32,
                        error_message: r.reason.clone(),
                    }),
                }
            })
            .collect();
        if let (true, Some(v)) = (list.is_empty(), version) {
            return Err(status_of(ServeError::VersionNotFound { model, version: v }));
        }
        Ok(Response::new(GetModelStatusResponse {
            model_version_status: list,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dtype: DataType, dims: &[i64]) -> TensorProto {
        TensorProto {
            dtype: dtype as i32,
            tensor_shape: Some(shape_proto(dims.iter().copied(), false)),
            ..Default::default()
        }
    }

    #[test]
    fn typed_values_and_content_decode_alike() {
        let mut typed = proto(DataType::DtFloat, &[2, 2]);
        typed.float_val = vec![1.0, 2.0, 3.0, 4.0];
        let mut raw = proto(DataType::DtFloat, &[2, 2]);
        raw.tensor_content = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = tensor_from_proto("x", &typed, 1 << 20).unwrap();
        let b = tensor_from_proto("x", &raw, 1 << 20).unwrap();
        assert_eq!((a.dims.as_slice(), a.bytes()), (b.dims.as_slice(), b.bytes()));
        assert_eq!(a.f32_slice().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        // Round trip through the response encoding.
        let back = tensor_from_proto("x", &tensor_to_proto(&a).unwrap(), 1 << 20).unwrap();
        assert_eq!(back.bytes(), a.bytes());
    }

    #[test]
    fn fewer_values_repeat_the_last_as_tensorflow_does() {
        let mut t = proto(DataType::DtInt64, &[4]);
        t.int64_val = vec![7, 9];
        let d = tensor_from_proto("x", &t, 1 << 20).unwrap();
        let vals: Vec<i64> = d
            .bytes()
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, [7, 9, 9, 9]);
    }

    #[test]
    fn narrow_ints_half_bool_and_strings() {
        let mut t = proto(DataType::DtUint8, &[3]);
        t.int_val = vec![0, 200, 255];
        assert_eq!(tensor_from_proto("x", &t, 64).unwrap().bytes(), &[0, 200, 255]);
        t.int_val = vec![256];
        assert!(tensor_from_proto("x", &t, 64)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        let mut h = proto(DataType::DtHalf, &[1]);
        h.half_val = vec![half::f16::from_f32(1.5).to_bits() as i32];
        assert_eq!(
            tensor_from_proto("h", &h, 64).unwrap().bytes(),
            &half::f16::from_f32(1.5).to_le_bytes()
        );
        let mut b = proto(DataType::DtBool, &[2]);
        b.bool_val = vec![true, false];
        assert_eq!(tensor_from_proto("b", &b, 64).unwrap().bytes(), &[1, 0]);
        let mut s = proto(DataType::DtString, &[2]);
        s.string_val = vec![b"ab".to_vec(), b"c".to_vec()];
        let d = tensor_from_proto("s", &s, 64).unwrap();
        assert_eq!(d.string_data().unwrap(), &[b"ab".to_vec(), b"c".to_vec()]);
        assert_eq!(tensor_to_proto(&d).unwrap().string_val, s.string_val);
    }

    #[test]
    fn bad_tensors_get_clear_errors() {
        let err = |t: &TensorProto| tensor_from_proto("x", t, 1 << 20).unwrap_err().to_string();
        // The wrong typed field for the dtype.
        let mut t = proto(DataType::DtFloat, &[2]);
        t.int_val = vec![1, 2];
        assert!(err(&t).contains("no values"), "{}", err(&t));
        // More values than the shape holds.
        t.float_val = vec![1.0, 2.0, 3.0];
        assert!(err(&t).contains("3 values"));
        // Content of the wrong length.
        let mut c = proto(DataType::DtFloat, &[2]);
        c.tensor_content = vec![0; 7];
        assert!(err(&c).contains("needs 8 bytes"), "{}", err(&c));
        // One value may not stand for a huge shape (the last value repeats).
        let mut big = proto(DataType::DtFloat, &[1 << 20, 1 << 20]);
        big.float_val = vec![1.0];
        assert!(err(&big).contains("limit"), "{}", err(&big));
        assert!(err(&proto(DataType::DtFloat, &[-1])).contains("negative"));
        assert!(err(&proto(DataType::DtResource, &[1])).contains("DT_RESOURCE"));
        assert!(err(&TensorProto::default()).contains("DT_INVALID"));
        let mut shapeless = proto(DataType::DtFloat, &[]);
        shapeless.tensor_shape = None;
        assert!(err(&shapeless).contains("tensor_shape"));
        let mut s = proto(DataType::DtString, &[1]);
        s.tensor_content = vec![1];
        assert!(err(&s).contains("string_val"));
        // Overflowing dims.
        assert!(tensor_from_proto("x", &proto(DataType::DtFloat, &[i64::MAX, 4]), usize::MAX).is_err());
    }

    #[test]
    fn model_specs() {
        let spec = |sig: &str, v: Option<model_spec::VersionChoice>| ModelSpec {
            name: "m".into(),
            signature_name: sig.into(),
            version_choice: v,
        };
        assert_eq!(target(Some(&spec("", None))).unwrap(), ("m".to_string(), None));
        assert_eq!(
            target(Some(&spec(SIGNATURE, Some(model_spec::VersionChoice::Version(3))))).unwrap(),
            ("m".to_string(), Some(3))
        );
        assert!(target(Some(&spec("other", None))).is_err());
        assert!(target(Some(&spec("", Some(model_spec::VersionChoice::Version(-1))))).is_err());
        assert!(target(Some(&spec(
            "",
            Some(model_spec::VersionChoice::VersionLabel("stable".into()))
        )))
        .is_err());
        assert!(target(None).is_err());
        assert_eq!(data_type(Some(DType::F32)).as_str_name(), "DT_FLOAT");
    }
}
