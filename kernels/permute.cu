// Permuted (or any strided) copy into a contiguous output: y[i] = x[offset(i)], where i runs over the
// output in row-major order and offset(i) = sum_k idx_k(i) * strides[k], idx_k the output coordinate
// along axis k (dims[k]) and strides[k] the input's stride (in units) of the axis that becomes output
// axis k. This is ONNX Transpose (and any permute + contiguous) without candle's copy kernel, which
// reads its dims and strides from a buffer uploaded for every call.
//
// Units are 2, 4 or 16 bytes: the launcher collapses axes that stay adjacent, drops unit axes, and
// when the innermost output axis is contiguous in the input with a 16-byte multiple of bytes (and
// every stride and the start are 16-byte aligned) moves 16-byte vectors; otherwise single elements.
// Indices are 32-bit (the launcher declines tensors of 2^31 units or more).
//
// Launch: 1-D grid-stride loop, blockDim.x = 256, gridDim.x = min(ceil(total / 256), 32768).
// Reads are coalesced along the innermost output axis when its input stride is 1 (the common
// attention-head transposes); writes are always coalesced.
#include <stdint.h>

// Output dims and input strides (units), outermost first; `rank` of them are used. Passed by value
// (48 bytes of kernel parameters), so a launch uploads nothing.
struct KilnPermuteParams {
    unsigned dims[6];
    unsigned strides[6];
};

namespace {

template <typename U>
__device__ __forceinline__ void permute(const U* __restrict__ x, U* __restrict__ y, unsigned total, int rank,
                                        const KilnPermuteParams& p) {
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        unsigned rem = i, off = 0;
        for (int k = rank - 1; k > 0; --k) {
            const unsigned d = p.dims[k];
            const unsigned q = rem / d;
            off += (rem - q * d) * p.strides[k];
            rem = q;
        }
        off += rem * p.strides[0];
        y[i] = x[off];
    }
}

}  // namespace

#define KILN_PERMUTE(NAME, U)                                                                              \
    extern "C" __global__ void kiln_permute_##NAME(const U* x, U* y, unsigned total, int rank, KilnPermuteParams p) { \
        permute<U>(x, y, total, rank, p);                                                                      \
    }

KILN_PERMUTE(b2, uint16_t)
KILN_PERMUTE(b4, uint32_t)
KILN_PERMUTE(b16, uint4)
