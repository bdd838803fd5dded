// Fused multi-head scaled-dot-product attention (ONNX Attention, 4-D form), flash style: the
// [S, T] score matrix never exists in memory. Q [B, Hq, S, d], K and V [B, Hk, T, d] (Hq a
// multiple of Hk: grouped-query heads share K/V head h / (Hq / Hk)), out [B, Hq, S, d]; all
// contiguous, f16 or f32, f32 accumulation; d <= 128.
//
//   out[b, h, s] = sum_j softmax_j(scale * q.k_j + mask[b, h, s, j] + causal) * v_j
//
// - mask: optional f32 additive bias addressed by element strides (mask_sb, mask_sh, mask_ss,
//   mask_sj), so a key-padding mask [B, 1, 1, T] is read in place with zero strides.
// - kv_len: optional int32 [B], keys j >= kv_len[b] are padding (ONNX nonpad_kv_seqlen); it also
//   moves the causal frontier to kv_len[b] - S, as the ONNX reference does.
// - causal: key j is visible to query s when j <= s + causal_offset (causal_offset is 0 for plain
//   self-attention; ignored when kv_len is given).
// - A query row with no visible key gives zeros (the CPU kernel's rule), never NaN.
//
// Launch: grid = (ceil(S / 16), Hq, B), blockDim.x = 128 (4 warps), static shared memory about
// 41 KiB for d <= 128 (no opt-in needed). Each block owns 16 query rows of one head (4 per warp)
// and walks the keys in tiles of 32:
//   1. the block loads the K and V tile (32 x d, a contiguous chunk, coalesced) into shared
//      memory as f32; K rows are padded to D + 4 floats so that the 16-byte row reads of a
//      quarter-warp hit distinct banks;
//   2. lane j of each warp computes the scores of key j for its warp's 4 query rows (Q was
//      pre-scaled by scale * log2(e) when it was staged, and is read as broadcast float4s);
//   3. online softmax in base 2: the warp's running max and sum per row are updated with two
//      shuffle reductions, the accumulator is rescaled by exp2(m_old - m_new);
//   4. P.V: each lane owns output dims lane, lane + 32, ...; p_j is broadcast with a shuffle and
//      V is read conflict-free (consecutive lanes, consecutive words).
// Tiles past the causal frontier of the block's last row or past kv_len are skipped. This is a
// CUDA-core kernel (FFMA, no mma.sync/wgmma); the tensor-core variant is future work.
#include "common.cuh"

namespace {

using kiln::from_f32;
using kiln::to_f32;

constexpr int WARPS = 4;
constexpr int ROWS = 4;              // query rows per warp
constexpr int BM = WARPS * ROWS;     // query rows per block
constexpr int BN = 32;               // keys per tile (one per lane)
constexpr float LOG2E = 1.4426950408889634f;

template <typename T, int D>
__device__ void attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          T* __restrict__ out, const float* __restrict__ mask, long long mask_sb, long long mask_sh,
                          long long mask_ss, long long mask_sj, const int* __restrict__ kv_len, int hq, int hk,
                          int S, int Tk, int d, float scale, int causal, int causal_offset) {
    static_assert(D % 32 == 0 && D <= 128, "head dim tile must be 32, 64 or 128");
    constexpr int KP = D + 4;    // padded K row (floats)
    constexpr int DL = D / 32;   // output dims per lane
    __shared__ __align__(16) float qs[BM][D];
    __shared__ __align__(16) float ks[BN][KP];
    __shared__ __align__(16) float vs[BN][D];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BM;
    const int kvh = h / (hq / hk);
    const T* qh = q + ((size_t)b * hq + h) * (size_t)S * d;
    const T* kh = k + ((size_t)b * hk + kvh) * (size_t)Tk * d;
    const T* vh = v + ((size_t)b * hk + kvh) * (size_t)Tk * d;
    T* oh = out + ((size_t)b * hq + h) * (size_t)S * d;

    int kv_end = Tk, off = causal_offset;
    if (kv_len) {
        const int len = kv_len[b];
        kv_end = min(max(len, 0), Tk);
        off = len - S;
    }
    int kend = kv_end;
    if (causal) kend = min(kend, max(0, min(q0 + BM, S) - 1 + off + 1));

    // Stage Q (pre-scaled, base-2 logits), zero-padded to D columns and BM rows.
    const float qscale = scale * LOG2E;
    for (int e = tid; e < BM * D; e += blockDim.x) {
        const int r = e / D, c = e % D;
        qs[r][c] = (q0 + r < S && c < d) ? to_f32(qh[(size_t)(q0 + r) * d + c]) * qscale : 0.f;
    }

    float m[ROWS], l[ROWS], o[ROWS][DL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < DL; ++i) o[r][i] = 0.f;
    }
    const int row0 = q0 + warp * ROWS;

    for (int t0 = 0; t0 < kend; t0 += BN) {
        __syncthreads();  // the previous tile (and, the first time, Q staging) is done
        for (int e = tid; e < BN * D; e += blockDim.x) {
            const int j = e / D, c = e % D;
            const bool in = t0 + j < Tk && c < d;
            const size_t at = (size_t)(t0 + j) * d + c;
            ks[j][c] = in ? to_f32(kh[at]) : 0.f;
            vs[j][c] = in ? to_f32(vh[at]) : 0.f;
        }
        __syncthreads();

        // Scores of key t0 + lane for the warp's rows.
        float s[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
#pragma unroll 8
        for (int c = 0; c < D; c += 4) {
            const float4 kv = *reinterpret_cast<const float4*>(&ks[lane][c]);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float4 qv = *reinterpret_cast<const float4*>(&qs[warp * ROWS + r][c]);
                s[r] = fmaf(qv.x, kv.x, s[r]);
                s[r] = fmaf(qv.y, kv.y, s[r]);
                s[r] = fmaf(qv.z, kv.z, s[r]);
                s[r] = fmaf(qv.w, kv.w, s[r]);
            }
        }

        const int j = t0 + lane;
        float p[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = row0 + r;
            const bool ok = j < kv_end && row < S && (!causal || j <= row + off);
            float sc = -INFINITY;
            if (ok) {
                sc = s[r];
                if (mask) sc += mask[b * mask_sb + h * mask_sh + (long long)row * mask_ss + (long long)j * mask_sj] * LOG2E;
            }
            const float mnew = fmaxf(m[r], kiln::warp_max(sc));
            p[r] = (sc == -INFINITY) ? 0.f : exp2f(sc - mnew);
            const float corr = (m[r] == -INFINITY) ? 0.f : exp2f(m[r] - mnew);
            l[r] = l[r] * corr + kiln::warp_sum(p[r]);
            m[r] = mnew;
#pragma unroll
            for (int i = 0; i < DL; ++i) o[r][i] *= corr;
        }

        // P.V for the tile.
#pragma unroll 4
        for (int jj = 0; jj < BN; ++jj) {
            float vv[DL];
#pragma unroll
            for (int i = 0; i < DL; ++i) vv[i] = vs[jj][lane + 32 * i];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float pj = __shfl_sync(KILN_FULL_MASK, p[r], jj);
#pragma unroll
                for (int i = 0; i < DL; ++i) o[r][i] = fmaf(pj, vv[i], o[r][i]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
        if (row >= S) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            const int c = lane + 32 * i;
            if (c < d) oh[(size_t)row * d + c] = from_f32<T>(o[r][i] * inv);
        }
    }
}

}  // namespace

// Arguments: q, k, v, out, mask (f32 or null), mask_sb, mask_sh, mask_ss, mask_sj (i64 element
// strides), kv_len (i32 [B] or null), hq, hk, S, T, d (i32), scale (f32), causal (i32 0/1),
// causal_offset (i32). One entry point per dtype and head-dim tile (d <= 32, 64, 128).
#define KILN_ATTENTION(SUFFIX, T, D)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                        \
        kiln_attention_##SUFFIX##_d##D(const T* q, const T* k, const T* v, T* out, const float* mask,       \
                                       long long mask_sb, long long mask_sh, long long mask_ss,              \
                                       long long mask_sj, const int* kv_len, int hq, int hk, int S, int Tk,  \
                                       int d, float scale, int causal, int causal_offset) {                  \
        attention<T, D>(q, k, v, out, mask, mask_sb, mask_sh, mask_ss, mask_sj, kv_len, hq, hk, S, Tk, d,   \
                        scale, causal, causal_offset);                                                       \
    }

KILN_ATTENTION(f32, float, 32)
KILN_ATTENTION(f32, float, 64)
KILN_ATTENTION(f32, float, 128)
KILN_ATTENTION(f16, __half, 32)
KILN_ATTENTION(f16, __half, 64)
KILN_ATTENTION(f16, __half, 128)
