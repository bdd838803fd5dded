use kiln::TensorData;
use kiln_serve::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_serve::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kiln_serve::proto::*;
use tonic::Code;

use crate::common::*;

async fn client(server: &kiln_serve::Server) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc_addr.unwrap()))
        .await
        .unwrap()
}

fn raw_request(model: &str, inputs: &[TensorData], outputs: &[&str]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        id: "g1".into(),
        inputs: inputs
            .iter()
            .map(|t| InferInputTensor {
                name: t.name.clone(),
                datatype: kiln_serve::protocols::wire_name(t.dtype).into(),
                shape: t.dims.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|n| InferRequestedOutputTensor {
                name: n.to_string(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: inputs.iter().map(|t| t.bytes().to_vec()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_metadata_infer() {
    let repo = temp_repo(&["mlp", "simple"]);
    let server = start(&repo).await;
    let mut c = client(&server).await;
    assert!(c.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(c.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let ready = c
        .model_ready(ModelReadyRequest {
            name: "mlp".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    let meta = c.server_metadata(ServerMetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(meta.name, "kiln");
    let m = c
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.versions, vec!["1"]);
    assert_eq!(m.inputs[0].name, "input");
    assert_eq!(m.inputs[0].datatype, "FP32");
    assert_eq!(m.inputs[0].shape, vec![-1, 4]);

    // Raw contents in and out, compared bit for bit with Session::run.
    let x = mlp_tensor(4, 3);
    let want = reference(&repo, "mlp", 1, vec![x.clone()]);
    let r = c
        .model_infer(raw_request("mlp", std::slice::from_ref(&x), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_name, "mlp");
    assert_eq!(r.model_version, "1");
    assert_eq!(r.id, "g1");
    assert_eq!(r.outputs.len(), 2);
    assert_eq!(r.outputs[1].name, "probabilities");
    assert_eq!(r.outputs[1].shape, vec![4, 3]);
    assert_eq!(r.raw_output_contents[0], want[0].bytes());
    assert_eq!(r.raw_output_contents[1], want[1].bytes());

    // Typed contents, one requested output.
    let mut req = raw_request("mlp", std::slice::from_ref(&x), &["logits"]);
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: x.values::<f32>().unwrap(),
        ..Default::default()
    });
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.raw_output_contents[0], want[0].bytes());

    // INT32 typed contents on the simple model.
    let a = TensorData::from_values("INPUT0", vec![1, 16], &(0..16).collect::<Vec<i32>>()).unwrap();
    let b = TensorData::from_values("INPUT1", vec![1, 16], &[7i32; 16]).unwrap();
    let mut req = raw_request("simple", &[a.clone(), b.clone()], &[]);
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(InferTensorContents {
        int_contents: a.values::<i32>().unwrap(),
        ..Default::default()
    });
    req.inputs[1].contents = Some(InferTensorContents {
        int_contents: b.values::<i32>().unwrap(),
        ..Default::default()
    });
    let r = c.model_infer(req).await.unwrap().into_inner();
    let want = reference(&repo, "simple", 1, vec![a, b]);
    assert_eq!(r.raw_output_contents[0], want[0].bytes());
    assert_eq!(r.raw_output_contents[1], want[1].bytes());

    let idx = c
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(idx.models.len(), 2);
    assert_eq!(idx.models[0].state, "READY");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors() {
    let repo = temp_repo(&["mlp"]);
    let server = start(&repo).await;
    let mut c = client(&server).await;
    let x = mlp_tensor(1, 0);
    let code = |r: Result<tonic::Response<ModelInferResponse>, tonic::Status>| r.unwrap_err().code();

    let mut req = raw_request("mlp", std::slice::from_ref(&x), &[]);
    req.raw_input_contents[0].truncate(10);
    assert_eq!(code(c.model_infer(req).await), Code::InvalidArgument);
    let mut req = raw_request("mlp", std::slice::from_ref(&x), &[]);
    req.inputs[0].datatype = "INT64".into();
    req.raw_input_contents[0] = vec![0; 32];
    assert_eq!(code(c.model_infer(req).await), Code::InvalidArgument);
    let mut req = raw_request("mlp", std::slice::from_ref(&x), &[]);
    req.raw_input_contents.push(vec![1, 2]);
    assert_eq!(code(c.model_infer(req).await), Code::InvalidArgument);
    assert_eq!(
        code(c.model_infer(raw_request("nope", std::slice::from_ref(&x), &[])).await),
        Code::NotFound
    );
    let mut req = raw_request("mlp", std::slice::from_ref(&x), &[]);
    req.model_version = "4".into();
    assert_eq!(code(c.model_infer(req).await), Code::NotFound);
    let mut req = raw_request("mlp", std::slice::from_ref(&x), &[]);
    req.raw_input_contents.clear();
    assert_eq!(code(c.model_infer(req).await), Code::InvalidArgument);
    // Still serving.
    assert!(c.model_infer(raw_request("mlp", &[x], &[])).await.is_ok());
    server.shutdown().await.unwrap();
}
