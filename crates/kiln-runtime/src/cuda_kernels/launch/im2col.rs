//! Launcher for `kernels/im2col.cu`: a 2-D convolution as the column matrix plus one cuBLAS batched
//! product (through candle) whose result is already NCHW, the bias folded into the product.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::Tensor as CT;
use half::f16;

use super::{alloc, cuda_dev, input, ptx, wrap, Kd};
use crate::cuda_kernels::{count_launch, Conv2dGeometry};
use crate::Result;

/// The parameters of `kiln_im2col_*` in `kernels/im2col.cu`, in order.
pub(crate) const PARAMS: &[&str] = &["x", "col", "g"];

/// `KilnIm2colParams` in `kernels/im2col.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    c: i32,
    h: i32,
    w: i32,
    kh: i32,
    kw: i32,
    oh: i32,
    ow: i32,
    sh: i32,
    sw: i32,
    dh: i32,
    dw: i32,
    pt: i32,
    pl: i32,
    ones: i32,
}

// SAFETY: plain `#[repr(C)]` data matching the kernel's by-value struct parameter.
unsafe impl DeviceRepr for Params {}

/// Largest grid.y / grid.z.
const MAX_YZ: usize = 65_535;

/// Conv of `x [N, C, H, W]` with `w [M, C, KH, KW]` (one group) plus `bias [M]`, f32 or f16 on
/// CUDA: `[N, M, OH, OW]`; `None` for other cases (CPU tensors, other dtypes, mixed dtypes, sizes
/// past the kernel's grid) so the caller takes candle's path.
pub(crate) fn conv2d(x: &CT, w: &CT, bias: Option<&CT>, g: &Conv2dGeometry) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(x), Kd::of(x)) else {
        return Ok(None);
    };
    if w.dtype() != x.dtype() || x.rank() != 4 || w.rank() != 4 {
        return Ok(None);
    }
    let (n, c, h, wd) = x.dims4()?;
    let (m, wc, kh, kw) = w.dims4()?;
    let [oh, ow] = g.out;
    let p = oh * ow;
    let taps = c * kh * kw;
    let ones = usize::from(bias.is_some());
    let rows = taps + ones;
    if bias.is_some_and(|b| b.elem_count() != m)
        || wc != c
        || n == 0
        || m == 0
        || p == 0
        || taps == 0
        || rows > MAX_YZ
        || n > MAX_YZ
    {
        return Ok(None);
    }
    if p.checked_mul(rows).is_none_or(|v| v >= i32::MAX as usize) {
        return Ok(None);
    }
    let int = |v: usize| i32::try_from(v).ok();
    let fields = [
        c,
        h,
        wd,
        kh,
        kw,
        oh,
        ow,
        g.stride[0],
        g.stride[1],
        g.dilation[0],
        g.dilation[1],
        g.pad[0],
        g.pad[1],
    ];
    let Some(f) = fields.iter().map(|&v| int(v)).collect::<Option<Vec<i32>>>() else {
        return Ok(None);
    };
    let params = Params {
        c: f[0],
        h: f[1],
        w: f[2],
        kh: f[3],
        kw: f[4],
        oh: f[5],
        ow: f[6],
        sh: f[7],
        sw: f[8],
        dh: f[9],
        dw: f[10],
        pt: f[11],
        pl: f[12],
        ones: ones as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (p.div_ceil(256) as u32, rows as u32, n as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let xc = x.contiguous()?;
    let dims = [n, rows, p];
    let col = match kd {
        Kd::F32 => launch::<f32>(dev, "kiln_im2col_f32", &xc, params, cfg, dims)?,
        Kd::F16 => launch::<f16>(dev, "kiln_im2col_f16", &xc, params, cfg, dims)?,
    };
    // W as [M, taps] (+ the bias column), the same for every image: a zero batch stride.
    let mut wm = w.contiguous()?.reshape((m, taps))?;
    if let Some(b) = bias {
        let b = b.to_dtype(x.dtype())?.reshape((m, 1))?;
        wm = CT::cat(&[&wm, &b], 1)?;
    }
    let y = wm.unsqueeze(0)?.broadcast_as((n, m, rows))?.matmul(&col)?;
    Ok(Some(y.reshape((n, m, oh, ow))?))
}

fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    x: &CT,
    params: Params,
    cfg: LaunchConfig,
    dims: [usize; 3],
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_im2col", ptx::IM2COL)?;
    let xi = input(x)?;
    let xv = xi.view::<T>()?;
    let mut out = alloc::<T>(dev, dims.iter().product())?;
    {
        let mut l = f.builder();
        kernel_args!(l, PARAMS; x = &xv, col = &mut out, g = &params);
        // SAFETY: matches kiln_im2col_{f32,f16}(x, col, KilnIm2colParams) in kernels/im2col.cu; x
        // holds N*C*H*W elements (contiguous), col N*(taps+ones)*P, and the grid is (P/256, rows, N).
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, &dims))
}
