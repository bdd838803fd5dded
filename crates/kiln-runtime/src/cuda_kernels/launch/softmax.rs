//! Launcher for `kernels/softmax.cu` (scaled, masked, causal softmax).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{DType as CDType, Tensor as CT};
use half::f16;

use super::{alloc, cuda_dev, i32_of, input, internal, ptx, strided, wrap, Kd, MAX_GRID_X};
use crate::cuda_kernels::{count_launch, SoftmaxSpec};
use crate::Result;

/// The parameters of `kiln_softmax_*` in `kernels/softmax.cu`, in order.
pub(crate) const PARAMS: &[&str] = &[
    "x",
    "y",
    "mask",
    "rows",
    "cols",
    "heads",
    "seq",
    "scale",
    "mask_sb",
    "mask_sh",
    "mask_ss",
    "mask_sj",
    "causal",
    "causal_offset",
];

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
        kernel_args!(l, PARAMS;
            x = &xv,
            y = &mut out,
            mask ?= &mv,
            rows = &rows64,
            cols = &cols,
            heads = &heads,
            seq = &seq,
            scale = &spec.scale,
            mask_sb = &ms[0],
            mask_sh = &ms[1],
            mask_ss = &ms[2],
            mask_sj = &ms[3],
            causal = &causal,
            causal_offset = &offset,
        );
        // SAFETY: matches KILN_SOFTMAX_ARGS in kernels/softmax.cu; x and y hold rows * cols
        // elements, the mask view covers every element its strides reach for [B, H, S, cols].
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, x.dims()))
}
