// The emulator's globals and its launcher. Every CUDA thread of a block is a fiber (ucontext) with
// its own stack, all on the calling OS thread: a thread runs until it waits at a barrier
// (__syncthreads, or the two halves of a warp shuffle) or returns, then the next runnable thread
// of the block continues. Switching fibers costs far less than waking OS threads, which is what
// keeps kernels with many shuffles (paged attention) cheap to check on a small machine.
#include "emu.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
EmuWarp* emu_warp;
int emu_lane;
EmuBarrier* emu_block;

namespace {

constexpr size_t STACK = 256 * 1024;

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    EmuWarp* warp;
    int lane;
    bool done, waiting;
};

ucontext_t main_ctx;
std::vector<Fiber> fibers;
std::vector<std::unique_ptr<char[]>> stacks;   // kept (and reused) across launches
int current;
int alive;
const std::function<void()>* body;

void enter(int i) {
    current = i;
    threadIdx = fibers[i].tid;
    emu_warp = fibers[i].warp;
    emu_lane = fibers[i].lane;
}

// The current fiber blocked or finished: continue with the next runnable one (round robin), or
// return to the launcher when every fiber is done.
void switch_away() {
    const int n = int(fibers.size()), me = current;
    for (int k = 1; k <= n; ++k) {
        const int i = (me + k) % n;
        if (fibers[i].done || fibers[i].waiting) continue;
        if (i == me) return;   // released while looking (cannot happen, kept for safety)
        enter(i);
        swapcontext(&fibers[me].ctx, &fibers[i].ctx);
        return;
    }
    if (alive > 0) {
        std::fprintf(stderr, "emulator: deadlock, %d threads wait at a barrier no other thread reaches\n", alive);
        std::abort();
    }
    swapcontext(&fibers[me].ctx, &main_ctx);
}

void release(EmuBarrier* b) {
    b->arrived = 0;
    for (int w : b->waiters) fibers[w].waiting = false;
    b->waiters.clear();
}

void fiber_main(int i) {
    (*body)();
    // A finished thread leaves the barriers, like a retired CUDA thread.
    Fiber& f = fibers[i];
    for (EmuBarrier* b : {emu_block, f.warp->bar}) {
        --b->expected;
        if (b->arrived > 0 && b->arrived == b->expected) release(b);
    }
    f.done = true;
    --alive;
    switch_away();
}

}  // namespace

void emu_arrive_and_wait(EmuBarrier* b) {
    if (++b->arrived == b->expected) {
        release(b);   // the last thread to arrive goes on
        return;
    }
    const int me = current;
    fibers[me].waiting = true;
    b->waiters.push_back(me);
    switch_away();
    enter(me);
}

void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    body = &kernel;
    const int n = int(block.x * block.y * block.z);
    const int nw = (n + 31) / 32;
    while (int(stacks.size()) < n) stacks.emplace_back(new char[STACK]);   // not zeroed: pages stay lazy
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                EmuBarrier bb;
                bb.expected = n;
                std::vector<EmuBarrier> wb(nw);
                std::vector<float> buf(64 * nw);
                std::vector<EmuWarp> warps(nw);
                for (int w = 0; w < nw; ++w) {
                    wb[w].expected = std::min(32, n - 32 * w);
                    warps[w] = {&wb[w], buf.data() + 64 * w, {}};
                }
                emu_block = &bb;
                fibers.assign(n, Fiber{});
                for (int t = 0; t < n; ++t) {
                    Fiber& f = fibers[t];
                    f.tid = {unsigned(t) % block.x, (unsigned(t) / block.x) % block.y, unsigned(t) / (block.x * block.y)};
                    f.warp = &warps[t / 32];
                    f.lane = t % 32;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = stacks[t].get();
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, t);
                }
                alive = n;
                enter(0);
                swapcontext(&main_ctx, &fibers[0].ctx);
            }
}
