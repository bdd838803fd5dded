use std::collections::HashMap;
use std::path::Path;

use kiln_graph::passes::float16::{convert_to_float16, Float16Options, Float16Report};
use kiln_graph::passes::{optimize, OptLevel, Options, Report as OptimizationReport};
use kiln_graph::{DType, Model, Shape, TensorData, ValueKind};
use kiln_runtime::{CpuConstEval, Device, DeviceMemoryStats, ExecutionPlan, RunOptions, RunStats, Tensor, Value};

use crate::{Error, Result};

/// Graph optimization level, named as in ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    /// Run the graph as written.
    Disabled,
    /// Semantics-preserving clean-ups (dead-node elimination, ...).
    #[default]
    Basic,
    /// Basic plus operator fusions.
    Extended,
    /// Everything, including layout choices for the backend.
    All,
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "disabled" | "none" => Ok(Level::Disabled),
            "basic" => Ok(Level::Basic),
            "extended" => Ok(Level::Extended),
            "all" => Ok(Level::All),
            _ => Err(format!(
                "unknown optimization level '{s}' (disabled, basic, extended, all)"
            )),
        }
    }
}

impl From<Level> for OptLevel {
    fn from(l: Level) -> Self {
        match l {
            Level::Disabled => OptLevel::Disabled,
            Level::Basic => OptLevel::Basic,
            Level::Extended => OptLevel::Extended,
            Level::All => OptLevel::All,
        }
    }
}

/// Runs the graph optimizer of `level` over a model's main graph, folding constants with the
/// runtime's CPU kernels. Fusions may use Kiln's kernels whatever opset the model declares.
pub fn optimize_model(model: &mut Model, level: Level) -> Result<OptimizationReport> {
    optimize_for_precision(model, level, Precision::F32, false)
}

/// [`optimize_model`] for a session of the given precision: int8 weight-only quantization runs after
/// the optimizer and rewrites MatMul/Gemm weights, so the MatMul + bias fusion (Level All) stays off.
/// `cpu_f32`: a CPU session computing in f32, whose kernels can share one packed form of a weight
/// read both as stored and transposed (tied embeddings; `Options::share_transposed_weights`).
fn optimize_for_precision(
    model: &mut Model,
    level: Level,
    precision: Precision,
    cpu_f32: bool,
) -> Result<OptimizationReport> {
    let mut options = Options::for_model(model, level.into());
    options.fuse_matmul_bias = precision != Precision::Int8WeightOnly;
    options.share_transposed_weights = cpu_f32 && precision == Precision::F32;
    options.nhwc_convs = cpu_f32 && precision == Precision::F32 && nhwc_convs_wanted();
    // Quantized convs go channels-last on every CPU (their NCHW kernel transposes its input and
    // output around the same integer GEMM); `KILN_NHWC=0` keeps them NCHW too.
    options.nhwc_qconvs =
        cpu_f32 && precision == Precision::F32 && std::env::var("KILN_NHWC").map_or(true, |v| v != "0");
    Ok(optimize(&mut model.graph, &options, &CpuConstEval)?)
}

/// Whether CPU f32 sessions compute their 2-D convs in channels-last regions: by default where the
/// direct channels-last conv kernel runs (AVX-512F; measured faster than NCHW on the model zoo,
/// docs/benchmarks.md), elsewhere only when asked for. `KILN_NHWC=0` turns the regions off,
/// `KILN_NHWC=1` on (read when a session is built).
fn nhwc_convs_wanted() -> bool {
    match std::env::var("KILN_NHWC") {
        Ok(v) => v != "0",
        Err(_) => kiln_runtime::sgemm::indexed_available(),
    }
}

/// Rewrites a model's main graph to compute in fp16 (f16 weights, f32 inputs and outputs, the
/// ops in `kiln_graph::passes::float16::KEEP_FP32` kept in fp32). Run it after [`optimize_model`].
pub fn convert_model_to_float16(model: &mut Model) -> Result<Float16Report> {
    let options = Float16Options::for_model(model);
    Ok(convert_to_float16(&mut model.graph, &options)?)
}

/// The [`OptimizationReport`] entry counting what widening float16 to float32 changed (values,
/// initializers and attributes) in a CPU session of an f16 model.
pub const WIDEN_F16_RULE: &str = "widen_f16_to_f32";

/// Numeric precision a session computes in. Inputs and outputs keep the model's dtypes whatever
/// the precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Computes in f32. On the CPU a model's float16 arithmetic is widened to f32 at load (f16
    /// weights converted once, f16 inputs and outputs kept, with one Cast at each), as ONNX
    /// Runtime's CPU provider does: x86 cores have no f16 arithmetic, so an f16 kernel would
    /// convert every operand anyway. On CUDA the model runs as written.
    #[default]
    F32,
    /// Float weights converted to fp16 once at load; reductions, softmax and normalization
    /// accumulate in fp32.
    F16,
    /// MatMul/Gemm weights stored as int8 with one scale per output channel, dequantized inside
    /// the kernel; activations stay float.
    Int8WeightOnly,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::F32),
            "fp16" | "f16" | "float16" => Ok(Precision::F16),
            "int8" | "int8-weight" | "int8_weight" | "int8-weight-only" => Ok(Precision::Int8WeightOnly),
            _ => Err(format!("unknown precision '{s}' (fp32, fp16, int8-weight)")),
        }
    }
}

/// Name, element type and (possibly symbolic) shape of a model input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct IoInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub shape: Option<Shape>,
}

/// Configures and builds a [`Session`].
#[derive(Debug, Clone, Default)]
pub struct SessionBuilder {
    device: Device,
    level: Level,
    precision: Precision,
    run_options: RunOptions,
    device_memory_limit: Option<u64>,
    load_limits: kiln_onnx::LoadLimits,
    paged_attention: Option<crate::paged::PagedRewriteOptions>,
}

impl SessionBuilder {
    /// Caps the device memory pool of a CUDA device at `bytes` (the pool is per device and process:
    /// the first session on a device sets it, a later one asking for another limit fails to build).
    /// A run that needs more fails with [`kiln_runtime::RuntimeError::DeviceOutOfMemory`] and the
    /// session stays usable. Ignored on the CPU.
    pub fn device_memory_limit(mut self, bytes: u64) -> Self {
        self.device_memory_limit = Some(bytes);
        self
    }

    /// Numeric precision (default [`Precision::F32`]).
    pub fn precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Device to run on (default CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Graph optimization level (default [`Level::Basic`]).
    pub fn optimization(mut self, level: Level) -> Self {
        self.level = level;
        self
    }

    /// Limits checked while loading (file size, node count, nesting, declared tensor bytes);
    /// default [`kiln_onnx::LoadLimits::default`].
    pub fn load_limits(mut self, limits: kiln_onnx::LoadLimits) -> Self {
        self.load_limits = limits;
        self
    }

    /// Limits applied at run time (largest tensor, loop iterations).
    pub fn run_options(mut self, options: RunOptions) -> Self {
        self.run_options = options;
        self
    }

    /// Loads an ONNX file (external data resolved next to it) and compiles it.
    pub fn build_from_file(self, path: impl AsRef<Path>) -> Result<Session> {
        let path = path.as_ref();
        let limits = self.load_limits;
        let model = crate::error::catch_panic("loading the model", || Ok(kiln_onnx::load_model_with(path, &limits)?))?;
        self.build_from_model(model)
    }

    /// Rewrites the model's KV-cache attention into `ai.kiln::PagedAttention` before optimizing
    /// (see [`crate::paged`]): the session then runs flat token batches over a paged KV cache
    /// handed to each run in [`RunOptions::paged_kv`]. Building fails when the model has no
    /// recognisable KV-cache attention.
    pub fn paged_attention(mut self, options: crate::paged::PagedRewriteOptions) -> Self {
        self.paged_attention = Some(options);
        self
    }

    /// Loads an ONNX model from bytes and compiles it.
    pub fn build_from_bytes(self, bytes: &[u8]) -> Result<Session> {
        let limits = self.load_limits;
        let model = crate::error::catch_panic("loading the model", || {
            Ok(kiln_onnx::load_model_bytes_with(bytes, &limits)?)
        })?;
        self.build_from_model(model)
    }

    /// Compiles an already imported model. A panic in a graph pass or while compiling is
    /// returned as [`Error::Internal`].
    pub fn build_from_model(self, model: Model) -> Result<Session> {
        crate::error::catch_panic("building the session", move || self.build_inner(model))
    }

    fn build_inner(self, mut model: Model) -> Result<Session> {
        let paged = match &self.paged_attention {
            Some(opts) => Some(kiln_graph::passes::paged_attention::rewrite_for_paged_attention(
                &mut model, opts,
            )?),
            None => None,
        };
        let cpu = self.device == Device::Cpu;
        // The CPU has no f16 arithmetic: an f16 model computes in f32 (see `Precision::F32`).
        let widened = if cpu && self.precision != Precision::F16 {
            Some(kiln_graph::passes::float16::widen_to_float32(
                &mut model.graph,
                model.ir_version >= 4,
            )?)
        } else {
            None
        };
        let mut optimization = optimize_for_precision(&mut model, self.level, self.precision, cpu)?;
        if let Some(w) = widened.filter(|w| w.changed()) {
            optimization
                .rewrites
                .insert(WIDEN_F16_RULE, w.values + w.initializers + w.attributes);
        }
        match self.precision {
            Precision::F32 => {}
            Precision::Int8WeightOnly => {
                crate::quantize::quantize_model(&mut model, crate::quantize::DEFAULT_MIN_ELEMENTS, false)?;
            }
            Precision::F16 => convert_model_to_float16(&mut model).map(|_| ())?,
        }
        // After optimizing, so constant folding never sees the int8 weights; also picks up models
        // quantized by `kiln quantize`.
        if self.level != Level::Disabled || self.precision == Precision::Int8WeightOnly {
            crate::quantize::fuse_int8_weight_matmuls(&mut model)?;
        }
        let device = self.device.to_candle()?;
        // Every CUDA allocation comes from Kiln's caching pool (kiln_runtime::device_memory).
        kiln_runtime::device_memory::configure_pool(&device, self.device_memory_limit)?;
        let g = &model.graph;
        let io = |id: kiln_graph::ValueId| {
            let v = g.value(id);
            IoInfo {
                name: v.name.clone(),
                dtype: v.dtype,
                shape: v.shape.clone(),
            }
        };
        let inputs = g.runtime_inputs().into_iter().map(io).collect();
        let outputs = g.outputs.iter().copied().map(io).collect();
        let input_kinds = g.inputs.iter().map(|v| g.value(*v).kind).collect();
        // The plan takes the model, dropping each weight once its kernel has its own form of it.
        let plan = ExecutionPlan::compile_owned(model, device)?;
        Ok(Session {
            optimization,
            plan,
            inputs,
            outputs,
            input_kinds,
            device: self.device,
            run_options: self.run_options,
            paged,
        })
    }
}

/// A compiled model, ready to run from many threads at once.
pub struct Session {
    optimization: OptimizationReport,
    plan: ExecutionPlan,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    input_kinds: Vec<ValueKind>,
    device: Device,
    run_options: RunOptions,
    paged: Option<crate::paged::PagedRewrite>,
}

impl Session {
    /// What the paged-attention rewrite did, when the session was built with
    /// [`SessionBuilder::paged_attention`].
    pub fn paged_rewrite(&self) -> Option<&crate::paged::PagedRewrite> {
        self.paged.as_ref()
    }

    /// Starts configuring a session.
    pub fn builder() -> SessionBuilder {
        SessionBuilder::default()
    }

    /// Inputs the caller must feed (initializer-backed inputs are optional and not listed).
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The device memory pool's statistics (reserved, allocated, peaks, limit; fragmentation via
    /// [`DeviceMemoryStats::fragmentation`]); `None` for a CPU session.
    pub fn device_memory_stats(&self) -> Result<Option<DeviceMemoryStats>> {
        Ok(kiln_runtime::device_memory::pool_stats(self.plan.device())?)
    }

    /// Nodes that have run on the CPU (inputs and outputs copied explicitly) because the device
    /// backend lacked a kernel for their op or dtype, subgraph nodes included; a node is listed
    /// from its first run that fell back. Always empty for a CPU session. `kiln inspect --device
    /// cuda` runs a model once and prints this list.
    pub fn host_fallbacks(&self) -> Vec<kiln_runtime::HostFallback> {
        self.plan.host_fallbacks()
    }

    /// What the graph optimizer did at build time (node counts before/after, rewrites per rule).
    pub fn optimization_report(&self) -> &OptimizationReport {
        &self.optimization
    }

    /// The compiled plan (kernel count, peak activation bytes).
    pub fn plan(&self) -> &ExecutionPlan {
        &self.plan
    }

    /// Runs with named host tensors; returns the outputs in graph order, named.
    pub fn run(&self, inputs: Vec<(String, TensorData)>) -> Result<Vec<TensorData>> {
        Ok(self.run_with_stats(inputs)?.0)
    }

    /// Like [`Session::run`], also returning what the run measured.
    pub fn run_with_stats(&self, inputs: Vec<(String, TensorData)>) -> Result<(Vec<TensorData>, RunStats)> {
        self.run_with_options(inputs, &self.run_options)
    }

    /// Like [`Session::run_with_stats`] with per-run options (a deadline, profiling) in place of
    /// the session's.
    pub fn run_with_options(
        &self,
        inputs: Vec<(String, TensorData)>,
        options: &RunOptions,
    ) -> Result<(Vec<TensorData>, RunStats)> {
        // Kernel panics are caught per node by the executor (naming it); this catches the rest.
        crate::error::catch_panic("running the model", || self.run_inner(inputs, options))
    }

    fn run_inner(
        &self,
        inputs: Vec<(String, TensorData)>,
        options: &RunOptions,
    ) -> Result<(Vec<TensorData>, RunStats)> {
        let feeds = self.bind_inputs(inputs)?;
        let (values, stats) = self.plan.run(feeds, &HashMap::new(), options)?;
        let mut out = Vec::with_capacity(values.len());
        for (v, info) in values.into_iter().zip(&self.outputs) {
            let t = v.into_tensor().map_err(|e| Error::Input {
                name: info.name.clone(),
                reason: format!("output is not a tensor: {e}"),
            })?;
            out.push(t.to_data(&info.name)?);
        }
        Ok((out, stats))
    }

    /// Checks named host tensors against the graph's inputs and copies them to the session's
    /// device once, aligned for [`Session::run_values`] (`None` = initializer default). Reusing the
    /// result runs the model with inputs already on the device (IO binding): no host copies per
    /// run, as `kiln bench --io device` measures.
    pub fn bind_inputs(&self, inputs: Vec<(String, TensorData)>) -> Result<Vec<Option<Value>>> {
        let device = self.plan.device().clone();
        let mut by_name: HashMap<String, TensorData> = HashMap::new();
        for (name, data) in inputs {
            if by_name.insert(name.clone(), data).is_some() {
                return Err(Error::Input {
                    name,
                    reason: "given twice".into(),
                });
            }
        }
        let mut feeds = Vec::new();
        for (info, has_default) in self.plan.input_infos() {
            match by_name.remove(&info.name) {
                Some(data) => {
                    check_input(&info.name, info.dtype, info.shape.as_ref(), &data)?;
                    feeds.push(Some(Value::Tensor(Tensor::from_data(&data, &device).map_err(|e| {
                        Error::Input {
                            name: info.name.clone(),
                            reason: e.to_string(),
                        }
                    })?)));
                }
                None if has_default => feeds.push(None),
                None => {
                    return Err(Error::Input {
                        name: info.name.clone(),
                        reason: "missing".into(),
                    })
                }
            }
        }
        if let Some(name) = by_name.keys().next() {
            let known: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::Input {
                name: name.clone(),
                reason: format!("the model has no such input (inputs: {})", known.join(", ")),
            });
        }
        Ok(feeds)
    }

    /// Waits until the session's device has finished all queued work (a no-op on the CPU): device
    /// kernels run asynchronously, so timing [`Session::run_values`] on a GPU needs this.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self
            .plan
            .device()
            .synchronize()
            .map_err(kiln_runtime::RuntimeError::from)?)
    }

    /// The limits every run of this session applies.
    pub fn run_options(&self) -> &RunOptions {
        &self.run_options
    }

    /// Runs with run-time values (tensors already on the session's device, sequences,
    /// optionals), aligned with every graph input (`None` = initializer default).
    pub fn run_values(&self, feeds: Vec<Option<Value>>) -> Result<Vec<Value>> {
        self.run_values_with(feeds, &self.run_options)
    }

    /// Like [`Session::run_values`] with per-run limits (e.g. a deadline for this request).
    pub fn run_values_with(&self, feeds: Vec<Option<Value>>, options: &RunOptions) -> Result<Vec<Value>> {
        if feeds.len() != self.input_kinds.len() {
            return Err(Error::Input {
                name: String::new(),
                reason: format!(
                    "{} values given, the graph has {} inputs",
                    feeds.len(),
                    self.input_kinds.len()
                ),
            });
        }
        Ok(self.plan.run(feeds, &HashMap::new(), options)?.0)
    }
}

fn check_input(name: &str, dtype: Option<DType>, shape: Option<&Shape>, data: &TensorData) -> Result<()> {
    if let Some(d) = dtype {
        if d != data.dtype {
            return Err(Error::Input {
                name: name.into(),
                reason: format!("expected dtype {d}, got {}", data.dtype),
            });
        }
    }
    if let Some(s) = shape {
        if !s.accepts(&data.dims) {
            return Err(Error::Input {
                name: name.into(),
                reason: format!("shape {:?} does not fit the declared shape {s}", data.dims),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn session_is_send_and_sync() {
        assert_send_sync::<Session>();
    }
}
