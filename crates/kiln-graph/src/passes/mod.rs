//! Graph rewrite passes and the pass manager. One file per pass; each is a named rule.
//!
//! [`optimize`] runs the passes of an [`OptLevel`] over the main graph to a fixed point (bounded by
//! [`Options::max_iterations`]) and returns a [`Report`] with how often each rule fired. Levels follow
//! ONNX Runtime:
//!
//! - `Basic`: semantics-preserving clean-ups that need no knowledge of the backend: constant folding
//!   (through a [`ConstEval`] that runs the node's real kernel), static `Shape`/`Size` folding,
//!   dead-node elimination, common-subexpression elimination, removal of no-op nodes (Identity,
//!   same-type Cast, identity Reshape/Transpose, inference Dropout) and Reshape chains.
//! - `Extended`: operator fusions into ops the runtime implements (MatMul+Add -> Gemm, Conv+BN,
//!   Conv[+residual Add]+activation -> `com.microsoft` FusedConv, LayerNorm and GELU subgraphs, bias+GELU,
//!   scaled-dot-product attention, Transpose pairs, QDQ convolutions -> QLinearConv).
//! - `All`: Extended plus fusions into Kiln's own `ai.kiln` nodes, which only Kiln runs (chains of
//!   scalar element-wise ops -> `ElementwiseChain`, and such a chain after a Conv ->
//!   `FusedConvChain`), and, when asked for (`Options::nhwc_convs`: CPU f32 sessions on AVX-512F CPUs by default, `KILN_NHWC=0|1`),
//!   channels-last conv regions (`nhwc`, once after the fixed point).
//!
//! Rules never rename or remove graph outputs, never drop graph inputs, and never rewire a value a
//! subgraph reads by name (an implicit input): those values are *pinned* (see [`edit`]).

use std::collections::BTreeMap;
use std::fmt;

use crate::{Graph, Node, Result, TensorData};

pub mod attention;
pub mod bias_gelu;
pub mod const_fold;
pub mod conv_activation;
pub mod conv_add_activation;
pub mod conv_bn;
pub mod conv_chain;
pub mod cse;
pub mod dce;
pub mod edit;
pub mod elementwise_chain;
pub mod float16;
pub mod gelu;
pub mod int8_matmul;
pub mod layer_norm;
pub mod matmul_add;
pub mod matmul_bias;
pub mod matmul_integer_to_float;
pub mod nhwc;
pub mod noop;
pub mod paged_attention;
pub mod prune;
pub mod qdq_conv;
pub mod qdq_matmul;
pub mod qdq_pair;
pub mod quantize;
pub mod quantize_int4;
pub mod quantize_static;
pub mod reshape_chain;
pub mod shape_fold;
pub mod tied_weight;
pub mod transpose;

/// How much rewriting to do (the ONNX Runtime levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum OptLevel {
    Disabled,
    #[default]
    Basic,
    Extended,
    All,
}

/// Evaluates single nodes on constant inputs with the runtime's real kernels, and says which
/// operators the runtime implements (so a fusion only emits ops that can run).
///
/// kiln-graph cannot run kernels; `kiln-runtime` implements this on the CPU.
pub trait ConstEval {
    /// Runs `node` (of `graph`, whose other nodes are irrelevant) on `inputs` (aligned with the
    /// node's explicit inputs, `None` for omitted ones) and returns the tensors of its present
    /// (`Some`) outputs, in order. `Ok(None)` when the node cannot be folded
    /// (its outputs are not all tensors); `Err` with a reason when the kernel failed or would
    /// allocate a tensor over `max_output_bytes`.
    fn eval(
        &self,
        graph: &Graph,
        node: &Node,
        opset: i64,
        inputs: &[Option<TensorData>],
        max_output_bytes: usize,
    ) -> std::result::Result<Option<Vec<TensorData>>, String>;

    /// `true` when the runtime has a kernel for `domain::op` (`""` is the default domain).
    fn has_kernel(&self, domain: &str, op: &str) -> bool;
}

/// What [`optimize`] may do.
#[derive(Debug, Clone)]
pub struct Options {
    pub level: OptLevel,
    /// Fixed-point iteration cap (one iteration runs every pass once).
    pub max_iterations: usize,
    /// A folded tensor may be at most this many bytes larger than the node's constant inputs
    /// together (so folding `ConstantOfShape` of a big shape does not inflate the model beyond it).
    pub max_fold_growth_bytes: usize,
    /// Opset versions of the model by domain (`""` = ai.onnx).
    pub opsets: BTreeMap<String, i64>,
    /// Initializers that are also graph inputs may be overridden by the caller (IR version >= 4):
    /// they are then not constants.
    pub overridable_initializers: bool,
    /// Only emit default-domain ops that exist in the model's declared opset (e.g. fuse to
    /// `LayerNormalization` only at opset >= 17), so an exported model stays valid ONNX. When
    /// `false` (in-memory sessions), Kiln's kernels are used regardless of the declared opset.
    pub strict_opsets: bool,
    /// Level All's `matmul_bias_fusion` (MatMul + bias (+ GELU) -> `ai.kiln::MatMulBias`). Off when the
    /// int8 weight-only quantization runs after the optimizer: it rewrites MatMul/Gemm weights only.
    pub fuse_matmul_bias: bool,
    /// Level All's `transposed_weight_matmul`: `MatMul(X, Transpose(W))` with a constant `W` reads
    /// `W` as stored (`ai.kiln::MatMulBias` with `trans_b`), so tied embeddings stay one tensor.
    /// For CPU sessions, whose kernels pack such a weight once for every reader.
    pub share_transposed_weights: bool,
    /// Level All's channels-last regions (`nhwc_layout`): 2-D convs and the ops between them on
    /// `[N, H, W, C]` tensors, run once after the fixed point. For CPU f32 sessions.
    pub nhwc_convs: bool,
    /// QLinearConv joins those regions (`ai.kiln::QLinearConvNhwc`), with the per-tensor
    /// Quantize/DequantizeLinear around it. For CPU sessions.
    pub nhwc_qconvs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            level: OptLevel::Basic,
            max_iterations: 8,
            max_fold_growth_bytes: 64 << 20,
            opsets: BTreeMap::new(),
            overridable_initializers: true,
            strict_opsets: false,
            fuse_matmul_bias: true,
            share_transposed_weights: false,
            nhwc_convs: false,
            nhwc_qconvs: false,
        }
    }
}

impl Options {
    /// Options for a model: its opsets and IR version.
    pub fn for_model(model: &crate::Model, level: OptLevel) -> Self {
        Options {
            level,
            opsets: model.opsets.clone(),
            overridable_initializers: model.ir_version >= 4,
            ..Default::default()
        }
    }

    /// Default-domain opset (1 when undeclared).
    pub fn opset(&self) -> i64 {
        self.opsets.get("").copied().unwrap_or(1)
    }
}

/// Shared state handed to every rule.
pub struct PassCx<'a> {
    pub options: &'a Options,
    pub eval: &'a dyn ConstEval,
}

impl PassCx<'_> {
    /// `true` when a fused node `domain::op` may be emitted: the runtime has a kernel and, for the
    /// default domain under `strict_opsets`, the model's opset has the op (`since` = first opset).
    pub fn can_emit(&self, domain: &str, op: &str, since: i64) -> bool {
        self.eval.has_kernel(domain, op)
            && (!domain.is_empty() || !self.options.strict_opsets || self.options.opset() >= since)
    }
}

/// One named rewrite rule.
pub trait Pass {
    /// Rule name (used in reports and errors).
    fn name(&self) -> &'static str;
    /// Applies the rule everywhere it matches once; returns how many rewrites were made.
    fn run(&self, graph: &mut Graph, cx: &PassCx) -> Result<usize>;
}

/// The rules of a level, in the order they run within one iteration.
pub fn passes_for(level: OptLevel) -> Vec<Box<dyn Pass>> {
    let mut v: Vec<Box<dyn Pass>> = Vec::new();
    if level == OptLevel::Disabled {
        return v;
    }
    if level >= OptLevel::All {
        // Before constant folding, which would copy the transposed weight.
        v.push(Box::new(tied_weight::MatMulTransposedWeight));
    }
    v.push(Box::new(noop::EliminateNoOps));
    v.push(Box::new(shape_fold::FoldStaticShapes));
    if level >= OptLevel::Extended {
        // Before constant folding, which would turn the filter's DequantizeLinear into floats.
        v.push(Box::new(qdq_conv::FuseQdqConv));
        v.push(Box::new(qdq_matmul::FuseQdqMatMul));
    }
    v.push(Box::new(const_fold::FoldConstants));
    v.push(Box::new(reshape_chain::MergeReshapes));
    v.push(Box::new(cse::EliminateCommonSubexpressions));
    if level >= OptLevel::Extended {
        v.push(Box::new(transpose::MergeTransposes));
        v.push(Box::new(conv_bn::FuseConvBatchNorm));
        v.push(Box::new(conv_add_activation::FuseConvAddActivation));
        v.push(Box::new(conv_activation::FuseConvActivation));
        v.push(Box::new(matmul_add::FuseMatMulAdd));
        v.push(Box::new(layer_norm::FuseLayerNorm));
        v.push(Box::new(gelu::FuseGelu));
        v.push(Box::new(bias_gelu::FuseBiasGelu));
        v.push(Box::new(matmul_integer_to_float::FuseMatMulIntegerToFloat));
        v.push(Box::new(attention::FuseAttention));
    }
    if level >= OptLevel::All {
        v.push(Box::new(matmul_bias::FuseMatMulBias));
        v.push(Box::new(qdq_pair::FuseQuantizeDequantize));
        v.push(Box::new(elementwise_chain::FuseElementwiseChains));
        v.push(Box::new(conv_chain::FuseConvChain));
    }
    v.push(Box::new(dce::EliminateDeadNodes));
    v
}

/// What [`optimize`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Fixed-point iterations run.
    pub iterations: usize,
    /// Rewrites per rule (rules that never fired are absent).
    pub rewrites: BTreeMap<&'static str, usize>,
}

impl Report {
    /// How many times `rule` fired.
    pub fn count(&self, rule: &str) -> usize {
        self.rewrites.get(rule).copied().unwrap_or(0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} nodes in {} iteration(s)",
            self.nodes_before, self.nodes_after, self.iterations
        )?;
        for (k, v) in &self.rewrites {
            write!(f, "; {k}: {v}")?;
        }
        Ok(())
    }
}

/// Runs the passes of `options.level` over `graph` until nothing changes or the iteration cap is
/// reached. Subgraph bodies (If/Loop/Scan) are left as written.
pub fn optimize(graph: &mut Graph, options: &Options, eval: &dyn ConstEval) -> Result<Report> {
    let mut report = Report {
        nodes_before: graph.nodes.len(),
        ..Default::default()
    };
    let passes = passes_for(options.level);
    let cx = PassCx { options, eval };
    if !passes.is_empty() {
        for _ in 0..options.max_iterations.max(1) {
            report.iterations += 1;
            let mut changed = 0;
            for p in &passes {
                crate::infer::infer_shapes(graph);
                let n = p.run(graph, &cx)?;
                if n > 0 {
                    *report.rewrites.entry(p.name()).or_insert(0) += n;
                    changed += n;
                }
            }
            if changed == 0 {
                break;
            }
        }
        if options.level >= OptLevel::All && (options.nhwc_convs || options.nhwc_qconvs) {
            crate::infer::infer_shapes(graph);
            let n = nhwc::run(graph, &cx)?;
            if n > 0 {
                report.rewrites.insert(nhwc::RULE, n);
            }
        }
        graph.topological_order().map_err(|e| crate::GraphError::Pass {
            pass: "optimize".into(),
            reason: format!("the optimized graph is invalid: {e}"),
        })?;
    }
    report.nodes_after = graph.nodes.len();
    Ok(report)
}
