// Bias + activation over a contiguous tensor: y[i] = act(x[i] + bias[i % n]), f32 or f16 in and
// out, computed in f32. bias is f32 `[n]` (the launcher widens f16 biases once) or null (no bias;
// n is then ignored). Activations: GELU with erf (ONNX Gelu, com.microsoft Gelu/BiasGelu), GELU
// with the tanh approximation (com.microsoft FastGelu, ONNX Gelu approximate="tanh"), ReLU, and none
// (the bias alone: `ai.kiln::MatMulBias` without an activation).
//
// Launch: 1-D grid-stride loop, blockDim.x = 256, gridDim.x = min(ceil(total / (256 * V)),
// 32 * SMs) where V is the vector width. When x and y are 16-byte aligned and n is a multiple of
// V (or there is no bias), each thread moves V = 4 (f32) or 8 (f16) elements per 16-byte load
// and store; otherwise the scalar loop runs (still coalesced). Purely memory-bound: one read and
// one write of x, the bias stays in L1.
#include "common.cuh"

namespace {

using kiln::to_f32;
using kiln::from_f32;

enum Act { GELU_ERF, GELU_TANH, RELU, NONE };

template <Act A>
__device__ __forceinline__ float act(float v) {
    if (A == GELU_ERF) {
        return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    } else if (A == GELU_TANH) {
        const float k = 0.79788456080286536f;  // sqrt(2 / pi)
        return 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
    } else if (A == RELU) {
        return fmaxf(v, 0.f);
    } else {
        return v;
    }
}

template <typename T> struct Vec;
template <> struct Vec<float> {
    static constexpr int N = 4;
    using Raw = float4;
};
template <> struct Vec<__half> {
    static constexpr int N = 8;
    using Raw = uint4;
};

// A 16-byte vector and its elements (see layer_norm.cu).
template <typename T> union Pack {
    typename Vec<T>::Raw raw;
    T e[Vec<T>::N];
};

template <typename T, Act A>
__device__ __forceinline__ void bias_act(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y,
                                         size_t total, int n) {
    constexpr int N = Vec<T>::N;
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 == 0) &&
                         (bias == nullptr || n % N == 0);
    size_t done = 0;
    if (aligned) {
        const size_t nvec = total / N;
        for (size_t i = tid; i < nvec; i += stride) {
            Pack<T> pk;
            pk.raw = reinterpret_cast<const typename Vec<T>::Raw*>(x)[i];
            T* e = pk.e;
            // n % N == 0: the N elements share one bias row and never wrap inside the vector.
            const int b0 = bias ? (int)((i * N) % (size_t)n) : 0;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = to_f32(e[k]);
                if (bias) v += bias[b0 + k];
                e[k] = from_f32<T>(act<A>(v));
            }
            reinterpret_cast<typename Vec<T>::Raw*>(y)[i] = pk.raw;
        }
        done = nvec * N;
    }
    for (size_t i = done + tid; i < total; i += stride) {
        float v = to_f32(x[i]);
        if (bias) v += bias[i % (size_t)n];
        y[i] = from_f32<T>(act<A>(v));
    }
}

}  // namespace

#define KILN_BIAS_ACT(NAME, A)                                                                          \
    extern "C" __global__ void kiln_bias_##NAME##_f32(const float* x, const float* bias, float* y,         \
                                                      size_t total, int n) {                               \
        bias_act<float, A>(x, bias, y, total, n);                                                          \
    }                                                                                                      \
    extern "C" __global__ void kiln_bias_##NAME##_f16(const __half* x, const float* bias, __half* y,       \
                                                      size_t total, int n) {                               \
        bias_act<__half, A>(x, bias, y, total, n);                                                         \
    }

KILN_BIAS_ACT(gelu_erf, GELU_ERF)
KILN_BIAS_ACT(gelu_tanh, GELU_TANH)
KILN_BIAS_ACT(relu, RELU)
KILN_BIAS_ACT(none, NONE)
