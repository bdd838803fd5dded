//! Launcher for `kernels/attention.cu` (flash-style attention).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{DType as CDType, Tensor as CT};
use half::f16;

use super::{alloc, cuda_dev, i32_of, input, internal, ptx, strided, wrap, Kd, MAX_GRID_X, MAX_GRID_YZ};
use crate::cuda_kernels::{count_launch, AttentionSpec};
use crate::Result;

/// The parameters of `kiln_attention_*` in `kernels/attention.cu`, in order.
pub(crate) const PARAMS: &[&str] = &[
    "q",
    "k",
    "v",
    "out",
    "mask",
    "mask_sb",
    "mask_sh",
    "mask_ss",
    "mask_sj",
    "kv_len",
    "hq",
    "hk",
    "S",
    "Tk",
    "d",
    "scale",
    "causal",
    "causal_offset",
];

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
        kernel_args!(l, PARAMS;
            q = &qv,
            k = &kv,
            v = &vv,
            out = &mut out,
            mask ?= &mv,
            mask_sb = &ms[0],
            mask_sh = &ms[1],
            mask_ss = &ms[2],
            mask_sj = &ms[3],
            kv_len ?= &lv,
            hq = &hq,
            hk = &hk,
            S = &s,
            Tk = &t,
            d = &d,
            scale = &a.scale,
            causal = &causal,
            causal_offset = &offset,
        );
        // SAFETY: matches KILN_ATTENTION(q, k, v, out, mask, 4 mask strides, kv_len, hq, hk, S, T, d,
        // scale, causal, causal_offset) in kernels/attention.cu; q/out hold B*hq*S*d elements, k/v
        // B*hk*T*d, kv_len B values, the mask view every element its strides reach for [B,hq,S,T].
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, a.q.dims()))
}
