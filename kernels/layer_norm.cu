// LayerNorm and RMSNorm over the last axis (ONNX LayerNormalization / RMSNormalization with the
// normalized dims flattened into `cols`), f32 or f16 in and out, f32 accumulation.
//
//   LayerNorm: y = (x - mean) / sqrt(var + eps) * gamma + beta,   var = mean((x - mean)^2)
//   RMSNorm:   y = x / sqrt(mean(x^2) + eps) * gamma
//
// gamma and beta are f32 `[cols]` (the launcher widens f16 parameters once); either may be null
// (gamma null = 1, beta null = 0).
//
// Launch: one block per row, grid = (rows, 1, 1), blockDim.x a multiple of 32 in [32, 1024]
// (the launcher picks about cols / 8 threads, rounded up to a warp, capped at 512), no dynamic
// shared memory. Two passes over the row for the statistics (mean, then the centered sum of
// squares: exact where the one-pass E[x^2] - E[x]^2 cancels) and a third that writes; all three
// are coalesced, and the second and third re-read the row from L1/L2 (a row is at most a few
// tens of KiB). When the row pointer is 16-byte aligned and cols is a multiple of 4 (f32) or 8
// (f16), loads and stores are 16-byte vectors.
#include "common.cuh"

namespace {

using kiln::to_f32;
using kiln::from_f32;

// 16 bytes of T.
template <typename T> struct Vec;
template <> struct Vec<float> {
    static constexpr int N = 4;
    using Raw = float4;
};
template <> struct Vec<__half> {
    static constexpr int N = 8;
    using Raw = uint4;
};

// A 16-byte vector and its elements (a union: the one type-punning form that is defined for host
// compilers too, which the CPU emulator in tests/kernels/emu relies on).
template <typename T> union Pack {
    typename Vec<T>::Raw raw;
    T e[Vec<T>::N];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::N]) {
    Pack<T> pk;
    pk.raw = *reinterpret_cast<const typename Vec<T>::Raw*>(p);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_f32(pk.e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[Vec<T>::N]) {
    Pack<T> pk;
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) pk.e[i] = from_f32<T>(v[i]);
    *reinterpret_cast<typename Vec<T>::Raw*>(p) = pk.raw;
}

template <typename T, bool RMS>
__device__ void norm_row(const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
                         T* __restrict__ y, int cols, float eps) {
    __shared__ float scratch[32];
    constexpr int N = Vec<T>::N;
    const bool vec = (cols % N == 0) && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 == 0);
    const int nvec = cols / N;

    // Pass 1: mean (LayerNorm) or mean of squares (RMSNorm).
    float acc = 0.f;
    if (vec) {
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            float v[N];
            load_vec(x + (size_t)i * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) acc += RMS ? v[k] * v[k] : v[k];
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            const float v = to_f32(x[i]);
            acc += RMS ? v * v : v;
        }
    }
    const float first = kiln::block_sum(acc, scratch) / (float)cols;

    float mean = 0.f, inv;
    if (RMS) {
        inv = 1.f / sqrtf(first + eps);
    } else {
        // Pass 2: centered sum of squares.
        mean = first;
        float sq = 0.f;
        if (vec) {
            for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
                float v[N];
                load_vec(x + (size_t)i * N, v);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float d = v[k] - mean;
                    sq += d * d;
                }
            }
        } else {
            for (int i = threadIdx.x; i < cols; i += blockDim.x) {
                const float d = to_f32(x[i]) - mean;
                sq += d * d;
            }
        }
        inv = 1.f / sqrtf(kiln::block_sum(sq, scratch) / (float)cols + eps);
    }

    // Pass 3: normalize, scale, shift.
    if (vec) {
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            float v[N];
            load_vec(x + (size_t)i * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const int c = i * N + k;
                float r = (v[k] - mean) * inv;
                if (gamma) r *= gamma[c];
                if (beta) r += beta[c];
                v[k] = r;
            }
            store_vec(y + (size_t)i * N, v);
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            float r = (to_f32(x[i]) - mean) * inv;
            if (gamma) r *= gamma[i];
            if (beta) r += beta[i];
            y[i] = from_f32<T>(r);
        }
    }
}

template <typename T, bool RMS>
__device__ __forceinline__ void norm_rows(const T* x, const float* gamma, const float* beta, T* y, int cols,
                                          float eps) {
    const size_t row = blockIdx.x;
    norm_row<T, RMS>(x + row * cols, gamma, beta, y + row * cols, cols, eps);
}

}  // namespace

extern "C" {

__global__ void kiln_layer_norm_f32(const float* x, const float* gamma, const float* beta, float* y, int cols,
                                    float eps) {
    norm_rows<float, false>(x, gamma, beta, y, cols, eps);
}

__global__ void kiln_layer_norm_f16(const __half* x, const float* gamma, const float* beta, __half* y, int cols,
                                    float eps) {
    norm_rows<__half, false>(x, gamma, beta, y, cols, eps);
}

// RMSNorm takes the same arguments; beta must be null (ONNX RMSNormalization has no bias).
__global__ void kiln_rms_norm_f32(const float* x, const float* gamma, const float* beta, float* y, int cols,
                                  float eps) {
    norm_rows<float, true>(x, gamma, beta, y, cols, eps);
}

__global__ void kiln_rms_norm_f16(const __half* x, const float* gamma, const float* beta, __half* y, int cols,
                                  float eps) {
    norm_rows<__half, true>(x, gamma, beta, y, cols, eps);
}

}  // extern "C"
