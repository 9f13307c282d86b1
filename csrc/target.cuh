// The target law of one row (sjd_kernels/reference/target.py) for a whole thread block, shared by
// every kernel that needs a target row: CFG in float32, the float32 reciprocal of the temperature,
// top-k threshold by a 7-pivot search over order-preserving keys, softmax, top-p threshold by the
// same search over probability bits, or the greedy one-hot.
#pragma once

#include <cstdint>

#include "sampling.cuh"

namespace sjd {

struct TargetLaw {
  int greedy;             // T == 0
  float inv_temperature;  // float32(1) / float32(T): what PyTorch does for tensor / T on CUDA
  int top_k;              // 0 = off
  int use_top_p;
  float top_p;
};

// Shared-memory reduction buffers (2 * kMaxWarps * width elements each) and their ping-pong
// parities, owned by the calling kernel (it may keep reducing with the same buffers afterwards).
struct TargetRed {
  uint64_t* u64;  // width 1
  int& par_u64;
  float* f;       // width 1
  int& par_f;
  int* i;         // width 1
  int& par_i;
  int* i7;        // width kPivots
  int& par_i7;
  float* f7;      // width kPivots
  int& par_f7;
};

// Whether the reference's target row is NaN from the flags of one pass over the combined logits:
// flags bit 1 NaN, 2 +inf, 4 some logit > -inf, 8 NaN after 1/T; ``ymax`` the max of x / T (sampling).
__device__ __forceinline__ bool target_row_bad(int flags, float ymax, bool greedy) {
  const bool bad = (flags & 3) != 0 || (flags & 4) == 0;
  // +inf or all -inf after scaling makes the reference's softmax NaN, i.e. a bad row.
  return bad || (!greedy && ((flags & 8) != 0 || !isfinite(ymax)));
}

// The flags of target_row_bad for one combined logit x (ymax is tracked by the caller).
__device__ __forceinline__ int target_logit_flags(float x, float y, bool greedy) {
  int flags = 0;
  if (x != x) flags |= 1;
  if (x == INFINITY) flags |= 2;
  if (x > -INFINITY) flags |= 4;
  if (!greedy && y != y) flags |= 8;
  return flags;
}

// Writes the target law P of one row to S[0..V) (shared or global memory of the block) and returns
// whether the row is bad (then S is all zeros, as after the reference's nan_to_num). ``crow`` /
// ``urow`` are the conditional / unconditional logits rows (urow null: no CFG). The caller
// synchronises (__syncthreads) before reading S with another thread mapping.
template <typename T>
__device__ __forceinline__ bool target_row(const T* crow, const T* urow, float cfg, int V, const TargetLaw& p,
                                           float* S, TargetRed& red) {
  const int tid = threadIdx.x, nth = blockDim.x;
  // ---- 1. combined logits (CFG in float32), temperature, non-finite detection
  int flags = 0;
  float ymax = -INFINITY;
  uint64_t amax = 0;
  const bool greedy = p.greedy != 0;
  for_each_logit<T>(crow, urow, V, [&](int i, float c, float u) {
    const float x = urow ? __fadd_rn(u, __fmul_rn(cfg, __fsub_rn(c, u))) : c;
    if (greedy) {
      flags |= target_logit_flags(x, 0.0f, true);
      const uint64_t k = (static_cast<uint64_t>(order_key(x)) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(i));
      amax = k > amax ? k : amax;
    } else {
      const float y = __fmul_rn(x, p.inv_temperature);
      flags |= target_logit_flags(x, y, false);
      ymax = fmaxf(ymax, y);
      S[i] = y;
    }
  });
  flags = block_allreduce1(flags, OpOrI(), red.i, red.par_i);
  if (greedy) {
    amax = block_allreduce1(amax, OpMaxU64(), red.u64, red.par_u64);
  } else {
    ymax = block_allreduce1(ymax, OpMaxF(), red.f, red.par_f);
  }
  const bool bad = target_row_bad(flags, ymax, greedy);

  // ---- 2. target law P in S
  if (bad) {
    for (int i = tid; i < V; i += nth) S[i] = 0.0f;
  } else if (greedy) {
    const int am = static_cast<int>(~static_cast<uint32_t>(amax));
    for (int i = tid; i < V; i += nth) S[i] = i == am ? 1.0f : 0.0f;
  } else {
    if (p.top_k > 0 && p.top_k < V) {
      // k-th largest value: the largest key K with #{key >= K} >= k (ties at the boundary kept).
      const uint32_t kth = search_last_true(0u, order_key(ymax), [&](const uint32_t* piv, bool* ok) {
        int cnt[kPivots] = {};
        for (int i = tid; i < V; i += nth) {
          const uint32_t key = order_key(S[i]);
#pragma unroll
          for (int m = 0; m < kPivots; ++m) cnt[m] += key >= piv[m] ? 1 : 0;
        }
        block_allreduce<kPivots>(cnt, OpSumI(), red.i7, red.par_i7);
#pragma unroll
        for (int m = 0; m < kPivots; ++m) ok[m] = cnt[m] >= p.top_k;
      });
      const float thr = key_to_float(kth);
      for (int i = tid; i < V; i += nth)
        if (!(S[i] >= thr)) S[i] = -INFINITY;
    }
    float sum = 0.0f;
    for (int i = tid; i < V; i += nth) {
      const float e = expf(__fsub_rn(S[i], ymax));
      S[i] = e;
      sum = __fadd_rn(sum, e);
    }
    sum = block_allreduce1(sum, OpSumF(), red.f, red.par_f);
    for (int i = tid; i < V; i += nth) S[i] = __fdiv_rn(S[i], sum);
    if (p.use_top_p) {
      // Threshold t*: the largest probability with mass{P >= t*} >= top_p (ties kept), searched
      // over the bits of non-negative floats, which order like their values (a float sum of a
      // subset only shrinks as t grows, so the predicate is monotone). When rounding leaves the
      // total below top_p every lane is kept (the reference's clamp to the last index).
      float tot = 0.0f;
      for (int i = tid; i < V; i += nth) tot = __fadd_rn(tot, S[i]);
      tot = block_allreduce1(tot, OpSumF(), red.f, red.par_f);
      uint32_t lo = 0u;
      if (tot >= p.top_p) {
        // the largest P is 1 / sum (its e is exp(0) = 1)
        lo = search_last_true(0u, __float_as_uint(__fdiv_rn(1.0f, sum)), [&](const uint32_t* piv, bool* ok) {
          float acc[kPivots] = {};
          for (int i = tid; i < V; i += nth) {
            const float v = S[i];
#pragma unroll
            for (int m = 0; m < kPivots; ++m) acc[m] = __fadd_rn(acc[m], v >= __uint_as_float(piv[m]) ? v : 0.0f);
          }
          block_allreduce<kPivots>(acc, OpSumF(), red.f7, red.par_f7);
#pragma unroll
          for (int m = 0; m < kPivots; ++m) ok[m] = acc[m] >= p.top_p;
        });
      }
      const float thr = __uint_as_float(lo);
      float s2 = 0.0f;
      for (int i = tid; i < V; i += nth) {
        const float v = S[i] >= thr ? S[i] : 0.0f;
        S[i] = v;
        s2 = __fadd_rn(s2, v);
      }
      s2 = block_allreduce1(s2, OpSumF(), red.f, red.par_f);
      for (int i = tid; i < V; i += nth) S[i] = __fdiv_rn(S[i], s2);
    }
  }
  return bad;
}

}  // namespace sjd
