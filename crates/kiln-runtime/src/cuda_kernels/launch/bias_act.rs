//! Launcher for `kernels/bias_act.cu` (bias + activation (GELU erf/tanh, ReLU, none)).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::Tensor as CT;
use half::f16;

use super::{alloc, column_param, cuda_dev, i32_of, input, ptx, wrap, Kd};
use crate::cuda_kernels::{count_launch, Act};
use crate::Result;

/// The parameters of `kiln_bias_*` in `kernels/bias_act.cu`, in order.
pub(crate) const PARAMS: &[&str] = &["x", "bias", "y", "total", "n"];

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
            Act::None => "none",
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
        kernel_args!(l, PARAMS; x = &xv, bias ?= &bv, y = &mut out, total = &total, n = &n);
        // SAFETY: matches kiln_bias_*(x, bias, y, size_t total, int n) in kernels/bias_act.cu; x and
        // y hold `total` elements, bias `n` f32 values.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, x.dims()))
}
