#pragma once
#include <functional>

#include "cuda_emu.h"

// Runs `kernel` once per thread of every block of `grid`, one block at a time (each thread a fiber
// on the calling OS thread; see emu.cpp).
void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel);
