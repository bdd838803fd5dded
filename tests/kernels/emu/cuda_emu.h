// CPU emulation of the CUDA execution model, enough to run kernels/*.cu on the host: each block's
// threads are OS threads; __syncthreads is a block barrier; warp shuffles exchange through a
// per-warp buffer between two warp barriers; __shared__ variables are function statics, shared by
// the threads of the one block that runs at a time. Checks the kernels' index math, reductions
// and masking logic (not their speed, and not memory-model subtleties beyond barriers).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

struct EmuWarp {
    std::barrier<>* bar;
    float* buf;
};
extern thread_local EmuWarp* emu_warp;
extern thread_local int emu_lane;
extern thread_local std::barrier<>* emu_block;

inline void __syncthreads() { emu_block->arrive_and_wait(); }

inline float emu_exchange(float v, int src) {
    emu_warp->buf[emu_lane] = v;
    emu_warp->bar->arrive_and_wait();
    const float r = emu_warp->buf[src & 31];
    emu_warp->bar->arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_exchange(v, emu_lane ^ o); }
inline float __shfl_sync(unsigned, float v, int src) { return emu_exchange(v, src); }
