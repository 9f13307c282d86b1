// Stand-in for cuda_bf16.h under the CPU simulator (sjd_sim.h): the bfloat16 type as storage and
// its exact conversion to float, which is all the kernels use.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_fp16.h"

struct __nv_bfloat16 {
  uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
