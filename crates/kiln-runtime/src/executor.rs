use std::collections::HashMap;

use crate::ops::RunCx;
use crate::{ExecutionPlan, Result, RuntimeError, Value};

/// Per-run limits.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Largest tensor an operator may create from run-time shapes (ConstantOfShape, Expand, ...).
    pub max_tensor_bytes: u64,
    /// Loop iteration cap (a model may declare an unbounded loop).
    pub max_loop_iterations: u64,
    /// Abandon the run (with an error) once this instant has passed; checked before every kernel,
    /// including those inside loop bodies. A server sets it from the request timeout.
    pub deadline: Option<std::time::Instant>,
    /// Time every kernel, those of subgraph bodies included, and return the times in
    /// [`RunStats::op_times`] (costs two clock reads per node, and on a GPU a wait for each node's
    /// kernels so the times are their own; off by default).
    pub profile: bool,
    /// The paged KV cache and batch layout `ai.kiln::PagedAttention` nodes read and write (set by
    /// an LLM engine for each model step; `None` otherwise).
    pub paged_kv: Option<std::sync::Arc<crate::paged_kv::PagedStep>>,
    /// Run the whole plan on a worker of the CPU thread pool (rayon's global pool; the calling thread
    /// waits for it). Parallel kernels then split their work from inside the pool, where the other
    /// workers are still spinning from the previous kernel, instead of waking the pool from outside
    /// and sleeping for every kernel: a run of many small parallel kernels (an LLM decode step: 200
    /// matrix-vector products) loses a third of its time to those thread switches otherwise. With
    /// one thread it saves the same switches (the single worker runs the plan and every kernel
    /// inline). On by default. The cost: a pool worker waiting inside one run may pick up another
    /// caller's whole run, which delays the first by the second's duration, so `kiln serve` (many
    /// concurrent requests) turns it off. Ignored when the caller already is a pool worker and for
    /// plans on a GPU (whose kernels run on the caller's thread, where its context is current).
    pub on_thread_pool: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_tensor_bytes: 4 << 30,
            max_loop_iterations: 1 << 20,
            deadline: None,
            profile: false,
            paged_kv: None,
            on_thread_pool: true,
        }
    }
}

static HOST_FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many plan steps (process-wide, all plans) have switched to the CPU because the device
/// backend lacked a kernel. For reports; 0 on CPU-only runs.
pub fn host_fallback_count() -> u64 {
    HOST_FALLBACKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs one kernel. On a GPU, a node whose kernel hits a gap in the device backend (an op or dtype
/// candle's CUDA backend lacks) is re-run on the CPU with explicit copies. Only when the CPU run
/// succeeds does the step remember it (so a bad input cannot pin a node to the CPU), log it once and
/// count it; later runs then skip the failing device attempt.
fn run_step(step: &crate::plan::Step, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    run_step_on(step, cx, ins, !cx.device.is_cpu())
}

/// [`run_step`] with the "is this a device plan" answer passed in (so the fallback bookkeeping can
/// be tested on a machine without a GPU).
fn run_step_on(step: &crate::plan::Step, cx: &RunCx, ins: &[Option<&Value>], on_device: bool) -> Result<Vec<Value>> {
    use std::sync::atomic::Ordering;
    let pinned = on_device && step.host_fallback.load(Ordering::Relaxed);
    let device_error = if pinned {
        None
    } else {
        match step.kernel.run(cx, ins) {
            Ok(o) => return Ok(o),
            Err(RuntimeError::Candle(e)) if on_device => {
                let message = crate::error::candle_message(&e);
                match classify_device_error(&message) {
                    DeviceError::NoKernel => Some(RuntimeError::Candle(e)),
                    // The device (or the pool's limit) is full: the caller's problem to size, not
                    // a reason to move the node to the CPU for good.
                    DeviceError::OutOfMemory => {
                        return Err(RuntimeError::DeviceOutOfMemory {
                            node: step.node.clone(),
                            message,
                        })
                    }
                    // A launch or execution failure: a CPU rerun would hide a broken kernel or
                    // context.
                    DeviceError::Failed => {
                        return Err(RuntimeError::Op {
                            node: step.node.clone(),
                            op: step.op.clone(),
                            reason: format!("the device kernel failed (not retried on the CPU): {message}"),
                        })
                    }
                }
            }
            Err(e) => return Err(e.at_node(&step.node, &step.op)),
        }
    };
    let outs = run_step_on_host(step, cx, ins)?;
    if let Some(e) = device_error {
        if !step.host_fallback.swap(true, Ordering::Relaxed) {
            tracing::warn!(node = %step.node, op = %step.op, error = %e, "no device kernel; running this node on the CPU");
            HOST_FALLBACKS.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(outs)
}

/// What a candle error from a device kernel means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceError {
    /// The backend has no kernel for this op or dtype: run the node on the CPU.
    NoKernel,
    /// Device memory (or the pool's limit) ran out.
    OutOfMemory,
    /// The kernel was launched and failed (driver, cuBLAS or launch error).
    Failed,
}

/// Sorts a device kernel's error message. Driver and cuBLAS errors name their status
/// (`CUDA_ERROR_*`, `CUBLAS_STATUS_*`); of those, a missing kernel is: "not supported", "not
/// found" (candle looks a kernel up by name, `bmaximum_i16` say, in its PTX module when it runs it,
/// and dtypes it has no kernel for end there) and "invalid value" (a launch the driver refused
/// before running it, as candle's launches over zero-element tensors are).
/// Everything else candle reports on a device (unsupported dtype, missing kernel module,
/// non-contiguous matmul, "not implemented") is a gap in the backend.
fn classify_device_error(message: &str) -> DeviceError {
    if crate::device_memory::is_out_of_memory(message) || message.contains("CUBLAS_STATUS_ALLOC_FAILED") {
        return DeviceError::OutOfMemory;
    }
    let unsupported = [
        "CUDA_ERROR_NOT_SUPPORTED",
        "CUDA_ERROR_NOT_FOUND",
        "CUDA_ERROR_INVALID_VALUE",
        "CUBLAS_STATUS_NOT_SUPPORTED",
    ];
    let driver = message.contains("CUDA_ERROR_") || message.contains("CUBLAS_STATUS_");
    if driver && !unsupported.iter().any(|u| message.contains(u)) {
        return DeviceError::Failed;
    }
    DeviceError::NoKernel
}

/// Runs a step placed on the host by [`crate::placement`] (shape arithmetic of a device plan): its
/// inputs are host values, or for `Shape`/`Size` a tensor whose dims alone are read; its outputs
/// stay on the host.
fn run_on_host_placement(step: &crate::plan::Step, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let host_cx = RunCx {
        device: &candle_core::Device::Cpu,
        options: cx.options,
    };
    step.kernel
        .run(&host_cx, ins)
        .map_err(|e| e.at_node(&step.node, &step.op))
}

/// Runs a step's kernel on the CPU: inputs copied to the host, outputs copied back to `cx.device`.
fn run_step_on_host(step: &crate::plan::Step, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let cpu = candle_core::Device::Cpu;
    let host_ins: Vec<Option<Value>> = ins
        .iter()
        .map(|v| v.map(|v| move_value(v, &cpu)).transpose())
        .collect::<Result<_>>()?;
    let refs: Vec<Option<&Value>> = host_ins.iter().map(Option::as_ref).collect();
    let host_cx = RunCx {
        device: &cpu,
        options: cx.options,
    };
    let outs = step
        .kernel
        .run(&host_cx, &refs)
        .map_err(|e| e.at_node(&step.node, &step.op))?;
    outs.iter().map(|v| move_value(v, cx.device)).collect()
}

/// Copies a value (and everything inside it) to `device`.
pub(crate) fn move_value(v: &Value, device: &candle_core::Device) -> Result<Value> {
    Ok(match v {
        Value::Tensor(t) => Value::Tensor(t.to_device(device)?),
        Value::Sequence(ts, d) => Value::Sequence(ts.iter().map(|t| t.to_device(device)).collect::<Result<_>>()?, *d),
        Value::Optional(o, d) => {
            Value::Optional(o.as_ref().map(|v| move_value(v, device).map(Box::new)).transpose()?, *d)
        }
    })
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Most bytes of intermediate tensors alive at once.
    pub peak_activation_bytes: u64,
    /// Sum of the sizes of all intermediates (what no reuse would hold).
    pub total_intermediate_bytes: u64,
    /// With [`RunOptions::profile`]: wall time of each node, subgraph nodes included (see
    /// [`OpTime::depth`]), in the order they finished.
    pub op_times: Vec<OpTime>,
}

/// Wall time one node took in a profiled run.
#[derive(Debug, Clone)]
pub struct OpTime {
    pub node: String,
    pub op: String,
    /// Everything the node took, including the nodes of its subgraphs (If, Loop, Scan bodies).
    pub duration: std::time::Duration,
    /// 0 for the main graph's nodes, 1 for nodes of their subgraphs, and so on. A node's subgraph
    /// nodes come right before it in [`RunStats::op_times`] (post-order).
    pub depth: u32,
}

impl OpTime {
    /// Each entry's own time: its duration less that of the subgraph nodes it ran (its direct
    /// children in the post-ordered list). Aligned with `times`.
    pub fn self_times(times: &[OpTime]) -> Vec<std::time::Duration> {
        let mut child_sums: Vec<std::time::Duration> = Vec::new();
        times
            .iter()
            .map(|t| {
                let d = t.depth as usize;
                if child_sums.len() < d + 2 {
                    child_sums.resize(d + 2, std::time::Duration::ZERO);
                }
                let children = std::mem::take(&mut child_sums[d + 1]);
                child_sums[d] += t.duration;
                t.duration.saturating_sub(children)
            })
            .collect()
    }
}

thread_local! {
    /// Profiling depth of the plan running on this thread (0 = not inside a profiled run).
    static PROFILE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Times of subgraph nodes, collected until the main-graph node that ran them finishes.
    static NESTED_TIMES: std::cell::RefCell<Vec<OpTime>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A top-level run starting on a thread that may already be inside another run (a pool worker that
/// picked up this run's job while waiting): the profiling depth and pending subgraph times of the
/// suspended run are set aside until this one ends.
struct TopLevelRun {
    depth: u32,
    nested: Vec<OpTime>,
}

impl TopLevelRun {
    fn enter() -> Self {
        TopLevelRun {
            depth: PROFILE_DEPTH.with(|d| d.replace(0)),
            nested: NESTED_TIMES.with(|n| std::mem::take(&mut *n.borrow_mut())),
        }
    }
}

impl Drop for TopLevelRun {
    fn drop(&mut self) {
        PROFILE_DEPTH.with(|d| d.set(self.depth));
        NESTED_TIMES.with(|n| *n.borrow_mut() = std::mem::take(&mut self.nested));
    }
}

/// Marks this thread as inside a profiled plan run for its lifetime; yields the depth.
struct ProfileScope(u32);

impl ProfileScope {
    fn enter() -> Self {
        ProfileScope(PROFILE_DEPTH.with(|d| {
            let v = d.get();
            d.set(v + 1);
            v
        }))
    }
}

impl Drop for ProfileScope {
    fn drop(&mut self) {
        PROFILE_DEPTH.with(|d| d.set(self.0));
        if self.0 == 0 {
            NESTED_TIMES.with(|n| n.borrow_mut().clear());
        }
    }
}

impl ExecutionPlan {
    /// Runs the plan. `feeds` is aligned with the plan's inputs (`None` = use the initializer
    /// default); `captures` binds outer-scope names for subgraph bodies.
    pub fn run(
        &self,
        feeds: Vec<Option<Value>>,
        captures: &HashMap<&str, &Value>,
        options: &RunOptions,
    ) -> Result<(Vec<Value>, RunStats)> {
        // Subnormal floats read as zero while the plan runs (see `denormals`); the caller's own
        // mode comes back when this returns.
        let _denormals = crate::denormals::RunMode::enter();
        if options.on_thread_pool && self.device.is_cpu() && rayon::current_thread_index().is_none() {
            return rayon::scope(|_| {
                // The worker may be waiting inside another caller's run (it stole this job from
                // a join there): this run is not nested in that one.
                let _own = TopLevelRun::enter();
                self.run_on(feeds, captures, options, &self.device)
            });
        }
        self.run_on(feeds, captures, options, &self.device)
    }

    /// Like [`ExecutionPlan::run`], returning the outputs on `out_device` (a control-flow node
    /// that fell back to the CPU gets its body's outputs there).
    pub fn run_on(
        &self,
        feeds: Vec<Option<Value>>,
        captures: &HashMap<&str, &Value>,
        options: &RunOptions,
        out_device: &candle_core::Device,
    ) -> Result<(Vec<Value>, RunStats)> {
        let mut env: Vec<Option<Value>> = vec![None; self.num_slots];
        for (slot, v) in &self.constants {
            env[*slot] = Some(v.clone());
        }
        if feeds.len() > self.inputs.len() {
            return Err(RuntimeError::msg(format!(
                "{} inputs given, the graph has {}",
                feeds.len(),
                self.inputs.len()
            )));
        }
        let mut feeds = feeds.into_iter();
        for (slot, info, has_default) in &self.inputs {
            match feeds.next().flatten() {
                Some(v) => {
                    // Values from another device (a caller's host tensor, or a loop body fed by a
                    // node that fell back to the CPU) are copied to the plan's device.
                    env[*slot] = Some(move_value(&v, &self.device)?);
                }
                None if *has_default => {}
                None => {
                    return Err(RuntimeError::Input {
                        name: info.name.clone(),
                        reason: "missing".into(),
                    })
                }
            }
        }
        for (slot, name) in &self.captures {
            let v = captures.get(name.as_str()).ok_or_else(|| RuntimeError::Input {
                name: name.clone(),
                reason: "outer-scope value not bound".into(),
            })?;
            env[*slot] = Some(move_value(v, &self.device)?);
        }
        let cx = RunCx {
            device: &self.device,
            options,
        };
        let mut stats = RunStats::default();
        let mut live: u64 = 0;
        let scope = options.profile.then(ProfileScope::enter);
        for step in &self.steps {
            if options.deadline.is_some_and(|d| std::time::Instant::now() > d) {
                return Err(RuntimeError::DeadlineExceeded {
                    node: step.node.clone(),
                });
            }
            let started = options.profile.then(std::time::Instant::now);
            // A panic in the kernel (or in a rayon task it spawned, re-raised here) becomes an
            // error naming the node; the plan, the session and the calling thread stay usable.
            let outs = crate::error::catch_panic(&step.node, &step.op, || {
                let mut ins: Vec<Option<&Value>> =
                    step.inputs.iter().map(|s| s.and_then(|s| env[s].as_ref())).collect();
                if step.on_host {
                    run_on_host_placement(step, &cx, &ins)
                } else if step.to_device.is_empty() {
                    run_step(step, &cx, &ins)
                } else {
                    // Host values (shape arithmetic) this device kernel reads as data.
                    let moved: Vec<(usize, Value)> = step
                        .to_device
                        .iter()
                        .filter_map(|&i| ins.get(i).copied().flatten().map(|v| (i, v)))
                        .map(|(i, v)| Ok((i, move_value(v, cx.device)?)))
                        .collect::<Result<_>>()?;
                    for (i, v) in &moved {
                        ins[*i] = Some(v);
                    }
                    run_step(step, &cx, &ins)
                }
            })?;
            if let (Some(t), Some(scope)) = (started, &scope) {
                // Device kernels run asynchronously: wait for this node's, so its time is its own.
                if !self.device.is_cpu() {
                    self.device.synchronize()?;
                }
                let time = OpTime {
                    node: step.node.clone(),
                    op: step.op.clone(),
                    duration: t.elapsed(),
                    depth: scope.0,
                };
                if scope.0 == 0 {
                    NESTED_TIMES.with(|n| stats.op_times.append(&mut n.borrow_mut()));
                    stats.op_times.push(time);
                } else {
                    NESTED_TIMES.with(|n| n.borrow_mut().push(time));
                }
            }
            if outs.len() < step.outputs.iter().filter(|o| o.is_some()).count() && outs.len() < step.outputs.len() {
                return Err(RuntimeError::Op {
                    node: step.node.clone(),
                    op: step.op.clone(),
                    reason: format!(
                        "kernel returned {} outputs, {} expected",
                        outs.len(),
                        step.outputs.len()
                    ),
                });
            }
            for (slot, v) in step.outputs.iter().zip(outs) {
                if let Some(s) = slot {
                    let b = v.size_in_bytes() as u64;
                    live += b;
                    stats.total_intermediate_bytes += b;
                    env[*s] = Some(v);
                }
            }
            stats.peak_activation_bytes = stats.peak_activation_bytes.max(live);
            for &s in &step.release {
                if let Some(v) = env[s].take() {
                    live = live.saturating_sub(v.size_in_bytes() as u64);
                }
            }
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (slot, name) in &self.outputs {
            let v = env[*slot].clone().ok_or_else(|| RuntimeError::Op {
                node: String::new(),
                op: String::new(),
                reason: format!("graph output '{name}' was not produced"),
            })?;
            outputs.push(move_value(&v, out_device)?);
        }
        self.note_peak(stats.peak_activation_bytes);
        Ok((outputs, stats))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::ops::OpKernel;
    use crate::plan::Step;
    use crate::Tensor;

    /// Fails its first `device_failures` calls with a candle error (what a missing CUDA kernel
    /// gives), then doubles its input; counts every call.
    struct Flaky {
        calls: Arc<AtomicUsize>,
        device_failures: usize,
        candle_error: bool,
    }

    impl OpKernel for Flaky {
        fn run(&self, cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.device_failures {
                return Err(if self.candle_error {
                    RuntimeError::Candle(candle_core::Error::Msg("no cuda kernel for this dtype".into()))
                } else {
                    RuntimeError::msg("a shape error")
                });
            }
            let x = crate::ops::common::tin(ins, 0)?;
            let y = Tensor::new((x.candle() * 2.0)?, x.dtype())?;
            assert!(y.device().same_device(cx.device));
            Ok(vec![Value::Tensor(y)])
        }
    }

    fn flaky(calls: &Arc<AtomicUsize>, device_failures: usize, candle_error: bool) -> Flaky {
        Flaky {
            calls: Arc::clone(calls),
            device_failures,
            candle_error,
        }
    }

    fn step(node: &str, kernel: Flaky) -> Step {
        Step {
            kernel: Box::new(kernel),
            node: node.into(),
            op: "Flaky".into(),
            inputs: vec![Some(0)],
            outputs: vec![Some(1)],
            release: vec![],
            host_fallback: Default::default(),
            subplans: vec![],
            on_host: false,
            to_device: vec![],
            held_bytes: 0,
        }
    }

    fn plan(steps: Vec<Step>) -> ExecutionPlan {
        ExecutionPlan {
            steps,
            num_slots: 2,
            constants: vec![],
            inputs: vec![],
            outputs: vec![],
            captures: vec![],
            device: candle_core::Device::Cpu,
            peak_activation: Default::default(),
            placement_counts: None,
        }
    }

    fn input() -> Value {
        let t = candle_core::Tensor::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).unwrap();
        Value::Tensor(Tensor::from_candle(t).unwrap())
    }

    fn values(v: &[Value]) -> Vec<f32> {
        match v {
            [Value::Tensor(t)] => t.candle().to_vec1::<f32>().unwrap(),
            other => panic!("expected one tensor, got {} values", other.len()),
        }
    }

    #[test]
    fn a_device_failure_reruns_the_node_on_the_host_and_pins_it() {
        let calls = Arc::new(AtomicUsize::new(0));
        let s = step("n0", flaky(&calls, 1, true));
        let options = RunOptions::default();
        let cx = RunCx {
            device: &candle_core::Device::Cpu,
            options: &options,
        };
        let x = input();
        let before = host_fallback_count();
        assert_eq!(
            values(&run_step_on(&s, &cx, &[Some(&x)], true).unwrap()),
            vec![2.0, 4.0]
        );
        // Device attempt + host run.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(s.host_fallback.load(Ordering::SeqCst));
        assert!(host_fallback_count() > before);
        // Pinned: the next run goes straight to the host (one call).
        assert_eq!(
            values(&run_step_on(&s, &cx, &[Some(&x)], true).unwrap()),
            vec![2.0, 4.0]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn only_backend_errors_fall_back_and_a_failed_host_run_pins_nothing() {
        let options = RunOptions::default();
        let cx = RunCx {
            device: &candle_core::Device::Cpu,
            options: &options,
        };
        let x = input();
        // A kernel's own error (bad input) is the answer: no host retry, no pin, node named.
        let calls = Arc::new(AtomicUsize::new(0));
        let s = step("n1", flaky(&calls, 1, false));
        let e = run_step_on(&s, &cx, &[Some(&x)], true).unwrap_err().to_string();
        assert!(e.contains("n1") && e.contains("a shape error"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!s.host_fallback.load(Ordering::SeqCst));
        // A backend error whose host run fails too: the host's error, and still not pinned.
        let s = step("n2", flaky(&Arc::default(), 2, true));
        assert!(run_step_on(&s, &cx, &[Some(&x)], true).is_err());
        assert!(!s.host_fallback.load(Ordering::SeqCst));
        // On the CPU a backend error is returned as is.
        let s = step("n3", flaky(&Arc::default(), 1, true));
        assert!(run_step_on(&s, &cx, &[Some(&x)], false).is_err());
        assert!(!s.host_fallback.load(Ordering::SeqCst));
    }

    /// Fails its first call with a candle error carrying `message` (as a device backend would),
    /// then doubles its input.
    struct DeviceFails {
        calls: Arc<AtomicUsize>,
        message: &'static str,
    }

    impl OpKernel for DeviceFails {
        fn run(&self, _cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let e: Box<dyn std::error::Error + Send + Sync> = self.message.into();
                return Err(RuntimeError::Candle(candle_core::Error::Cuda(e)));
            }
            let x = crate::ops::common::tin(ins, 0)?;
            Ok(vec![Value::Tensor(Tensor::new((x.candle() * 2.0)?, x.dtype())?)])
        }
    }

    #[test]
    fn only_missing_device_kernels_fall_back_to_the_cpu() {
        let options = RunOptions::default();
        let cx = RunCx {
            device: &candle_core::Device::Cpu,
            options: &options,
        };
        let x = input();
        let run = |message: &'static str| {
            let calls = Arc::new(AtomicUsize::new(0));
            let mut s = step("n", flaky(&calls, 0, true));
            s.kernel = Box::new(DeviceFails {
                calls: calls.clone(),
                message,
            });
            let r = run_step_on(&s, &cx, &[Some(&x)], true);
            (r, calls.load(Ordering::SeqCst), s.host_fallback.load(Ordering::SeqCst))
        };
        for gap in [
            "unsupported dtype BF16 for conv2d",
            "missing kernel 'affine'",
            "no cuda implementation for upsample_nearest1d",
            "DriverError(CUDA_ERROR_NOT_SUPPORTED, \"operation not supported\")",
            "DriverError(CUDA_ERROR_NOT_FOUND, \"named symbol not found\")",
            "DriverError(CUDA_ERROR_INVALID_VALUE, \"invalid argument\")",
        ] {
            let (r, calls, pinned) = run(gap);
            assert_eq!(values(&r.unwrap()), vec![2.0, 4.0], "{gap}");
            assert_eq!((calls, pinned), (2, true), "{gap}: rerun on the host and pinned");
        }
        for oom in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cuda:0: the device memory pool's limit of 1024 bytes is reached: out of memory",
            "CUBLAS_STATUS_ALLOC_FAILED",
        ] {
            let (r, calls, pinned) = run(oom);
            match r {
                Err(RuntimeError::DeviceOutOfMemory { node, .. }) => assert_eq!(node, "n"),
                other => panic!("{oom}: expected DeviceOutOfMemory, got {:?}", other.map(|_| ())),
            }
            assert_eq!((calls, pinned), (1, false), "{oom}: no CPU rerun, not pinned");
        }
        for failed in [
            "DriverError(CUDA_ERROR_LAUNCH_FAILED, \"unspecified launch failure\")",
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")",
            "CUBLAS_STATUS_EXECUTION_FAILED",
        ] {
            let (r, calls, pinned) = run(failed);
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("'n'") && e.contains("not retried on the CPU") && e.contains(&failed[..15]),
                "{e}"
            );
            assert_eq!((calls, pinned), (1, false), "{failed}: no CPU rerun, not pinned");
        }
    }

    #[test]
    fn host_fallbacks_lists_pinned_nodes_in_subgraphs_too() {
        let k = || flaky(&Arc::default(), 0, true);
        let inner = plan(vec![step("body_a", k()), step("body_b", k())]);
        let mut owner = step("the_loop", k());
        owner.subplans.push(Arc::new(inner));
        let outer = plan(vec![step("first", k()), owner, step("last", k())]);
        assert!(outer.host_fallbacks().is_empty());
        outer.steps[1].subplans[0].steps[1]
            .host_fallback
            .store(true, Ordering::SeqCst);
        outer.steps[0].host_fallback.store(true, Ordering::SeqCst);
        outer.steps[2].host_fallback.store(true, Ordering::SeqCst);
        let got: Vec<(String, u32)> = outer.host_fallbacks().into_iter().map(|f| (f.node, f.depth)).collect();
        assert_eq!(got, vec![("first".into(), 0), ("body_b".into(), 1), ("last".into(), 0)]);
    }
}

#[cfg(test)]
mod panic_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::ops::OpKernel;
    use crate::plan::Step;
    use crate::Tensor;

    /// Panics on its first `panics` calls (inside a rayon task when `in_rayon`), then doubles
    /// its input.
    struct Panicky {
        calls: Arc<AtomicUsize>,
        panics: usize,
        in_rayon: bool,
    }

    impl OpKernel for Panicky {
        fn run(&self, _cx: &RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.panics {
                if self.in_rayon {
                    rayon::scope(|s| s.spawn(|_| panic!("index out of range in a worker")));
                }
                panic!("index out of range");
            }
            let x = crate::ops::common::tin(ins, 0)?;
            Ok(vec![Value::Tensor(Tensor::new((x.candle() * 2.0)?, x.dtype())?)])
        }
    }

    fn plan_of(kernel: Panicky) -> ExecutionPlan {
        let x = candle_core::Tensor::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).unwrap();
        ExecutionPlan {
            steps: vec![Step {
                kernel: Box::new(kernel),
                node: "conv_7".into(),
                op: "Conv".into(),
                inputs: vec![Some(0)],
                outputs: vec![Some(1)],
                release: vec![],
                host_fallback: Default::default(),
                subplans: vec![],
                on_host: false,
                to_device: vec![],
                held_bytes: 0,
            }],
            num_slots: 2,
            constants: vec![(0, Value::Tensor(Tensor::from_candle(x).unwrap()))],
            inputs: vec![],
            outputs: vec![(1, "y".into())],
            captures: vec![],
            device: candle_core::Device::Cpu,
            peak_activation: Default::default(),
            placement_counts: None,
        }
    }

    #[test]
    fn a_kernel_panic_is_an_error_naming_the_node_and_the_plan_runs_again() {
        for in_rayon in [false, true] {
            let calls = Arc::new(AtomicUsize::new(0));
            let plan = plan_of(Panicky {
                calls: calls.clone(),
                panics: 1,
                in_rayon,
            });
            let options = RunOptions::default();
            match plan.run(vec![], &HashMap::new(), &options) {
                Err(RuntimeError::Internal { node, op, message }) => {
                    assert_eq!((node.as_str(), op.as_str()), ("conv_7", "Conv"));
                    assert!(message.contains("index out of range"), "{message}");
                }
                other => panic!("expected an internal error, got {:?}", other.map(|_| ())),
            }
            let (out, _) = plan.run(vec![], &HashMap::new(), &options).expect("second run");
            match &out[..] {
                [Value::Tensor(t)] => assert_eq!(t.candle().to_vec1::<f32>().unwrap(), vec![2.0, 4.0]),
                _ => panic!("one tensor expected"),
            }
        }
    }
}
