//! Operator family `attention`: Attention (opset 23+), RotaryEmbedding, Swish, SwiGLU, LinearAttention.
//!
//! Everything runs on whole candle tensors. Half-precision inputs are computed in f32 and cast back.

use candle_core::{DType as CDType, Device as CDevice, Tensor as CT, D};
use kiln_graph::DType;

use super::common::{tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("Attention", attention);
    r.add("RotaryEmbedding", rotary);
    r.add("LinearAttention", linear_attention);
    r.add("Swish", |n| {
        let alpha = n.attr_f("alpha", 1.0)? as f64;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            out1(swish(x, alpha)?)
        }))
    });
    r.add("SwiGLU", |n| {
        let alpha = n.attr_f("alpha", 1.0)? as f64;
        Ok(kernel(move |_, ins| {
            let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
            if a.dims() != b.dims() {
                bail!(
                    "SwiGLU inputs must have the same shape: {:?} vs {:?}",
                    a.dims(),
                    b.dims()
                );
            }
            if a.dtype() != b.dtype() {
                bail!("SwiGLU inputs must have the same dtype");
            }
            let s = swish(a, alpha)?;
            let (sc, dt) = to_compute(&s)?;
            let (bc, _) = to_compute(b)?;
            out1(from_compute(sc.mul(&bc)?, dt)?)
        }))
    });
}

/// Converts a float tensor to the dtype used for computing (f32, or f64 for f64 inputs).
fn to_compute(t: &Tensor) -> Result<(CT, DType)> {
    let dt = t.dtype();
    let c = match dt {
        DType::F32 | DType::F64 => t.candle().clone(),
        DType::F16 | DType::BF16 => t.candle().to_dtype(CDType::F32)?,
        other => bail!("expected a float tensor, found {other}"),
    };
    Ok((c, dt))
}

fn from_compute(c: CT, dt: DType) -> Result<Tensor> {
    Tensor::new(c.to_dtype(crate::tensor::storage_dtype(dt)?)?, dt)
}

fn swish(x: &Tensor, alpha: f64) -> Result<Tensor> {
    let (c, dt) = to_compute(x)?;
    // x * sigmoid(alpha * x) = x / (1 + exp(-alpha * x))
    let den = c.affine(-alpha, 0.0)?.exp()?.affine(1.0, 1.0)?;
    from_compute(c.div(&den)?, dt)
}

fn filled(v: f64, dims: &[usize], cd: CDType, dev: &CDevice) -> Result<CT> {
    Ok(CT::full(v, dims, dev)?.to_dtype(cd)?)
}

/// Turns a u8 "allowed" tensor into an additive bias: 0 where allowed, -inf elsewhere.
fn allowed_to_bias(allowed: &CT, cd: CDType) -> Result<CT> {
    let dims = allowed.dims().to_vec();
    let dev = allowed.device();
    let z = filled(0.0, &dims, cd, dev)?;
    let n = filled(f64::NEG_INFINITY, &dims, cd, dev)?;
    Ok(allowed.where_cond(&z, &n)?)
}

/// Causal / window frontier offset: one for all batches, or one per batch.
enum Offset {
    Scalar(i64),
    PerBatch(Vec<i64>),
}

/// `diff[b?, i, j] = i + offset[b] - j` as i64: shape (q, kv) or (batch, 1, q, kv).
fn diff_tensor(q: usize, kv: usize, off: &Offset, dev: &CDevice) -> Result<CT> {
    let i = CT::arange(0i64, q as i64, dev)?.reshape((q, 1))?;
    let j = CT::arange(0i64, kv as i64, dev)?.reshape((1, kv))?;
    Ok(match off {
        Offset::Scalar(o) => {
            let o = CT::from_vec(vec![*o], (1, 1), dev)?;
            i.broadcast_add(&o)?.broadcast_sub(&j)?
        }
        Offset::PerBatch(v) => {
            let b = v.len();
            let o = CT::from_vec(v.clone(), (b, 1, 1), dev)?;
            i.broadcast_add(&o)?.broadcast_sub(&j)?.reshape((b, 1, q, kv))?
        }
    })
}

fn add_bias(bias: Option<CT>, extra: CT) -> Result<Option<CT>> {
    Ok(Some(match bias {
        None => extra,
        Some(b) => b.broadcast_add(&extra)?,
    }))
}

struct AttnCfg {
    is_causal: bool,
    scale: Option<f32>,
    q_heads: Option<i64>,
    kv_heads: Option<i64>,
    softcap: Option<f32>,
    mode: i64,
    left: i64,
    right: i64,
    /// Whether the graph reads output 3 (the QK scores), which the fused CPU path does not produce.
    wants_scores: bool,
    outputs: usize,
}

fn attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let cfg = AttnCfg {
        is_causal: n.attr_i("is_causal", 0)? != 0,
        scale: n.attr_f_opt("scale")?,
        q_heads: n.attr_i_opt("q_num_heads")?,
        kv_heads: n.attr_i_opt("kv_num_heads")?,
        softcap: n.attr_f_opt("softcap")?,
        mode: n.attr_i("qk_matmul_output_mode", 0)?,
        left: n.attr_i("left_window_size", -1)?,
        right: n.attr_i("right_window_size", -1)?,
        wants_scores: n.node.outputs.get(3).is_some_and(|o| o.is_some()),
        outputs: n.num_outputs(),
    };
    if !(0..=3).contains(&cfg.mode) {
        return Err(n.err(format!("qk_matmul_output_mode {} is not supported", cfg.mode)));
    }
    if cfg.left < -1 || cfg.right < -1 {
        return Err(n.err("window sizes must be -1 or nonnegative"));
    }
    Ok(kernel(move |cx, ins| run_attention(&cfg, cx, ins)))
}

/// The fused CUDA kernel (`kernels/attention.cu`) for a node with only the Y output, on a CUDA
/// device, without past K/V, softcap or sliding window; `None` otherwise (and for shapes the kernel
/// does not cover), so the path below runs and reports any input error.
fn attention_cuda(cfg: &AttnCfg, ins: &[Option<&Value>]) -> Result<Option<Tensor>> {
    let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    let plain = cfg.outputs <= 1 && cfg.softcap.is_none_or(|c| c <= 0.0) && cfg.left < 0 && cfg.right < 0;
    if !plain || !q.device().is_cuda() || tin_opt(ins, 4)?.is_some() || tin_opt(ins, 5)?.is_some() {
        return Ok(None);
    }
    let (q4, k4, v4) = match (q.rank(), cfg.q_heads, cfg.kv_heads) {
        (4, _, _) => (q.candle().clone(), k.candle().clone(), v.candle().clone()),
        (3, Some(qh), Some(kvh)) if k.rank() == 3 && v.rank() == 3 => {
            match (
                split_heads(q.candle(), qh, "Q"),
                split_heads(k.candle(), kvh, "K"),
                split_heads(v.candle(), kvh, "V"),
            ) {
                (Ok(q4), Ok(k4), Ok(v4)) => (q4, k4, v4),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let nonpad = tin_opt(ins, 6)?.map(Tensor::to_i64_vec).transpose()?;
    let d = q4.dim(3)?;
    let scale = cfg.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let mask = tin_opt(ins, 3)?.map(Tensor::candle);
    if nonpad.is_none() && use_gemm_route(&q4, &k4, mask) {
        if let Some(y) = attention_cuda_gemm(&q4, &k4, &v4, mask, scale, cfg.is_causal)? {
            return Ok(Some(Tensor::new(merge_heads(y, q.rank())?, q.dtype())?));
        }
    }
    let spec = crate::cuda_kernels::AttentionSpec {
        q: &q4,
        k: &k4,
        v: &v4,
        mask,
        kv_len: nonpad.as_deref(),
        scale,
        causal: cfg.is_causal,
    };
    let Some(y) = crate::cuda_kernels::attention(&spec)? else {
        return Ok(None);
    };
    Ok(Some(Tensor::new(merge_heads(y, q.rank())?, q.dtype())?))
}

/// (B, H, S, D) back to (B, S, H*D) when the node's inputs were 3-D.
fn merge_heads(y: CT, rank: usize) -> Result<CT> {
    if rank != 3 {
        return Ok(y);
    }
    let (b, h, s, dv) = y.dims4()?;
    Ok(y.transpose(1, 2)?.contiguous()?.reshape((b, s, h * dv))?)
}

/// How attention runs on CUDA: the flash-style kernel (`kernels/attention.cu`, CUDA cores, no
/// (B, H, S, T) tensor) or two cuBLAS products around the fused softmax kernel (tensor cores for
/// f16, the scores tensor in device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CudaAttentionRoute {
    /// GEMMs while the scores tensor stays under [`GEMM_ROUTE_MAX_SCORES_BYTES`], else flash.
    Auto,
    Flash,
    Gemm,
}

/// Largest (B, Hq, S, T) scores tensor the automatic route computes with GEMMs.
pub(crate) const GEMM_ROUTE_MAX_SCORES_BYTES: usize = 256 << 20;

thread_local! {
    static ROUTE_OVERRIDE: std::cell::Cell<Option<CudaAttentionRoute>> = const { std::cell::Cell::new(None) };
}

/// The route: a test's override, else `KILN_CUDA_ATTENTION` (flash, gemm, auto), else auto.
fn cuda_attention_route() -> CudaAttentionRoute {
    static ENV: std::sync::OnceLock<CudaAttentionRoute> = std::sync::OnceLock::new();
    ROUTE_OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        *ENV.get_or_init(|| match std::env::var("KILN_CUDA_ATTENTION").as_deref() {
            Ok("flash") => CudaAttentionRoute::Flash,
            Ok("gemm") => CudaAttentionRoute::Gemm,
            _ => CudaAttentionRoute::Auto,
        })
    })
}

/// Runs `f` with attention on this thread forced to `route` (tests of both CUDA routes).
#[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))]
pub(crate) fn with_cuda_attention_route<R>(route: CudaAttentionRoute, f: impl FnOnce() -> R) -> R {
    let previous = ROUTE_OVERRIDE.with(|o| o.replace(Some(route)));
    let r = f();
    ROUTE_OVERRIDE.with(|o| o.set(previous));
    r
}

/// Whether this call takes the GEMM route: a float mask whose last dim is T (the softmax kernel
/// reads float masks through strides; boolean or short masks go to the flash kernel), and under
/// the automatic route a scores tensor of at most [`GEMM_ROUTE_MAX_SCORES_BYTES`].
fn use_gemm_route(q4: &CT, k4: &CT, mask: Option<&CT>) -> bool {
    let (Ok((b, hq, s, _)), Ok((_, _, t, _))) = (q4.dims4(), k4.dims4()) else {
        return false;
    };
    let mask_ok = mask.is_none_or(|m| m.dtype().is_float() && m.dims().last() == Some(&t));
    let scores_bytes = b * hq * s * t * q4.dtype().size_in_bytes();
    match cuda_attention_route() {
        CudaAttentionRoute::Flash => false,
        CudaAttentionRoute::Gemm => mask_ok,
        CudaAttentionRoute::Auto => mask_ok && scores_bytes <= GEMM_ROUTE_MAX_SCORES_BYTES,
    }
}

/// softmax(scale * Q K^T + mask, causal) V with K/V heads shared by groups of query heads:
/// cuBLAS batched products (f16 on tensor cores with f32 accumulation) and the fused softmax
/// kernel (f32 accumulation; rows with no attendable key give zeros). `None` when the softmax
/// kernel does not take the shape.
fn attention_cuda_gemm(q4: &CT, k4: &CT, v4: &CT, mask: Option<&CT>, scale: f32, causal: bool) -> Result<Option<CT>> {
    let (b, hq, s, d) = q4.dims4()?;
    let (_, hk, t, _) = k4.dims4()?;
    let dv = v4.dim(3)?;
    if hk == 0 || hq % hk != 0 || d == 0 || t == 0 {
        return Ok(None);
    }
    let reps = hq / hk;
    let qg = q4.contiguous()?.reshape((b, hk, reps * s, d))?;
    let kt = k4.transpose(2, 3)?.contiguous()?;
    let scores = qg.matmul(&kt)?.reshape((b, hq, s, t))?;
    let spec = crate::cuda_kernels::SoftmaxSpec {
        cols: t,
        heads: hq,
        seq: s,
        scale,
        mask,
        causal,
        causal_offset: 0,
    };
    let Some(p) = crate::cuda_kernels::softmax(&scores, &spec)? else {
        return Ok(None);
    };
    let y = p.reshape((b, hk, reps * s, t))?.matmul(&v4.contiguous()?)?;
    Ok(Some(y.reshape((b, hq, s, dv))?))
}

/// Splits (B, S, H*D) into (B, H, S, D).
fn split_heads(t: &CT, heads: i64, what: &str) -> Result<CT> {
    let (b, s, hid) = t.dims3()?;
    if heads <= 0 || hid % heads as usize != 0 {
        bail!("{what} hidden size {hid} is not divisible by the number of heads {heads}");
    }
    let h = heads as usize;
    Ok(t.reshape((b, s, h, hid / h))?.transpose(1, 2)?.contiguous()?)
}

fn run_attention(cfg: &AttnCfg, cx: &super::RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    if let Some(y) = attention_cuda(cfg, ins)? {
        return Ok(vec![Value::Tensor(y)]);
    }
    let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    let mask = tin_opt(ins, 3)?;
    let past_k = tin_opt(ins, 4)?;
    let past_v = tin_opt(ins, 5)?;
    let nonpad = tin_opt(ins, 6)?;
    let dt = q.dtype();
    if !dt.is_float() {
        bail!("Attention expects float inputs, found {dt}");
    }
    if k.dtype() != dt || v.dtype() != dt {
        bail!("Q, K and V must share a dtype");
    }
    let rank = q.rank();
    if k.rank() != rank || v.rank() != rank || !(rank == 3 || rank == 4) {
        bail!("Q, K and V must all be 3-D or all be 4-D");
    }
    if past_k.is_some() != past_v.is_some() {
        bail!("past_key and past_value must be provided together");
    }
    if nonpad.is_some() && past_k.is_some() {
        bail!("nonpad_kv_seqlen cannot be combined with past_key/past_value");
    }
    // 4-D (B, H, S, D) views in the input dtype.
    let (q4, k4, v4) = if rank == 3 {
        let (Some(qh), Some(kvh)) = (cfg.q_heads, cfg.kv_heads) else {
            bail!("q_num_heads and kv_num_heads are required for 3-D inputs");
        };
        (
            split_heads(q.candle(), qh, "Q")?,
            split_heads(k.candle(), kvh, "K")?,
            split_heads(v.candle(), kvh, "V")?,
        )
    } else {
        (q.candle().clone(), k.candle().clone(), v.candle().clone())
    };
    let (b, hq, s, dq) = q4.dims4()?;
    let (bk, hk, _, dk) = k4.dims4()?;
    let (bv, hv, _, dv) = v4.dims4()?;
    if bk != b || bv != b {
        bail!("Q, K and V batch sizes differ");
    }
    if dk != dq {
        bail!("Q head size {dq} differs from K head size {dk}");
    }
    let cat_past = |cur: CT, past: Option<&Tensor>, what: &str| -> Result<CT> {
        match past {
            None => Ok(cur),
            Some(p) => {
                if p.dtype() != dt || p.rank() != 4 {
                    bail!("{what} must be a 4-D tensor of the input dtype");
                }
                let (pd, cd) = (p.dims(), cur.dims());
                if pd[0] != cd[0] || pd[1] != cd[1] || pd[3] != cd[3] {
                    bail!("{what} shape {pd:?} does not match {cd:?}");
                }
                Ok(CT::cat(&[p.candle(), &cur], 2)?)
            }
        }
    };
    let present_k = cat_past(k4, past_k, "past_key")?;
    let present_v = cat_past(v4, past_v, "past_value")?;
    let t = present_k.dim(2)?;
    if present_v.dim(2)? != t {
        bail!("K and V sequence lengths differ");
    }
    if hk != hv {
        bail!("K has {hk} heads but V has {hv}");
    }
    if hk == 0 || hq % hk != 0 {
        bail!("q_num_heads {hq} is not a multiple of kv_num_heads {hk}");
    }
    let reps = hq / hk;
    let past_len = past_k.map(|p| p.dims()[2]).unwrap_or(0);

    let cd = if dt == DType::F64 { CDType::F64 } else { CDType::F32 };
    let dev = q.device();
    let scale = cfg.scale.map(f64::from).unwrap_or(1.0 / (dq as f64).sqrt());

    // ---- additive bias, broadcastable to (B, Hq, S, T) ----
    let mask_b = match mask {
        None => None,
        Some(m) => {
            let mut mc = if m.dtype() == DType::Bool {
                allowed_to_bias(m.candle(), cd)?
            } else if m.dtype().is_float() {
                m.candle().to_dtype(cd)?
            } else {
                bail!("attn_mask must be bool or float, found {}", m.dtype());
            };
            if mc.rank() == 0 {
                mc = mc.reshape((1, 1))?;
            }
            let ml = mc.dims()[mc.rank() - 1];
            if ml < t {
                let mut pd = mc.dims().to_vec();
                let last = pd.len() - 1;
                pd[last] = t - ml;
                let pad = filled(f64::NEG_INFINITY, &pd, cd, dev)?;
                mc = CT::cat(&[&mc, &pad], last)?;
            } else if ml > t && ml != 1 {
                bail!("attn_mask last dimension {ml} exceeds the key length {t}");
            }
            Some(mc)
        }
    };
    let nonpad_v = match nonpad {
        None => None,
        Some(np) => {
            let v = np.to_i64_vec()?;
            if v.len() != b {
                bail!("nonpad_kv_seqlen has {} entries for batch size {b}", v.len());
            }
            Some(v)
        }
    };
    let offset = match (&nonpad_v, past_k) {
        (Some(v), None) => Offset::PerBatch(v.iter().map(|&x| x - s as i64).collect()),
        _ => Offset::Scalar(past_len as i64),
    };
    let window = cfg.left >= 0 || cfg.right >= 0;
    let mut bias = mask_b;
    if cfg.is_causal || window {
        let diff = diff_tensor(s, t, &offset, dev)?;
        let mut allowed: Option<CT> = None;
        let mut and = |a: CT| -> Result<()> {
            allowed = Some(match allowed.take() {
                None => a,
                Some(p) => p.mul(&a)?,
            });
            Ok(())
        };
        if cfg.is_causal {
            and(diff.ge(0i64)?)?;
        }
        if cfg.left >= 0 {
            and(diff.le(cfg.left)?)?;
        }
        if cfg.right >= 0 {
            and(diff.ge(-cfg.right)?)?;
        }
        if let Some(a) = allowed {
            bias = add_bias(bias, allowed_to_bias(&a, cd)?)?;
        }
    }
    if let Some(v) = &nonpad_v {
        let j = CT::arange(0i64, t as i64, dev)?.reshape((1, t))?;
        let lim = CT::from_vec(v.clone(), (b, 1), dev)?;
        let allowed = j.broadcast_lt(&lim)?.reshape((b, 1, 1, t))?;
        bias = add_bias(bias, allowed_to_bias(&allowed, cd)?)?;
    }
    if let Some(bb) = &bias {
        if bb.rank() < 2 {
            bias = Some(bb.broadcast_add(&filled(0.0, &[s, t], cd, dev)?)?);
        }
    }

    if b * hq * s * t * dv == 0 {
        // Degenerate shapes (no queries or no keys): the weighted sum is empty, hence zero.
        let y = CT::zeros((b, hq, s, dv), cd, dev)?;
        let y = if rank == 3 {
            y.transpose(1, 2)?.contiguous()?.reshape((b, s, hq * dv))?
        } else {
            y
        };
        return Ok(vec![
            Value::Tensor(from_compute(y, dt)?),
            Value::Tensor(Tensor::new(present_k, dt)?),
            Value::Tensor(Tensor::new(present_v, dt)?),
            Value::Tensor(from_compute(CT::zeros((b, hq, s, t), cd, dev)?, dt)?),
        ]);
    }

    // The output, and the (B, H, S, T) scores the general path below materializes (the fused CPU path
    // holds one head's (S, T) at a time, per thread): refused before allocating when over the limit.
    cx.check_alloc((b * hq * s) as u128 * dv as u128, dt)?;
    cx.check_alloc(s as u128 * t as u128, dt)?;
    let plain = cfg.softcap.is_none_or(|c| c <= 0.0) && !cfg.wants_scores;
    if plain && dt == DType::F32 && dev.is_cpu() && crate::sgemm::available() {
        if let Some(y) = fused_cpu_attention(&q4, &present_k, &present_v, bias.as_ref(), scale, reps)? {
            let y = if rank == 3 {
                y.transpose(1, 2)?.contiguous()?.reshape((b, s, hq * dv))?
            } else {
                y
            };
            return Ok(vec![
                Value::Tensor(Tensor::new(y, dt)?),
                Value::Tensor(Tensor::new(present_k, dt)?),
                Value::Tensor(Tensor::new(present_v, dt)?),
            ]);
        }
    }

    cx.check_alloc((b * hq * s) as u128 * t as u128, dt)?;
    // ---- QK^T ----
    // bf16 results are rounded at the reference's rounding points (it computes in bf16 throughout).
    let emulate = dt == DType::BF16;
    let rnd = |x: CT| -> Result<CT> {
        if emulate {
            Ok(x.to_dtype(CDType::BF16)?.to_dtype(cd)?)
        } else {
            Ok(x)
        }
    };
    let (qc, kc) = if emulate {
        let ss = rnd(CT::new(&[scale.sqrt() as f32], dev)?)?.to_vec1::<f32>()?[0] as f64;
        (
            rnd(q4.to_dtype(cd)?.affine(ss, 0.0)?)?,
            rnd(present_k.to_dtype(cd)?.affine(ss, 0.0)?)?,
        )
    } else {
        (q4.to_dtype(cd)?.affine(scale, 0.0)?, present_k.to_dtype(cd)?)
    };
    let vc = present_v.to_dtype(cd)?.contiguous()?;
    let qg = qc.contiguous()?.reshape((b, hk, reps * s, dq))?;
    let kt = kc.transpose(2, 3)?.contiguous()?;
    let mut qk = if dq == 0 {
        CT::zeros((b, hq, s, t), cd, dev)?
    } else {
        rnd(qg.matmul(&kt)?.reshape((b, hq, s, t))?)?
    };
    if let Some(c) = cfg.softcap {
        if c > 0.0 {
            let c = c as f64;
            qk = rnd(qk.affine(1.0 / c, 0.0)?.tanh()?.affine(c, 0.0)?)?;
        }
    }
    let qk_bias = match &bias {
        None => qk.clone(),
        Some(bb) => {
            let fast = if emulate || cd != CDType::F32 {
                None
            } else {
                super::binary_cpu::binary_f32(super::binary_cpu::BinOp::Add, &qk, &bb.contiguous()?)
            };
            match fast {
                Some(r) => r?,
                None => rnd(qk.broadcast_add(bb)?)?,
            }
        }
    };

    // ---- softmax robust to fully masked rows ----
    if !emulate && cd == CDType::F32 && dev.is_cpu() {
        if let Some(p) = softmax_rows_f32(&qk_bias)? {
            return finish(
                cfg,
                (b, hq, hk, reps, s, t, dv, rank),
                p,
                &vc,
                qk,
                qk_bias,
                present_k,
                present_v,
                dt,
            );
        }
    }
    let mx = qk_bias.max_keepdim(D::Minus1)?;
    let safe = mx.eq(f64::NEG_INFINITY)?.where_cond(&mx.zeros_like()?, &mx)?;
    let e = rnd(rnd(qk_bias.broadcast_sub(&safe)?)?.exp()?)?;
    let sum = if emulate && t <= 256 {
        // numpy reduces bf16 sequentially, rounding after each add.
        let mut acc = e.narrow(D::Minus1, 0, 1.min(t))?;
        for j in 1..t {
            acc = rnd(acc.add(&e.narrow(D::Minus1, j, 1)?)?)?;
        }
        acc
    } else {
        rnd(e.sum_keepdim(D::Minus1)?)?
    };
    let sum = sum.eq(0f64)?.where_cond(&sum.ones_like()?, &sum)?;
    let mut p = rnd(e.broadcast_div(&sum)?)?;
    if let Some(bb) = &bias {
        // Rows whose bias is entirely -inf have no attendable key: their probabilities are 0.
        let masked = bb.max_keepdim(D::Minus1)?.eq(f64::NEG_INFINITY)?;
        if masked.flatten_all()?.max(0)?.to_scalar::<u8>()? != 0 {
            let masked = masked.broadcast_as(p.shape())?.contiguous()?;
            p = masked.where_cond(&p.zeros_like()?, &p)?;
        }
    }

    finish(
        cfg,
        (b, hq, hk, reps, s, t, dv, rank),
        p,
        &vc,
        qk,
        qk_bias,
        present_k,
        present_v,
        dt,
    )
}

/// An additive bias broadcast to `target` (4-D) by strides: its f32 values and the element stride of
/// each target dim (0 along broadcast dims).
fn bias_strides(bias: &CT, target: [usize; 4]) -> Result<(Vec<f32>, [usize; 4])> {
    let dims = bias.dims();
    if dims.len() > 4 {
        bail!("attention mask of shape {dims:?} does not broadcast to {target:?}");
    }
    let mut d4 = [1usize; 4];
    d4[4 - dims.len()..].copy_from_slice(dims);
    let mut strides = [0usize; 4];
    let mut acc = 1;
    for i in (0..4).rev() {
        if d4[i] != 1 && d4[i] != target[i] {
            bail!("attention mask of shape {dims:?} does not broadcast to {target:?}");
        }
        strides[i] = if d4[i] == 1 { 0 } else { acc };
        acc *= d4[i];
    }
    let values = bias.to_dtype(CDType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((values, strides))
}

/// Scaled dot-product attention on the CPU in f32, one task per (batch, head): `Q·Kᵀ` with the bias
/// as the product's initial value, a softmax per row (rows with no attendable key give zeros) and
/// `P·V`, through the packed GEMM's micro-kernels, without materializing the (B, H, S, T) scores.
/// Inputs are (B, H, S, D) / (B, Hk, T, D); returns (B, H, S, Dv). `None` when a tensor is not an
/// f32 CPU tensor.
fn fused_cpu_attention(q4: &CT, k4: &CT, v4: &CT, bias: Option<&CT>, scale: f64, reps: usize) -> Result<Option<CT>> {
    use crate::fastmath::f32_view;
    use crate::sgemm::{gemm_seq, Bias, MatRef};
    use rayon::prelude::*;
    let (b, hq, s, d) = q4.dims4()?;
    let (_, hk, t, dv) = v4.dims4()?;
    let bias = match bias {
        None => None,
        Some(bb) => Some(bias_strides(bb, [b, hq, s, t])?),
    };
    let (q, k, v) = (q4.contiguous()?, k4.contiguous()?, v4.contiguous()?);
    let (Some(qv), Some(kv), Some(vv)) = (f32_view(&q), f32_view(&k), f32_view(&v)) else {
        return Ok(None);
    };
    let (qs, ks, vs) = (qv.slice(), kv.slice(), vv.slice());
    if qs.len() != b * hq * s * d || ks.len() != b * hk * t * d || vs.len() != b * hk * t * dv {
        bail!("internal: attention operand sizes do not match their shapes");
    }
    let scale = scale as f32;
    let mut y = vec![0f32; b * hq * s * dv];
    y.par_chunks_mut(s * dv)
        .enumerate()
        .try_for_each(|(bh, out)| -> Result<()> {
            let (bi, h) = (bh / hq, bh % hq);
            let kvh = bi * hk + h / reps;
            let qsc: Vec<f32> = qs[bh * s * d..(bh + 1) * s * d].iter().map(|x| x * scale).collect();
            let kh = &ks[kvh * t * d..(kvh + 1) * t * d];
            let vh = &vs[kvh * t * dv..(kvh + 1) * t * dv];
            let mut scores = vec![0f32; s * t];
            let init = match &bias {
                None => Bias::None,
                Some((bv, st)) => {
                    let base = bi * st[0] + h * st[1];
                    if st[2] == 0 && st[3] == 1 {
                        Bias::PerCol(&bv[base..base + t])
                    } else {
                        for (i, row) in scores.chunks_mut(t).enumerate() {
                            for (j, x) in row.iter_mut().enumerate() {
                                *x = bv[base + i * st[2] + j * st[3]];
                            }
                        }
                        Bias::Accumulate
                    }
                }
            };
            // Kᵀ as a (D, T) view of K's (T, D) rows.
            let kt = MatRef {
                data: kh,
                rows: d,
                cols: t,
                rs: 1,
                cs: d,
            };
            let err = |e: crate::sgemm::GemmError| crate::RuntimeError::msg(e.to_string());
            gemm_seq(MatRef::row_major(&qsc, s, d), kt, init, &mut scores, t).map_err(err)?;
            for row in scores.chunks_mut(t) {
                if row.iter().all(|&x| x == f32::NEG_INFINITY) {
                    row.fill(0.0);
                } else {
                    crate::fastmath::softmax_row(row);
                }
            }
            gemm_seq(
                MatRef::row_major(&scores, s, t),
                MatRef::row_major(vh, t, dv),
                Bias::None,
                out,
                dv,
            )
            .map_err(err)
        })?;
    Ok(Some(CT::from_vec(y, (b, hq, s, dv), q4.device())?))
}

/// Softmax over the last axis of f32 scores on the CPU, one fused pass per row; rows whose scores
/// are all -inf (no attendable key) give zeros. `None` when the scores are not a contiguous f32
/// CPU tensor.
fn softmax_rows_f32(scores: &CT) -> Result<Option<CT>> {
    use rayon::prelude::*;
    let Some(t) = scores.dims().last().copied() else {
        return Ok(None);
    };
    if t == 0 {
        return Ok(None);
    }
    let out = crate::fastmath::with_f32(scores, |src| {
        let mut v = src.to_vec();
        v.par_chunks_mut(t).with_min_len((16384 / t).max(1)).for_each(|row| {
            if row.iter().all(|&x| x == f32::NEG_INFINITY) {
                row.iter_mut().for_each(|x| *x = 0.0);
            } else {
                crate::fastmath::softmax_row(row);
            }
        });
        v
    });
    Ok(match out {
        Some(v) => Some(CT::from_vec(v, scores.dims(), scores.device())?),
        None => None,
    })
}

/// Probabilities times V, the output layout, and the node's four outputs.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn finish(
    cfg: &AttnCfg,
    (b, hq, hk, reps, s, t, dv, rank): (usize, usize, usize, usize, usize, usize, usize, usize),
    p: CT,
    vc: &CT,
    qk: CT,
    qk_bias: CT,
    present_k: CT,
    present_v: CT,
    dt: DType,
) -> Result<Vec<Value>> {
    let y = p
        .contiguous()?
        .reshape((b, hk, reps * s, t))?
        .matmul(vc)?
        .reshape((b, hq, s, dv))?;
    let y = if rank == 3 {
        y.transpose(1, 2)?.contiguous()?.reshape((b, s, hq * dv))?
    } else {
        y
    };
    let qk_out = match cfg.mode {
        2 => qk_bias,
        3 => p,
        _ => qk,
    };
    Ok(vec![
        Value::Tensor(from_compute(y, dt)?),
        Value::Tensor(Tensor::new(present_k, dt)?),
        Value::Tensor(Tensor::new(present_v, dt)?),
        Value::Tensor(from_compute(qk_out.contiguous()?, dt)?),
    ])
}

fn rotary(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let interleaved = n.attr_i("interleaved", 0)? != 0;
    let rot_dim = n.attr_i("rotary_embedding_dim", 0)?;
    let num_heads = n.attr_i("num_heads", 0)?;
    if rot_dim < 0 || num_heads < 0 {
        return Err(n.err("rotary_embedding_dim and num_heads must be nonnegative"));
    }
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let (cos, sin) = (tin(ins, 1)?, tin(ins, 2)?);
        let pos = tin_opt(ins, 3)?;
        let (xc, dt) = to_compute(x)?;
        let (cc, _) = to_compute(cos)?;
        let (sc, _) = to_compute(sin)?;
        // Work in (B, S, H, D) for 3-D inputs, (B, H, S, D) for 4-D ones.
        let (x4, b, sq) = match xc.rank() {
            4 => {
                let (b, _, s, _) = xc.dims4()?;
                (xc.clone(), b, s)
            }
            3 => {
                let (b, s, hid) = xc.dims3()?;
                if num_heads == 0 || hid % num_heads as usize != 0 {
                    bail!("hidden size {hid} is not divisible by num_heads {num_heads}");
                }
                let h = num_heads as usize;
                (xc.reshape((b, s, h, hid / h))?, b, s)
            }
            r => bail!("RotaryEmbedding input must be 3-D or 4-D, got rank {r}"),
        };
        let hd = x4.dim(3)?;
        let rd = if rot_dim == 0 { hd } else { rot_dim as usize };
        if rd > hd || rd % 2 != 0 {
            bail!("rotary_embedding_dim {rd} is invalid for head size {hd}");
        }
        let half = rd / 2;
        // cos/sin as (B, S, half)
        let (cg, sg) = match pos {
            Some(p) => {
                let ids = p.to_i64_vec()?;
                if cc.rank() != 2 || sc.rank() != 2 {
                    bail!("cos_cache and sin_cache must be 2-D when position_ids is given");
                }
                let maxp = cc.dim(0)?.min(sc.dim(0)?);
                if ids.len() != b * sq {
                    bail!(
                        "position_ids shape {:?} does not match (batch, seq) = ({b}, {sq})",
                        p.dims()
                    );
                }
                let idx: Vec<u32> = ids
                    .iter()
                    .map(|&i| {
                        if i < 0 || i as usize >= maxp {
                            bail!("position id {i} is out of range for cache length {maxp}");
                        }
                        Ok(i as u32)
                    })
                    .collect::<Result<_>>()?;
                let it = CT::from_vec(idx, ids.len(), xc.device())?;
                (
                    cc.index_select(&it, 0)?.reshape((b, sq, cc.dim(1)?))?,
                    sc.index_select(&it, 0)?.reshape((b, sq, sc.dim(1)?))?,
                )
            }
            None => (cc.clone(), sc.clone()),
        };
        if cg.rank() != 3 || sg.rank() != 3 || cg.dim(2)? != half || sg.dim(2)? != half {
            bail!("cos/sin cache last dimension must be rotary_embedding_dim/2 = {half}");
        }
        // Broadcast shape for cos/sin against x4's (.., .., .., half).
        let (cg, sg) = if xc.rank() == 4 {
            (cg.unsqueeze(1)?, sg.unsqueeze(1)?)
        } else {
            (cg.unsqueeze(2)?, sg.unsqueeze(2)?)
        };
        let xr = x4.narrow(3, 0, rd)?;
        let (x1, x2) = if interleaved {
            let d = xr.dims().to_vec();
            let pairs = xr.reshape((d[0], d[1], d[2], half, 2))?;
            (pairs.narrow(4, 0, 1)?.squeeze(4)?, pairs.narrow(4, 1, 1)?.squeeze(4)?)
        } else {
            (xr.narrow(3, 0, half)?, xr.narrow(3, half, half)?)
        };
        let real = x1.broadcast_mul(&cg)?.sub(&x2.broadcast_mul(&sg)?)?;
        let imag = x1.broadcast_mul(&sg)?.add(&x2.broadcast_mul(&cg)?)?;
        let rot = if interleaved {
            let d = real.dims().to_vec();
            CT::stack(&[&real, &imag], 4)?.reshape((d[0], d[1], d[2], rd))?
        } else {
            CT::cat(&[&real, &imag], 3)?
        };
        let out = if rd < hd {
            CT::cat(&[&rot, &x4.narrow(3, rd, hd - rd)?], 3)?
        } else {
            rot
        };
        let out = out.reshape(xc.dims())?;
        out1(from_compute(out, dt)?)
    }))
}

// ---------------------------------------------------------------------------------------------
// LinearAttention (opset 27): recurrent linear attention with linear / gated / delta / gated_delta
// update rules, GQA/MQA, optional past state.
// ---------------------------------------------------------------------------------------------

struct LinAttnCfg {
    q_heads: usize,
    kv_heads: usize,
    /// 0 means 1/sqrt(d_k).
    scale: f32,
    gating: bool,
    delta: bool,
}

fn linear_attention(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let (Some(qh), Some(kvh)) = (n.attr_i_opt("q_num_heads")?, n.attr_i_opt("kv_num_heads")?) else {
        return Err(n.err("q_num_heads and kv_num_heads are required"));
    };
    if qh <= 0 || kvh <= 0 || qh % kvh != 0 {
        return Err(n.err(format!(
            "q_num_heads ({qh}) must be a positive multiple of kv_num_heads ({kvh})"
        )));
    }
    let rule = n.attr_s("update_rule", "gated_delta")?;
    let (gating, delta) = match rule.as_str() {
        "linear" => (false, false),
        "gated" => (true, false),
        "delta" => (false, true),
        "gated_delta" => (true, true),
        other => return Err(n.err(format!("unsupported update_rule '{other}'"))),
    };
    let cfg = LinAttnCfg {
        q_heads: usize::try_from(qh).map_err(|_| n.err("q_num_heads is too large"))?,
        kv_heads: usize::try_from(kvh).map_err(|_| n.err("kv_num_heads is too large"))?,
        scale: n.attr_f("scale", 0.0)?,
        gating,
        delta,
    };
    Ok(kernel(move |cx, ins| run_linear_attention(&cfg, cx, ins)))
}

/// (B, T, H*D) -> (T, B*H, D, 1) or (T, B*H, 1, D) (same memory), in the compute dtype.
fn time_major(c: &CT, h: usize, d: usize, column: bool) -> Result<CT> {
    let (b, t, _) = c.dims3()?;
    let x = c.reshape((b, t, h, d))?.transpose(0, 1)?;
    Ok(if column {
        x.reshape((t, b * h, d, 1))?
    } else {
        x.reshape((t, b * h, 1, d))?
    })
}

fn run_linear_attention(cfg: &LinAttnCfg, cx: &super::RunCx, ins: &[Option<&Value>]) -> Result<Vec<Value>> {
    let (q, k, v) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
    let past = tin_opt(ins, 3)?;
    let decay = tin_opt(ins, 4)?;
    let beta = tin_opt(ins, 5)?;
    let dt = q.dtype();
    if !matches!(dt, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        bail!("LinearAttention expects float inputs, found {dt}");
    }
    for (name, x) in [("key", Some(k)), ("value", Some(v)), ("decay", decay), ("beta", beta)] {
        if let Some(x) = x {
            if x.dtype() != dt {
                bail!("{name} has dtype {} but query has {dt}", x.dtype());
            }
            if x.rank() != 3 {
                bail!("{name} must be rank 3 (B, T, H*D), got shape {:?}", x.dims());
            }
        }
    }
    if q.rank() != 3 {
        bail!("query must be rank 3 (B, T, H*D), got shape {:?}", q.dims());
    }
    if cfg.gating != decay.is_some() {
        bail!("the decay input must be given exactly for the gated update rules");
    }
    if cfg.delta != beta.is_some() {
        bail!("the beta input must be given exactly for the delta update rules");
    }
    let (hq, hkv) = (cfg.q_heads, cfg.kv_heads);
    let qd = q.dims();
    let (b, t, qhid) = (qd[0], qd[1], qd[2]);
    for (name, x) in [("key", Some(k)), ("value", Some(v)), ("decay", decay), ("beta", beta)] {
        if let Some(x) = x {
            if x.dims()[..2] != [b, t] {
                bail!(
                    "{name} shape {:?} does not match query batch/sequence ({b}, {t})",
                    x.dims()
                );
            }
        }
    }
    if qhid % hq != 0 {
        bail!("query hidden size {qhid} is not divisible by q_num_heads {hq}");
    }
    let dk = qhid / hq;
    if hkv.checked_mul(dk) != Some(k.dims()[2]) {
        bail!("key hidden size {} is not kv_num_heads {hkv} * d_k {dk}", k.dims()[2]);
    }
    let vhid = v.dims()[2];
    if vhid % hkv != 0 {
        bail!("value hidden size {vhid} is not divisible by kv_num_heads {hkv}");
    }
    let dv = vhid / hkv;
    let group = hq / hkv;
    let state_dims = [b, hkv, dk, dv];
    let state_dt = match past {
        Some(p) => {
            if !matches!(p.dtype(), DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
                bail!("past_state must be a float tensor, found {}", p.dtype());
            }
            if p.dims() != state_dims {
                bail!("past_state shape {:?} does not match {state_dims:?}", p.dims());
            }
            p.dtype()
        }
        None => dt,
    };
    let out_elems = super::common::elems(&[b, t, hq, dv]);
    cx.check_alloc(out_elems, DType::F32)?;
    cx.check_alloc(super::common::elems(&state_dims), DType::F32)?;
    let cd = if dt == DType::F64 { CDType::F64 } else { CDType::F32 };
    let dev = q.device();
    // Head counts come from attributes: keep the products overflow-free even for empty tensors.
    let (Some(bh), Some(out_hid)) = (b.checked_mul(hkv), hq.checked_mul(dv)) else {
        bail!("LinearAttention sizes overflow");
    };
    let mut state = match past {
        Some(p) => p.candle().to_dtype(cd)?.reshape((bh, dk, dv))?,
        None => CT::zeros((bh, dk, dv), cd, dev)?,
    };
    if bh == 0 || t == 0 || dk == 0 || dv == 0 {
        // Nothing to accumulate: the state passes through and every output is an empty sum.
        let out = CT::zeros((b, t, out_hid), cd, dev)?;
        return Ok(vec![
            Value::Tensor(from_compute(out, dt)?),
            Value::Tensor(from_compute(state.reshape((b, hkv, dk, dv))?, state_dt)?),
        ]);
    }
    let scale = if cfg.scale == 0.0 {
        1.0 / (dk as f64).sqrt()
    } else {
        f64::from(cfg.scale)
    };
    let to_cd = |x: &Tensor| -> Result<CT> { Ok(x.candle().to_dtype(cd)?) };
    // Time-major per-step views: q (T, B*Hkv, G, d_k), k (T, B*Hkv, d_k, 1), v (T, B*Hkv, 1, d_v).
    let qc = to_cd(q)?
        .reshape((b, t, hkv, group * dk))?
        .transpose(0, 1)?
        .reshape((t, bh, group, dk))?;
    let kc = time_major(&to_cd(k)?, hkv, dk, true)?;
    let vc = time_major(&to_cd(v)?, hkv, dv, false)?;
    // exp(decay): (T, B*Hkv, 1, 1) per head or (T, B*Hkv, d_k, 1) per key dimension.
    let edecay = match decay {
        None => None,
        Some(g) => {
            let last = g.dims()[2];
            let e = to_cd(g)?.exp()?;
            Some(if last == hkv {
                time_major(&e, hkv, 1, true)?
            } else if last == hkv * dk {
                time_major(&e, hkv, dk, true)?
            } else {
                bail!(
                    "decay last dim {last} must be kv_num_heads ({hkv}) or kv_num_heads*d_k ({})",
                    hkv * dk
                );
            })
        }
    };
    // beta: (T, B*Hkv, 1, 1), a per-token scalar shared by all heads when its last dim is 1.
    let betac = match beta {
        None => None,
        Some(bt) => {
            let last = bt.dims()[2];
            if last != hkv && last != 1 {
                bail!("beta last dim {last} must be kv_num_heads ({hkv}) or 1");
            }
            let x = to_cd(bt)?.broadcast_as((b, t, hkv))?.contiguous()?;
            Some(time_major(&x, hkv, 1, true)?)
        }
    };
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        if cx.options.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Err(crate::RuntimeError::DeadlineExceeded { node: String::new() });
        }
        if let Some(ed) = &edecay {
            state = state.broadcast_mul(&ed.get(i)?)?;
        }
        let kt = kc.get(i)?;
        let mut vt = vc.get(i)?;
        if let Some(bc) = &betac {
            // v_t <- beta_t * (v_t - S^T k_t)
            let retrieved = kt.reshape((bh, 1, dk))?.matmul(&state)?;
            vt = vt.sub(&retrieved)?.broadcast_mul(&bc.get(i)?)?;
        }
        state = state.add(&kt.broadcast_mul(&vt)?)?;
        outs.push(qc.get(i)?.matmul(&state)?);
    }
    let out = CT::stack(&outs, 0)?
        .affine(scale, 0.0)?
        .reshape((t, b, out_hid))?
        .transpose(0, 1)?
        .contiguous()?;
    Ok(vec![
        Value::Tensor(from_compute(out, dt)?),
        Value::Tensor(from_compute(state.reshape((b, hkv, dk, dv))?, state_dt)?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cfg: &LinAttnCfg, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
        let dev = CDevice::Cpu;
        let options = crate::RunOptions::default();
        let cx = super::super::RunCx {
            device: &dev,
            options: &options,
        };
        let vals: Vec<Option<Value>> = ins.iter().map(|t| t.clone().map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        let outs = run_linear_attention(cfg, &cx, &refs)?;
        Ok(outs
            .into_iter()
            .map(|v| match v {
                Value::Tensor(t) => t,
                _ => panic!("expected a tensor"),
            })
            .collect())
    }

    fn seq(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| (i as f64 * 0.37 + seed).sin() * 0.5).collect()
    }

    fn t64(v: Vec<f64>, dims: &[usize]) -> Tensor {
        Tensor::from_f64s(v, dims, DType::F64, &CDevice::Cpu).unwrap()
    }

    /// Scalar-loop reference for gated_delta with per-head decay, shared beta, GQA and a past state.
    #[test]
    fn gated_delta_gqa_matches_scalar_reference() {
        let (b, t, hq, hkv, dk, dv) = (2, 3, 4, 2, 3, 2);
        let g = hq / hkv;
        let q = seq(b * t * hq * dk, 0.1);
        let k = seq(b * t * hkv * dk, 0.7);
        let v = seq(b * t * hkv * dv, 1.3);
        let decay: Vec<f64> = seq(b * t * hkv, 2.1).iter().map(|x| -x.abs()).collect();
        let beta: Vec<f64> = seq(b * t, 3.3).iter().map(|x| x.abs() + 0.2).collect();
        let past = seq(b * hkv * dk * dv, 4.9);
        let scale = 0.5;
        let cfg = LinAttnCfg {
            q_heads: hq,
            kv_heads: hkv,
            scale: scale as f32,
            gating: true,
            delta: true,
        };
        let outs = run(
            &cfg,
            &[
                Some(t64(q.clone(), &[b, t, hq * dk])),
                Some(t64(k.clone(), &[b, t, hkv * dk])),
                Some(t64(v.clone(), &[b, t, hkv * dv])),
                Some(t64(past.clone(), &[b, hkv, dk, dv])),
                Some(t64(decay.clone(), &[b, t, hkv])),
                Some(t64(beta.clone(), &[b, t, 1])),
            ],
        )
        .unwrap();
        assert_eq!(outs[0].dims(), [b, t, hq * dv]);
        assert_eq!(outs[1].dims(), [b, hkv, dk, dv]);
        let (out, state) = (outs[0].to_f64_vec().unwrap(), outs[1].to_f64_vec().unwrap());
        let mut s = past;
        let si = |bb: usize, h: usize, i: usize, j: usize| ((bb * hkv + h) * dk + i) * dv + j;
        for bb in 0..b {
            for ti in 0..t {
                for h in 0..hkv {
                    let e = decay[(bb * t + ti) * hkv + h].exp();
                    let kv = |i: usize| k[((bb * t + ti) * hkv + h) * dk + i];
                    for i in 0..dk {
                        for j in 0..dv {
                            s[si(bb, h, i, j)] *= e;
                        }
                    }
                    let mut vt = vec![0.0; dv];
                    for (j, vj) in vt.iter_mut().enumerate() {
                        let r: f64 = (0..dk).map(|i| s[si(bb, h, i, j)] * kv(i)).sum();
                        *vj = beta[bb * t + ti] * (v[((bb * t + ti) * hkv + h) * dv + j] - r);
                    }
                    for i in 0..dk {
                        for (j, vj) in vt.iter().enumerate() {
                            s[si(bb, h, i, j)] += kv(i) * vj;
                        }
                    }
                    for gi in 0..g {
                        let qh = h * g + gi;
                        for j in 0..dv {
                            let o: f64 = (0..dk)
                                .map(|i| q[((bb * t + ti) * hq + qh) * dk + i] * s[si(bb, h, i, j)])
                                .sum();
                            let got = out[((bb * t + ti) * hq + qh) * dv + j];
                            assert!((got - scale * o).abs() < 1e-12, "{got} vs {}", scale * o);
                        }
                    }
                }
            }
        }
        for (a, e) in state.iter().zip(&s) {
            assert!((a - e).abs() < 1e-12);
        }
    }

    #[test]
    fn empty_sequence_passes_state_through() {
        let cfg = LinAttnCfg {
            q_heads: 2,
            kv_heads: 1,
            scale: 0.0,
            gating: false,
            delta: false,
        };
        let past = Tensor::from_f64s(seq(4, 0.0), &[1, 1, 2, 2], DType::F32, &CDevice::Cpu).unwrap();
        let z = |n| Tensor::from_f64s(vec![], &[1, 0, n], DType::F16, &CDevice::Cpu).unwrap();
        let outs = run(&cfg, &[Some(z(4)), Some(z(2)), Some(z(2)), Some(past.clone())]).unwrap();
        assert_eq!(outs[0].dims(), [1, 0, 4]);
        assert_eq!(outs[0].dtype(), DType::F16);
        assert_eq!(outs[1].dtype(), DType::F32);
        assert_eq!(outs[1].to_f64_vec().unwrap(), past.to_f64_vec().unwrap());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = LinAttnCfg {
            q_heads: 2,
            kv_heads: 2,
            scale: 0.0,
            gating: true,
            delta: false,
        };
        let x = |n| t64(seq(2 * n, 0.0), &[1, 2, n]);
        // Missing decay for a gated rule.
        assert!(run(&cfg, &[Some(x(4)), Some(x(4)), Some(x(4))]).is_err());
        // Decay with a last dim that is neither H_kv nor H_kv*d_k.
        assert!(run(&cfg, &[Some(x(4)), Some(x(4)), Some(x(4)), None, Some(x(3))]).is_err());
        // Key head size differs from the query's.
        assert!(run(&cfg, &[Some(x(4)), Some(x(6)), Some(x(4)), None, Some(x(2))]).is_err());
        assert!(run(&cfg, &[Some(x(4)), Some(x(4)), Some(x(4)), None, Some(x(2))]).is_ok());
    }
}
