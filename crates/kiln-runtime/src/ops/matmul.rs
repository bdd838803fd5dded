//! Operator family `matmul`: MatMul, Gemm, Einsum, Det, MatMulInteger.

use candle_core::{DType as CDType, Tensor as CT};
use kiln_graph::DType;
use rayon::prelude::*;

use std::sync::Arc;

use super::common::{broadcast_dims, elems, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::fastmath::with_f32;
use crate::Value;
use crate::{bail, qgemm, sgemm, Result, Tensor};

const MS: &str = "com.microsoft";

pub fn register(r: &mut Registry) {
    r.add("MatMul", |n| {
        let packed = pack_const_weight(n, 1, false)?;
        Ok(kernel(move |cx, ins| {
            let a = tin(ins, 0)?;
            if let Some(p) = &packed {
                if let Some(y) = packed_matmul(cx, a, p, None, sgemm::Activation::None)? {
                    return out1(y);
                }
                return out1(matmul(cx, a, p.weight(ins)?)?);
            }
            out1(matmul(cx, a, tin(ins, 1)?)?)
        }))
    });
    r.add("Gemm", gemm);
    r.add_domain("ai.kiln", "MatMulBias", matmul_bias);
    r.add("Einsum", einsum_factory);
    r.add_domain(MS, "MatMulIntegerToFloat", matmul_integer_to_float);
    r.add_domain(MS, "DynamicQuantizeMatMul", dynamic_quantize_matmul);
    r.add("Det", |_| Ok(kernel(|_, ins| out1(det(tin(ins, 0)?)?))));
    r.add("MatMulInteger", |n| {
        let packed = pack_const_int8_weight(n, 3)?;
        Ok(kernel(move |cx, ins| {
            let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
            let (azp, bzp) = (tin_opt(ins, 2)?, tin_opt(ins, 3)?);
            if let Some(y) = int8_matmul(cx, a, azp, b, bzp, packed.as_deref())? {
                return out1(y);
            }
            let acc = matmul_integer(cx, a, azp, b, bzp)?;
            out1(acc.cast(DType::I32)?)
        }))
    });
}

/// An 8-bit tensor's bytes and signedness (i8 is stored widened; its bytes come back two's
/// complement); `None` for other dtypes and devices.
fn int8_bytes(t: &Tensor) -> Result<Option<(Vec<u8>, qgemm::Int8)>> {
    if !t.device().is_cpu() {
        return Ok(None);
    }
    let flat = t.candle().flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => Some((flat.to_vec1::<u8>()?, qgemm::Int8::U8)),
        DType::I8 => Some((
            flat.to_vec1::<i16>()?.into_iter().map(|v| v as i8 as u8).collect(),
            qgemm::Int8::I8,
        )),
        _ => None,
    })
}

/// A zero-point input as i32 values: absent, one value, or a 1-D list of `len`; `None` otherwise.
fn int8_zero_points(zp: Option<&Tensor>, len: usize) -> Result<Option<Vec<i32>>> {
    let Some(z) = zp else { return Ok(Some(vec![0])) };
    if z.elem_count() != 1 && (z.rank() != 1 || z.elem_count() != len) {
        return Ok(None);
    }
    Ok(Some(z.to_i64_vec()?.into_iter().map(|v| v as i32).collect()))
}

/// A constant `[K, N]` 8-bit weight (input 1) with its constant or absent zero point (input
/// `zp_input`) packed for the integer GEMM at plan time (CPU plans).
fn pack_const_int8_weight(n: &NodeCtx, zp_input: usize) -> Result<Option<Arc<qgemm::PackedQB>>> {
    if !n.options.device.is_cpu() {
        return Ok(None);
    }
    let Some(w) = n.const_input(1) else { return Ok(None) };
    if w.dims.len() != 2 || w.dims.contains(&0) || !matches!(w.dtype, DType::U8 | DType::I8) {
        return Ok(None);
    }
    let zp = match n.node.inputs.get(zp_input).copied().flatten() {
        None => vec![0],
        Some(_) => match n.const_input(zp_input).and_then(|z| z.to_i64_vec()) {
            Some(z) if z.len() == 1 || z.len() == w.dims[1] => z.into_iter().map(|v| v as i32).collect(),
            _ => return Ok(None),
        },
    };
    let ty = if w.dtype == DType::U8 {
        qgemm::Int8::U8
    } else {
        qgemm::Int8::I8
    };
    let packed = qgemm::PackedQB::pack(w.bytes(), ty, w.dims[0], w.dims[1], qgemm::ZeroPoint::PerIndex(&zp))
        .map_err(|e| n.err(e.to_string()))?;
    n.note_held_bytes(packed.bytes());
    Ok(Some(Arc::new(packed)))
}

/// MatMulInteger's operands ready for the packed integer GEMM: A's bytes, signedness, row count
/// and zero points, B packed (at plan time when constant, else here) and the output dims; `None`
/// unless A is 8-bit of rank >= 2, B 2-D 8-bit on the CPU with matching K and the zero points
/// scalar or per row / per column (the exact general path takes the rest and reports shape errors).
struct Int8Operands<'p> {
    a: Vec<u8>,
    ty: qgemm::Int8,
    m: usize,
    za: Vec<i32>,
    w: std::borrow::Cow<'p, qgemm::PackedQB>,
    out_dims: Vec<usize>,
}

impl<'p> Int8Operands<'p> {
    fn new(
        a: &Tensor,
        azp: Option<&Tensor>,
        b: &Tensor,
        bzp: Option<&Tensor>,
        packed: Option<&'p qgemm::PackedQB>,
    ) -> Result<Option<Self>> {
        let dims = a.dims();
        if dims.len() < 2 || b.rank() != 2 || !b.device().is_cpu() {
            return Ok(None);
        }
        let (k, n) = (b.dims()[0], b.dims()[1]);
        let rows_per_matrix = dims[dims.len() - 2];
        if dims[dims.len() - 1] != k || k == 0 || n == 0 {
            return Ok(None);
        }
        let Some(za) = int8_zero_points(azp, rows_per_matrix)? else {
            return Ok(None);
        };
        let Some((abytes, ty)) = int8_bytes(a)? else {
            return Ok(None);
        };
        let w = match packed {
            Some(p) if p.k() == k && p.n() == n => std::borrow::Cow::Borrowed(p),
            _ => {
                let Some(zb) = int8_zero_points(bzp, n)? else {
                    return Ok(None);
                };
                let Some((bbytes, bty)) = int8_bytes(b)? else {
                    return Ok(None);
                };
                let p = qgemm::PackedQB::pack(&bbytes, bty, k, n, qgemm::ZeroPoint::PerIndex(&zb))
                    .map_err(|e| crate::RuntimeError::msg(e.to_string()))?;
                std::borrow::Cow::Owned(p)
            }
        };
        let m = abytes.len() / k;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok(Some(Int8Operands {
            a: abytes,
            ty,
            m,
            za,
            w,
            out_dims,
        }))
    }
}

/// MatMulInteger through the packed integer GEMM (see [`Int8Operands`]).
fn int8_matmul(
    cx: &RunCx,
    a: &Tensor,
    azp: Option<&Tensor>,
    b: &Tensor,
    bzp: Option<&Tensor>,
    packed: Option<&qgemm::PackedQB>,
) -> Result<Option<Tensor>> {
    let Some(op) = Int8Operands::new(a, azp, b, bzp, packed)? else {
        return Ok(None);
    };
    cx.check_alloc(elems(&op.out_dims), DType::I32)?;
    let mut out = vec![0i32; op.m * op.w.n()];
    qgemm::gemm(&op.a, op.ty, op.m, qgemm::ZeroPoint::PerIndex(&op.za), &op.w, &mut out)
        .map_err(|e| crate::RuntimeError::msg(e.to_string()))?;
    Ok(Some(Tensor::new(
        CT::from_vec(out, op.out_dims, a.device())?,
        DType::I32,
    )?))
}

/// f32 values of a float tensor with one value or `n`; `None` otherwise.
fn f32_params(t: &Tensor, n: usize) -> Result<Option<Vec<f32>>> {
    if t.dtype() != DType::F32 || (t.elem_count() != 1 && (t.rank() != 1 || t.elem_count() != n)) {
        return Ok(None);
    }
    Ok(Some(t.candle().flatten_all()?.to_vec1::<f32>()?))
}

/// `com.microsoft` `MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?,
/// bias?)`: `(A - a_zp)(B - b_zp) * (a_scale * b_scale) + bias`, the form ONNX Runtime fuses
/// DynamicQuantizeLinear models into (Kiln's `matmul_integer_to_float_fusion` too). With an f32
/// per-tensor `a_scale`, a per-tensor or per-column `b_scale` and bias, the integer GEMM writes the
/// floats directly; anything else goes through the exact integer product and tensor arithmetic.
fn matmul_integer_to_float(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let packed = pack_const_int8_weight(n, 5)?;
    Ok(kernel(move |cx, ins| {
        let (a, b, a_s, b_s) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?, tin(ins, 3)?);
        let (azp, bzp, bias) = (tin_opt(ins, 4)?, tin_opt(ins, 5)?, tin_opt(ins, 6)?);
        integer_to_float(cx, a, b, a_s, b_s, azp, bzp, bias, packed.as_deref())
    }))
}

/// `com.microsoft` `DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?)`: A (f32) quantized
/// to u8 as DynamicQuantizeLinear does, then [`matmul_integer_to_float`].
fn dynamic_quantize_matmul(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let packed = pack_const_int8_weight(n, 3)?;
    Ok(kernel(move |cx, ins| {
        let (a, b, b_s) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
        let (bzp, bias) = (tin_opt(ins, 3)?, tin_opt(ins, 4)?);
        if !a.dtype().is_float() {
            bail!("DynamicQuantizeMatMul needs a float A, got {}", a.dtype());
        }
        let af = a.candle().to_dtype(CDType::F32)?.contiguous()?;
        let Some((q, scale, zp)) = with_f32(&af, super::quant::dynamic_quantize_slice) else {
            bail!("DynamicQuantizeMatMul runs on the CPU only");
        };
        let dev = a.device();
        let aq = Tensor::new(CT::from_vec(q, a.dims(), dev)?, DType::U8)?;
        let a_s = Tensor::new(CT::new(scale, dev)?, DType::F32)?;
        let azp = Tensor::new(CT::new(zp as u8, dev)?, DType::U8)?;
        integer_to_float(cx, &aq, b, &a_s, b_s, Some(&azp), bzp, bias, packed.as_deref())
    }))
}

#[allow(clippy::too_many_arguments)]
fn integer_to_float(
    cx: &RunCx,
    a: &Tensor,
    b: &Tensor,
    a_s: &Tensor,
    b_s: &Tensor,
    azp: Option<&Tensor>,
    bzp: Option<&Tensor>,
    bias: Option<&Tensor>,
    packed: Option<&qgemm::PackedQB>,
) -> Result<Vec<Value>> {
    {
        for s in [a_s, b_s] {
            if !s.dtype().is_float() {
                bail!("MatMulIntegerToFloat scales must be floating point, got {}", s.dtype());
            }
        }
        let nn = b.dims().get(1).copied().unwrap_or(0);
        let fast_params = match (
            f32_params(a_s, 1)?,
            f32_params(b_s, nn)?,
            bias.map(|t| f32_params(t, nn)),
        ) {
            (Some(sa), Some(sb), None) => Some((sa, sb, None)),
            (Some(sa), Some(sb), Some(Ok(Some(bv)))) if bv.len() == nn => Some((sa, sb, Some(bv))),
            _ => None,
        };
        if let Some((sa, sb, bv)) = fast_params {
            if let Some(op) = Int8Operands::new(a, azp, b, bzp, packed)? {
                // a_scale * b_scale in f32 first, as the unfused graph's Mul computes it.
                let scale: Vec<f32> = sb.iter().map(|&s| sa[0] * s).collect();
                cx.check_alloc(elems(&op.out_dims), DType::F32)?;
                let len = op.m * op.w.n();
                let mut y = Vec::with_capacity(len);
                qgemm::gemm_f32_uninit(
                    &op.a,
                    op.ty,
                    op.m,
                    qgemm::ZeroPoint::PerIndex(&op.za),
                    &op.w,
                    &scale,
                    bv.as_deref(),
                    &mut y.spare_capacity_mut()[..len],
                )
                .map_err(|e| crate::RuntimeError::msg(e.to_string()))?;
                // SAFETY: the product succeeded, so it wrote all `len` values.
                unsafe { y.set_len(len) };
                return out1(Tensor::new(CT::from_vec(y, op.out_dims, a.device())?, DType::F32)?);
            }
        }
        let acc = matmul_integer(cx, a, azp, b, bzp)?;
        let wide = a_s.candle().dtype();
        let sa = a_s.candle().to_dtype(CDType::F32)?;
        let sa = if sa.elem_count() == 1 {
            sa.flatten_all()?.reshape(())?
        } else {
            sa
        };
        let sb = b_s.candle().to_dtype(CDType::F32)?;
        let sb = if sb.elem_count() == 1 {
            sb.flatten_all()?.reshape(())?
        } else {
            sb
        };
        let mut y = acc
            .candle()
            .to_dtype(CDType::F32)?
            .broadcast_mul(&sa.broadcast_mul(&sb)?)?;
        if let Some(bias) = bias {
            y = y.broadcast_add(&bias.candle().to_dtype(CDType::F32)?)?;
        }
        let dt = if wide == CDType::F16 { DType::F16 } else { DType::F32 };
        out1(Tensor::new(y.to_dtype(wide)?, dt)?)
    }
}

/// A constant f32 weight packed for the CPU GEMM at plan time, in place of the input: the plan
/// keeps no other copy (see [`NodeCtx::consume_input`]). The rare call the packed kernel does not
/// take (an operand of another dtype or shape, which the general path reports) gets the weight
/// rebuilt from the packed copy.
pub(crate) struct PackedWeight {
    pub packed: Arc<sgemm::PackedB>,
    /// Input position and dims of the weight as the graph stores it.
    input: usize,
    dims: [usize; 2],
    /// Stored as `[N, K]` (Gemm's transB).
    trans: bool,
    original: std::sync::OnceLock<Tensor>,
}

impl std::ops::Deref for PackedWeight {
    type Target = sgemm::PackedB;
    fn deref(&self) -> &sgemm::PackedB {
        &self.packed
    }
}

impl PackedWeight {
    /// The weight input as the graph stores it: the run's value when one was passed, else rebuilt.
    pub(crate) fn weight<'a>(&'a self, ins: &[Option<&'a Value>]) -> Result<&'a Tensor> {
        if let Some(Some(v)) = ins.get(self.input) {
            return v
                .as_tensor()
                .map_err(|e| crate::RuntimeError::msg(format!("input {}: {e}", self.input)));
        }
        if let Some(t) = self.original.get() {
            return Ok(t);
        }
        let kn = self.packed.unpack();
        let (k, n) = (self.packed.k(), self.packed.n());
        let values = if self.trans {
            (0..n)
                .flat_map(|j| (0..k).map(move |p| (j, p)))
                .map(|(j, p)| kn[p * n + j])
                .collect()
        } else {
            kn
        };
        let t = Tensor::new(
            CT::from_vec(values, self.dims.to_vec(), &candle_core::Device::Cpu)?,
            DType::F32,
        )?;
        Ok(self.original.get_or_init(|| t))
    }
}

/// Packs a constant f32 2-D weight (input `i`; `[K, N]`, or `[N, K]` when `trans`) for the CPU
/// packed GEMM, when the plan runs on a CPU that has the kernels; the kernel then holds the only
/// copy.
fn pack_const_weight(n: &NodeCtx, i: usize, trans: bool) -> Result<Option<PackedWeight>> {
    let Some((packed, dims)) = shared_packed(n, i, trans)? else {
        return Ok(None);
    };
    n.consume_input(i);
    Ok(Some(PackedWeight {
        packed,
        input: i,
        dims,
        trans,
        original: std::sync::OnceLock::new(),
    }))
}

/// The constant f32 2-D input `i` (`[K, N]`, or `[N, K]` when `trans`) packed as the GEMM's right
/// operand, with its stored dims: packed once per plan for all kernels that read the same
/// initializer the same way ([`NodeCtx::packs`]; its bytes are counted by the first). `None` off
/// the CPU, without the kernels, or for another dtype or rank.
pub(crate) fn shared_packed(n: &NodeCtx, i: usize, trans: bool) -> Result<Option<(Arc<sgemm::PackedB>, [usize; 2])>> {
    if !n.options.device.is_cpu() || !sgemm::available() {
        return Ok(None);
    }
    let Some(w) = n.const_input(i) else { return Ok(None) };
    if w.dtype != DType::F32 || w.dims.len() != 2 {
        return Ok(None);
    }
    let (r, c) = (w.dims[0], w.dims[1]);
    // Only initializers are shared (a Constant node's value belongs to that node).
    let key = n.node.inputs[i]
        .filter(|id| n.graph.initializers.contains_key(id))
        .map(|id| (id, trans));
    if let Some(p) = key.and_then(|k| n.packs.borrow().get(&k).cloned()) {
        return Ok(Some((p, [r, c])));
    }
    let copied;
    let vals = match w.f32_slice() {
        Some(v) => v,
        None => {
            copied = w.values::<f32>().unwrap_or_default();
            copied.as_slice()
        }
    };
    let view = if trans {
        // stored [N, K]: element (p, j) of the [K, N] operand is at j * K + p
        sgemm::MatRef {
            data: vals,
            rows: c,
            cols: r,
            rs: 1,
            cs: c,
        }
    } else {
        sgemm::MatRef::row_major(vals, r, c)
    };
    let packed = Arc::new(sgemm::PackedB::pack(view).map_err(|e| n.err(e.to_string()))?);
    n.note_held_bytes(packed.bytes());
    if let Some(k) = key {
        n.packs.borrow_mut().insert(k, Arc::clone(&packed));
    }
    Ok(Some((packed, [r, c])))
}

/// `act(A @ W (+ bias))` with a packed constant `W` for an f32 CPU `A` of rank >= 2 whose last dim
/// is `W`'s K (the activation is applied while each output block is in cache); `None` when `A` is
/// anything else (the caller takes the general path, which also reports shape errors).
pub(crate) fn packed_matmul(
    cx: &RunCx,
    a: &Tensor,
    w: &sgemm::PackedB,
    bias: Option<&[f32]>,
    act: sgemm::Activation,
) -> Result<Option<Tensor>> {
    let dims = a.dims();
    let (k, n) = (w.k(), w.n());
    if a.dtype() != DType::F32 || !a.device().is_cpu() || dims.len() < 2 || dims.last() != Some(&k) {
        return Ok(None);
    }
    let m = a
        .elem_count()
        .checked_div(k)
        .unwrap_or_else(|| dims[..dims.len() - 1].iter().product());
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    cx.check_alloc(elems(&out_dims), DType::F32)?;
    let ac = a.candle().contiguous()?;
    let mut out = vec![0f32; m * n];
    let done = with_f32(&ac, |x| {
        let bias = bias.map_or(sgemm::Bias::None, sgemm::Bias::PerCol);
        sgemm::gemm_packed_b_act(sgemm::MatRef::row_major(x, m, k), w, bias, act, &mut out, n)
    });
    match done {
        None => return Ok(None),
        Some(r) => r.map_err(|e| crate::RuntimeError::msg(e.to_string()))?,
    }
    Ok(Some(Tensor::new(CT::from_vec(out, out_dims, a.device())?, DType::F32)?))
}

/// `ai.kiln::MatMulBias(A, W, bias)` with attribute `activation` (`""`, `"relu"`, `"gelu_erf"`,
/// `"gelu_tanh"`): `act(A @ W + bias)`, fused by `kiln_graph::passes::matmul_bias`. With a constant
/// f32 `W` on a CPU with the packed kernels the bias and activation are part of the GEMM; otherwise
/// (other devices, dtypes or shapes) it runs as MatMul, Add and the activation.
fn matmul_bias(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let act = match n.attr_s("activation", "")?.as_str() {
        "" => sgemm::Activation::None,
        "relu" => sgemm::Activation::Relu,
        "gelu_erf" => sgemm::Activation::GeluErf,
        "gelu_tanh" => sgemm::Activation::GeluTanh,
        other => return Err(n.err(format!("unknown activation '{other}'"))),
    };
    // `trans_b` (`kiln_graph::passes::tied_weight`): W is stored `[N, K]`.
    let trans_b = n.attr_i("trans_b", 0)? != 0;
    let packed = pack_const_weight(n, 1, trans_b)?;
    let const_bias = n
        .const_input(2)
        .filter(|t| t.dtype == DType::F32)
        .and_then(|t| t.values::<f32>());
    Ok(kernel(move |cx, ins| {
        let (a, bias) = (tin(ins, 0)?, tin_opt(ins, 2)?);
        if let Some(p) = &packed {
            let fits = bias.is_none_or(|b| b.dtype() == DType::F32 && b.elem_count() == p.n() && b.rank() <= a.rank());
            if fits {
                let runtime_bias;
                let bv = match (&const_bias, bias) {
                    (Some(v), _) => Some(v.as_slice()),
                    (None, Some(b)) => {
                        runtime_bias = b.candle().flatten_all()?.to_vec1::<f32>()?;
                        Some(runtime_bias.as_slice())
                    }
                    (None, None) => None,
                };
                if let Some(y) = packed_matmul(cx, a, p, bv, act)? {
                    return out1(y);
                }
            }
        }
        let w = match &packed {
            Some(p) => p.weight(ins)?,
            None => tin(ins, 1)?,
        };
        let transposed;
        let w = if trans_b {
            // A transposed view: candle's GEMM reads it in place.
            transposed = Tensor::new(w.candle().t()?, w.dtype())?;
            &transposed
        } else {
            w
        };
        let y = matmul(cx, a, w)?;
        if let Some(b) = bias {
            if b.dtype() != y.dtype() {
                bail!("MatMulBias bias has dtype {}, the product {}", b.dtype(), y.dtype());
            }
        }
        // On CUDA the bias and activation are one fused kernel (`kernels/bias_act.cu`).
        let cuda_act = match act {
            sgemm::Activation::None => crate::cuda_kernels::Act::None,
            sgemm::Activation::Relu => crate::cuda_kernels::Act::Relu,
            sgemm::Activation::GeluErf => crate::cuda_kernels::Act::GeluErf,
            sgemm::Activation::GeluTanh => crate::cuda_kernels::Act::GeluTanh,
        };
        if bias.is_none() && act == sgemm::Activation::None {
            return out1(y);
        }
        if let Some(r) = crate::cuda_kernels::bias_act(y.candle(), bias.map(|b| b.candle()), cuda_act)? {
            return out1(Tensor::new(r, y.dtype())?);
        }
        let s = match bias {
            Some(b) => y.candle().broadcast_add(b.candle())?,
            None => y.candle().clone(),
        };
        let s = match act {
            sgemm::Activation::None => s,
            sgemm::Activation::Relu => s.relu()?,
            sgemm::Activation::GeluErf => s.gelu_erf()?,
            sgemm::Activation::GeluTanh => s.gelu()?,
        };
        out1(Tensor::new(s, y.dtype())?)
    }))
}

/// Whether candle's matmul on this device handles `dt` natively.
fn native_mm(dt: CDType, dev: &candle_core::Device) -> bool {
    match dt {
        CDType::F32 | CDType::F64 => true,
        // candle's CPU f16 gemm loses precision on long sums: accumulate those in f32.
        CDType::F16 | CDType::BF16 => dev.is_cuda(),
        _ => false,
    }
}

/// A matrix operand as candle's gemm takes it: a row-major or a plain transposed (column-major)
/// 2-D view is used in place, anything else is made contiguous.
fn gemm_ready(t: &CT) -> Result<CT> {
    if t.rank() == 2 && !t.is_contiguous() {
        let d = t.dims();
        if t.stride() == [1, d[0]] && d[0] > 1 && d[1] > 1 {
            return Ok(t.clone());
        }
    }
    Ok(t.contiguous()?)
}

/// Matrix product of two candle tensors of equal rank (2 or 3), equal batch and equal dtype,
/// any dtype: floats on candle (bf16 through f32 where needed), integers exactly (wrapping).
pub(crate) fn mm_any(a: &CT, b: &CT) -> Result<CT> {
    let dt = a.dtype();
    if b.dtype() != dt {
        bail!("internal: matmul of {:?} and {:?}", dt, b.dtype());
    }
    if native_mm(dt, a.device()) {
        return Ok(gemm_ready(a)?.matmul(&gemm_ready(b)?)?);
    }
    if matches!(dt, CDType::BF16 | CDType::F16) {
        let r = gemm_ready(&a.to_dtype(CDType::F32)?)?.matmul(&gemm_ready(&b.to_dtype(CDType::F32)?)?)?;
        return Ok(r.to_dtype(dt)?);
    }
    // Integers: f64 is exact while every partial sum stays below 2^53.
    let k = a.dims().last().copied().unwrap_or(0);
    let af = a.to_dtype(CDType::F64)?;
    let bf = b.to_dtype(CDType::F64)?;
    let amax = if af.elem_count() == 0 {
        0.0
    } else {
        af.abs()?.max_all()?.to_scalar::<f64>()?
    };
    let bmax = if bf.elem_count() == 0 {
        0.0
    } else {
        bf.abs()?.max_all()?.to_scalar::<f64>()?
    };
    if amax * bmax * (k as f64) < 9.0e15 {
        let r = af.contiguous()?.matmul(&bf.contiguous()?)?;
        return Ok(r.round()?.to_dtype(CDType::I64)?.to_dtype(dt)?);
    }
    host_mm_i64(a, b)
}

/// Exact wrapping integer matrix product on the host (rank 2 or 3).
fn host_mm_i64(a: &CT, b: &CT) -> Result<CT> {
    let (a3, b3) = if a.rank() == 2 {
        (a.unsqueeze(0)?, b.unsqueeze(0)?)
    } else {
        (a.clone(), b.clone())
    };
    let (bt, m, k) = a3.dims3()?;
    let (_, k2, n) = b3.dims3()?;
    if k != k2 {
        bail!("matmul inner dimensions differ: {k} and {k2}");
    }
    let av = a3.to_dtype(CDType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    let bv = b3.to_dtype(CDType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    let mut out = vec![0i64; bt * m * n];
    if n > 0 {
        out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
            let (bi, i) = (row / m.max(1), row % m.max(1));
            let arow = &av[(bi * m + i) * k..(bi * m + i + 1) * k];
            let bmat = &bv[bi * k * n..(bi + 1) * k * n];
            for (p, &x) in arow.iter().enumerate() {
                if x == 0 {
                    continue;
                }
                let brow = &bmat[p * n..(p + 1) * n];
                for (d, &y) in dst.iter_mut().zip(brow) {
                    *d = d.wrapping_add(x.wrapping_mul(y));
                }
            }
        });
    }
    let mut dims = a.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let r = CT::from_vec(out, dims, a.device())?;
    Ok(r.to_dtype(a.dtype())?)
}

/// Numpy `matmul` on candle tensors of one dtype: 1-D promotion and batch broadcasting.
pub(crate) fn matmul_ct(cx: &RunCx, a: &CT, b: &CT, out_dtype: DType) -> Result<CT> {
    let (ad, bd) = (a.dims().to_vec(), b.dims().to_vec());
    if ad.is_empty() || bd.is_empty() {
        bail!("MatMul inputs must have rank >= 1, got shapes {ad:?} and {bd:?}");
    }
    let a2 = if ad.len() == 1 {
        a.reshape((1, ad[0]))?
    } else {
        a.clone()
    };
    let b2 = if bd.len() == 1 {
        b.reshape((bd[0], 1))?
    } else {
        b.clone()
    };
    let (a2d, b2d) = (a2.dims().to_vec(), b2.dims().to_vec());
    let (ra, rb) = (a2d.len(), b2d.len());
    let (m, k) = (a2d[ra - 2], a2d[ra - 1]);
    let (k2, n) = (b2d[rb - 2], b2d[rb - 1]);
    if k != k2 {
        bail!("MatMul shapes {ad:?} and {bd:?} are not aligned ({k} != {k2})");
    }
    let batch = broadcast_dims(&a2d[..ra - 2], &b2d[..rb - 2])?;
    let mut out_dims = batch.clone();
    out_dims.extend([m, n]);
    cx.check_alloc(elems(&out_dims), out_dtype)?;
    let bsz: usize = batch.iter().product();
    let b_batch: usize = b2d[..rb - 2].iter().product();
    let r = if batch.is_empty() {
        mm_any(&a2, &b2)?
    } else if b_batch == 1 && bsz > 0 {
        // Fold every batch of `a` into the rows of one 2-D product.
        let mut ab = batch.clone();
        ab.extend([m, k]);
        let a_flat = a2.broadcast_as(ab)?.contiguous()?.reshape((bsz * m, k))?;
        let b_flat = if b2.rank() == 2 {
            b2.clone()
        } else {
            b2.reshape((k, n))?
        };
        mm_any(&a_flat, &b_flat)?.reshape(out_dims.as_slice())?
    } else {
        let mut ab = batch.clone();
        ab.extend([m, k]);
        let mut bb = batch.clone();
        bb.extend([k, n]);
        cx.check_alloc(elems(&ab).max(elems(&bb)), out_dtype)?;
        let a3 = a2.broadcast_as(ab)?.contiguous()?.reshape((bsz, m, k))?;
        let b3 = b2.broadcast_as(bb)?.contiguous()?.reshape((bsz, k, n))?;
        mm_any(&a3, &b3)?.reshape(out_dims.as_slice())?
    };
    // Undo 1-D promotion.
    let mut fin = batch;
    if ad.len() > 1 {
        fin.push(m);
    }
    if bd.len() > 1 {
        fin.push(n);
    }
    Ok(r.reshape(fin)?)
}

/// ONNX MatMul on Kiln tensors (any numeric dtype; integers wrap).
pub(crate) fn matmul(cx: &RunCx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        bail!("MatMul inputs have different dtypes: {} and {}", a.dtype(), b.dtype());
    }
    let dt = a.dtype();
    if dt == DType::Bool || dt == DType::String {
        bail!("MatMul does not support {dt}");
    }
    let r = matmul_ct(cx, a.candle(), b.candle(), dt)?;
    Tensor::new(r, dt)
}

fn gemm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let alpha = n.attr_f("alpha", 1.0)? as f64;
    let beta = n.attr_f("beta", 1.0)? as f64;
    let ta = n.attr_i("transA", 0)? != 0;
    let tb = n.attr_i("transB", 0)? != 0;
    let packed = if ta || alpha != 1.0 {
        None
    } else {
        pack_const_weight(n, 1, tb)?
    };
    Ok(kernel(move |cx, ins| {
        let a = tin(ins, 0)?;
        // A packed weight is rebuilt only if the general path below needs it.
        let (b_dtype, b_dims) = match &packed {
            Some(p) => (DType::F32, &p.dims[..]),
            None => {
                let b = tin(ins, 1)?;
                (b.dtype(), b.dims())
            }
        };
        let c = tin_opt(ins, 2)?;
        if a.dtype() != b_dtype {
            bail!("Gemm inputs have different dtypes: {} and {}", a.dtype(), b_dtype);
        }
        if a.rank() != 2 || b_dims.len() != 2 {
            bail!("Gemm needs 2-D inputs, got shapes {:?} and {:?}", a.dims(), b_dims);
        }
        let dt = a.dtype();
        // Packed weight (f32 CPU, alpha 1, no transA): a [N] / [1, N] C with beta 1 is the kernel's
        // initial value; any other C is added below like on the general path.
        let mut c_added = false;
        let mut packed_y = None;
        if let Some(p) = &packed {
            let row_bias = c.filter(|c| {
                beta == 1.0 && c.dtype() == DType::F32 && c.elem_count() == p.n() && c.dims().last() == Some(&p.n())
            });
            let bias_vec = match row_bias {
                Some(c) => Some(c.candle().flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            packed_y = packed_matmul(cx, a, p, bias_vec.as_deref(), sgemm::Activation::None)?;
            c_added = packed_y.is_some() && bias_vec.is_some();
        }
        let mut y = match packed_y {
            Some(y) => y.into_candle(),
            None => {
                let b = match &packed {
                    Some(p) => p.weight(ins)?,
                    None => tin(ins, 1)?,
                };
                let mut at = a.candle().clone();
                let mut bt = b.candle().clone();
                if ta {
                    at = at.t()?;
                }
                if tb {
                    bt = bt.t()?;
                }
                if !dt.is_float() {
                    // Integers: compute in f64 then convert (numpy's float scale then astype).
                    at = at.to_dtype(CDType::F64)?;
                    bt = bt.to_dtype(CDType::F64)?;
                } else if matches!(dt, DType::F16 | DType::BF16) {
                    // Half precision: one rounding at the end (product and bias in f32).
                    at = at.to_dtype(CDType::F32)?;
                    bt = bt.to_dtype(CDType::F32)?;
                }
                let y = matmul_ct(cx, &at, &bt, dt)?;
                if alpha != 1.0 {
                    y.affine(alpha, 0.0)?
                } else {
                    y
                }
            }
        };
        if let Some(c) = c.filter(|_| !c_added) {
            if beta != 0.0 {
                let mut cc = c.candle().to_dtype(y.dtype())?;
                if beta != 1.0 {
                    cc = cc.affine(beta, 0.0)?;
                }
                let dims = y.dims().to_vec();
                y = y.add(&cc.broadcast_as(dims)?)?;
            }
        }
        if dt.is_float() {
            out1(Tensor::new(y.to_dtype(crate::storage_dtype(dt)?)?, dt)?)
        } else {
            out1(Tensor::new(y.trunc_f64()?, DType::F64)?.cast(dt)?)
        }
    }))
}

trait TruncF64 {
    fn trunc_f64(&self) -> candle_core::Result<CT>;
}

impl TruncF64 for CT {
    /// Rounds toward zero (numpy `astype(int)`), kept in f64.
    fn trunc_f64(&self) -> candle_core::Result<CT> {
        let pos = self.ge(0.0)?;
        pos.where_cond(&self.floor()?, &self.ceil()?)
    }
}

/// MatMulInteger's accumulation: (A - a_zp) @ (B - b_zp), exact, as an I64 tensor.
/// `a_zp` is a scalar or per-row (1-D of size M); `b_zp` a scalar or per-column (1-D of size N).
pub(crate) fn matmul_integer(
    cx: &RunCx,
    a: &Tensor,
    azp: Option<&Tensor>,
    b: &Tensor,
    bzp: Option<&Tensor>,
) -> Result<Tensor> {
    for t in [a, b] {
        if t.dtype().is_float() || t.dtype() == DType::Bool {
            bail!("integer matmul needs integer inputs, got {}", t.dtype());
        }
    }
    let mut af = a.candle().to_dtype(CDType::F64)?;
    let mut bf = b.candle().to_dtype(CDType::F64)?;
    if let Some(z) = azp {
        let z = z.candle().to_dtype(CDType::F64)?;
        let z = if z.elem_count() == 1 {
            z.flatten_all()?.reshape(())?
        } else if a.rank() >= 2 && z.rank() == 1 {
            // Per-row zero point: shape [M] -> [M, 1].
            z.reshape((z.elem_count(), 1))?
        } else {
            z
        };
        af = af.broadcast_sub(&z)?;
    }
    if let Some(z) = bzp {
        let z = z.candle().to_dtype(CDType::F64)?;
        let z = if z.elem_count() == 1 {
            z.flatten_all()?.reshape(())?
        } else {
            z
        };
        bf = bf.broadcast_sub(&z)?;
    }
    // Products of 8/16-bit values: f64 accumulation is exact for any realistic K.
    let r = matmul_ct(cx, &af, &bf, DType::I64)?;
    Tensor::new(r.round()?.to_dtype(CDType::I64)?, DType::I64)
}

// ---------------------------------------------------------------- Det

fn det(x: &Tensor) -> Result<Tensor> {
    let d = x.dims();
    if d.len() < 2 || d[d.len() - 1] != d[d.len() - 2] {
        bail!("Det needs [..., n, n] input, got {d:?}");
    }
    if !x.dtype().is_float() {
        bail!("Det needs a float input, got {}", x.dtype());
    }
    let n = d[d.len() - 1];
    let batch = &d[..d.len() - 2];
    let v = x.to_f64_vec()?;
    let count: usize = batch.iter().product();
    let out: Vec<f64> = (0..count)
        .map(|bi| {
            let mut m = v[bi * n * n..(bi + 1) * n * n].to_vec();
            lu_det(&mut m, n)
        })
        .collect();
    Tensor::from_f64s(out, batch, x.dtype(), x.device())
}

fn lu_det(m: &mut [f64], n: usize) -> f64 {
    let mut det = 1.0;
    for c in 0..n {
        let mut p = c;
        let mut best = m[c * n + c].abs();
        for r in c + 1..n {
            let v = m[r * n + c].abs();
            if v > best {
                best = v;
                p = r;
            }
        }
        if best == 0.0 {
            return 0.0;
        }
        if p != c {
            for j in 0..n {
                m.swap(c * n + j, p * n + j);
            }
            det = -det;
        }
        let piv = m[c * n + c];
        det *= piv;
        for r in c + 1..n {
            let f = m[r * n + c] / piv;
            if f != 0.0 {
                for j in c..n {
                    m[r * n + j] -= f * m[c * n + j];
                }
            }
        }
    }
    det
}

// ---------------------------------------------------------------- Einsum

/// A label: letters are 0..52, ellipsis dimensions 52.. (right-aligned).
type Label = usize;
const ELL: usize = 52;

struct Term {
    letters: Vec<Label>,
    /// Position of the ellipsis among `letters`, if any.
    ell: Option<usize>,
}

fn parse_term(s: &str) -> Result<Term> {
    let mut letters = Vec::new();
    let mut ell = None;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'.' {
            if b.get(i + 1) == Some(&b'.') && b.get(i + 2) == Some(&b'.') && ell.is_none() {
                ell = Some(letters.len());
                i += 3;
                continue;
            }
            bail!("Einsum: bad ellipsis in term '{s}'");
        }
        let l = match c {
            b'a'..=b'z' => (c - b'a') as usize + 26,
            b'A'..=b'Z' => (c - b'A') as usize,
            _ => bail!("Einsum: bad character '{}' in equation", c as char),
        };
        letters.push(l);
        i += 1;
    }
    Ok(Term { letters, ell })
}

fn expand_term(t: &Term, ell_rank: usize, total_ell: usize) -> Vec<Label> {
    let mut out = Vec::new();
    for (i, &l) in t.letters.iter().enumerate() {
        if t.ell == Some(i) {
            out.extend((total_ell - ell_rank..total_ell).map(|j| ELL + j));
        }
        out.push(l);
    }
    if t.ell == Some(t.letters.len()) {
        out.extend((total_ell - ell_rank..total_ell).map(|j| ELL + j));
    }
    out
}

fn einsum_factory(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let eq: String = n
        .attr_s("equation", "")?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if eq.is_empty() {
        return Err(n.err("Einsum needs an equation"));
    }
    Ok(kernel(move |cx, ins| {
        let ts: Vec<&Tensor> = (0..ins.len()).map(|i| tin(ins, i)).collect::<Result<_>>()?;
        out1(einsum(cx, &eq, &ts)?)
    }))
}

/// An operand during contraction: a candle tensor and one label per dimension.
struct Op {
    t: CT,
    labels: Vec<Label>,
}

fn einsum(cx: &RunCx, eq: &str, ts: &[&Tensor]) -> Result<Tensor> {
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq, None),
    };
    let terms: Vec<Term> = lhs.split(',').map(parse_term).collect::<Result<_>>()?;
    if terms.len() != ts.len() {
        bail!(
            "Einsum equation has {} operands but {} inputs were given",
            terms.len(),
            ts.len()
        );
    }
    let Some(first) = ts.first() else {
        bail!("Einsum needs at least one input")
    };
    let dt = first.dtype();
    for t in ts {
        if t.dtype() != dt {
            bail!("Einsum inputs have different dtypes");
        }
    }
    if dt == DType::Bool {
        bail!("Einsum does not support bool");
    }
    let cdt = match dt {
        DType::F64 => CDType::F64,
        d if d.is_float() => CDType::F32,
        _ => CDType::I64,
    };
    // Ellipsis ranks.
    let mut ell_ranks = Vec::new();
    for (t, x) in terms.iter().zip(ts) {
        let r = x.rank();
        let er = if t.ell.is_some() {
            if r < t.letters.len() {
                bail!("Einsum: operand of rank {r} has too few dimensions for its term");
            }
            r - t.letters.len()
        } else {
            if r != t.letters.len() {
                bail!(
                    "Einsum: operand of rank {r} does not match a term of {} labels",
                    t.letters.len()
                );
            }
            0
        };
        ell_ranks.push(er);
    }
    let total_ell = ell_ranks.iter().copied().max().unwrap_or(0);
    let mut sizes = [0usize; 256];
    let mut seen = [false; 256];
    let mut ops = Vec::new();
    let mut counts = [0usize; 256];
    for ((t, x), er) in terms.iter().zip(ts).zip(&ell_ranks) {
        let labels = expand_term(t, *er, total_ell);
        if labels.iter().any(|&l| l >= 256) {
            bail!("Einsum: too many ellipsis dimensions");
        }
        for (&l, &d) in labels.iter().zip(x.dims()) {
            if !seen[l] || sizes[l] == 1 {
                sizes[l] = d;
            } else if d != 1 && d != sizes[l] {
                bail!("Einsum: label size mismatch ({} vs {d})", sizes[l]);
            }
            seen[l] = true;
        }
        let mut uniq = labels.clone();
        uniq.sort_unstable();
        uniq.dedup();
        for &l in &uniq {
            counts[l] += 1;
        }
        ops.push(Op {
            t: x.candle().to_dtype(cdt)?,
            labels,
        });
    }
    let out_labels: Vec<Label> = match rhs {
        Some(r) => {
            let t = parse_term(r)?;
            let out = expand_term(&t, total_ell, total_ell);
            if out.iter().any(|&l| l >= 256) {
                bail!("Einsum: too many ellipsis dimensions");
            }
            for &l in &out {
                if !seen[l] {
                    bail!("Einsum: output label not found in inputs");
                }
            }
            let mut s = out.clone();
            s.sort_unstable();
            s.dedup();
            if s.len() != out.len() {
                bail!("Einsum: repeated output label");
            }
            out
        }
        None => {
            let mut out: Vec<Label> = (0..total_ell).map(|j| ELL + j).collect();
            // Letters appearing once in the whole equation, in alphabetical (ASCII) order.
            let mut occ = [0usize; 52];
            for t in &terms {
                for &l in &t.letters {
                    occ[l] += 1;
                }
            }
            out.extend((0..52).filter(|&l| occ[l] == 1));
            out
        }
    };
    let out_dims: Vec<usize> = out_labels.iter().map(|&l| sizes[l]).collect();
    cx.check_alloc(elems(&out_dims), dt)?;

    // Diagonals and single-operand sums.
    let mut ops: Vec<Op> = ops.into_iter().map(diagonalize).collect::<Result<_>>()?;
    for op in &mut ops {
        let keep = |l: Label| out_labels.contains(&l) || counts[l] > 1;
        let sum_dims: Vec<usize> = (0..op.labels.len()).filter(|&d| !keep(op.labels[d])).collect();
        if !sum_dims.is_empty() {
            let t = op.t.sum(sum_dims.clone())?;
            let labels = (0..op.labels.len())
                .filter(|d| !sum_dims.contains(d))
                .map(|d| op.labels[d])
                .collect();
            for &d in &sum_dims {
                counts[op.labels[d]] -= 1;
            }
            *op = Op { t, labels };
        }
    }
    // Pairwise contraction, left to right.
    let mut it = ops.into_iter();
    let mut acc = it
        .next()
        .ok_or_else(|| crate::RuntimeError::msg("Einsum needs an input"))?;
    for b in it {
        for &l in &acc.labels {
            counts[l] -= 1;
        }
        for &l in &b.labels {
            counts[l] -= 1;
        }
        let later = |l: Label| out_labels.contains(&l) || counts[l] > 0;
        acc = contract(cx, acc, b, &sizes, later, dt)?;
        for &l in &acc.labels {
            counts[l] += 1;
        }
    }
    // Final sums and permutation.
    let sum_dims: Vec<usize> = (0..acc.labels.len())
        .filter(|&d| !out_labels.contains(&acc.labels[d]))
        .collect();
    let mut t = acc.t;
    let mut labels = acc.labels;
    if !sum_dims.is_empty() {
        t = t.sum(sum_dims.clone())?;
        labels = (0..labels.len())
            .filter(|d| !sum_dims.contains(d))
            .map(|d| labels[d])
            .collect();
    }
    let perm: Vec<usize> = out_labels
        .iter()
        .map(|l| labels.iter().position(|x| x == l))
        .collect::<Option<_>>()
        .ok_or_else(|| crate::RuntimeError::msg("Einsum: internal label error"))?;
    if perm.len() != labels.len() {
        bail!("Einsum: internal label count error");
    }
    if !perm.is_empty() {
        t = t.permute(perm)?;
    }
    let t = t.broadcast_as(out_dims.as_slice())?.contiguous()?;
    Tensor::from_candle(t)?.cast(dt)
}

/// Takes diagonals for labels repeated within one operand.
fn diagonalize(mut op: Op) -> Result<Op> {
    loop {
        let mut pair = None;
        'outer: for i in 0..op.labels.len() {
            for j in i + 1..op.labels.len() {
                if op.labels[i] == op.labels[j] {
                    pair = Some((i, j));
                    break 'outer;
                }
            }
        }
        let Some((i, j)) = pair else { return Ok(op) };
        let dims = op.t.dims().to_vec();
        if dims[i] != dims[j] {
            bail!(
                "Einsum: repeated label with different sizes {} and {}",
                dims[i],
                dims[j]
            );
        }
        let n = dims[i];
        if n >= 65_000 {
            bail!("Einsum: diagonal of size {n} is too large");
        }
        let r = dims.len();
        let mut perm: Vec<usize> = (0..r).filter(|&d| d != i && d != j).collect();
        perm.push(i);
        perm.push(j);
        let t = op.t.permute(perm.clone())?.contiguous()?;
        let mut nd: Vec<usize> = perm[..r - 2].iter().map(|&d| dims[d]).collect();
        nd.push(n * n);
        let t = t.reshape(nd)?;
        let idx: Vec<u32> = (0..n as u32).map(|x| x * (n as u32 + 1)).collect();
        let idx = CT::from_vec(idx, n, t.device())?;
        let t = t.index_select(&idx, r - 2)?;
        let mut labels: Vec<Label> = perm[..r - 2].iter().map(|&d| op.labels[d]).collect();
        labels.push(op.labels[i]);
        op = Op { t, labels };
    }
}

fn contract(cx: &RunCx, a: Op, b: Op, sizes: &[usize], later: impl Fn(Label) -> bool, dt: DType) -> Result<Op> {
    let in_a = |l: &Label| a.labels.contains(l);
    let in_b = |l: &Label| b.labels.contains(l);
    let batch: Vec<Label> = a.labels.iter().copied().filter(|l| in_b(l) && later(*l)).collect();
    let contr: Vec<Label> = a.labels.iter().copied().filter(|l| in_b(l) && !later(*l)).collect();
    let a_only: Vec<Label> = a.labels.iter().copied().filter(|l| !in_b(l)).collect();
    let b_only: Vec<Label> = b.labels.iter().copied().filter(|l| !in_a(l)).collect();
    // Labels in only one operand that nothing needs later are summed first.
    let (a, a_only) = sum_unneeded(a, a_only, &later)?;
    let (b, b_only) = sum_unneeded(b, b_only, &later)?;
    let arrange = |op: &Op, order: &[Label]| -> Result<CT> {
        let perm: Vec<usize> = order
            .iter()
            .map(|l| op.labels.iter().position(|x| x == l))
            .collect::<Option<_>>()
            .ok_or_else(|| crate::RuntimeError::msg("Einsum: internal label error"))?;
        let target: Vec<usize> = order.iter().map(|&l| sizes[l]).collect();
        let t = if perm.is_empty() {
            op.t.clone()
        } else {
            op.t.permute(perm)?
        };
        Ok(t.broadcast_as(target)?.contiguous()?)
    };
    let prod = |ls: &[Label]| ls.iter().map(|&l| sizes[l]).product::<usize>();
    let (nb, m, k, n) = (prod(&batch), prod(&a_only), prod(&contr), prod(&b_only));
    let mut ord_a = batch.clone();
    ord_a.extend(&a_only);
    ord_a.extend(&contr);
    let mut ord_b = batch.clone();
    ord_b.extend(&contr);
    ord_b.extend(&b_only);
    let mut labels = batch.clone();
    labels.extend(&a_only);
    labels.extend(&b_only);
    let out_dims: Vec<usize> = labels.iter().map(|&l| sizes[l]).collect();
    cx.check_alloc(elems(&out_dims), dt)?;
    let ta = arrange(&a, &ord_a)?.reshape((nb, m, k))?;
    let tb = arrange(&b, &ord_b)?.reshape((nb, k, n))?;
    let t = mm_any(&ta, &tb)?.reshape(out_dims)?;
    Ok(Op { t, labels })
}

fn sum_unneeded(op: Op, only: Vec<Label>, later: &impl Fn(Label) -> bool) -> Result<(Op, Vec<Label>)> {
    let dims: Vec<usize> = (0..op.labels.len())
        .filter(|&d| only.contains(&op.labels[d]) && !later(op.labels[d]))
        .collect();
    if dims.is_empty() {
        return Ok((op, only));
    }
    let t = op.t.sum(dims.clone())?;
    let labels: Vec<Label> = (0..op.labels.len())
        .filter(|d| !dims.contains(d))
        .map(|d| op.labels[d])
        .collect();
    let only = only.into_iter().filter(|l| later(*l)).collect();
    Ok((Op { t, labels }, only))
}
