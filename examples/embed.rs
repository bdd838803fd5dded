//! Runs the shipped SqueezeNet (models/light) through the embedding API and prints the top class.
//!
//!     cargo run --release -p kiln --example embed
use kiln::{Device, Level, Session, TensorData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let session = Session::builder()
        .device(Device::Cpu)
        .optimization(Level::Basic)
        .build_from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/light/squeezenet.onnx"
        ))?;
    let n = 3 * 224 * 224;
    let pixels: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let input = TensorData::from_values("data_0", vec![1, 3, 224, 224], &pixels)?;
    let outputs = session.run(vec![(session.inputs()[0].name.clone(), input)])?;
    let probs = outputs[0].values::<f32>().ok_or("expected float32 output")?;
    let (class, p) = probs
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &p)| if p > b.1 { (i, p) } else { b });
    println!(
        "{}: {:?}, top class {class} (p = {p:.4})",
        session.outputs()[0].name,
        outputs[0].dims
    );
    Ok(())
}
