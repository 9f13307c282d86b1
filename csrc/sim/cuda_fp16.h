// Stand-in for cuda_fp16.h under the CPU simulator (sjd_sim.h): the half type as storage, its
// exact conversion to float and the round-to-nearest-even conversion from float, which is all the
// kernels use.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu;
  uint32_t man = h.x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float -> half, round to nearest even; overflow to infinity, gradual underflow, NaN stays NaN.
inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  uint32_t h;
  if (ax > 0x7f800000u) {
    h = 0x7e00u;                      // NaN
  } else if (ax >= 0x477ff000u) {     // >= 65520, the midpoint between 65504 and 2^16: infinity
    h = 0x7c00u;
  } else if (ax >= 0x38800000u) {     // >= 2^-14: a normal half
    uint32_t m = ax - 0x38000000u;    // exponent rebiased from 127 to 15
    m += 0xfffu + ((m >> 13) & 1u);
    h = m >> 13;
  } else {                            // a subnormal half (units of 2^-24) or zero
    const int e = static_cast<int>(ax >> 23);
    const int shift = 126 - e;
    if (e == 0 || shift > 24) {
      h = 0;
    } else {
      const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
      uint32_t q = mant >> shift;
      const uint32_t rem = mant & ((1u << shift) - 1u);
      const uint32_t mid = 1u << (shift - 1);
      if (rem > mid || (rem == mid && (q & 1u))) ++q;
      h = q;                          // 0x400 is the smallest normal: the encoding carries over
    }
  }
  return __half{static_cast<uint16_t>(sign | h)};
}
