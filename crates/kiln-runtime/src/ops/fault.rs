//! Fault injection for tests of Kiln's failure handling: `ai.kiln.testing::Fault`, an identity
//! op (one input, one output, any dtype) that panics inside a rayon task when its f32 input holds
//! the value of its `trigger` attribute (default `13.0`). The panic takes the path a kernel bug
//! takes: rayon re-raises it on the calling thread and the executor turns it into
//! [`crate::RuntimeError::Internal`].
//!
//! Off unless enabled: a model using it fails to compile unless [`enable_fault_injection`] was
//! called or `KILN_FAULT_INJECTION=1` is set, so a production model cannot trigger it.

use std::sync::atomic::{AtomicBool, Ordering};

use super::common::tin;
use super::{kernel, NodeCtx, OpKernel, Registry};
use crate::{Result, Value};

/// The operator domain of the test-only ops.
pub const DOMAIN: &str = "ai.kiln.testing";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Lets models use `ai.kiln.testing::Fault` in this process (tests call it).
pub fn enable_fault_injection() {
    ENABLED.store(true, Ordering::SeqCst);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst) || std::env::var("KILN_FAULT_INJECTION").is_ok_and(|v| v == "1")
}

pub(crate) fn register(r: &mut Registry) {
    r.add_domain(DOMAIN, "Fault", build);
}

fn build(cx: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    if !enabled() {
        return Err(
            cx.err("ai.kiln.testing::Fault is a fault-injection op for tests; it is off (set KILN_FAULT_INJECTION=1)")
        );
    }
    let trigger = cx.attr_f("trigger", 13.0)?;
    Ok(kernel(move |_cx, ins| {
        let x = tin(ins, 0)?;
        if x.dtype() == kiln_graph::DType::F32 {
            let values = x.candle().flatten_all()?.to_vec1::<f32>()?;
            if values.contains(&trigger) {
                rayon::scope(|s| {
                    s.spawn(|_| panic!("injected fault: the input holds the trigger value {trigger}"));
                });
            }
        }
        Ok(vec![Value::Tensor(x.clone())])
    }))
}
