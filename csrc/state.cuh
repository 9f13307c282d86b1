// Codes of the Jacobi state and the device status shared by every op's kernels: the constants of
// sjd_kernels/reference/jacobi_step.py (kinds, error bits, status counters, sparse padding) and the
// lookup of a forced token. Device code only, no PyTorch.
#pragma once

#include <cstdint>

namespace sjd {

// q_kind of a slot: the law its draft was drawn from (| kFlagPrev when p_prev holds a row).
constexpr int kKindDense = 0, kKindUniform = 1, kKindOnehot = 2, kKindMask = 3, kFlagPrev = 4;
// status[0] error bits.
constexpr int kErrNonfinite = 1, kErrDraftRange = 2, kErrTreeIndex = 4, kErrPrepare = 32;
// status slots: error bits, zero-mass residuals, zero-mass coupling redraws, sparse-state overflows.
constexpr int kStatusErr = 0, kStatusZeroResid = 1, kStatusZeroCouple = 2, kStatusOverflow = 3;
// Id of an unused sparse entry (sorts after every lane).
constexpr int32_t kIdxPad = 0x7fffffff;

// forced[b, position] of a [B, len] table, -1 outside it or without one.
__device__ __forceinline__ int64_t forced_token(const int64_t* forced, int64_t len, int64_t b, int64_t position) {
  if (forced == nullptr || position < 0 || position >= len) return -1;
  return forced[b * len + position];
}

}  // namespace sjd
