// cuda_bf16.h (cudasim): __nv_bfloat16 and its conversions, see ../cudasim_half.h.
#pragma once
#include "../cudasim_half.h"
