// Paged attention for decode and mixed prefill/decode steps (vLLM's PagedAttention): a flat batch of
// T query tokens from many sequences attends to K/V stored in fixed-size blocks of a paged cache,
// each sequence through its own block table. f16 or f32, f32 accumulation, grouped K/V heads.
//
// Layouts (all contiguous, row-major):
//   q, out              [T, H, D]
//   k_cache, v_cache    [num_blocks, KV, block_size, D]   (one layer; block_size a power of two)
//   block_tables        int32, every sequence's table concatenated (block ids in token order)
//   table_start         int32 [T]: where the token's sequence's table starts in block_tables
//   context_lens        int32 [T]: keys the token attends to (its position in its sequence + 1, so
//                       causality is in the metadata: no mask); 0 gives a zero row
// Query head h reads K/V head h / (H / KV). Key j of a token's sequence lives in block
// block_tables[table_start + j / block_size], slot j % block_size.
//
//   out[t, h] = sum_{j < ctx[t]} softmax_j(scale * q[t, h] . k_j) * v_j
//
// kiln_paged_attention_*: grid = (T * H) (token-major: the heads of one token are neighbours, so
// the query heads of a K/V group read the same blocks close together in time and hit L2),
// blockDim.x = 128 (4 warps), at most 2 KiB static shared memory. One thread block per (token,
// head); the 4 warps split the context (warp w takes keys 8w..8w+7, then +32, ...) and each keeps
// its own online-softmax state, merged once at the end (a flash-decoding split inside the block):
//   1. Q: each lane holds D / 4 query values in registers, pre-scaled by scale * log2(e) (base-2
//      logits, exp2f).
//   2. Scores: 8 keys per warp step, a group of 4 lanes per key; lane r of a group reads the
//      16-byte vectors r, r + 4, ... of the key row (4 lanes read 64 contiguous bytes; the 8 rows
//      of a step are neighbouring slots), dots them with its query slice, and the group sums with
//      two xor shuffles. The block of each key comes from the table (one int load per group).
//   3. Online softmax: the step's max and sum over the 8 groups (3 xor shuffles each), the
//      running max m, sum l and accumulator rescaled by exp2(m_old - m_new).
//   4. P.V: lane owns output dims [lane * D/32, +D/32); for each key of the step p and the block
//      id are broadcast by shuffles and the lane reads its D/32 values of the V row (the warp reads
//      the whole row, coalesced). Keys past the context are never read, so stale or NaN slots in a
//      partly filled block cannot leak in.
//   5. Merge: the warps' (m, l, acc) go through shared memory; thread c < D combines dim c and
//      writes it (coalesced).
// Q and K rows are read in 16-byte vectors (D * sizeof(T) is a multiple of 16 for every head dim
// and the launcher checks the base alignment), V rows in D/32-element pieces per lane (one 8- or
// 16-byte access for D = 64, 128). The context length has no limit beyond int32: unlike vLLM's
// v1 kernel, no per-block buffer of all the logits (shared memory) exists.
//
// Faster, later (see docs/gpu.md): split-K over the context (vLLM's v2 partitions, a second small
// reduce kernel) when T * H blocks cannot fill the GPU (single-stream decode with long contexts);
// one thread block per (token, K/V head) serving all H / KV query heads of the group, so each K/V
// row is read once per group instead of once per query head; for long prefill chunks, query tiles
// of one sequence sharing K/V tiles in shared memory (as attention.cu does); tensor cores.
//
// kiln_reshape_and_cache_*: writes the step's new K and V [T, KV, D] into their cache slots,
// slot_mapping int32 [T] = block * block_size + offset (a negative slot skips the token, as vLLM's
// padding tokens). grid = (T), blockDim.x = 128; 16-byte vectors when D and every pointer allow.
#include "common.cuh"

// N contiguous elements read or written as one access, aligned as far as its size allows (16, 8
// or 4 bytes become one vector load/store). Outside the unnamed namespace: nvcc does not count a
// use in alignas as a reference and would warn about an unreferenced internal symbol.
namespace kiln {
template <int BYTES>
struct PackAlign {
    static constexpr int low = BYTES & -BYTES;   // largest power of two dividing BYTES
    static constexpr int value = low > 16 ? 16 : low;
};
template <typename T, int N>
struct alignas(PackAlign<int(sizeof(T)) * N>::value) Pack {
    T v[N];
};
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
    return *reinterpret_cast<const Pack<T, N>*>(p);
}
}  // namespace kiln

namespace {

using kiln::from_f32;
using kiln::load;
using kiln::Pack;
using kiln::to_f32;

constexpr int PA_WARPS = 4;
constexpr int PA_THREADS = 32 * PA_WARPS;
constexpr int GROUP = 4;              // lanes per key in the score step
constexpr int KEYS = 32 / GROUP;      // keys per warp step
constexpr float LOG2E = 1.4426950408889634f;

// acc += p_j * V[key k0 + j] for the first n keys of a warp step: lane jj * GROUP holds key jj's
// probability and block id; this lane reads and accumulates dims [lane * DL, +DL) of each V row.
template <typename T, int D, bool TAIL, int DL = D / 32>
__device__ __forceinline__ void pv_step(float (&acc)[DL], float p, int blk, int k0, int n, const T* vbase,
                                        long long block_stride, int slot_mask, int lane) {
#pragma unroll(TAIL ? 1 : KEYS)
    for (int jj = 0; jj < KEYS; ++jj) {
        const float pj = __shfl_sync(KILN_FULL_MASK, p, jj * GROUP);
        const int bj = __shfl_sync(KILN_FULL_MASK, blk, jj * GROUP);
        const int kj = k0 + jj;
        if (!TAIL || jj < n) {
            const Pack<T, DL> v = load<T, DL>(vbase + bj * block_stride + (long long)(kj & slot_mask) * D + lane * DL);
#pragma unroll
            for (int i = 0; i < DL; ++i) acc[i] = fmaf(pj, to_f32(v.v[i]), acc[i]);
        }
    }
}

template <typename T, int D>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ k_cache,
                                const T* __restrict__ v_cache, T* __restrict__ out,
                                const int* __restrict__ block_tables, const int* __restrict__ table_start,
                                const int* __restrict__ context_lens, int H, int KV, int log2_bs, float scale) {
    constexpr int VEC = 16 / int(sizeof(T));   // elements per 16-byte vector
    constexpr int NV = D / VEC;                // vectors per row
    static_assert(D % 32 == 0 && NV % GROUP == 0, "head dim must be a multiple of 32");
    constexpr int VPL = NV / GROUP;            // vectors per lane in the score step
    constexpr int QL = VPL * VEC;              // query values per lane
    constexpr int DL = D / 32;                 // output dims per lane
    __shared__ float red_m[PA_WARPS], red_l[PA_WARPS];
    __shared__ __align__(16) float red_o[PA_WARPS][D];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int grp = lane / GROUP, r = lane % GROUP;
    const long long row = blockIdx.x;          // token * H + head
    const int token = int(row / H), h = int(row % H);
    const int kvh = h / (H / KV);
    const int ctx = context_lens[token];
    const int* table = block_tables + table_start[token];
    const int slot_mask = (1 << log2_bs) - 1;
    const long long head_stride = (long long)D << log2_bs;   // one head's tile in a block
    const long long block_stride = head_stride * KV;
    const T* kbase = k_cache + kvh * head_stride;
    const T* vbase = v_cache + kvh * head_stride;

    // 1. This lane's query slice, as base-2 logits.
    const float qscale = scale * LOG2E;
    float qr[QL];
    const T* qrow = q + row * D;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
        const Pack<T, VEC> p = load<T, VEC>(qrow + (r + i * GROUP) * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) qr[i * VEC + e] = to_f32(p.v[e]) * qscale;
    }

    float m = -INFINITY, l = 0.f, acc[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) acc[i] = 0.f;

    for (int k0 = warp * KEYS; k0 < ctx; k0 += PA_WARPS * KEYS) {
        // 2. Score of key k0 + grp (the group's 4 lanes each dot a quarter of the row).
        const int key = k0 + grp;
        const bool valid = key < ctx;
        int blk = 0;
        float s = 0.f;
        if (valid) {
            blk = table[key >> log2_bs];
            const T* krow = kbase + blk * block_stride + (long long)(key & slot_mask) * D;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                const Pack<T, VEC> p = load<T, VEC>(krow + (r + i * GROUP) * VEC);
#pragma unroll
                for (int e = 0; e < VEC; ++e) s = fmaf(qr[i * VEC + e], to_f32(p.v[e]), s);
            }
        }
#pragma unroll
        for (int o = GROUP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(KILN_FULL_MASK, s, o);
        if (!valid) s = -INFINITY;

        // 3. Online softmax over the step's keys (key k0 is always valid, so mnew is finite).
        float mx = s;
#pragma unroll
        for (int o = 16; o >= GROUP; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(KILN_FULL_MASK, mx, o));
        const float mnew = fmaxf(m, mx);
        const float p = valid ? exp2f(s - mnew) : 0.f;
        float ps = p;
#pragma unroll
        for (int o = 16; o >= GROUP; o >>= 1) ps += __shfl_xor_sync(KILN_FULL_MASK, ps, o);
        const float corr = exp2f(m - mnew);   // 0 on the first step (m = -inf)
        l = l * corr + ps;
        m = mnew;
#pragma unroll
        for (int i = 0; i < DL; ++i) acc[i] *= corr;

        // 4. P.V over the step's keys: full steps unrolled, the last partial one (same bound for
        //    the whole warp) as a loop.
        if (ctx - k0 >= KEYS) {
            pv_step<T, D, false>(acc, p, blk, k0, KEYS, vbase, block_stride, slot_mask, lane);
        } else {
            pv_step<T, D, true>(acc, p, blk, k0, ctx - k0, vbase, block_stride, slot_mask, lane);
        }
    }

    // 5. Merge the warps' states.
    if (lane == 0) {
        red_m[warp] = m;
        red_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DL; ++i) red_o[warp][lane * DL + i] = acc[i];
    __syncthreads();
    if (tid < D) {
        float mm = -INFINITY;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) mm = fmaxf(mm, red_m[w]);
        float sum = 0.f, o = 0.f;
        if (mm != -INFINITY) {
#pragma unroll
            for (int w = 0; w < PA_WARPS; ++w) {
                const float c = exp2f(red_m[w] - mm);   // 0 for a warp that saw no key
                sum = fmaf(red_l[w], c, sum);
                o = fmaf(red_o[w][tid], c, o);
            }
        }
        out[row * D + tid] = from_f32<T>(sum > 0.f ? o / sum : 0.f);
    }
}

template <typename T>
__device__ void reshape_and_cache(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                                  T* __restrict__ v_cache, const int* __restrict__ slot_mapping, int KV, int D,
                                  int log2_bs) {
    constexpr int VEC = 16 / int(sizeof(T));
    const int t = blockIdx.x;
    const int slot = slot_mapping[t];
    if (slot < 0) return;
    const long long blk = slot >> log2_bs;
    const int off = slot & ((1 << log2_bs) - 1);
    const int n = KV * D;
    const T* ks = k + (long long)t * n;
    const T* vs = v + (long long)t * n;
    // Element (head, c) goes to ((blk * KV + head) * block_size + off) * D + c.
    T* kd = k_cache + ((blk * KV) << log2_bs) * D + (long long)off * D;
    T* vd = v_cache + ((blk * KV) << log2_bs) * D + (long long)off * D;
    const long long head_stride = (long long)D << log2_bs;
    const unsigned long long align = reinterpret_cast<unsigned long long>(ks) |
                                     reinterpret_cast<unsigned long long>(vs) |
                                     reinterpret_cast<unsigned long long>(kd) |
                                     reinterpret_cast<unsigned long long>(vd);
    if (D % VEC == 0 && (align & 15) == 0) {
        for (int e = threadIdx.x * VEC; e < n; e += blockDim.x * VEC) {
            const int hd = e / D, c = e % D;
            *reinterpret_cast<Pack<T, VEC>*>(kd + hd * head_stride + c) = load<T, VEC>(ks + e);
            *reinterpret_cast<Pack<T, VEC>*>(vd + hd * head_stride + c) = load<T, VEC>(vs + e);
        }
    } else {
        for (int e = threadIdx.x; e < n; e += blockDim.x) {
            const int hd = e / D, c = e % D;
            kd[hd * head_stride + c] = ks[e];
            vd[hd * head_stride + c] = vs[e];
        }
    }
}

}  // namespace

// Arguments: q, k_cache, v_cache, out, block_tables, table_start, context_lens (int32), H, KV,
// log2(block_size) (i32), scale (f32). One entry point per dtype and head dim (32, 64, 96, 128).
#define KILN_PAGED_ATTENTION(SUFFIX, T, D)                                                                 \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) kiln_paged_attention_##SUFFIX##_d##D(           \
        const T* q, const T* k_cache, const T* v_cache, T* out, const int* block_tables,                   \
        const int* table_start, const int* context_lens, int H, int KV, int log2_bs, float scale) {         \
        paged_attention<T, D>(q, k_cache, v_cache, out, block_tables, table_start, context_lens, H, KV,    \
                              log2_bs, scale);                                                             \
    }

KILN_PAGED_ATTENTION(f32, float, 32)
KILN_PAGED_ATTENTION(f32, float, 64)
KILN_PAGED_ATTENTION(f32, float, 96)
KILN_PAGED_ATTENTION(f32, float, 128)
KILN_PAGED_ATTENTION(f16, __half, 32)
KILN_PAGED_ATTENTION(f16, __half, 64)
KILN_PAGED_ATTENTION(f16, __half, 96)
KILN_PAGED_ATTENTION(f16, __half, 128)

// Arguments: k, v (new, [T, KV, D]), k_cache, v_cache, slot_mapping (int32 [T]), KV, D,
// log2(block_size) (i32).
#define KILN_RESHAPE_AND_CACHE(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) kiln_reshape_and_cache_##SUFFIX(                     \
        const T* k, const T* v, T* k_cache, T* v_cache, const int* slot_mapping, int KV, int D,            \
        int log2_bs) {                                                                                     \
        reshape_and_cache<T>(k, v, k_cache, v_cache, slot_mapping, KV, D, log2_bs);                        \
    }

KILN_RESHAPE_AND_CACHE(f32, float)
KILN_RESHAPE_AND_CACHE(f16, __half)
