// Stand-in for cuda_bf16.h under the CPU simulator (sjd_sim.h): the bfloat16 type as storage, its
// exact conversion to float and the round-to-nearest-even conversion from float, which is all the
// kernels use.
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

// float -> bfloat16, round to nearest even; NaN stays NaN (quiet).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}
