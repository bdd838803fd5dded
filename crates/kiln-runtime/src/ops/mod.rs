//! Operator kernels, registered by family: one file per family, one `register` per file, so the
//! table of supported operators is generated from this code (`supported_ops`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use kiln_graph::{Attribute, DType, Graph, Node, TensorData};

use crate::{ExecutionPlan, PlanOptions, Result, RuntimeError, Tensor, Value};

pub(crate) mod attention;
mod binary_cpu;
mod block_quant;
mod chain;
pub mod common;
mod control;
mod conv_cpu;
mod conv_dw;
mod conv_nhwc;
mod conv_transpose_cpu;
mod elementwise;
pub mod fault;
mod fused;
mod indexing;
mod int8_matmul;
mod matmul;
mod ml;
pub(crate) mod nhwc;
mod nn;
mod norm;
mod pool;
mod q4;
mod qconv;
mod qlinear;
mod quant;
mod reduce;
mod resize;
mod rnn;
mod sequence;
mod shape;
mod signal;
mod softmax;
mod text;

/// Run-time context handed to every kernel.
pub struct RunCx<'a> {
    pub device: &'a candle_core::Device,
    pub options: &'a crate::RunOptions,
}

impl RunCx<'_> {
    /// Rejects a tensor allocation over the configured limit before it is made.
    pub fn check_alloc(&self, elems: u128, dtype: DType) -> Result<()> {
        let bytes = elems.saturating_mul(dtype.size_in_bytes().max(1) as u128);
        if bytes > self.options.max_tensor_bytes as u128 {
            return Err(RuntimeError::TooLarge {
                bytes,
                limit: self.options.max_tensor_bytes,
            });
        }
        Ok(())
    }
}

/// A compiled operator. `inputs` holds the node's explicit inputs (`None` for omitted optional
/// ones) followed by its implicit (subgraph capture) inputs.
pub trait OpKernel: Send + Sync {
    fn run(&self, cx: &RunCx, inputs: &[Option<&Value>]) -> Result<Vec<Value>>;
}

/// A kernel made from a closure.
pub struct FnKernel<F>(pub F);

impl<F> OpKernel for FnKernel<F>
where
    F: Fn(&RunCx, &[Option<&Value>]) -> Result<Vec<Value>> + Send + Sync,
{
    fn run(&self, cx: &RunCx, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        (self.0)(cx, inputs)
    }
}

/// Boxes a closure as a kernel.
pub fn kernel<F>(f: F) -> Box<dyn OpKernel>
where
    F: Fn(&RunCx, &[Option<&Value>]) -> Result<Vec<Value>> + Send + Sync + 'static,
{
    Box::new(FnKernel(f))
}

/// Compile-time view of one node: attributes, opset, constant inputs, subgraph compilation.
pub struct NodeCtx<'a> {
    pub node: &'a Node,
    pub graph: &'a Graph,
    pub opset: i64,
    pub(crate) options: &'a PlanOptions,
    /// Subgraph plans compiled for this node (kept on its plan step, so reports such as
    /// [`ExecutionPlan::host_fallbacks`] can descend into If/Loop/Scan bodies).
    pub(crate) subplans: std::cell::RefCell<Vec<Arc<ExecutionPlan>>>,
    /// Input positions the kernel holds a plan-time form of (see [`NodeCtx::consume_input`]).
    pub(crate) consumed: std::cell::RefCell<Vec<usize>>,
    /// Bytes of weights the kernel holds in a form of its own (see [`NodeCtx::note_held_bytes`]).
    pub(crate) held: std::cell::Cell<u64>,
    /// Weights packed for the GEMM so far in this plan, by (initializer, stored transposed): kernels
    /// reading the same initializer the same way share one packed copy.
    pub(crate) packs: SharedPacks,
}

/// See [`NodeCtx::packs`].
pub(crate) type SharedPacks =
    std::rc::Rc<std::cell::RefCell<HashMap<(kiln_graph::ValueId, bool), Arc<crate::sgemm::PackedB>>>>;

impl NodeCtx<'_> {
    pub fn err(&self, reason: impl Into<String>) -> RuntimeError {
        RuntimeError::Op {
            node: self.node.name.clone(),
            op: self.node.op_type.clone(),
            reason: reason.into(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&Attribute> {
        self.node.attr(name)
    }

    pub fn attr_i(&self, name: &str, default: i64) -> Result<i64> {
        match self.attr(name) {
            None => Ok(default),
            Some(Attribute::Int(v)) => Ok(*v),
            Some(a) => Err(self.err(format!("attribute '{name}' should be an int, found {}", a.kind_name()))),
        }
    }

    pub fn attr_i_opt(&self, name: &str) -> Result<Option<i64>> {
        self.attr(name).map(|_| self.attr_i(name, 0)).transpose()
    }

    pub fn attr_f(&self, name: &str, default: f32) -> Result<f32> {
        match self.attr(name) {
            None => Ok(default),
            Some(Attribute::Float(v)) => Ok(*v),
            Some(Attribute::Int(v)) => Ok(*v as f32),
            Some(a) => Err(self.err(format!("attribute '{name}' should be a float, found {}", a.kind_name()))),
        }
    }

    pub fn attr_f_opt(&self, name: &str) -> Result<Option<f32>> {
        self.attr(name).map(|_| self.attr_f(name, 0.0)).transpose()
    }

    pub fn attr_ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::Ints(v)) => Ok(Some(v.clone())),
            Some(Attribute::Int(v)) => Ok(Some(vec![*v])),
            Some(a) => Err(self.err(format!("attribute '{name}' should be ints, found {}", a.kind_name()))),
        }
    }

    pub fn attr_floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::Floats(v)) => Ok(Some(v.clone())),
            Some(Attribute::Float(v)) => Ok(Some(vec![*v])),
            Some(a) => Err(self.err(format!("attribute '{name}' should be floats, found {}", a.kind_name()))),
        }
    }

    pub fn attr_s(&self, name: &str, default: &str) -> Result<String> {
        match self.attr(name) {
            None => Ok(default.to_string()),
            Some(Attribute::String(v)) => Ok(String::from_utf8_lossy(v).into_owned()),
            Some(a) => Err(self.err(format!(
                "attribute '{name}' should be a string, found {}",
                a.kind_name()
            ))),
        }
    }

    pub fn attr_tensor(&self, name: &str) -> Result<Option<&TensorData>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::Tensor(t)) => Ok(Some(t)),
            Some(a) => Err(self.err(format!(
                "attribute '{name}' should be a tensor, found {}",
                a.kind_name()
            ))),
        }
    }

    pub fn attr_graph(&self, name: &str) -> Result<Option<&Arc<Graph>>> {
        match self.attr(name) {
            None => Ok(None),
            Some(Attribute::Graph(g)) => Ok(Some(g)),
            Some(a) => Err(self.err(format!("attribute '{name}' should be a graph, found {}", a.kind_name()))),
        }
    }

    /// Number of explicit input positions.
    pub fn num_inputs(&self) -> usize {
        self.node.inputs.len()
    }

    /// Number of declared output positions.
    pub fn num_outputs(&self) -> usize {
        self.node.outputs.len()
    }

    /// `true` when input `i` is present.
    pub fn has_input(&self, i: usize) -> bool {
        matches!(self.node.inputs.get(i), Some(Some(_)))
    }

    /// Input `i` when it is an initializer the caller cannot override at run time (an initializer
    /// that is also a graph input may be fed a different value, so it is not a constant).
    ///
    /// The output of a `Constant` node with a `value` tensor counts too: subgraph bodies (If/Loop/Scan)
    /// are compiled as written, and exporters put their weights in such nodes (Silero VAD's whole
    /// model is an If branch), so their filters are packed at plan time like top-level ones.
    pub fn const_input(&self, i: usize) -> Option<&TensorData> {
        let id = self.node.inputs.get(i).copied().flatten()?;
        if self.graph.inputs.contains(&id) {
            return None;
        }
        if let Some(t) = self.graph.initializers.get(&id) {
            return Some(t);
        }
        let producer = self.graph.nodes.iter().find(|n| n.outputs.contains(&Some(id)))?;
        if producer.op_type != "Constant" || !producer.domain.is_empty() {
            return None;
        }
        match producer.attr("value") {
            Some(kiln_graph::Attribute::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// Declares that the kernel keeps its own form of the constant input `i` (a packed weight) and
    /// never reads the input at run time: the plan then passes it no value there, and an
    /// initializer no other kernel reads is not kept in the plan at all, so the weight is held
    /// once, in the form its kernel reads.
    pub fn consume_input(&self, i: usize) {
        if self.const_input(i).is_some() {
            self.consumed.borrow_mut().push(i);
        }
    }

    /// Records `bytes` of weight data the kernel keeps in a form of its own (packed panels, 4-bit
    /// codes), for [`ExecutionPlan::memory`].
    pub fn note_held_bytes(&self, bytes: usize) {
        self.held.set(self.held.get() + bytes as u64);
    }

    /// Statically known dtype of input `i`.
    pub fn input_dtype(&self, i: usize) -> Option<DType> {
        let id = self.node.inputs.get(i).copied().flatten()?;
        self.graph.value(id).dtype
    }

    /// Compiles a subgraph (a body of If/Loop/Scan) with this plan's options.
    pub fn compile_subgraph(&self, g: &Graph) -> Result<Arc<ExecutionPlan>> {
        let plan = Arc::new(ExecutionPlan::compile_graph(g, self.options)?);
        self.subplans.borrow_mut().push(Arc::clone(&plan));
        Ok(plan)
    }

    /// Names of this node's implicit inputs, in the order the kernel receives them.
    pub fn implicit_input_names(&self) -> Vec<String> {
        self.node
            .implicit_inputs
            .iter()
            .map(|v| self.graph.value_name(*v).to_string())
            .collect()
    }
}

/// Builds a kernel for one node.
pub type Factory = fn(&NodeCtx) -> Result<Box<dyn OpKernel>>;

/// Operator table: (domain, op type) -> factory.
#[derive(Default)]
pub struct Registry {
    ops: HashMap<(&'static str, &'static str), Factory>,
}

impl Registry {
    /// Registers an operator of the default ONNX domain.
    pub fn add(&mut self, op: &'static str, f: Factory) {
        self.ops.insert(("", op), f);
    }

    /// Registers an operator of another domain (e.g. `com.microsoft`).
    pub fn add_domain(&mut self, domain: &'static str, op: &'static str, f: Factory) {
        self.ops.insert((domain, op), f);
    }

    pub fn get(&self, domain: &str, op: &str) -> Option<Factory> {
        let domain = if domain == "ai.onnx" { "" } else { domain };
        self.ops.get(&(domain, op)).copied()
    }

    pub fn contains(&self, domain: &str, op: &str) -> bool {
        self.get(domain, op).is_some()
    }

    /// The built-in registry with every family registered.
    pub fn global() -> &'static Registry {
        static REG: OnceLock<Registry> = OnceLock::new();
        REG.get_or_init(|| {
            let mut r = Registry::default();
            attention::register(&mut r);
            block_quant::register(&mut r);
            control::register(&mut r);
            conv_nhwc::register(&mut r);
            elementwise::register(&mut r);
            fault::register(&mut r);
            fused::register(&mut r);
            chain::register(&mut r);
            indexing::register(&mut r);
            int8_matmul::register(&mut r);
            matmul::register(&mut r);
            ml::register(&mut r);
            nn::register(&mut r);
            norm::register(&mut r);
            pool::register(&mut r);
            qlinear::register(&mut r);
            quant::register(&mut r);
            qconv::register(&mut r);
            reduce::register(&mut r);
            resize::register(&mut r);
            rnn::register(&mut r);
            sequence::register(&mut r);
            shape::register(&mut r);
            signal::register(&mut r);
            softmax::register(&mut r);
            text::register(&mut r);
            r
        })
    }
}

/// Sorted `(domain, op)` pairs Kiln can run.
pub fn supported_ops() -> Vec<(String, String)> {
    let mut v: Vec<_> = Registry::global()
        .ops
        .keys()
        .filter(|(d, _)| *d != fault::DOMAIN)
        .map(|(d, o)| (d.to_string(), o.to_string()))
        .collect();
    v.sort();
    v
}

/// Single-tensor output helper.
pub fn out1(t: Tensor) -> Result<Vec<Value>> {
    Ok(vec![Value::Tensor(t)])
}
