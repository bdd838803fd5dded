//! Robustness sweep: every node-test model is run with malformed inputs (a dim set to 0, an extra
//! leading dim, a scalar, the wrong dtype). Results are not compared; the engine must return an
//! error or an output, never panic or hang.

use kiln::internals::runtime::{Tensor, Value};
use kiln::{DType, Session, TensorData};

use crate::{Status, TestCase};

fn variants(t: &TensorData) -> Vec<TensorData> {
    let mut out = Vec::new();
    let make = |dims: Vec<usize>, dtype: DType| -> Option<TensorData> {
        let n: usize = dims.iter().product();
        if n > 1 << 20 || dtype.is_exotic() {
            return None;
        }
        let bytes = vec![1u8; dtype.packed_size(n)?];
        TensorData::new("m", dtype, dims, bytes).ok()
    };
    if !t.dims.is_empty() {
        let mut d = t.dims.clone();
        d[0] = 0;
        out.extend(make(d, t.dtype));
        let mut d = t.dims.clone();
        let last = d.len() - 1;
        d[last] += 1;
        out.extend(make(d, t.dtype));
    }
    let mut d = vec![2];
    d.extend_from_slice(&t.dims);
    out.extend(make(d, t.dtype));
    out.extend(make(vec![], t.dtype));
    let other = if t.dtype == DType::F32 { DType::I64 } else { DType::F32 };
    out.extend(make(t.dims.clone(), other));
    out
}

/// Runs the malformed-input variants of one test; a panic anywhere is reported as an error.
pub fn run(case: &TestCase) -> Status {
    let Ok(session) = Session::builder().build_from_file(case.dir.join("model.onnx")) else {
        return Status::Pass;
    };
    let Ok(sets) = case.data_sets() else {
        return Status::Pass;
    };
    let Some((ins, _)) = sets.into_iter().next() else {
        return Status::Pass;
    };
    let Ok(model) = kiln::internals::onnx::load_model(case.dir.join("model.onnx")) else {
        return Status::Pass;
    };
    let names: Vec<String> = model
        .graph
        .inputs
        .iter()
        .map(|v| model.graph.value_name(*v).to_string())
        .collect();
    let dev = candle_core::Device::Cpu;
    let base: Vec<Option<Value>> = names
        .iter()
        .map(|n| {
            let i = case.meta.inputs.iter().position(|m| &m.name == n)?;
            match &ins[i] {
                kiln::internals::onnx::DataValue::Tensor(t) => Tensor::from_data(t, &dev).ok().map(Value::Tensor),
                _ => None,
            }
        })
        .collect();
    for (k, v) in ins.iter().enumerate() {
        let kiln::internals::onnx::DataValue::Tensor(t) = v else {
            continue;
        };
        let Some(pos) = names.iter().position(|n| *n == case.meta.inputs[k].name) else {
            continue;
        };
        for bad in variants(t) {
            let mut feeds = base.clone();
            match Tensor::from_data(&bad, &dev) {
                Ok(b) => feeds[pos] = Some(Value::Tensor(b)),
                Err(_) => continue,
            }
            // Errors are the expected outcome; only panics (caught by the caller) count.
            let options = kiln::RunOptions {
                deadline: Some(std::time::Instant::now() + std::time::Duration::from_secs(3)),
                ..Default::default()
            };
            let _ = session.run_values_with(feeds, &options);
        }
    }
    Status::Pass
}
