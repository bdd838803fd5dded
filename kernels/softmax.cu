// Scaled, masked softmax over the last axis:
//
//   y[r, j] = softmax_j(scale * x[r, j] + mask[b, h, s, j] + causal(s, j))
//
// for x, y contiguous `[rows, cols]` with rows = batch * heads * seq (row r -> b, h, s), f32 or f16
// in and out, f32 accumulation. `mask` is an optional f32 additive bias addressed through element
// strides (mask_sb, mask_sh, mask_ss, mask_sj), so a padding mask [B, 1, 1, T] broadcasts over
// heads and queries with zero strides and is never materialized. `causal` masks keys j > s +
// causal_offset. A row whose every logit is -inf (nothing to attend to) gives zeros, not NaN.
//
// Online softmax: one read pass keeps a running (max, sum of exp) per thread, merged with
// shuffles; a second pass re-reads x (from L1/L2) and writes. Two kernels share the code:
//   kiln_softmax_warp_*:  one warp per row, for cols <= 1024. blockDim = (32, 4): 4 rows per
//                         block, grid = ceil(rows / 4). No shared memory, no block barrier.
//   kiln_softmax_block_*: one block per row, for long rows. blockDim.x = 256 (512 for cols >=
//                         8192), grid = rows. 64 floats of static shared memory.
#include "common.cuh"

namespace {

using kiln::MaxSum;
using kiln::from_f32;
using kiln::to_f32;

// Scalar parameters, passed as separate kernel arguments (no struct ABI to keep in sync with Rust).
struct Params {
    long long rows;
    int cols, heads, seq;
    float scale;
    const float* mask;
    long long mask_sb, mask_sh, mask_ss, mask_sj;
    int causal;
    int causal_offset;
};

// The masked, scaled logit of column j in a row, or -inf.
template <typename T>
__device__ __forceinline__ float logit(const T* __restrict__ xr, const float* __restrict__ mr, int j, int s,
                                       const Params& p) {
    if (p.causal && j > s + p.causal_offset) return -INFINITY;
    float v = p.scale * to_f32(xr[j]);
    if (mr) v += mr[(long long)j * p.mask_sj];
    return v;
}

template <typename T>
__device__ __forceinline__ void row_setup(const Params& p, long long r, const T* x, const T*& xr, const float*& mr,
                                          int& s) {
    s = (int)(r % p.seq);
    const long long bh = r / p.seq;
    const long long h = bh % p.heads, b = bh / p.heads;
    xr = x + r * p.cols;
    mr = p.mask ? p.mask + b * p.mask_sb + h * p.mask_sh + (long long)s * p.mask_ss : nullptr;
}

template <typename T>
__device__ __forceinline__ void write_row(const T* xr, const float* mr, T* yr, int s, const Params& p, MaxSum st,
                                          int start, int step) {
    const bool empty = st.m == -INFINITY;
    const float inv = empty ? 0.f : 1.f / st.s;
    for (int j = start; j < p.cols; j += step) {
        const float v = logit(xr, mr, j, s, p);
        yr[j] = from_f32<T>(empty ? 0.f : expf(v - st.m) * inv);
    }
}

template <typename T>
__device__ void softmax_warp(const T* __restrict__ x, T* __restrict__ y, Params p) {
    const long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= p.rows) return;  // whole warps leave together: no shuffle sees a missing lane
    const T* xr;
    const float* mr;
    int s;
    row_setup(p, r, x, xr, mr, s);
    MaxSum st{-INFINITY, 0.f};
    for (int j = threadIdx.x; j < p.cols; j += 32) st = kiln::merge(st, MaxSum{logit(xr, mr, j, s, p), 1.f});
    st = kiln::warp_merge(st);
    write_row(xr, mr, y + r * p.cols, s, p, st, threadIdx.x, 32);
}

template <typename T>
__device__ void softmax_block(const T* __restrict__ x, T* __restrict__ y, Params p) {
    __shared__ float scratch[64];
    const long long r = blockIdx.x;
    const T* xr;
    const float* mr;
    int s;
    row_setup(p, r, x, xr, mr, s);
    MaxSum st{-INFINITY, 0.f};
    for (int j = threadIdx.x; j < p.cols; j += blockDim.x) st = kiln::merge(st, MaxSum{logit(xr, mr, j, s, p), 1.f});
    st = kiln::block_merge(st, scratch);
    write_row(xr, mr, y + r * p.cols, s, p, st, threadIdx.x, blockDim.x);
}

}  // namespace

// Arguments (both kernels): x, y, mask (f32 or null), rows (i64), cols, heads, seq (i32), scale (f32),
// mask_sb, mask_sh, mask_ss, mask_sj (i64 element strides), causal (i32 0/1), causal_offset (i32).
#define KILN_SOFTMAX_ARGS(T)                                                                                \
    const T *x, T *y, const float *mask, long long rows, int cols, int heads, int seq, float scale,          \
        long long mask_sb, long long mask_sh, long long mask_ss, long long mask_sj, int causal, int causal_offset
#define KILN_SOFTMAX_PARAMS \
    Params { rows, cols, heads, seq, scale, mask, mask_sb, mask_sh, mask_ss, mask_sj, causal, causal_offset }

#define KILN_SOFTMAX(SUFFIX, T)                                                                             \
    extern "C" __global__ void kiln_softmax_warp_##SUFFIX(KILN_SOFTMAX_ARGS(T)) {                            \
        softmax_warp<T>(x, y, KILN_SOFTMAX_PARAMS);                                                          \
    }                                                                                                        \
    extern "C" __global__ void kiln_softmax_block_##SUFFIX(KILN_SOFTMAX_ARGS(T)) {                           \
        softmax_block<T>(x, y, KILN_SOFTMAX_PARAMS);                                                         \
    }

KILN_SOFTMAX(f32, float)
KILN_SOFTMAX(f16, __half)
