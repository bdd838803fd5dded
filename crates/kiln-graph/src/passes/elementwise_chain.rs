//! Chains of element-wise float ops with scalar constants (`x * s + b`, the decomposed HardSwish
//! `x * Clip(x + 3, 0, 6) / 6`, ...) become one `ai.kiln` `ElementwiseChain` node that runs the
//! whole chain in one pass over the data: PP-LCNetV3-style CNNs (PP-OCRv4) put eight such ops
//! after most convolutions, each a full read and write of the activation plus an allocation.
//!
//! The fused kernel performs the same f32 operations in the same order as the ops it replaces
//! (a multiply then an add, never an FMA), so results are bit-identical on the CPU. The node is
//! Kiln's own, so under `strict_opsets` (export) the rule stays off.
//!
//! Steps: `x*c`, `x+c`, `x-c`, `c-x`, `x/c`, `c/x` with a one-element f32 constant `c` (of any
//! rank: attribute `min_rank` is the highest, and the result gets leading 1s up to it, as
//! broadcasting would give),
//! `Clip(x, lo, hi)` with constant bounds, `Sigmoid` and `HardSwish` of an f32 value (the runtime's
//! own f32 functions), and `x * f(x)` where `f` is itself a chain of steps reading `x` (how exporters
//! write HardSwish, and SiLU as `x * Sigmoid(x)`; such a gate may also open a chain). A chain of one
//! step is kept only for HardSwish or a gate (one pass instead of a kernel or two).

use crate::{Attribute, DType, Graph, Node, Result, ValueId};

use super::edit::{const_input, constant, make_node, out0, Index};
use super::{Pass, PassCx};

/// Domain of Kiln's own fused nodes (in-memory graphs only).
pub const KILN: &str = "ai.kiln";
/// The fused node's op type.
pub const OP: &str = "ElementwiseChain";

/// One step of a chain, applied to the running value `x`.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Mul(f32),
    Add(f32),
    /// `x - c`
    Sub(f32),
    /// `c - x`
    SubFrom(f32),
    /// `x / c`
    Div(f32),
    /// `c / x`
    DivInto(f32),
    /// `x < lo ? lo : x`, then `x > hi ? hi : x` (NaN stays NaN, as the Clip kernel does).
    Clip(f32, f32),
    /// `x * f(x)` with `f` the nested steps.
    MulSelf(Vec<Step>),
    /// `1 / (1 + exp(-x))`, as the runtime's f32 Sigmoid kernel computes it (so `x * sigmoid(x)`, SiLU,
    /// is `MulSelf([Sigmoid])`).
    Sigmoid,
    /// ONNX HardSwish, `x * clamp(x / 6 + 0.5, 0, 1)` in f32 ([`hard_swish`]).
    HardSwish,
}

/// HardSwish in f32, shared by the chain step and the runtime's HardSwish kernel.
#[inline]
pub fn hard_swish(x: f32) -> f32 {
    x * (x / 6.0 + 0.5).clamp(0.0, 1.0)
}

/// Encodes steps as the node's `program` attribute: `[code, a, b]` per step; `MulSelf` is
/// `[7, n, 0]` followed by its `n` nested steps.
pub fn encode(steps: &[Step]) -> Vec<f32> {
    let mut v = Vec::new();
    for s in steps {
        match s {
            Step::Mul(c) => v.extend([0.0, *c, 0.0]),
            Step::Add(c) => v.extend([1.0, *c, 0.0]),
            Step::Sub(c) => v.extend([2.0, *c, 0.0]),
            Step::SubFrom(c) => v.extend([3.0, *c, 0.0]),
            Step::Div(c) => v.extend([4.0, *c, 0.0]),
            Step::DivInto(c) => v.extend([5.0, *c, 0.0]),
            Step::Clip(lo, hi) => v.extend([6.0, *lo, *hi]),
            Step::MulSelf(inner) => {
                v.extend([7.0, inner.len() as f32, 0.0]);
                v.extend(encode(inner));
            }
            Step::Sigmoid => v.extend([8.0, 0.0, 0.0]),
            Step::HardSwish => v.extend([9.0, 0.0, 0.0]),
        }
    }
    v
}

/// Decodes a `program` attribute; `None` when it is malformed.
pub fn decode(program: &[f32]) -> Option<Vec<Step>> {
    fn steps(p: &[f32], pos: &mut usize, count: Option<usize>) -> Option<Vec<Step>> {
        let mut out = Vec::new();
        while count.is_none_or(|n| out.len() < n) && *pos < p.len() {
            let t = p.get(*pos..*pos + 3)?;
            *pos += 3;
            let (a, b) = (t[1], t[2]);
            out.push(match t[0] as i32 {
                0 => Step::Mul(a),
                1 => Step::Add(a),
                2 => Step::Sub(a),
                3 => Step::SubFrom(a),
                4 => Step::Div(a),
                5 => Step::DivInto(a),
                6 => Step::Clip(a, b),
                7 => {
                    if !(a >= 1.0 && a.fract() == 0.0) {
                        return None;
                    }
                    Step::MulSelf(steps(p, pos, Some(a as usize))?)
                }
                8 => Step::Sigmoid,
                9 => Step::HardSwish,
                _ => return None,
            });
        }
        (count.is_none_or(|n| out.len() == n)).then_some(out)
    }
    let mut pos = 0;
    let s = steps(program, &mut pos, None)?;
    (pos == program.len()).then_some(s)
}

/// Rule `elementwise_chain_fusion`.
pub struct FuseElementwiseChains;

/// A one-element f32 constant and whether it is the node's first operand (which makes `x` f32
/// too: both operands of these ops have one type).
fn scalar_operand(g: &Graph, cx: &PassCx, node: &Node, x: ValueId) -> Option<(f32, bool)> {
    let [Some(a), Some(b)] = node.inputs.as_slice() else {
        return None;
    };
    let (c, c_first) = if *a == x && *b != x {
        (*b, false)
    } else if *b == x && *a != x {
        (*a, true)
    } else {
        return None;
    };
    let t = constant(g, cx.options, c)?;
    // Up to rank 8: a one-element constant of higher rank than `x` widens the result with leading
    // 1s (`[] + [1]` is `[1]`); the node's `min_rank` says how far.
    if t.dtype != DType::F32 || t.len() != 1 || t.dims.len() > 8 {
        return None;
    }
    Some((*t.values::<f32>()?.first()?, c_first))
}

/// The step `node` applies to `x` when it is a simple one (not `MulSelf`).
fn simple_step(g: &Graph, cx: &PassCx, node: &Node, x: ValueId) -> Option<Step> {
    if !node.domain.is_empty() || node.outputs.len() != 1 {
        return None;
    }
    match node.op_type.as_str() {
        "Mul" | "Add" | "Sub" | "Div" => {
            let (c, c_first) = scalar_operand(g, cx, node, x)?;
            Some(match (node.op_type.as_str(), c_first) {
                ("Mul", _) => Step::Mul(c),
                ("Add", _) => Step::Add(c),
                ("Sub", false) => Step::Sub(c),
                ("Sub", true) => Step::SubFrom(c),
                ("Div", false) => Step::Div(c),
                _ => Step::DivInto(c),
            })
        }
        // No constant types `x` here: the value's inferred dtype must be f32.
        "Sigmoid" | "HardSwish"
            if node.inputs.first().copied().flatten() == Some(x) && g.value(x).dtype == Some(DType::F32) =>
        {
            Some(if node.op_type == "Sigmoid" {
                Step::Sigmoid
            } else {
                Step::HardSwish
            })
        }
        "Clip" if node.inputs.first().copied().flatten() == Some(x) && node.attributes.is_empty() => {
            let bound = |i: usize, default: f32| -> Option<f32> {
                match node.inputs.get(i).copied().flatten() {
                    None => Some(default),
                    Some(_) => {
                        let t = const_input(g, cx.options, node, i)?;
                        if t.dtype != DType::F32 || t.len() != 1 {
                            return None;
                        }
                        t.values::<f32>()?.first().copied()
                    }
                }
            };
            // A constant bound types `x` as f32 (a bound-less Clip could be any type).
            node.inputs.iter().skip(1).flatten().next()?;
            Some(Step::Clip(bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?))
        }
        _ => None,
    }
}

struct Chain {
    steps: Vec<Step>,
    /// Nodes the chain replaces.
    nodes: Vec<usize>,
    out: ValueId,
}

impl FuseElementwiseChains {
    /// Grows a chain from value `x` (the chain's input); `depth` 1 (nested) allows no `MulSelf`.
    fn grow(g: &Graph, cx: &PassCx, idx: &Index, x: ValueId, depth: usize) -> Chain {
        let mut chain = Chain {
            steps: Vec::new(),
            nodes: Vec::new(),
            out: x,
        };
        loop {
            let cur = chain.out;
            if let Some(r) = idx.sole_reader(cur) {
                if idx.is_touched(r) {
                    break;
                }
                let Some(step) = simple_step(g, cx, &g.nodes[r], cur) else {
                    break;
                };
                let Some(o) = out0(&g.nodes[r]) else { break };
                chain.steps.push(step);
                chain.nodes.push(r);
                chain.out = o;
                continue;
            }
            // `cur * f(cur)`: two readers, a chain and the Mul that closes it.
            if depth > 0 || idx.pinned.contains(&cur) {
                break;
            }
            let readers = idx.readers(cur);
            let [r1, r2] = readers else { break };
            let (mul, head) = if is_mul_of(&g.nodes[*r1], cur) {
                (*r1, *r2)
            } else {
                (*r2, *r1)
            };
            if mul == head || idx.is_touched(mul) || idx.is_touched(head) || !is_mul_of(&g.nodes[mul], cur) {
                break;
            }
            let Some(inner) = Self::grow_from(g, cx, idx, cur, head) else {
                break;
            };
            let closes = g.nodes[mul].inputs.iter().flatten().any(|v| *v == inner.out);
            let Some(o) = out0(&g.nodes[mul]) else { break };
            if !closes || inner.steps.is_empty() || idx.sole_reader(inner.out) != Some(mul) {
                break;
            }
            chain.steps.push(Step::MulSelf(inner.steps));
            chain.nodes.extend(inner.nodes);
            chain.nodes.push(mul);
            chain.out = o;
        }
        chain
    }

    /// A nested chain starting at node `head` (which reads `x`), stopping before the node that
    /// reads its result more than once or is not a simple step.
    fn grow_from(g: &Graph, cx: &PassCx, idx: &Index, x: ValueId, head: usize) -> Option<Chain> {
        let step = simple_step(g, cx, &g.nodes[head], x)?;
        let o = out0(&g.nodes[head])?;
        let mut rest = Self::grow(g, cx, idx, o, 1);
        rest.steps.insert(0, step);
        rest.nodes.insert(0, head);
        Some(rest)
    }
}

/// `node` is `Mul(x, y)` or `Mul(y, x)` with `y != x`.
fn is_mul_of(node: &Node, x: ValueId) -> bool {
    node.domain.is_empty()
        && node.op_type == "Mul"
        && matches!(node.inputs.as_slice(), [Some(a), Some(b)] if (*a == x) != (*b == x))
}

impl Pass for FuseElementwiseChains {
    fn name(&self) -> &'static str {
        "elementwise_chain_fusion"
    }

    fn run(&self, g: &mut Graph, cx: &PassCx) -> Result<usize> {
        if cx.options.strict_opsets || !cx.can_emit(KILN, OP, 1) {
            return Ok(0);
        }
        let mut idx = Index::new(g);
        let mut count = 0;
        for head in 0..g.nodes.len() {
            if idx.is_touched(head) {
                continue;
            }
            // Nodes are in topological order, so the first step of a chain is met first.
            let Some(x) = g.nodes[head]
                .inputs
                .iter()
                .flatten()
                .find(|v| !g.initializers.contains_key(v))
                .copied()
            else {
                continue;
            };
            // A chain that opens with `x * f(x)` (SiLU: `x * Sigmoid(x)`) starts at x's first reader.
            let opens_with_gate = idx.readers(x).len() == 2 && idx.readers(x).iter().min() == Some(&head);
            let gated = opens_with_gate
                .then(|| Self::grow(g, cx, &idx, x, 0))
                .filter(|c| matches!(c.steps.first(), Some(Step::MulSelf(_))) && c.nodes.contains(&head));
            let rest = match gated {
                Some(c) => c,
                None => {
                    let Some(first) = simple_step(g, cx, &g.nodes[head], x) else {
                        continue;
                    };
                    let Some(o) = out0(&g.nodes[head]) else { continue };
                    let mut rest = Self::grow(g, cx, &idx, o, 0);
                    rest.steps.insert(0, first);
                    rest.nodes.insert(0, head);
                    rest
                }
            };
            // One cheap step is no gain; a HardSwish or a gate alone is (one vectorized f32 pass
            // instead of one or two kernels and their allocations).
            if rest.steps.len() < 2 && !matches!(rest.steps.as_slice(), [Step::HardSwish] | [Step::MulSelf(_)]) {
                continue;
            }
            if rest.nodes.first() != Some(&head) {
                continue;
            }
            let min_rank = rest
                .nodes
                .iter()
                .flat_map(|&i| g.nodes[i].inputs.iter().flatten())
                .filter_map(|v| g.initializers.get(v))
                .map(|t| t.dims.len())
                .max()
                .unwrap_or(0);
            let mut attrs = std::collections::BTreeMap::new();
            attrs.insert("program".to_string(), Attribute::Floats(encode(&rest.steps)));
            attrs.insert("min_rank".to_string(), Attribute::Int(min_rank as i64));
            let name = format!("{}_chain", g.nodes[head].name);
            let fused = make_node(name, KILN, OP, vec![Some(x)], vec![Some(rest.out)], attrs);
            // The chain's input is available at `head`, and every reader of its output comes
            // after the chain's last node, so the fused node can take `head`'s place.
            g.nodes[head] = fused;
            idx.remove(&rest.nodes[1..]);
            idx.touch(&[head]);
            count += 1;
        }
        idx.finish(g);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_round_trip() {
        let steps = vec![
            Step::Mul(0.5),
            Step::Add(-1.0),
            Step::MulSelf(vec![Step::Add(3.0), Step::Clip(0.0, 6.0)]),
            Step::Div(6.0),
            Step::SubFrom(2.0),
            Step::DivInto(1.0),
            Step::Sub(0.25),
            Step::MulSelf(vec![Step::Sigmoid]),
            Step::HardSwish,
        ];
        assert_eq!(decode(&encode(&steps)), Some(steps));
        assert_eq!(decode(&[10.0, 0.0, 0.0]), None);
        assert_eq!(decode(&[7.0, 2.0, 0.0, 0.0, 1.0, 0.0]), None);
        assert_eq!(decode(&[0.0, 1.0]), None);
    }
}
