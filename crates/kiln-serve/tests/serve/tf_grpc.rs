use std::collections::HashMap;

use kiln::TensorData;
use kiln_serve::tf_proto::tensorflow::serving::model_service_client::ModelServiceClient;
use kiln_serve::tf_proto::tensorflow::serving::prediction_service_client::PredictionServiceClient;
use kiln_serve::tf_proto::tensorflow::serving::{
    model_spec, model_version_status, GetModelMetadataRequest, GetModelStatusRequest, ModelSpec, PredictRequest,
    SignatureDefMap,
};
use kiln_serve::tf_proto::tensorflow::{tensor_shape_proto, DataType, TensorProto, TensorShapeProto};
use prost::Message;
use tonic::Code;

use crate::common::*;

fn spec(model: &str, version: Option<i64>) -> Option<ModelSpec> {
    Some(ModelSpec {
        name: model.into(),
        signature_name: String::new(),
        version_choice: version.map(model_spec::VersionChoice::Version),
    })
}

fn proto_of(t: &TensorData) -> TensorProto {
    TensorProto {
        dtype: kiln_serve::protocols::tf_grpc::data_type(Some(t.dtype)) as i32,
        tensor_shape: Some(TensorShapeProto {
            dim: t
                .dims
                .iter()
                .map(|&d| tensor_shape_proto::Dim {
                    size: d as i64,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        tensor_content: t.bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_grpc_predict_metadata_status() {
    let repo = temp_repo(&["mlp", "simple"]);
    let server = start(&repo).await;
    let addr = format!("http://{}", server.grpc_addr.unwrap());
    let mut predict = PredictionServiceClient::connect(addr.clone()).await.unwrap();
    let mut models = ModelServiceClient::connect(addr).await.unwrap();

    // Predict, compared bit for bit with Session::run.
    let x = mlp_tensor(4, 3);
    let want = reference(&repo, "mlp", 1, vec![x.clone()]);
    let r = predict
        .predict(PredictRequest {
            model_spec: spec("mlp", Some(1)),
            inputs: HashMap::from([("input".to_string(), proto_of(&x))]),
            output_filter: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let answered = r.model_spec.unwrap();
    assert_eq!(
        (answered.name.as_str(), answered.signature_name.as_str()),
        ("mlp", "serving_default")
    );
    assert_eq!(answered.version_choice, Some(model_spec::VersionChoice::Version(1)));
    assert_eq!(r.outputs.len(), want.len());
    for w in &want {
        let got = &r.outputs[&w.name];
        assert_eq!(got.tensor_content, w.bytes(), "{}", w.name);
        let dims: Vec<usize> = got
            .tensor_shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| d.size as usize)
            .collect();
        assert_eq!(dims, w.dims);
    }

    // Metadata: one serving_default signature in an Any.
    let m = predict
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("mlp", None),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let any = &m.metadata["signature_def"];
    assert_eq!(any.type_url, "type.googleapis.com/tensorflow.serving.SignatureDefMap");
    let sigs = SignatureDefMap::decode(any.value.as_slice()).unwrap();
    let sig = &sigs.signature_def["serving_default"];
    let input = &sig.inputs["input"];
    assert_eq!(input.dtype, DataType::DtFloat as i32);
    let dims: Vec<i64> = input
        .tensor_shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| d.size)
        .collect();
    assert_eq!(dims, vec![-1, 4]);
    assert_eq!(sig.outputs.len(), 2);

    // Status.
    let s = models
        .get_model_status(GetModelStatusRequest {
            model_spec: spec("simple", None),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.model_version_status.len(), 1);
    assert_eq!(
        s.model_version_status[0].state,
        model_version_status::State::Available as i32
    );

    // Errors keep their gRPC codes; the server keeps serving.
    let bad = PredictRequest {
        model_spec: spec("nope", None),
        inputs: HashMap::new(),
        output_filter: vec![],
    };
    assert_eq!(predict.predict(bad).await.unwrap_err().code(), Code::NotFound);
    let mut wrong = proto_of(&x);
    wrong.tensor_content.pop();
    let bad = PredictRequest {
        model_spec: spec("mlp", None),
        inputs: HashMap::from([("input".to_string(), wrong)]),
        output_filter: vec![],
    };
    assert_eq!(predict.predict(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let bad = GetModelStatusRequest {
        model_spec: spec("mlp", Some(5)),
    };
    assert_eq!(models.get_model_status(bad).await.unwrap_err().code(), Code::NotFound);
    let again = predict
        .predict(PredictRequest {
            model_spec: spec("mlp", None),
            inputs: HashMap::from([("input".to_string(), proto_of(&x))]),
            output_filter: vec!["probabilities".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outputs.keys().collect::<Vec<_>>(), vec!["probabilities"]);
    server.shutdown().await.unwrap();
}
