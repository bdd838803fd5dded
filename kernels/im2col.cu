// im2col for 2-D convolutions (1-D ones are 2-D with one row), the column matrix in the layout that
// makes the convolution one batched GEMM with an NCHW result:
//
//   col[n][k][p] = x[n][c][oy * sh - pt + ky * dh][ox * sw - pl + kx * dw]   (0 outside the image)
//   k = (c * KH + ky) * KW + kx,  p = oy * OW + ox
//
// so that y[n] = W[M, K] x col[n][K, P] is `[M, OH * OW]`, already NCHW (no transpose afterwards).
// With `ones` set, row K (one past the last tap) is all ones and the caller appends the bias as a
// column of W, so the GEMM adds it. Pads may differ per side (pt/pl given; the far side follows from
// OH/OW). f32 or f16, copied as is.
//
// Launch: grid (ceil(P / 256), K + ones, n), blockDim.x = 256: a block fills 256 columns of one row
// of one image, so the tap (c, ky, kx) is the block's and each thread divides once (oy, ox). The
// launcher keeps K + ones and n within 65535 and P * (K + ones) under 2^31 (else it declines).
// Writes are coalesced along p; reads along ox with stride sw.
#include <cuda_fp16.h>
#include <stdint.h>

// The geometry, passed by value (so a launch uploads nothing).
struct KilnIm2colParams {
    int c, h, w;      // input channels and spatial size
    int kh, kw;       // kernel
    int oh, ow;       // output spatial size
    int sh, sw;       // strides
    int dh, dw;       // dilations
    int pt, pl;       // top and left pads
    int ones;         // 1: an extra row of ones (bias folded into the GEMM)
};

namespace {

template <typename T> __device__ __forceinline__ T one();
template <> __device__ __forceinline__ float one<float>() { return 1.f; }
template <> __device__ __forceinline__ __half one<__half>() { return __float2half_rn(1.f); }
template <typename T> __device__ __forceinline__ T zero();
template <> __device__ __forceinline__ float zero<float>() { return 0.f; }
template <> __device__ __forceinline__ __half zero<__half>() { return __float2half_rn(0.f); }

template <typename T>
__device__ __forceinline__ void im2col(const T* __restrict__ x, T* __restrict__ col, const KilnIm2colParams& g) {
    const unsigned p_count = (unsigned)g.oh * (unsigned)g.ow;
    const unsigned p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= p_count) return;
    const unsigned k = blockIdx.y, b = blockIdx.z;
    const unsigned taps = (unsigned)g.c * g.kh * g.kw;
    const unsigned rows = taps + g.ones;
    T* out = col + ((size_t)b * rows + k) * p_count;
    if (k == taps) {
        out[p] = one<T>();
        return;
    }
    const int kx = (int)(k % g.kw);
    const int ky = (int)((k / g.kw) % g.kh);
    const unsigned c = k / ((unsigned)g.kw * g.kh);
    const int oy = (int)(p / (unsigned)g.ow), ox = (int)(p - (unsigned)oy * g.ow);
    const int iy = oy * g.sh - g.pt + ky * g.dh;
    const int ix = ox * g.sw - g.pl + kx * g.dw;
    const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
    out[p] = inside ? x[(((size_t)b * g.c + c) * g.h + iy) * g.w + ix] : zero<T>();
}

}  // namespace

extern "C" __global__ void kiln_im2col_f32(const float* x, float* col, KilnIm2colParams g) { im2col<float>(x, col, g); }
extern "C" __global__ void kiln_im2col_f16(const __half* x, __half* col, KilnIm2colParams g) { im2col<__half>(x, col, g); }
