// Shared device helpers for Kiln's fused kernels: dtype conversion to the fp32 compute type,
// warp/block reductions through register shuffles, and the online-softmax (max, sum) merge.
//
// Every kernel reads f32 or f16 and accumulates in f32; conversions happen in registers right
// after the load and right before the store.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#define KILN_FULL_MASK 0xffffffffu

namespace kiln {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KILN_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(KILN_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). Every thread gets the
// result. `scratch` needs 32 floats of shared memory; the call ends with a barrier so the
// scratch can be reused by the next reduction.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Online softmax state: running maximum `m` and the sum `s` of exp(x - m). Merging two states
// rescales the smaller-max sum; a state with m = -inf (nothing seen, or only masked values) is
// the identity.
struct MaxSum {
    float m, s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    if (a.m == -INFINITY) return b;
    if (b.m == -INFINITY) return a;
    const float m = fmaxf(a.m, b.m);
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other{__shfl_xor_sync(KILN_FULL_MASK, v.m, o), __shfl_xor_sync(KILN_FULL_MASK, v.s, o)};
        v = merge(v, other);
    }
    return v;
}

// Block-wide merge; every thread gets the result. `scratch` needs 64 floats of shared memory.
__device__ __forceinline__ MaxSum block_merge(MaxSum v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_merge(v);
    if (lane == 0) {
        scratch[warp] = v.m;
        scratch[32 + warp] = v.s;
    }
    __syncthreads();
    MaxSum w = lane < nwarps ? MaxSum{scratch[lane], scratch[32 + lane]} : MaxSum{-INFINITY, 0.f};
    w = warp_merge(w);
    __syncthreads();
    return w;
}

}  // namespace kiln
