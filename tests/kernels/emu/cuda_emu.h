// CPU emulation of the CUDA execution model, enough to run kernels/*.cu on the host: each block's
// threads are fibers on one OS thread (emu.cpp), switched when one waits at a barrier;
// __syncthreads is a block barrier; a warp shuffle exchanges through a per-warp buffer behind a
// warp barrier; __shared__ variables are function statics, shared by the threads of the one block
// that runs at a time. Checks the kernels' index math, reductions and masking logic (not their
// speed, and not memory-model subtleties beyond barriers).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

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

extern dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// A barrier of the running block: the threads still running that must arrive before any goes on.
struct EmuBarrier {
    int expected = 0, arrived = 0;
    std::vector<int> waiters;
};
void emu_arrive_and_wait(EmuBarrier* b);

struct EmuWarp {
    EmuBarrier* bar;
    float* buf;             // two exchange buffers of 32 lanes
    unsigned char phase[32];  // which buffer each lane's next shuffle uses
};
extern EmuWarp* emu_warp;
extern int emu_lane;
extern EmuBarrier* emu_block;

inline void __syncthreads() { emu_arrive_and_wait(emu_block); }

// A shuffle writes this lane's value, waits for the warp, reads the source lane's. Consecutive
// shuffles alternate between two buffers, so one barrier per shuffle suffices: a lane writes a
// buffer again only after the next shuffle's barrier, which every lane reaches after its read.
inline float emu_exchange(float v, int src) {
    float* b = emu_warp->buf + 32 * (emu_warp->phase[emu_lane] ^= 1);
    b[emu_lane] = v;
    emu_arrive_and_wait(emu_warp->bar);
    return b[src & 31];
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_exchange(v, emu_lane ^ o); }
inline float __shfl_sync(unsigned, float v, int src) { return emu_exchange(v, src); }
// int shuffles travel bit for bit through the float exchange.
inline int __shfl_sync(unsigned m, int v, int src) {
    float f;
    std::memcpy(&f, &v, sizeof f);
    f = __shfl_sync(m, f, src);
    std::memcpy(&v, &f, sizeof v);
    return v;
}
inline int __shfl_xor_sync(unsigned m, int v, int o) { return __shfl_sync(m, v, emu_lane ^ o); }
