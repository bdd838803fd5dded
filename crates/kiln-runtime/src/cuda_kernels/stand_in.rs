//! Without the `cuda` feature: every entry point declines, the callers take their regular path.

use candle_core::Tensor as CT;

use super::{Act, AttentionSpec, Conv2dGeometry, PagedLayerKv, PagedMeta, SoftmaxSpec, WeightArgs};
use crate::Result;

pub(crate) fn layer_norm(
    _x: &CT,
    _gamma: Option<&CT>,
    _beta: Option<&CT>,
    _axis: usize,
    _eps: f32,
    _rms: bool,
) -> Result<Option<CT>> {
    Ok(None)
}

pub(crate) fn bias_act(_x: &CT, _bias: Option<&CT>, _act: Act) -> Result<Option<CT>> {
    Ok(None)
}

pub(crate) fn conv2d(_x: &CT, _w: &CT, _bias: Option<&CT>, _g: &Conv2dGeometry) -> Result<Option<CT>> {
    Ok(None)
}

pub(crate) fn permute(_x: &CT, _perm: &[usize]) -> Result<Option<CT>> {
    Ok(None)
}

pub(crate) fn softmax(_x: &CT, _spec: &SoftmaxSpec) -> Result<Option<CT>> {
    Ok(None)
}

pub(crate) fn attention(_spec: &AttentionSpec) -> Result<Option<CT>> {
    Ok(None)
}

pub(crate) fn int8_gemm(_a: &CT, _weight: &WeightArgs) -> Result<Option<CT>> {
    Ok(None)
}

#[allow(dead_code)] // no caller until PagedAttention runs on CUDA
pub(crate) fn paged_attention(_q: &CT, _kv: &PagedLayerKv, _meta: &PagedMeta, _scale: f32) -> Result<Option<CT>> {
    Ok(None)
}

#[allow(dead_code)] // no caller until PagedAttention runs on CUDA
pub(crate) fn reshape_and_cache(_k: &CT, _v: &CT, _kv: &PagedLayerKv, _meta: &PagedMeta) -> Result<Option<()>> {
    Ok(None)
}
