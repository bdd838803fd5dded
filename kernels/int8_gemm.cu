// Weight-only int8 GEMM (ai.kiln::MatMulInt8Weight):
//
//   out[m, n] = scale[n] * sum_k a[m, k] * w(k, n)
//
// a: [M, K] row-major f32 or f16; w: int8 codes, [K, N] row-major ("nn") or [N, K] row-major
// ("nt", the transB = 1 layout), exactly as the ONNX initializer stores them; scale: f32 [N], one
// per output channel (alpha already folded in); out: [M, N] in a's dtype. f32 accumulation.
//
// Dequantization is fused into the tile load: the int8 codes are widened to f32 as they are staged
// into shared memory, so the weight crosses DRAM at 1 byte per element and is never materialized
// in f32; the per-channel scale is a column factor, applied once per output in the epilogue
// (mathematically the same as scaling every code, K - 1 fewer multiplies per output).
//
// Launch: grid = (ceil(N / 64), ceil(M / 64)), blockDim.x = 256, static shared memory 8.4 KiB.
// Each block computes a 64 x 64 output tile, walking K in steps of 16: the 256 threads stage the
// A tile (64 x 16, read along K, coalesced; stored transposed so the inner loop reads rows) and
// the W tile (16 x 64; read along N for "nn", along K for "nt"; rows padded by one float so the
// transposed stores of "nt" do not serialize on one bank), then each thread accumulates a 4 x 4
// register tile at rows ty + 16 i and columns tx + 16 j (conflict-free, broadcast reads). CUDA-core
// FFMA; an mma.sync (tensor-core) variant and a split-K GEMV for M <= 8 are future work.
#include "common.cuh"

namespace {

using kiln::from_f32;
using kiln::to_f32;

constexpr int TM = 64, TN = 64, TK = 16, THREADS = 256;

template <typename T, bool TRANS>
__device__ void int8_gemm(const T* __restrict__ a, const signed char* __restrict__ w, const float* __restrict__ scale,
                          T* __restrict__ out, int M, int N, int K) {
    __shared__ float as[TK][TM + 4];
    __shared__ float bs[TK][TN + 1];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < K; k0 += TK) {
#pragma unroll
        for (int i = 0; i < TM * TK / THREADS; ++i) {
            const int e = tid + i * THREADS, r = e / TK, c = e % TK;
            const int gm = m0 + r, gk = k0 + c;
            as[c][r] = (gm < M && gk < K) ? to_f32(a[(size_t)gm * K + gk]) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < TK * TN / THREADS; ++i) {
            const int e = tid + i * THREADS;
            int r, c;
            if (TRANS) {
                c = e / TK;
                r = e % TK;
            } else {
                r = e / TN;
                c = e % TN;
            }
            const int gk = k0 + r, gn = n0 + c;
            float v = 0.f;
            if (gk < K && gn < N) v = (float)(TRANS ? w[(size_t)gn * K + gk] : w[(size_t)gk * N + gn]);
            bs[r][c] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int gn = n0 + tx + 16 * j;
        if (gn >= N) continue;
        const float sc = scale[gn];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int gm = m0 + ty + 16 * i;
            if (gm < M) out[(size_t)gm * N + gn] = from_f32<T>(acc[i][j] * sc);
        }
    }
}

}  // namespace

// Arguments: a, w (int8 codes), scale (f32 [N]), out, M, N, K (i32).
#define KILN_INT8_GEMM(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        kiln_int8_gemm_##SUFFIX##_nn(const T* a, const signed char* w, const float* scale, T* out, int M,    \
                                     int N, int K) {                                                         \
        int8_gemm<T, false>(a, w, scale, out, M, N, K);                                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        kiln_int8_gemm_##SUFFIX##_nt(const T* a, const signed char* w, const float* scale, T* out, int M,    \
                                     int N, int K) {                                                         \
        int8_gemm<T, true>(a, w, scale, out, M, N, K);                                                       \
    }

KILN_INT8_GEMM(f32, float)
KILN_INT8_GEMM(f16, __half)
