//! Fused operators the graph optimizer emits (`com.microsoft` domain, as in ONNX Runtime):
//! `FusedConv` (Conv + activation), `Gelu`, `FastGelu` (tanh GELU, optional bias) and `BiasGelu`.
//!
//! `FusedConv` runs the regular Conv kernel and applies the activation to its fresh output in
//! place on the CPU (no second buffer), so it is never slower than Conv followed by the
//! activation node.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, Layout, Tensor as CT};
use kiln_graph::{Attribute, Node};

use kiln_graph::passes::conv_chain::{CONV_CHAIN, KILN as CHAIN_DOMAIN};
use kiln_graph::passes::elementwise_chain::decode;

use super::binary_cpu::{binary_f32, BinOp};
use super::chain::ChainInPlace;
use super::common::tin;
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::cuda_kernels::{self, Act as CudaAct};
use crate::fastmath::Func;
use crate::{bail, Result, Tensor, Value};

const MS: &str = "com.microsoft";

/// f32 CPU GELU (optionally after a broadcast bias add) through the vectorized `fastmath`
/// kernels; `None` when the operands are not contiguous f32 CPU tensors.
fn fast_gelu_f32(x: &CT, bias: Option<&CT>, f: Func) -> Result<Option<Tensor>> {
    if x.dtype() != candle_core::DType::F32 || bias.is_some_and(|b| b.dtype() != candle_core::DType::F32) {
        return Ok(None);
    }
    if let Some(b) = bias {
        if let Some(y) = crate::fastmath::bias_map_tensor(f, x, b) {
            return Ok(Some(Tensor::new(y?, kiln_graph::DType::F32)?));
        }
    }
    let summed;
    let input = match bias {
        Some(b) => match binary_f32(BinOp::Add, x, b) {
            Some(r) => {
                summed = r?;
                &summed
            }
            None => return Ok(None),
        },
        None => x,
    };
    match crate::fastmath::map_tensor(f, input) {
        Some(y) => Ok(Some(Tensor::new(y?, kiln_graph::DType::F32)?)),
        None => Ok(None),
    }
}

pub fn register(r: &mut Registry) {
    r.add_domain(MS, "FusedConv", fused_conv);
    r.add_domain(CHAIN_DOMAIN, CONV_CHAIN, fused_conv_chain);
    r.add_domain(MS, "Gelu", |_| {
        Ok(kernel(|_, ins| {
            let x = tin(ins, 0)?;
            float_only(x, "Gelu")?;
            if let Some(y) = cuda_kernels::bias_act(x.candle(), None, CudaAct::GeluErf)? {
                return out1(Tensor::new(y, x.dtype())?);
            }
            if let Some(y) = fast_gelu_f32(x.candle(), None, Func::GeluErf)? {
                return out1(y);
            }
            out1(x.map(|t| t.gelu_erf())?)
        }))
    });
    r.add_domain(MS, "BiasGelu", |_| {
        Ok(kernel(|_, ins| {
            let (x, b) = (tin(ins, 0)?, tin(ins, 1)?);
            float_only(x, "BiasGelu")?;
            if let Some(y) = cuda_kernels::bias_act(x.candle(), Some(b.candle()), CudaAct::GeluErf)? {
                return out1(Tensor::new(y, x.dtype())?);
            }
            if let Some(y) = fast_gelu_f32(x.candle(), Some(b.candle()), Func::GeluErf)? {
                return out1(y);
            }
            let bc = b.candle().to_dtype(x.candle().dtype())?;
            out1(x.map(|t| t.broadcast_add(&bc)?.gelu_erf())?)
        }))
    });
    r.add_domain(MS, "FastGelu", |_| {
        Ok(kernel(|_, ins| {
            let x = tin(ins, 0)?;
            float_only(x, "FastGelu")?;
            let b = super::common::tin_opt(ins, 1)?;
            if let Some(y) = cuda_kernels::bias_act(x.candle(), b.map(Tensor::candle), CudaAct::GeluTanh)? {
                return out1(Tensor::new(y, x.dtype())?);
            }
            if let Some(y) = fast_gelu_f32(x.candle(), b.map(|b| b.candle()), Func::GeluTanh)? {
                return out1(y);
            }
            let bc = b.map(|b| b.candle().to_dtype(x.candle().dtype())).transpose()?;
            out1(x.map(|t| match &bc {
                Some(b) => t.broadcast_add(b)?.gelu(),
                None => t.gelu(),
            })?)
        }))
    });
}

fn float_only(x: &crate::Tensor, op: &str) -> Result<()> {
    if !x.dtype().is_float() {
        bail!("{op} needs a float input, got {}", x.dtype());
    }
    Ok(())
}

/// The activation of a FusedConv.
#[derive(Debug, Clone, Copy)]
pub(super) enum Act {
    Relu,
    Sigmoid,
    Tanh,
    LeakyRelu(f32),
    HardSigmoid(f32, f32),
    Clip(f32, f32),
}

impl Act {
    pub(super) fn apply(self, v: f32) -> f32 {
        match self {
            Act::Relu => v.max(0.0),
            Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Act::Tanh => v.tanh(),
            Act::LeakyRelu(a) => {
                if v < 0.0 {
                    a * v
                } else {
                    v
                }
            }
            Act::HardSigmoid(a, b) => (a * v + b).clamp(0.0, 1.0),
            Act::Clip(lo, hi) => v.max(lo).min(hi),
        }
    }

    /// The same activation with candle ops (non-f32 or non-CPU tensors).
    fn apply_candle(self, t: &CT) -> candle_core::Result<CT> {
        match self {
            Act::Relu => t.relu(),
            Act::Sigmoid => (t.neg()?.exp()? + 1.0)?.recip(),
            Act::Tanh => t.tanh(),
            Act::LeakyRelu(a) => t.relu()? + (t.minimum(0.0)? * a as f64)?,
            Act::HardSigmoid(a, b) => t.affine(a as f64, b as f64)?.clamp(0.0, 1.0),
            Act::Clip(lo, hi) => t.maximum(lo as f64)?.minimum(hi as f64),
        }
    }
}

impl candle_core::InplaceOp1 for Act {
    fn name(&self) -> &'static str {
        "fused-activation"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused activation: f32 storage expected")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused activation: contiguous layout expected")
        };
        let Some(slice) = data.get_mut(start..end) else {
            candle_core::bail!("fused activation: layout out of the storage")
        };
        let act = *self;
        slice.iter_mut().for_each(|v| *v = act.apply(*v));
        Ok(())
    }
}

/// `y = act(y + z)` in place over two same-shaped contiguous f32 tensors.
struct AddThen(Act);

impl candle_core::InplaceOp2 for AddThen {
    fn name(&self) -> &'static str {
        "fused-add-activation"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("fused add: f32 storage expected")
        };
        let (Some((s1, e1)), Some((s2, e2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("fused add: contiguous layouts expected")
        };
        let (Some(a), Some(b)) = (a.get_mut(s1..e1), b.get(s2..e2)) else {
            candle_core::bail!("fused add: layout out of the storage")
        };
        if a.len() != b.len() {
            candle_core::bail!("fused add: {} vs {} elements", a.len(), b.len())
        }
        let act = self.0;
        a.iter_mut().zip(b).for_each(|(v, &z)| *v = act.apply(*v + z));
        Ok(())
    }
}

pub(super) fn parse_act(n: &NodeCtx) -> Result<Act> {
    let name = n.attr_s("activation", "")?;
    let p = n.attr_floats("activation_params")?.unwrap_or_default();
    let get = |k: usize, default: f32| p.get(k).copied().unwrap_or(default);
    Ok(match name.as_str() {
        "Relu" => Act::Relu,
        "Sigmoid" => Act::Sigmoid,
        "Tanh" => Act::Tanh,
        "LeakyRelu" => Act::LeakyRelu(get(0, 0.01)),
        "HardSigmoid" => Act::HardSigmoid(get(0, 0.2), get(1, 0.5)),
        "Clip" => Act::Clip(get(0, f32::MIN), get(1, f32::MAX)),
        other => return Err(n.err(format!("unsupported FusedConv activation '{other}'"))),
    })
}

/// The plain `Conv` kernel for a fused conv node: its attributes less `extra` (the fusion's own),
/// its output clamped to `clamp` when given.
fn inner_conv(n: &NodeCtx, extra: &[&str], clamp: Option<(f32, f32)>) -> Result<Box<dyn OpKernel>> {
    let attributes: BTreeMap<String, Attribute> = n
        .node
        .attributes
        .iter()
        .filter(|(k, _)| !extra.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut conv_node = Node {
        op_type: "Conv".into(),
        domain: String::new(),
        attributes,
        ..n.node.clone()
    };
    conv_node.inputs.truncate(3);
    let factory = Registry::global()
        .get("", "Conv")
        .ok_or_else(|| n.err("no Conv kernel"))?;
    let cx = NodeCtx {
        node: &conv_node,
        graph: n.graph,
        opset: n.options.opsets.get("").copied().unwrap_or(11),
        options: n.options,
        subplans: Default::default(),
        consumed: Default::default(),
        held: Default::default(),
        packs: n.packs.clone(),
    };
    let k = match clamp {
        Some(c) => super::nn::conv_kernel(&cx, Some(c)),
        None => factory(&cx),
    }?;
    // The Conv node keeps the fused node's input positions 0-2.
    n.consumed.borrow_mut().extend(cx.consumed.take());
    n.note_held_bytes(cx.held.get() as usize);
    Ok(k)
}

/// `ai.kiln::FusedConvChain` (`kiln_graph::passes::conv_chain`): Conv (all of Conv's attributes),
/// then the `ElementwiseChain` of `program` applied to its fresh output in place.
fn fused_conv_chain(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let program = n
        .attr_floats("program")?
        .ok_or_else(|| n.err("missing attribute 'program'"))?;
    let steps = decode(&program).ok_or_else(|| n.err("malformed 'program' attribute"))?;
    let conv = inner_conv(n, &["program"], None)?;
    Ok(kernel(move |cx, ins| {
        let mut outs = conv.run(cx, ins)?;
        let Some(Value::Tensor(y)) = outs.pop() else {
            bail!("FusedConvChain: Conv gave no tensor")
        };
        let t = y.candle();
        if t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous() {
            t.inplace_op1(&ChainInPlace(&steps))?;
            return out1(y);
        }
        let r = super::chain::run_candle(&steps, t)?;
        out1(Tensor::new(r, y.dtype())?)
    }))
}

/// `com.microsoft::FusedConv`: Conv (all of Conv's attributes), plus the optional fourth input
/// `Z` (a residual, broadcast like Add), then `activation`.
fn fused_conv(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let act = parse_act(n)?;
    // Relu and Clip without a residual run inside the conv kernels (in the GEMM's stores on the CPU).
    let residual = matches!(n.node.inputs.get(3), Some(Some(_)));
    let clamp = match act {
        Act::Relu => Some((0.0, f32::INFINITY)),
        Act::Clip(lo, hi) => Some((lo, hi)),
        _ => None,
    }
    .filter(|_| !residual);
    let conv = inner_conv(n, &["activation", "activation_params"], clamp)?;
    if clamp.is_some() {
        return Ok(conv);
    }
    Ok(kernel(move |cx, ins| {
        let mut outs = conv.run(cx, ins.get(..3).unwrap_or(ins))?;
        let Some(Value::Tensor(mut y)) = outs.pop() else {
            bail!("FusedConv: Conv gave no tensor")
        };
        let fast = |t: &CT| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous();
        if let Some(z) = super::common::tin_opt(ins, 3)? {
            let zc = z.candle().to_dtype(y.candle().dtype())?;
            // The Conv kernel's output is a fresh tensor nobody else holds: add in place.
            if fast(y.candle()) && fast(&zc) && zc.dims() == y.dims() {
                y.candle().inplace_op2(&zc, &AddThen(act))?;
                return out1(y);
            }
            y = y.map(|t| t.broadcast_add(&zc))?;
        }
        if fast(y.candle()) {
            y.candle().inplace_op1(&act)?;
            return out1(y);
        }
        out1(y.map(|t| act.apply_candle(t))?)
    }))
}
