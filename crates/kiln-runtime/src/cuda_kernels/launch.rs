//! The launchers (feature `cuda`): load the PTX that build.rs embedded through candle's CUDA
//! device (one module per `.cu` file, loaded once per device and cached by candle), read the
//! inputs' candle `CudaStorage` in place, allocate the output on candle's stream and launch there
//! with cudarc's launch builder, so the kernels are ordered with candle's own work and need no
//! synchronization. Launch configurations are described in each `.cu` file.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType as CDType, Device as CDevice, Storage, StorageRef, Tensor as CT};
use half::f16;

use super::{count_launch, Act, AttentionSpec, SoftmaxSpec, WeightArgs};
use crate::{Result, RuntimeError};

pub(super) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kiln_kernels.rs"));
}

/// A null device pointer argument (the kernels take `const float* = nullptr` for absent inputs).
const NULL: u64 = 0;
/// Largest grid.y / grid.z.
const MAX_GRID_YZ: usize = 65_535;
/// Largest grid.x.
const MAX_GRID_X: usize = i32::MAX as usize;

/// The element types the kernels take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kd {
    F32,
    F16,
}

impl Kd {
    fn of(t: &CT) -> Option<Kd> {
        match t.dtype() {
            CDType::F32 => Some(Kd::F32),
            CDType::F16 => Some(Kd::F16),
            _ => None,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Kd::F32 => "f32",
            Kd::F16 => "f16",
        }
    }

    /// Elements per 16-byte vector.
    fn vec_width(self) -> usize {
        match self {
            Kd::F32 => 4,
            Kd::F16 => 8,
        }
    }
}

fn cuda_dev(t: &CT) -> Option<&CudaDevice> {
    match t.device() {
        CDevice::Cuda(d) => Some(d),
        _ => None,
    }
}

fn internal(what: &str) -> RuntimeError {
    RuntimeError::Device(format!("fused CUDA kernel: {what}"))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| internal(&format!("{what} {v} exceeds the kernel's 32-bit index")))
}

/// A tensor's storage, read-locked for the launch, and the element range the kernel reads.
struct In<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl In<'_> {
    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        let Storage::Cuda(cs) = &*self.guard else {
            return Err(internal("input is not in CUDA memory"));
        };
        cs.as_cuda_slice::<T>()?
            .try_slice(self.start..self.start + self.len)
            .ok_or_else(|| internal("input layout reaches past its storage"))
    }
}

/// A contiguous tensor's data.
fn input(t: &CT) -> Result<In<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| internal("input is not contiguous"))?;
    Ok(In {
        guard,
        start,
        len: end - start,
    })
}

/// A strided (possibly broadcast, zero-stride) tensor's data and its element strides.
fn strided(t: &CT) -> Result<(In<'_>, Vec<i64>)> {
    let (guard, layout) = t.storage_and_layout();
    let mut reach = 1usize;
    for (&d, &s) in layout.dims().iter().zip(layout.stride()) {
        reach += d.saturating_sub(1) * s;
    }
    let strides = layout.stride().iter().map(|&s| s as i64).collect();
    Ok((
        In {
            guard,
            start: layout.start_offset(),
            len: reach,
        },
        strides,
    ))
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every kernel writes each of its n output elements before anything reads them.
    Ok(unsafe { dev.alloc::<T>(n) }?)
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, dims: &[usize]) -> CT {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    CT::from_storage(storage, dims, BackpropOp::none(), false)
}

/// An optional per-column f32 parameter on `x`'s device, flattened to `cols` values: one value
/// (broadcast), or exactly the trailing dims `trailing` of `x` (leading 1s aside), as the CPU
/// kernels accept them. `Err(())` when it does not fit (the caller then declines).
fn column_param(p: Option<&CT>, x: &CT, trailing: &[usize]) -> Result<std::result::Result<Option<CT>, ()>> {
    let Some(p) = p else { return Ok(Ok(None)) };
    if !p.device().same_device(x.device()) || !p.dtype().is_float() {
        return Ok(Err(()));
    }
    let strip = |d: &[usize]| -> Vec<usize> { d.iter().copied().skip_while(|&v| v == 1).collect() };
    let cols: usize = trailing.iter().product();
    let flat = p.to_dtype(CDType::F32)?.flatten_all()?;
    let flat = if p.elem_count() == 1 {
        flat.broadcast_as(cols)?
    } else if strip(p.dims()) == strip(trailing) {
        flat
    } else {
        return Ok(Err(()));
    };
    Ok(Ok(Some(flat.contiguous()?)))
}

// ------------------------------------------------------------------------------------------------
// layer_norm.cu
// ------------------------------------------------------------------------------------------------

/// LayerNorm (or RMSNorm with `rms`) of `x` over its axes `axis..`, with optional `gamma` and
/// `beta` of those axes' shape (RMSNorm: no beta).
pub(crate) fn layer_norm(
    x: &CT,
    gamma: Option<&CT>,
    beta: Option<&CT>,
    axis: usize,
    eps: f32,
    rms: bool,
) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(x), Kd::of(x)) else {
        return Ok(None);
    };
    let Some(trailing) = x.dims().get(axis..) else {
        return Ok(None);
    };
    let cols: usize = trailing.iter().product();
    let n = x.elem_count();
    if cols == 0 || n == 0 || !n.is_multiple_of(cols) || n / cols > MAX_GRID_X || (rms && beta.is_some()) {
        return Ok(None);
    }
    let (Ok(g), Ok(b)) = (column_param(gamma, x, trailing)?, column_param(beta, x, trailing)?) else {
        return Ok(None);
    };
    let rows = n / cols;
    let xc = x.contiguous()?;
    let name = format!("kiln_{}_{}", if rms { "rms_norm" } else { "layer_norm" }, kd.suffix());
    let threads = (cols / 8).div_ceil(32).clamp(1, 16) as u32 * 32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let cols32 = i32_of(cols, "row length")?;
    let y = match kd {
        Kd::F32 => ln_launch::<f32>(dev, &name, &xc, g.as_ref(), b.as_ref(), cols32, eps, cfg)?,
        Kd::F16 => ln_launch::<f16>(dev, &name, &xc, g.as_ref(), b.as_ref(), cols32, eps, cfg)?,
    };
    Ok(Some(y))
}

#[allow(clippy::too_many_arguments)]
fn ln_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    x: &CT,
    g: Option<&CT>,
    b: Option<&CT>,
    cols: i32,
    eps: f32,
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_layer_norm", ptx::LAYER_NORM)?;
    let (xi, gi, bi) = (input(x)?, g.map(input).transpose()?, b.map(input).transpose()?);
    let (xv, gv, bv) = (
        xi.view::<T>()?,
        gi.as_ref().map(|i| i.view::<f32>()).transpose()?,
        bi.as_ref().map(|i| i.view::<f32>()).transpose()?,
    );
    let mut out = alloc::<T>(dev, xi.len)?;
    {
        let mut l = f.builder();
        l.arg(&xv);
        match &gv {
            Some(v) => l.arg(v),
            None => l.arg(&NULL),
        };
        match &bv {
            Some(v) => l.arg(v),
            None => l.arg(&NULL),
        };
        l.arg(&mut out);
        l.arg(&cols);
        l.arg(&eps);
        // SAFETY: the argument list matches kiln_{layer,rms}_norm_*(x, gamma, beta, y, cols, eps)
        // in kernels/layer_norm.cu; every pointer covers rows * cols (x, y) or cols (gamma, beta)
        // elements of the kernel's element type.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, x.dims()))
}

// ------------------------------------------------------------------------------------------------
// bias_act.cu
// ------------------------------------------------------------------------------------------------

/// `act(x + bias)` with `bias` broadcast along `x`'s last axis (or no bias).
pub(crate) fn bias_act(x: &CT, bias: Option<&CT>, act: Act) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(x), Kd::of(x)) else {
        return Ok(None);
    };
    let total = x.elem_count();
    let last = x.dims().last().copied().unwrap_or(1);
    if total == 0 || (bias.is_some() && last == 0) {
        return Ok(None);
    }
    let Ok(b) = column_param(bias, x, &[last])? else {
        return Ok(None);
    };
    let xc = x.contiguous()?;
    let name = format!(
        "kiln_bias_{}_{}",
        match act {
            Act::GeluErf => "gelu_erf",
            Act::GeluTanh => "gelu_tanh",
            Act::Relu => "relu",
        },
        kd.suffix()
    );
    let blocks = total.div_ceil(256 * kd.vec_width()).clamp(1, 8192) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = i32_of(last, "bias length")?;
    let y = match kd {
        Kd::F32 => bias_act_launch::<f32>(dev, &name, &xc, b.as_ref(), n, cfg)?,
        Kd::F16 => bias_act_launch::<f16>(dev, &name, &xc, b.as_ref(), n, cfg)?,
    };
    Ok(Some(y))
}

fn bias_act_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    x: &CT,
    b: Option<&CT>,
    n: i32,
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_bias_act", ptx::BIAS_ACT)?;
    let (xi, bi) = (input(x)?, b.map(input).transpose()?);
    let (xv, bv) = (xi.view::<T>()?, bi.as_ref().map(|i| i.view::<f32>()).transpose()?);
    let total = xi.len as u64;
    let mut out = alloc::<T>(dev, xi.len)?;
    {
        let mut l = f.builder();
        l.arg(&xv);
        match &bv {
            Some(v) => l.arg(v),
            None => l.arg(&NULL),
        };
        l.arg(&mut out);
        l.arg(&total);
        l.arg(&n);
        // SAFETY: matches kiln_bias_*(x, bias, y, size_t total, int n) in kernels/bias_act.cu; x and
        // y hold `total` elements, bias `n` f32 values.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, x.dims()))
}

// ------------------------------------------------------------------------------------------------
// softmax.cu
// ------------------------------------------------------------------------------------------------

/// Scaled, masked softmax over groups of `spec.cols` trailing elements of `x`.
pub(crate) fn softmax(x: &CT, spec: &SoftmaxSpec) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(x), Kd::of(x)) else {
        return Ok(None);
    };
    let (n, cols) = (x.elem_count(), spec.cols);
    let hs = spec.heads * spec.seq;
    if n == 0 || cols == 0 || hs == 0 || !n.is_multiple_of(cols) || !(n / cols).is_multiple_of(hs) {
        return Ok(None);
    }
    let rows = n / cols;
    let batch = rows / hs;
    let mask = match spec.mask {
        None => None,
        Some(m) => {
            if !m.dtype().is_float() || !m.device().same_device(x.device()) || m.rank() > 4 {
                return Ok(None);
            }
            let mut m = m.to_dtype(CDType::F32)?;
            while m.rank() < 4 {
                m = m.unsqueeze(0)?;
            }
            match m.broadcast_as((batch, spec.heads, spec.seq, cols)) {
                Ok(b) => Some(b),
                Err(_) => return Ok(None),
            }
        }
    };
    let xc = x.contiguous()?;
    let (name, cfg) = if cols <= 1024 {
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4).min(MAX_GRID_X) as u32, 1, 1),
            block_dim: (32, 4, 1),
            shared_mem_bytes: 0,
        };
        ("warp", cfg)
    } else {
        let cfg = LaunchConfig {
            grid_dim: (rows.min(MAX_GRID_X) as u32, 1, 1),
            block_dim: (if cols >= 8192 { 512 } else { 256 }, 1, 1),
            shared_mem_bytes: 0,
        };
        ("block", cfg)
    };
    if rows.div_ceil(if name == "warp" { 4 } else { 1 }) > MAX_GRID_X {
        return Ok(None);
    }
    let name = format!("kiln_softmax_{name}_{}", kd.suffix());
    let y = match kd {
        Kd::F32 => softmax_launch::<f32>(dev, &name, &xc, mask.as_ref(), rows, spec, cfg)?,
        Kd::F16 => softmax_launch::<f16>(dev, &name, &xc, mask.as_ref(), rows, spec, cfg)?,
    };
    Ok(Some(y))
}

fn softmax_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    x: &CT,
    mask: Option<&CT>,
    rows: usize,
    spec: &SoftmaxSpec,
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_softmax", ptx::SOFTMAX)?;
    let xi = input(x)?;
    let mi = mask.map(strided).transpose()?;
    let xv = xi.view::<T>()?;
    let mv = mi.as_ref().map(|(i, _)| i.view::<f32>()).transpose()?;
    let ms: [i64; 4] = match &mi {
        Some((_, s)) => [
            s.first().copied().unwrap_or(0),
            s.get(1).copied().unwrap_or(0),
            s.get(2).copied().unwrap_or(0),
            s.get(3).copied().unwrap_or(0),
        ],
        None => [0; 4],
    };
    let rows64 = rows as i64;
    let cols = i32_of(spec.cols, "softmax length")?;
    let heads = i32_of(spec.heads, "heads")?;
    let seq = i32_of(spec.seq, "sequence length")?;
    let causal = i32::from(spec.causal);
    let offset = i32::try_from(spec.causal_offset).map_err(|_| internal("causal offset out of range"))?;
    let mut out = alloc::<T>(dev, xi.len)?;
    {
        let mut l = f.builder();
        l.arg(&xv);
        l.arg(&mut out);
        match &mv {
            Some(v) => l.arg(v),
            None => l.arg(&NULL),
        };
        l.arg(&rows64);
        l.arg(&cols);
        l.arg(&heads);
        l.arg(&seq);
        l.arg(&spec.scale);
        l.arg(&ms[0]);
        l.arg(&ms[1]);
        l.arg(&ms[2]);
        l.arg(&ms[3]);
        l.arg(&causal);
        l.arg(&offset);
        // SAFETY: matches KILN_SOFTMAX_ARGS in kernels/softmax.cu; x and y hold rows * cols
        // elements, the mask view covers every element its strides reach for [B, H, S, cols].
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, x.dims()))
}

// ------------------------------------------------------------------------------------------------
// attention.cu
// ------------------------------------------------------------------------------------------------

/// Flash-style attention; `None` for shapes and options the kernel does not cover.
pub(crate) fn attention(spec: &AttentionSpec) -> Result<Option<CT>> {
    let (q, k, v) = (spec.q, spec.k, spec.v);
    let (Some(dev), Some(kd)) = (cuda_dev(q), Kd::of(q)) else {
        return Ok(None);
    };
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() || q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Ok(None);
    }
    let (b, hq, s, d) = q.dims4()?;
    let (bk, hk, t, dk) = k.dims4()?;
    if v.dims() != k.dims() || bk != b || dk != d || hk == 0 || hq % hk != 0 {
        return Ok(None);
    }
    if b == 0 || hq == 0 || s == 0 || t == 0 || d == 0 || d > 128 || hq > MAX_GRID_YZ || b > MAX_GRID_YZ {
        return Ok(None);
    }
    if spec.kv_len.is_some_and(|l| l.len() != b) {
        return Ok(None);
    }
    let mask = match spec.mask {
        None => None,
        Some(m) if !m.device().same_device(q.device()) => return Ok(None),
        Some(m) => match attention_bias(m, b, hq, s, t)? {
            Some(m) => Some(m),
            None => return Ok(None),
        },
    };
    let kv_len = match spec.kv_len {
        None => None,
        Some(l) => {
            let v: Vec<i32> = l
                .iter()
                .map(|&x| x.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
                .collect();
            Some(CT::from_slice(&v, b, q.device())?)
        }
    };
    let tile = if d <= 32 {
        32
    } else if d <= 64 {
        64
    } else {
        128
    };
    let name = format!("kiln_attention_{}_d{tile}", kd.suffix());
    let cfg = LaunchConfig {
        grid_dim: (s.div_ceil(16).min(MAX_GRID_X) as u32, hq as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (qc, kc, vc) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let dims = AttnDims {
        hq: i32_of(hq, "heads")?,
        hk: i32_of(hk, "kv heads")?,
        s: i32_of(s, "query length")?,
        t: i32_of(t, "key length")?,
        d: i32_of(d, "head size")?,
    };
    let args = AttnArgs {
        q: &qc,
        k: &kc,
        v: &vc,
        mask: mask.as_ref(),
        kv_len: kv_len.as_ref(),
        dims,
        scale: spec.scale,
        causal: spec.causal,
    };
    let y = match kd {
        Kd::F32 => attention_launch::<f32>(dev, &name, &args, cfg)?,
        Kd::F16 => attention_launch::<f16>(dev, &name, &args, cfg)?,
    };
    Ok(Some(y))
}

/// The mask as an f32 additive bias broadcast (zero-stride, not copied) to `[B, H, S, T]`, with
/// the CPU kernel's rules: booleans become 0 / -inf, a last dimension shorter than T is padded
/// with -inf. `None` when it does not broadcast (the CPU path reports that).
fn attention_bias(m: &CT, b: usize, h: usize, s: usize, t: usize) -> Result<Option<CT>> {
    if m.rank() > 4 {
        return Ok(None);
    }
    let mut mc = match m.dtype() {
        CDType::U8 => {
            let zeros = CT::zeros(m.dims(), CDType::F32, m.device())?;
            let ninf = CT::full(f32::NEG_INFINITY, m.dims(), m.device())?;
            m.where_cond(&zeros, &ninf)?
        }
        d if d.is_float() => m.to_dtype(CDType::F32)?,
        _ => return Ok(None),
    };
    if mc.rank() == 0 {
        mc = mc.reshape((1, 1))?;
    }
    let last = mc.rank() - 1;
    let ml = mc.dims()[last];
    if ml < t {
        let mut pd = mc.dims().to_vec();
        pd[last] = t - ml;
        let pad = CT::full(f32::NEG_INFINITY, pd, mc.device())?;
        mc = CT::cat(&[&mc, &pad], last)?;
    } else if ml > t && ml != 1 {
        return Ok(None);
    }
    while mc.rank() < 4 {
        mc = mc.unsqueeze(0)?;
    }
    Ok(mc.broadcast_as((b, h, s, t)).ok())
}

#[derive(Clone, Copy)]
struct AttnDims {
    hq: i32,
    hk: i32,
    s: i32,
    t: i32,
    d: i32,
}

struct AttnArgs<'a> {
    q: &'a CT,
    k: &'a CT,
    v: &'a CT,
    mask: Option<&'a CT>,
    kv_len: Option<&'a CT>,
    dims: AttnDims,
    scale: f32,
    causal: bool,
}

fn attention_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    a: &AttnArgs,
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_attention", ptx::ATTENTION)?;
    let (qi, ki, vi) = (input(a.q)?, input(a.k)?, input(a.v)?);
    let mi = a.mask.map(strided).transpose()?;
    let li = a.kv_len.map(input).transpose()?;
    let (qv, kv, vv) = (qi.view::<T>()?, ki.view::<T>()?, vi.view::<T>()?);
    let mv = mi.as_ref().map(|(i, _)| i.view::<f32>()).transpose()?;
    let lv = li.as_ref().map(|i| i.view::<i32>()).transpose()?;
    let ms: [i64; 4] = match &mi {
        Some((_, s)) if s.len() == 4 => [s[0], s[1], s[2], s[3]],
        Some(_) => return Err(internal("attention mask is not 4-D")),
        None => [0; 4],
    };
    let AttnDims { hq, hk, s, t, d } = a.dims;
    let causal = i32::from(a.causal);
    let offset = 0i32;
    let mut out = alloc::<T>(dev, qi.len)?;
    {
        let mut l = f.builder();
        l.arg(&qv);
        l.arg(&kv);
        l.arg(&vv);
        l.arg(&mut out);
        match &mv {
            Some(v) => l.arg(v),
            None => l.arg(&NULL),
        };
        l.arg(&ms[0]);
        l.arg(&ms[1]);
        l.arg(&ms[2]);
        l.arg(&ms[3]);
        match &lv {
            Some(v) => l.arg(v),
            None => l.arg(&NULL),
        };
        l.arg(&hq);
        l.arg(&hk);
        l.arg(&s);
        l.arg(&t);
        l.arg(&d);
        l.arg(&a.scale);
        l.arg(&causal);
        l.arg(&offset);
        // SAFETY: matches KILN_ATTENTION(q, k, v, out, mask, 4 mask strides, kv_len, hq, hk, S, T, d,
        // scale, causal, causal_offset) in kernels/attention.cu; q/out hold B*hq*S*d elements, k/v
        // B*hk*T*d, kv_len B values, the mask view every element its strides reach for [B,hq,S,T].
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, a.q.dims()))
}

// ------------------------------------------------------------------------------------------------
// int8_gemm.cu
// ------------------------------------------------------------------------------------------------

/// `a [.., K] @ dequant(W)` -> `[.., N]`, with W's int8 codes and per-channel scales uploaded
/// once (`w.cache`).
pub(crate) fn int8_gemm(a: &CT, w: &WeightArgs) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(a), Kd::of(a)) else {
        return Ok(None);
    };
    let (k, n) = (w.k, w.n);
    let Some((&ka, batch)) = a.dims().split_last() else {
        return Ok(None);
    };
    let m: usize = batch.iter().product();
    if ka != k || m == 0 || n == 0 || k == 0 || w.codes.len() != k * n || w.scale.len() != n {
        return Ok(None);
    }
    if m.div_ceil(64) > MAX_GRID_YZ {
        return Ok(None);
    }
    let (codes, scale) = w.cache.get(a.device(), w.codes, w.scale)?;
    let ac = a.contiguous()?;
    let name = format!("kiln_int8_gemm_{}_{}", kd.suffix(), if w.trans_b { "nt" } else { "nn" });
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mnk = [i32_of(m, "M")?, i32_of(n, "N")?, i32_of(k, "K")?];
    let y = match kd {
        Kd::F32 => int8_launch::<f32>(dev, &name, &ac, &codes, &scale, mnk, cfg)?,
        Kd::F16 => int8_launch::<f16>(dev, &name, &ac, &codes, &scale, mnk, cfg)?,
    };
    let mut dims = batch.to_vec();
    dims.push(n);
    Ok(Some(y.reshape(dims)?))
}

fn int8_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    a: &CT,
    codes: &CT,
    scale: &CT,
    [m, n, k]: [i32; 3],
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_int8_gemm", ptx::INT8_GEMM)?;
    let (ai, ci, si) = (input(a)?, input(codes)?, input(scale)?);
    let (av, cv, sv) = (ai.view::<T>()?, ci.view::<u8>()?, si.view::<f32>()?);
    let mut out = alloc::<T>(dev, m as usize * n as usize)?;
    {
        let mut l = f.builder();
        l.arg(&av);
        l.arg(&cv);
        l.arg(&sv);
        l.arg(&mut out);
        l.arg(&m);
        l.arg(&n);
        l.arg(&k);
        // SAFETY: matches kiln_int8_gemm_*(a, w, scale, out, M, N, K) in kernels/int8_gemm.cu; a
        // holds M*K elements, w K*N bytes (read as signed char), scale N f32, out M*N elements.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, &[m as usize, n as usize]))
}
