// The emulator's globals and its launcher.
#include "emu.h"

#include <memory>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
thread_local EmuWarp* emu_warp;
thread_local int emu_lane;
thread_local std::barrier<>* emu_block;

void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    const int n = int(block.x * block.y * block.z);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bb(n);
                const int nw = (n + 31) / 32;
                std::vector<std::unique_ptr<std::barrier<>>> wb;
                std::vector<float> buf(32 * nw);
                std::vector<EmuWarp> warps;
                for (int w = 0; w < nw; ++w) wb.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
                for (int w = 0; w < nw; ++w) warps.push_back({wb[w].get(), buf.data() + 32 * w});
                std::vector<std::thread> ts;
                for (int t = 0; t < n; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = {unsigned(t) % block.x, (unsigned(t) / block.x) % block.y, unsigned(t) / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        emu_block = &bb;
                        emu_warp = &warps[t / 32];
                        emu_lane = t % 32;
                        kernel();
                        // A finished thread leaves the barriers, like a retired CUDA thread.
                        bb.arrive_and_drop();
                        emu_warp->bar->arrive_and_drop();
                    });
                for (auto& t : ts) t.join();
            }
}
