//! candle-onnx 0.11 `simple_eval` on the same tests and rule, as a baseline.
//! candle has no bool/i8/u16/u64 storage; its outputs are relabelled to the expected dtype
//! when the storage matches (so candle is not failed for its representation alone).

use std::collections::HashMap;

use kiln::internals::onnx::DataValue;
use kiln::internals::runtime::{storage_dtype, Tensor};

use crate::compare::compare;
use crate::{Status, TestCase};

pub fn run(case: &TestCase) -> Status {
    let model = match candle_onnx::read_file(case.dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return Status::Error(format!("load: {e}")),
    };
    let sets = match case.data_sets() {
        Ok(s) => s,
        Err(e) => return Status::Error(format!("test data: {e}")),
    };
    let dev = candle_core::Device::Cpu;
    for (ins, expected) in sets {
        let mut feeds = HashMap::new();
        for (m, v) in case.meta.inputs.iter().zip(&ins) {
            let DataValue::Tensor(t) = v else {
                return Status::Unsupported("non-tensor input".into());
            };
            match Tensor::from_data(t, &dev) {
                Ok(t) => feeds.insert(m.name.clone(), t.into_candle()),
                Err(e) => return Status::Unsupported(e.to_string()),
            };
        }
        let outs = match candle_onnx::simple_eval(&model, feeds) {
            Ok(o) => o,
            Err(e) => return Status::Error(e.to_string()),
        };
        for (m, e) in case.meta.outputs.iter().zip(&expected) {
            let Some(t) = outs.get(&m.name) else {
                return Status::Fail(format!("output '{}' missing", m.name));
            };
            let DataValue::Tensor(exp) = e else {
                return Status::Unsupported("non-tensor output".into());
            };
            let wrapped = match storage_dtype(exp.dtype) {
                Ok(sd) if sd == t.dtype() => Tensor::new(t.clone(), exp.dtype),
                _ => Tensor::from_candle(t.clone()),
            };
            let got = match wrapped.and_then(|w| w.to_data(&m.name)) {
                Ok(g) => g,
                Err(err) => return Status::Error(err.to_string()),
            };
            if let Err(msg) = compare(&DataValue::Tensor(got), e, &case.tol()) {
                return Status::Fail(format!("output '{}': {msg}", m.name));
            }
        }
    }
    Status::Pass
}
