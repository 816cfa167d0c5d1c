// cuda_runtime.h (cudasim): stands in for the CUDA runtime header when moonload's CUDA backend
// is built for the CPU emulator (make test-cuda-sim). Not the real header: see ../cudasim.h.
#pragma once
#include "../cudasim.h"
