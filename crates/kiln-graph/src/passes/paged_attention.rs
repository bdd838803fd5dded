//! KV-cache attention -> `ai.kiln::PagedAttention`: the rewrite that lets an ONNX decoder exported
//! with dense `past_key_values` run on a paged KV cache with a flat token batch from many
//! sequences. Not one of the optimization levels: an LLM engine applies it before optimizing.
//!
//! Recognised per layer (the decomposed form `torch.onnx` / optimum / Kiln's SmolLM2 builder write):
//!
//! ```text
//! present_k = Concat(past_k, K, axis=2)      present_v = Concat(past_v, V, axis=2)
//! Kr = repeat(present_k)  (Unsqueeze/Expand/Reshape/Tile for grouped heads; may be absent)
//! scores = MatMul(Q, Transpose(Kr, perm=[0,1,3,2])) [* or / scalar constants]
//! probs = Softmax(scores [+ mask], axis=-1)       out = MatMul(probs, repeat(present_v))
//! ```
//!
//! and ONNX's own `Attention` (opset 23) with `past_key`/`past_value` graph inputs (4-D `[B, H, S, D]`
//! or 3-D `[B, S, H*D]` with `q_num_heads`/`kv_num_heads`; causal through `is_causal = 1` or a mask built
//! from the token layout; no softcap, no extra outputs), and ONNX Runtime's
//! `com.microsoft::GroupQueryAttention` (the ONNX Runtime GenAI export form: 3-D, Q/K/V often packed
//! in one input, the rotary embedding inside with cos/sin caches, positions from the mask), and
//! replaced by `out = PagedAttention(Q, K, V [, cos_cache, sin_cache])` with the layer's index and the
//! scale (3-D layouts keep their layout through the kernel's `num_heads`/`kv_num_heads`; packed QKV
//! leaves K and V empty; `do_rotary` and `rotary_interleaved` carry the rotary embedding). The
//! `past_*` inputs and `present_*` outputs leave the graph, and so does every input nothing reads
//! any more (usually `attention_mask`). The mask must be a function of the token layout only (its
//! ancestors are graph inputs other than the past K/V, and constants): PagedAttention's causal
//! attention per sequence replaces it, and a flat batch has no padding. Bias masks that depend on
//! anything else (ALiBi from weights, say) are refused.
//!
//! Optionally the final projection producing `logits` reads only the rows named by a new input
//! `logits_indices` (int64 `[n]`): a prefill of 500 tokens then multiplies one hidden row by the
//! vocabulary matrix instead of 500 (vLLM computes logits only where it samples).

use std::collections::{BTreeMap, HashSet};

use crate::{Attribute, DType, Dim, GraphError, Model, Node, Result, Shape, ValueId, ValueInfo, ValueKind};

use super::dce::{drop_unused_initializers, eliminate_dead_nodes};
use super::edit::{scalar_f64, Index};

pub const KILN_DOMAIN: &str = "ai.kiln";
const MS_DOMAIN: &str = "com.microsoft";
/// Name of the input added by [`PagedRewriteOptions::select_logits`].
pub const LOGITS_INDICES: &str = "logits_indices";

#[derive(Debug, Clone)]
pub struct PagedRewriteOptions {
    /// Gather the rows named by `logits_indices` before the projection producing this output.
    pub select_logits: Option<String>,
}

impl Default for PagedRewriteOptions {
    fn default() -> Self {
        PagedRewriteOptions {
            select_logits: Some("logits".into()),
        }
    }
}

/// What the rewrite did.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedRewrite {
    /// Attention layers replaced, in execution order (PagedAttention `layer` attribute 0..n).
    pub num_layers: usize,
    /// KV heads and head size, from the past inputs' declared shapes where known.
    pub num_kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    /// Graph inputs removed: the past K/V and those nothing reads any more.
    pub removed_inputs: Vec<String>,
    /// Graph outputs removed (the present K/V).
    pub removed_outputs: Vec<String>,
    /// Whether `logits_indices` was added.
    pub selects_logits: bool,
}

fn err(reason: impl Into<String>) -> GraphError {
    GraphError::Pass {
        pass: "paged_attention".into(),
        reason: reason.into(),
    }
}

const REPEAT_OPS: &[&str] = &["Reshape", "Expand", "Unsqueeze", "Tile", "Identity", "Squeeze"];

struct Layer {
    q: ValueId,
    /// The step's new keys and values; `None` when `q` packs Q, K and V (GroupQueryAttention).
    k_new: Option<ValueId>,
    v_new: Option<ValueId>,
    past: [ValueId; 2],
    present: [ValueId; 2],
    out: ValueId,
    out_node: usize,
    scale: f64,
    mask: Option<ValueId>,
    name: String,
    /// Head counts for 3-D inputs (`Attention` with `[B, S, H*D]` tensors).
    heads_3d: Option<(i64, i64)>,
    /// Rotary embedding applied inside the attention (GroupQueryAttention's `do_rotary`): the cos
    /// and sin caches `[max_position, rotary_dim / 2]` and whether pairs are interleaved.
    rotary: Option<(ValueId, ValueId, bool)>,
}

struct Matcher<'a> {
    g: &'a crate::Graph,
    idx: Index,
    inputs: HashSet<ValueId>,
}

impl Matcher<'_> {
    fn producer(&self, v: ValueId) -> Option<(usize, &Node)> {
        let p = *self.idx.producer.get(&v)?;
        Some((p, &self.g.nodes[p]))
    }

    fn op(&self, v: ValueId, op: &str) -> Option<(usize, &Node)> {
        self.producer(v).filter(|(_, n)| n.op_type == op && n.domain.is_empty())
    }

    fn input(n: &Node, i: usize) -> Option<ValueId> {
        n.inputs.get(i).copied().flatten()
    }

    /// Follow data-preserving head-repeat nodes back to their source.
    fn through_repeat(&self, mut v: ValueId) -> ValueId {
        while let Some((_, n)) = self.producer(v) {
            if n.domain.is_empty() && REPEAT_OPS.contains(&n.op_type.as_str()) {
                match Self::input(n, 0) {
                    Some(x) => v = x,
                    None => break,
                }
            } else {
                break;
            }
        }
        v
    }

    /// `Concat(past, new, axis=2)` with `past` a graph input: returns (past, new, present).
    fn kv_concat(&self, v: ValueId) -> Option<(ValueId, ValueId, ValueId)> {
        let (_, n) = self.op(v, "Concat")?;
        let axis = match n.attr("axis") {
            Some(Attribute::Int(a)) => *a,
            _ => return None,
        };
        if !(axis == 2 || axis == -2) || n.inputs.len() != 2 {
            return None;
        }
        let (past, new) = (Self::input(n, 0)?, Self::input(n, 1)?);
        self.inputs.contains(&past).then_some((past, new, v))
    }

    /// The scores chain under a Softmax input: scalar Mul/Div then `MatMul(Q, Kt)`.
    fn scores(&self, mut v: ValueId) -> Option<(ValueId, ValueId, f64)> {
        let mut scale = 1.0;
        loop {
            let (_, n) = self.producer(v)?;
            if !n.domain.is_empty() {
                return None;
            }
            match n.op_type.as_str() {
                "Mul" => {
                    let (a, b) = (Self::input(n, 0)?, Self::input(n, 1)?);
                    if let Some(c) = self.scalar(b) {
                        scale *= c;
                        v = a;
                    } else if let Some(c) = self.scalar(a) {
                        scale *= c;
                        v = b;
                    } else {
                        return None;
                    }
                }
                "Div" => {
                    let c = self.scalar(Self::input(n, 1)?)?;
                    if c == 0.0 {
                        return None;
                    }
                    scale /= c;
                    v = Self::input(n, 0)?;
                }
                "MatMul" => return Some((Self::input(n, 0)?, Self::input(n, 1)?, scale)),
                _ => return None,
            }
        }
    }

    fn scalar(&self, v: ValueId) -> Option<f64> {
        if let Some(t) = self.g.initializers.get(&v) {
            return scalar_f64(t);
        }
        let (_, n) = self.op(v, "Constant")?;
        match n.attr("value") {
            Some(Attribute::Tensor(t)) => scalar_f64(t),
            Some(Attribute::Float(f)) => Some(*f as f64),
            _ => match n.attr("value_float") {
                Some(Attribute::Float(f)) => Some(*f as f64),
                _ => None,
            },
        }
    }

    /// K through `Transpose(perm=[0,1,3,2])` and repeats to its Concat with the past.
    fn key_path(&self, kt: ValueId) -> Option<(ValueId, ValueId, ValueId)> {
        let v = self.through_repeat(kt);
        let (_, t) = self.op(v, "Transpose")?;
        match t.attr("perm") {
            Some(Attribute::Ints(p)) if p == &[0, 1, 3, 2] => {}
            _ => return None,
        }
        self.kv_concat(self.through_repeat(Self::input(t, 0)?))
    }

    fn layer_at(&self, softmax: usize) -> Option<Layer> {
        let sm = &self.g.nodes[softmax];
        match sm.attr("axis") {
            Some(Attribute::Int(-1)) | Some(Attribute::Int(3)) => {}
            None => {} // opset >= 13 default is -1
            _ => return None,
        }
        let x = Self::input(sm, 0)?;
        let probs = sm.outputs.first().copied().flatten()?;
        // Optional additive mask.
        let (scores, mask) = match self.op(x, "Add") {
            Some((_, add)) => {
                let (a, b) = (Self::input(add, 0)?, Self::input(add, 1)?);
                if self.scores(a).and_then(|(_, kt, _)| self.key_path(kt)).is_some() {
                    (a, Some(b))
                } else {
                    (b, Some(a))
                }
            }
            None => (x, None),
        };
        let (q, kt, scale) = self.scores(scores)?;
        let (past_k, k_new, present_k) = self.key_path(kt)?;
        let [reader] = self.idx.readers(probs) else { return None };
        let pv = &self.g.nodes[*reader];
        if pv.op_type != "MatMul" || !pv.domain.is_empty() || Self::input(pv, 0)? != probs {
            return None;
        }
        let (past_v, v_new, present_v) = self.kv_concat(self.through_repeat(Self::input(pv, 1)?))?;
        Some(Layer {
            q,
            k_new: Some(k_new),
            v_new: Some(v_new),
            past: [past_k, past_v],
            present: [present_k, present_v],
            out: pv.outputs.first().copied().flatten()?,
            out_node: *reader,
            scale,
            mask,
            name: sm.name.clone(),
            heads_3d: None,
            rotary: None,
        })
    }

    /// ONNX `Attention` (opset 23) reading past K/V graph inputs and writing present outputs.
    fn attention_op(&self, i: usize) -> Option<Layer> {
        let n = &self.g.nodes[i];
        let (q, k, v) = (Self::input(n, 0)?, Self::input(n, 1)?, Self::input(n, 2)?);
        let mask = Self::input(n, 3);
        let (past_k, past_v) = (Self::input(n, 4)?, Self::input(n, 5)?);
        if !self.inputs.contains(&past_k) || !self.inputs.contains(&past_v) {
            return None;
        }
        let out = n.outputs.first().copied().flatten()?;
        let present_k = n.outputs.get(1).copied().flatten()?;
        let present_v = n.outputs.get(2).copied().flatten()?;
        if n.outputs.get(3).copied().flatten().is_some() {
            return None; // the qk_matmul_output would need the scores
        }
        let int = |name: &str| match n.attr(name) {
            Some(Attribute::Int(x)) => Some(*x),
            _ => None,
        };
        let softcap = match n.attr("softcap") {
            Some(Attribute::Float(c)) => *c,
            _ => 0.0,
        };
        let causal = int("is_causal").unwrap_or(0) != 0;
        if softcap != 0.0 || (!causal && mask.is_none()) {
            return None;
        }
        let scale = match n.attr("scale") {
            Some(Attribute::Float(x)) => *x as f64,
            _ => 0.0, // the kernel's default, 1/sqrt(head_dim)
        };
        let heads_3d = match (int("q_num_heads"), int("kv_num_heads")) {
            (Some(hq), Some(hk)) => Some((hq, hk)),
            _ => None,
        };
        Some(Layer {
            q,
            k_new: Some(k),
            v_new: Some(v),
            past: [past_k, past_v],
            present: [present_k, present_v],
            out,
            out_node: i,
            scale,
            mask,
            name: n.name.clone(),
            heads_3d,
            rotary: None,
        })
    }

    /// ONNX Runtime's `com.microsoft::GroupQueryAttention` (the ONNX Runtime GenAI export form) with
    /// past K/V graph inputs: 3-D `[B, S, H*D]` query (or Q, K and V packed in one `[B, S, (H + 2 *
    /// KV) * D]` input), causal, rotary inside (`do_rotary`) or not. Its `seqlens_k` and
    /// `total_sequence_length` inputs (computed from the attention mask) describe a padded dense batch
    /// and go with it; explicit `position_ids`, an `attention_bias`, a `head_sink`, a sliding window
    /// (`local_window_size`) or `softcap` are not carried over, so such layers are left alone.
    fn group_query_attention(&self, i: usize) -> Option<Layer> {
        let n = &self.g.nodes[i];
        let q = Self::input(n, 0)?;
        let (k, v) = (Self::input(n, 1), Self::input(n, 2));
        if k.is_some() != v.is_some() {
            return None;
        }
        let (past_k, past_v) = (Self::input(n, 3)?, Self::input(n, 4)?);
        if !self.inputs.contains(&past_k) || !self.inputs.contains(&past_v) {
            return None;
        }
        if (9..n.inputs.len()).any(|j| Self::input(n, j).is_some()) {
            return None; // position_ids, attention_bias, head_sink
        }
        let int = |name: &str, default: i64| match n.attr(name) {
            Some(Attribute::Int(x)) => Some(*x),
            None => Some(default),
            _ => None,
        };
        let float = |name: &str| match n.attr(name) {
            Some(Attribute::Float(x)) => Some(*x as f64),
            None => Some(0.0),
            _ => None,
        };
        let (heads, kv_heads) = (int("num_heads", 0)?, int("kv_num_heads", 0)?);
        if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 {
            return None;
        }
        if int("local_window_size", -1)? != -1 || float("softcap")? != 0.0 {
            return None;
        }
        let rotary = if int("do_rotary", 0)? != 0 {
            Some((
                Self::input(n, 7)?,
                Self::input(n, 8)?,
                int("rotary_interleaved", 0)? != 0,
            ))
        } else {
            None
        };
        Some(Layer {
            q,
            k_new: k,
            v_new: v,
            past: [past_k, past_v],
            present: [
                n.outputs.get(1).copied().flatten()?,
                n.outputs.get(2).copied().flatten()?,
            ],
            out: n.outputs.first().copied().flatten()?,
            out_node: i,
            scale: float("scale")?,
            mask: None,
            name: n.name.clone(),
            heads_3d: Some((heads, kv_heads)),
            rotary,
        })
    }

    /// Graph inputs `v` depends on.
    fn input_ancestors(&self, v: ValueId) -> HashSet<ValueId> {
        let mut seen = HashSet::new();
        let mut found = HashSet::new();
        let mut stack = vec![v];
        while let Some(x) = stack.pop() {
            if !seen.insert(x) {
                continue;
            }
            if self.inputs.contains(&x) {
                found.insert(x);
            }
            if let Some((_, n)) = self.producer(x) {
                stack.extend(n.all_inputs());
            }
        }
        found
    }
}

/// Replace every KV-cache attention of `model`'s main graph by `ai.kiln::PagedAttention`. Fails
/// (leaving the model unchanged) when no layer matches or a past input feeds anything else.
pub fn rewrite_for_paged_attention(model: &mut Model, opts: &PagedRewriteOptions) -> Result<PagedRewrite> {
    let mut g = model.graph.clone();
    let order = g.topological_order()?;
    let m = Matcher {
        g: &g,
        idx: Index::new(&g),
        inputs: g.inputs.iter().copied().collect(),
    };
    let mut layers = Vec::new();
    for &i in &order {
        let n = &g.nodes[i];
        if n.op_type == "Softmax" && n.domain.is_empty() {
            if let Some(l) = m.layer_at(i) {
                layers.push(l);
            }
        } else if n.op_type == "Attention" && n.domain.is_empty() {
            if let Some(l) = m.attention_op(i) {
                layers.push(l);
            }
        } else if n.op_type == "GroupQueryAttention" && n.domain == MS_DOMAIN {
            if let Some(l) = m.group_query_attention(i) {
                layers.push(l);
            }
        }
    }
    if layers.is_empty() {
        return Err(err(
            "no KV-cache attention found (Concat(past, new, axis=2) -> MatMul -> Softmax -> MatMul per layer, or Attention with past_key/past_value inputs)",
        ));
    }
    let past: HashSet<ValueId> = layers.iter().flat_map(|l| l.past).collect();
    for l in &layers {
        if let Some(mask) = l.mask {
            if let Some(p) = m.input_ancestors(mask).intersection(&past).next() {
                return Err(err(format!(
                    "{}: the attention mask depends on '{}'; only masks built from the token layout can be replaced",
                    l.name,
                    g.value_name(*p)
                )));
            }
        }
    }
    let num_kv_heads = dim_of(&g, layers[0].past[0], 1);
    let head_dim = dim_of(&g, layers[0].past[0], 3);
    let mut idx = m.idx;
    // The graph inputs and outputs that go.
    let present: HashSet<ValueId> = layers.iter().flat_map(|l| l.present).collect();
    for (li, l) in layers.iter().enumerate() {
        let mut attributes = BTreeMap::new();
        attributes.insert("layer".to_string(), Attribute::Int(li as i64));
        attributes.insert("scale".to_string(), Attribute::Float(l.scale as f32));
        if let Some((hq, hk)) = l.heads_3d {
            attributes.insert("num_heads".to_string(), Attribute::Int(hq));
            attributes.insert("kv_num_heads".to_string(), Attribute::Int(hk));
        }
        let mut inputs = vec![Some(l.q), l.k_new, l.v_new];
        if let Some((cos, sin, interleaved)) = l.rotary {
            attributes.insert("do_rotary".to_string(), Attribute::Int(1));
            attributes.insert("rotary_interleaved".to_string(), Attribute::Int(interleaved as i64));
            inputs.extend([Some(cos), Some(sin)]);
        }
        let node = Node {
            name: format!("{}/paged_attention", l.name),
            op_type: "PagedAttention".into(),
            domain: KILN_DOMAIN.into(),
            inputs,
            outputs: vec![Some(l.out)],
            attributes,
            implicit_inputs: vec![],
        };
        idx.remove(&[l.out_node]);
        idx.push_node(&mut g, node);
    }
    idx.finish(&mut g);
    let mut removed_outputs = Vec::new();
    g.outputs.retain(|o| {
        let keep = !present.contains(o);
        if !keep {
            removed_outputs.push(g.values[o.index()].name.clone());
        }
        keep
    });
    let mut selects_logits = false;
    if let Some(name) = &opts.select_logits {
        selects_logits = select_logits(&mut g, name)?;
    }
    eliminate_dead_nodes(&mut g);
    drop_unused_initializers(&mut g);
    // Inputs nothing reads any more (past K/V, usually the attention mask).
    let read: HashSet<ValueId> = g
        .nodes
        .iter()
        .flat_map(|n| n.all_inputs().collect::<Vec<_>>())
        .collect();
    let mut removed_inputs = Vec::new();
    let (values, initializers) = (&g.values, &g.initializers);
    g.inputs.retain(|v| {
        let keep = read.contains(v) || initializers.contains_key(v);
        if !keep {
            removed_inputs.push(values[v.index()].name.clone());
        }
        keep
    });
    g.topological_order()?;
    model.graph = g;
    model.opsets.entry(KILN_DOMAIN.into()).or_insert(1);
    Ok(PagedRewrite {
        num_layers: layers.len(),
        num_kv_heads,
        head_dim,
        removed_inputs,
        removed_outputs,
        selects_logits,
    })
}

fn dim_of(g: &crate::Graph, v: ValueId, axis: usize) -> Option<usize> {
    g.value(v).shape.as_ref()?.0.get(axis)?.known()
}

/// Make the projection producing output `name` read only the rows `logits_indices` names: insert
/// `Gather(x, logits_indices, axis=1)` before the `MatMul` (or `Gemm`-free `MatMul` chain) that
/// produces it. Returns false (graph unchanged) when the output is not produced by a MatMul over
/// a `[batch, tokens, hidden]` activation.
fn select_logits(g: &mut crate::Graph, name: &str) -> Result<bool> {
    let Some(&out) = g.outputs.iter().find(|&&o| g.value_name(o) == name) else {
        return Ok(false);
    };
    let producers = g.producers();
    let Some(&p) = producers.get(&out) else {
        return Ok(false);
    };
    if g.nodes[p].op_type != "MatMul" || !g.nodes[p].domain.is_empty() {
        return Ok(false);
    }
    let Some(x) = g.nodes[p].inputs.first().copied().flatten() else {
        return Ok(false);
    };
    if g.values.iter().any(|v| v.name == LOGITS_INDICES) {
        return Err(err(format!("the model already has a value named '{LOGITS_INDICES}'")));
    }
    let indices = g.add_value(ValueInfo {
        name: LOGITS_INDICES.into(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::I64),
        shape: Some(Shape(vec![Dim::Sym("num_logits".into())])),
    });
    g.inputs.push(indices);
    let mut idx = Index::new(g);
    let gathered = idx.new_value(g, &format!("{}/selected_rows", g.value_name(x)), g.value(x).dtype, None);
    let mut attributes = BTreeMap::new();
    attributes.insert("axis".to_string(), Attribute::Int(1));
    idx.push_node(
        g,
        Node {
            name: format!("{name}/select_rows"),
            op_type: "Gather".into(),
            domain: String::new(),
            inputs: vec![Some(x), Some(indices)],
            outputs: vec![Some(gathered)],
            attributes,
            implicit_inputs: vec![],
        },
    );
    idx.finish(g);
    g.nodes[p].inputs[0] = Some(gathered);
    // The output's declared shape no longer holds in its token dimension.
    if let Some(s) = g.values[out.index()].shape.as_mut() {
        if let Some(d) = s.0.get_mut(1) {
            *d = Dim::Sym("num_logits".into());
        }
    }
    Ok(true)
}
