// cuda_fp16.h (cudasim): __half and its conversions, see ../cudasim_half.h.
#pragma once
#include "../cudasim_half.h"
