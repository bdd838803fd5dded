//! Generates the gRPC types and services from the vendored protos with protox (pure Rust), so
//! building Kiln needs no system `protoc`: KServe v2 (`proto/grpc_service.proto`, package
//! `inference`) and TensorFlow Serving's PredictionService and ModelService
//! (`proto/tensorflow_serving/apis/`, with the `tensorflow` messages they carry under
//! `proto/tensorflow/`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "grpc_service.proto",
            "tensorflow_serving/apis/prediction_service.proto",
            "tensorflow_serving/apis/model_service.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
