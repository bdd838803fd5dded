//! Writes crates/kiln-onnx/src/proto/onnx.rs from onnx-ml.proto + onnx-data.proto (onnx 1.23.2).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crates/kiln-onnx");
    let proto_dir = format!("{root}/proto");
    let fds = protox::compile(["onnx/onnx-ml.proto", "onnx/onnx-data.proto"], [&proto_dir])?;
    let mut cfg = prost_build::Config::new();
    cfg.out_dir(format!("{root}/src/proto"));
    // Tensor payloads decode as slices of the model's buffer instead of copies (see load.rs).
    cfg.bytes([".onnx.TensorProto.raw_data"]);
    cfg.compile_fds(fds)?;
    println!("wrote {root}/src/proto/onnx.rs");
    Ok(())
}
