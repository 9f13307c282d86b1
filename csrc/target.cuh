// The target law of one row (sjd_kernels/reference/target.py) for a whole thread block, shared by
// every kernel that needs a target row: CFG in float32, the float32 reciprocal of the temperature,
// top-k threshold (a 7-pivot search over order-preserving keys, or the bracket selection below),
// softmax, top-p threshold by the 7-pivot search over probability bits, or the greedy one-hot.
#pragma once

#include <cstdint>

#include "pivot_count.cuh"
#include "sampling.cuh"

namespace sjd {

// How the top-k threshold is found (the same key either way: the k-th largest is unique).
enum TopkSelect : int {
  kTopkPivots = 0,   // search_last_true over the 32-bit key range: about 11 passes over the row
  kTopkBracket = 1,  // value-spaced pivots, then an exact rank among <= kCandMax candidates
};

struct TargetLaw {
  int greedy;             // T == 0
  float inv_temperature;  // float32(1) / float32(T): what PyTorch does for tensor / T on CUDA
  int top_k;              // 0 = off
  int use_top_p;
  float top_p;
  int topk_select = kTopkPivots;
};

// Candidates the bracket selection ranks exactly (shared memory: kCandMax keys and 2 words).
constexpr int kCandMax = 128;

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
  uint32_t* cand;  // kCandMax keys (bracket selection)
  uint32_t* cand_n;  // 2 words: candidate count, selected key
};

struct OpMaxU32 {
  using T = uint32_t;
  __device__ __forceinline__ static T identity() { return 0u; }
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// cnt[m] = #{i < V : order_key(S[i]) >= piv[m]} for non-decreasing piv (both searches below make
// them so), the same in every thread of the block. Each lane finds its bucket among the pivots
// and bumps a packed byte counter (pivot_count.cuh), flushed every kBucketFlush lanes of a thread.
__device__ __forceinline__ void count_keys_at_least(const float* S, int V, const uint32_t* piv, int (&cnt)[kPivots],
                                                    TargetRed& red) {
  static_assert(kPivots == kBucketPivots, "pivot_count.cuh counts 7 pivots");
#pragma unroll
  for (int m = 0; m < kPivots; ++m) cnt[m] = 0;
  const int nth = blockDim.x;
  for (int i0 = threadIdx.x; i0 < V; i0 += kBucketFlush * nth) {
    const int end = static_cast<int>(min(static_cast<int64_t>(V), static_cast<int64_t>(i0) + kBucketFlush * nth));
    uint32_t lo = 0u, hi = 0u;
    for (int i = i0; i < end; i += nth) bucket_count(order_key(S[i]), piv, lo, hi);
    bucket_flush(lo, hi, cnt);
  }
  block_allreduce<kPivots>(cnt, OpSumI(), red.i7, red.par_i7);
}

// Key of the k-th largest of the V floats S[0..V) (no NaN; 1 <= k <= V), the same for every
// thread: the largest key K with #{key >= K} >= k. ``ymin`` / ``ymax`` are the smallest value
// above -inf and the largest value of the row.
//
// The search keeps a bracket [lo, hi] of keys that holds the answer, with the counts
// cge = #{key >= lo} and cgt = #{key > hi}. Each round is one pass over the row counting 7 pivots,
// spaced evenly in value (not in key) between the bracket's ends: for a smooth row each round
// leaves about 1/8 of the candidates (the 32-bit key range needs about 11 such rounds; the
// candidates fall below kCandMax after about 3, sjd_kernels/bench/topk_model.py). A round that
// keeps more than half the candidates (ties, a far outlier) is followed by one pass that shrinks
// the bracket to the smallest and largest candidate, and if that stalls too, rounds space their
// pivots evenly in key, which cuts the key range 8-fold each round, so the loop always ends. The
// remaining cge - cgt <= kCandMax candidates are collected in shared memory and the one whose rank
// among them is k - cgt (ties included) is found by counting, G threads per candidate.
__device__ __forceinline__ uint32_t kth_key_bracket(const float* S, int V, int k, float ymin, float ymax,
                                                    TargetRed& red) {
  const int tid = threadIdx.x, nth = blockDim.x;
  uint32_t lo = 0u, hi = order_key(ymax);
  int cge = V, cgt = 0;
  const uint32_t kmin = order_key(ymin);
  int last = V;         // candidates before the previous round
  bool fresh = true;    // no round since the start or the last shrink pass
  bool shrunk = false;  // the shrink pass has run
  while (lo < hi && cge - cgt > kCandMax) {
    const int ncand = cge - cgt;
    const bool stalled = !fresh && 2 * static_cast<int64_t>(ncand) > last;
    if (stalled && !shrunk) {
      // smallest and largest key in [lo, hi] (max of key and of ~key), one pass. The reduction
      // takes kPivots values (2 used) so that it shares red.i7's ping-pong layout with the counting
      // rounds around it: with 2 values its second buffer would overlap the counting rounds'
      // first, which fast warps overwrote while slow ones still read the last round's counts.
      uint32_t mm[kPivots] = {};
      for (int i = tid; i < V; i += nth) {
        const uint32_t key = order_key(S[i]);
        if (key >= lo && key <= hi) {
          mm[0] = key > mm[0] ? key : mm[0];
          mm[1] = ~key > mm[1] ? ~key : mm[1];
        }
      }
      block_allreduce<kPivots>(mm, OpMaxU32(), reinterpret_cast<uint32_t*>(red.i7), red.par_i7);
      lo = ~mm[1];  // no key in [old lo, new lo) or (new hi, old hi]: cge and cgt stay
      hi = mm[0];
      shrunk = true;
      fresh = true;
      continue;
    }
    uint32_t piv[kPivots];
    bool by_key = stalled;
    if (!by_key) {
      const float a = lo < kmin ? ymin : key_to_float(lo);
      const float d = __fsub_rn(key_to_float(hi), a);
      if (isfinite(d) && d > 0.0f) {
#pragma unroll
        for (int m = 0; m < kPivots; ++m) {  // non-decreasing (rounding is monotone), then clamped into (lo, hi]
          uint32_t kk = order_key(__fadd_rn(a, __fmul_rn(d, 0.125f * static_cast<float>(m + 1))));
          kk = kk < lo + 1u ? lo + 1u : kk;
          piv[m] = kk > hi ? hi : kk;
        }
      } else {
        by_key = true;
      }
    }
    if (by_key) {
      const uint64_t span = static_cast<uint64_t>(hi) - lo;
#pragma unroll
      for (int m = 0; m < kPivots; ++m)
        piv[m] = lo + 1u + static_cast<uint32_t>(((span - 1) * static_cast<uint64_t>(m + 1)) / kPivots);
    }
    int cnt[kPivots];
    count_keys_at_least(S, V, piv, cnt, red);
    last = ncand;
    fresh = false;
#pragma unroll
    for (int m = kPivots - 1; m >= 0; --m) {
      if (cnt[m] >= k) {
        lo = piv[m];
        cge = cnt[m];
        break;
      }
      hi = piv[m] - 1u;
      cgt = cnt[m];
    }
  }
  if (lo >= hi) return lo;

  // ---- exact rank among the candidates (keys in [lo, hi], at most kCandMax of them)
  const int r = k - cgt;  // 1 <= r <= number of candidates
  if (tid == 0) red.cand_n[0] = 0u;
  __syncthreads();
  for (int i = tid; i < V; i += nth) {
    const uint32_t key = order_key(S[i]);
    if (key >= lo && key <= hi) {
      const uint32_t at = atomicAdd(red.cand_n, 1u);
      if (at < static_cast<uint32_t>(kCandMax)) red.cand[at] = key;
    }
  }
  __syncthreads();
  const int nc = min(static_cast<int>(red.cand_n[0]), kCandMax);
  int G = 1;  // threads per candidate: a power of two <= 8 (it divides a warp)
  while (G < 8 && 2 * G * kCandMax <= nth) G *= 2;
  const int c = tid / G, part = tid % G;
  const uint32_t kc = c < nc ? red.cand[c] : 0u;
  int gt = 0, ge = 0;
  if (c < nc) {
    for (int i = part; i < nc; i += G) {
      const uint32_t o = red.cand[i];
      gt += o > kc ? 1 : 0;
      ge += o >= kc ? 1 : 0;
    }
  }
  for (int o = 1; o < G; o <<= 1) {
    gt += __shfl_xor_sync(0xffffffffu, gt, o);
    ge += __shfl_xor_sync(0xffffffffu, ge, o);
  }
  // the candidates ranked r-th (several when tied: they hold the same key) write it
  if (c < nc && part == 0 && gt < r && r <= ge) red.cand_n[1] = kc;
  __syncthreads();
  return red.cand_n[1];
}

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
  float ymax = -INFINITY, ymin = INFINITY;  // ymin: smallest y above -inf (bracket selection only)
  uint64_t amax = 0;
  const bool greedy = p.greedy != 0;
  const bool bracket = p.topk_select == kTopkBracket && p.top_k > 0 && p.top_k < V;
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
      if (bracket && y > -INFINITY) ymin = fminf(ymin, y);
      S[i] = y;
    }
  });
  flags = block_allreduce1(flags, OpOrI(), red.i, red.par_i);
  if (greedy) {
    amax = block_allreduce1(amax, OpMaxU64(), red.u64, red.par_u64);
  } else if (bracket) {
    // kPivots values (2 used): red.f7 takes kPivots-wide reductions only (the top-p search's)
    float mm[kPivots] = {ymax, -ymin, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    block_allreduce<kPivots>(mm, OpMaxF(), red.f7, red.par_f7);
    ymax = mm[0];
    ymin = -mm[1];
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
    // top-k: keep the values >= the k-th largest (ties kept); the others get e = 0, as exp(-inf)
    float thr = -INFINITY;
    if (bracket) {
      thr = key_to_float(kth_key_bracket(S, V, p.top_k, ymin, ymax, red));
    } else if (p.top_k > 0 && p.top_k < V) {
      // k-th largest value: the largest key K with #{key >= K} >= k (ties at the boundary kept).
      const uint32_t kth = search_last_true(0u, order_key(ymax), [&](const uint32_t* piv, bool* ok) {
        int cnt[kPivots];
        count_keys_at_least(S, V, piv, cnt, red);
#pragma unroll
        for (int m = 0; m < kPivots; ++m) ok[m] = cnt[m] >= p.top_k;
      });
      thr = key_to_float(kth);
    }
    float sum = 0.0f;
    for (int i = tid; i < V; i += nth) {
      const float y = S[i];
      const float e = y >= thr ? expf(__fsub_rn(y, ymax)) : 0.0f;
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
