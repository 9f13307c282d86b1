// The target law of one row (sjd_kernels/reference/target.py) for a whole thread block, shared by
// every kernel that needs a target row: CFG in float32, the float32 reciprocal of the temperature,
// top-k threshold (a 7-pivot search over order-preserving keys, or the bracket selection below),
// softmax, top-p threshold by the 7-pivot search over probability bits, or the greedy one-hot.
#pragma once

#include <cstdint>
#include <type_traits>

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
  int hist = 0;  // the "hist_topk" path (topk_softmax_list) when the kernel passes its buffers
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

// The key ranked r-th from the top (ties included) among the red.cand_n[0] <= kCandMax keys gathered
// in red.cand (complete and visible: the caller synchronised), counted G threads per candidate;
// the same in every thread.
__device__ __forceinline__ uint32_t rank_candidates(int r, TargetRed& red) {
  const int tid = threadIdx.x, nth = blockDim.x;
  const int nc = min(static_cast<int>(red.cand_n[0]), kCandMax);
  int G = 1;  // threads per candidate: a power of two <= 8 (it divides a warp)
  while (G < 8 && 2 * G * kCandMax <= nth) G *= 2;
  const int c = tid / G, part = tid % G;
  const uint32_t kc = c < nc ? red.cand[c] : 0u;
  // rank in the order by key, then by slot: candidates above it, and tied ones in earlier slots
  int before = 0;
  if (c < nc) {
    for (int i = part; i < nc; i += G) {
      const uint32_t o = red.cand[i];
      before += (o > kc || (o == kc && i < c)) ? 1 : 0;
    }
  }
  for (int o = 1; o < G; o <<= 1) before += __shfl_xor_sync(0xffffffffu, before, o);
  // exactly one candidate holds rank r (one writer, no race among tied ones); its key is the
  // r-th largest with ties counted, the answer
  if (c < nc && part == 0 && before == r - 1) red.cand_n[1] = kc;
  __syncthreads();
  return red.cand_n[1];
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
  return rank_candidates(k - cgt, red);  // 1 <= rank <= number of candidates
}

// Softmax of the n scaled logits A[0..n) (values below ``thr``, the top-k threshold, get e = 0, as
// exp(-inf)), then the top-p cut, in place: A holds P afterwards. ``ymax`` is the largest value. The
// dense path passes the whole row, the "hist_topk" path its list of kept lanes (the sums then run
// in list order: the same law up to the last bit).
__device__ __forceinline__ void softmax_top_p(float* A, int n, float thr, float ymax, const TargetLaw& p,
                                              TargetRed& red) {
  const int tid = threadIdx.x, nth = blockDim.x;
  float sum = 0.0f;
  for (int i = tid; i < n; i += nth) {
    const float y = A[i];
    const float e = y >= thr ? expf(__fsub_rn(y, ymax)) : 0.0f;
    A[i] = e;
    sum = __fadd_rn(sum, e);
  }
  sum = block_allreduce1(sum, OpSumF(), red.f, red.par_f);
  for (int i = tid; i < n; i += nth) A[i] = __fdiv_rn(A[i], sum);
  if (p.use_top_p) {
    // Threshold t*: the largest probability with mass{P >= t*} >= top_p (ties kept), searched
    // over the bits of non-negative floats, which order like their values (a float sum of a
    // subset only shrinks as t grows, so the predicate is monotone). When rounding leaves the
    // total below top_p every lane is kept (the reference's clamp to the last index).
    float tot = 0.0f;
    for (int i = tid; i < n; i += nth) tot = __fadd_rn(tot, A[i]);
    tot = block_allreduce1(tot, OpSumF(), red.f, red.par_f);
    uint32_t lo = 0u;
    if (tot >= p.top_p) {
      // the largest P is 1 / sum (its e is exp(0) = 1)
      lo = search_last_true(0u, __float_as_uint(__fdiv_rn(1.0f, sum)), [&](const uint32_t* piv, bool* ok) {
        float acc[kPivots] = {};
        for (int i = tid; i < n; i += nth) {
          const float v = A[i];
#pragma unroll
          for (int m = 0; m < kPivots; ++m) acc[m] = __fadd_rn(acc[m], v >= __uint_as_float(piv[m]) ? v : 0.0f);
        }
        block_allreduce<kPivots>(acc, OpSumF(), red.f7, red.par_f7);
#pragma unroll
        for (int m = 0; m < kPivots; ++m) ok[m] = acc[m] >= p.top_p;
      });
    }
    const float thr_p = __uint_as_float(lo);
    float s2 = 0.0f;
    for (int i = tid; i < n; i += nth) {
      const float v = A[i] >= thr_p ? A[i] : 0.0f;
      A[i] = v;
      s2 = __fadd_rn(s2, v);
    }
    s2 = block_allreduce1(s2, OpSumF(), red.f, red.par_f);
    for (int i = tid; i < n; i += nth) A[i] = __fdiv_rn(A[i], s2);
  }
}

// ---- the "hist_topk" path: top-k through one histogram pass and a list of the kept lanes
//
// One pass counts the finite lanes of the row into kHistBins bins spaced evenly in value between the
// row's smallest finite value and its maximum (bin(y) is monotone in y: a rounded subtraction and a
// rounded multiply by a positive scale, truncated). A suffix scan of the counts finds the bin b* that
// holds the k-th largest value. A second pass marks the lanes in bins >= b* in a bitmap (one warp
// ballot per 32 lanes) and a scan of its popcounts expands it into a list in ascending lane order:
// the kept lanes plus the other lanes of b*. When that list would be too long (a far outlier puts
// most lanes in a few bins), a third pass splits b* into kHistBins sub-bins first. The exact
// threshold is ranked among b*'s lanes (gathered from the list; above kCandMax of them, refined by
// key histograms of the list first, each cutting the key span 2^11-fold), and the softmax and
// top-p run over the list. S becomes the dense P row at the end. Two light passes over the row
// instead of the searches' 4 to 12, and the exponentials, divisions and top-p sums on about k
// lanes instead of V.
constexpr int kHistBins = 2048;
constexpr int kHistListCap = 2048;             // lanes the list holds (more: the dense path)
constexpr int kHistMaxLanes = 32 * kHistBins;  // the bitmap (one bit per lane) reuses the bins' words
constexpr int kHistMisc = 64;                  // ints: the scan buffer [0, kMaxWarps], scalars from 48
// Dynamic shared memory of the path, placed after the row's V floats (rounded up to 16 bytes).
constexpr int kHistSmemBytes = (kHistBins + 2 * kHistListCap + kHistMisc) * 4;

struct HistBufs {
  uint32_t* hist;  // kHistBins counts, then the bitmap of the listed lanes
  int* ids;        // kHistListCap listed lanes, ascending
  float* vals;     // their y, then e, then P
  int* misc;       // kHistMisc ints
};

// Bytes of a row of V floats, rounded up to 16: where the path's buffers start. 64-bit: V * 4 passes
// 2^31 for V >= 2^29, which the ops accept (the path is off there, but every row kernel computes it).
__host__ __device__ __forceinline__ int64_t hist_row_bytes(int V) { return (static_cast<int64_t>(V) * 4 + 15) / 16 * 16; }

// Host side: the dynamic shared memory of a row launch that takes the hist_topk path (the row, then
// the path's buffers), or 0 when the path does not apply: rows in global memory, a greedy law,
// top-k off or >= V, V above kHistMaxLanes, or no room beside the row within ``max_lanes`` floats.
inline int hist_topk_smem(bool global_rows, bool greedy, int top_k, int V, int max_lanes) {
  const int64_t bytes = hist_row_bytes(V) + kHistSmemBytes;
  const bool on = !global_rows && !greedy && top_k > 0 && top_k < V && V <= kHistMaxLanes &&
                  bytes <= static_cast<int64_t>(max_lanes) * static_cast<int64_t>(sizeof(float));
  return on ? static_cast<int>(bytes) : 0;
}

__device__ __forceinline__ HistBufs hist_bufs_after_row(unsigned char* smem, int V) {
  uint32_t* h = reinterpret_cast<uint32_t*>(smem + hist_row_bytes(V));
  return HistBufs{h, reinterpret_cast<int*>(h + kHistBins), reinterpret_cast<float*>(h + kHistBins + kHistListCap),
                  reinterpret_cast<int*>(h + kHistBins + 2 * kHistListCap)};
}

// Over the kHistBins counts h (complete and visible), finds the largest bin b with
// #{counted in bins >= b} >= r and writes b, the count in the bins above it and h[b] to out[0..2]
// (one thread writes, when 1 <= r <= total; the caller synchronises before reading). Returns the
// total count, the same in every thread.
__device__ __forceinline__ int hist_find(const uint32_t* h, int r, int* scan_buf, int* out) {
  const int tid = threadIdx.x, nth = blockDim.x;
  const int G = (kHistBins + nth - 1) / nth;  // contiguous bins per thread
  const int b0 = min(tid * G, kHistBins), b1 = min(b0 + G, kHistBins);
  int s = 0;
  for (int b = b0; b < b1; ++b) s += static_cast<int>(h[b]);
  int total = 0;
  const int before = block_exclusive_scan(s, scan_buf, total);
  int above = total - before - s;  // counted in the bins after this thread's
  if (above < r && r <= above + s) {
    for (int b = b1 - 1; b >= b0; --b) {
      const int c = static_cast<int>(h[b]);
      if (above + c >= r) {
        out[0] = b;
        out[1] = above;
        out[2] = c;
        break;
      }
      above += c;
    }
  }
  return total;
}

// Top-k threshold, softmax and top-p of a sampling row (not bad, not greedy, 1 <= k < V) through the
// list. S[0..V) holds y = x / T (finite or -inf), ymin the smallest finite y, ymax the largest.
// Returns true with P in S and the list's length in n_out (hb.ids keeps the lanes: every lane with
// P > 0 is among them); false, with S untouched, when the row takes the dense path: a row whose
// finite values are all equal or span more than a float, or whose list would exceed kHistListCap
// lanes even after b* is split (ties, or more than that many finite lanes when k exceeds them).
// Every return is block-uniform.
__device__ __forceinline__ bool topk_softmax_list(float* S, int V, const TargetLaw& p, float ymin, float ymax,
                                                  TargetRed& red, const HistBufs hb, int& n_out) {
  const int tid = threadIdx.x, nth = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int k = p.top_k;
  const float d = __fsub_rn(ymax, ymin);
  const float scale = __fdiv_rn(static_cast<float>(kHistBins), d);
  if (!(d > 0.0f) || !isfinite(d) || !isfinite(scale)) return false;
  auto bin_of = [&](float y) -> int {  // y >= ymin: (y - ymin) * scale lies in [0, kHistBins (1 + 2^-23)]
    const int b = static_cast<int>(__fmul_rn(__fsub_rn(y, ymin), scale));
    return b < kHistBins - 1 ? b : kHistBins - 1;
  };
  int* sc = hb.misc + 48;
  // zeroes the bins; the caller has synchronised since their last read, and this synchronises
  auto clear_hist = [&]() {
    for (int b = tid; b < kHistBins; b += nth) hb.hist[b] = 0u;
    __syncthreads();
  };

  // ---- 1. counts of the finite lanes per bin (-inf lanes are below ymin)
  clear_hist();
  for (int i = tid; i < V; i += nth) {
    const float y = S[i];
    if (y >= ymin) atomicAdd(hb.hist + bin_of(y), 1u);
  }
  __syncthreads();
  const int nfin = hist_find(hb.hist, k, hb.misc, sc);
  __syncthreads();
  // Fewer than k finite lanes: the k-th largest is -inf and every finite lane is kept.
  const bool keep_all = nfin < k;
  const int bstar = keep_all ? 0 : sc[0];
  int cgt = keep_all ? 0 : sc[1];
  int nb = keep_all ? 0 : sc[2];
  if (keep_all && nfin > kHistListCap) return false;
  // A list over capacity means a crowded b* (a far outlier stretches the bins): one more pass splits
  // b* into kHistBins sub-bins spaced in value from about its lower end (sub_of is monotone in y and
  // clamped, so the order it gives b*'s lanes stays exact however rough the bounds).
  int b1 = -1;
  const float lo1 = __fadd_rn(ymin, __fdiv_rn(static_cast<float>(bstar), scale));
  const float scale1 = __fmul_rn(scale, static_cast<float>(kHistBins));
  auto sub_of = [&](float y) -> int {
    const float t = __fmul_rn(__fsub_rn(y, lo1), scale1);
    return t > 0.0f ? static_cast<int>(fminf(t, static_cast<float>(kHistBins - 1))) : 0;
  };
  if (!keep_all && cgt + nb > kHistListCap) {
    if (!isfinite(scale1) || !isfinite(lo1)) return false;
    clear_hist();  // the counts were read before the barrier above
    for (int i = tid; i < V; i += nth) {
      const float y = S[i];
      if (y >= ymin && bin_of(y) == bstar) atomicAdd(hb.hist + sub_of(y), 1u);
    }
    __syncthreads();
    hist_find(hb.hist, k - cgt, hb.misc, sc);
    __syncthreads();
    b1 = sc[0];
    cgt += sc[1];
    nb = sc[2];
    if (cgt + nb > kHistListCap) return false;
  }
  // the listed lanes: finite, in a bin above b*, or in b* (and its sub-bins from b1 when split)
  const float fbstar = static_cast<float>(bstar);
  auto in_list_whole = [&](float y) -> bool {  // b* whole: bin_of(y) >= b* (b* <= kHistBins - 1, t >= 0)
    return y >= ymin && __fmul_rn(__fsub_rn(y, ymin), scale) >= fbstar;
  };
  auto in_list_split = [&](float y) -> bool {
    if (!(y >= ymin)) return false;
    const int b = bin_of(y);
    return b > bstar || (b == bstar && sub_of(y) >= b1);
  };

  // ---- 2. bitmap of the listed lanes, one warp ballot per 32 lanes (the counts were read before
  //         the barrier above); a loop per predicate keeps the common one tight
  uint32_t* bits = hb.hist;
  auto mark = [&](auto in_list) {
    for (int base = 0; base < V; base += nth) {  // block-uniform trip count: the ballot sees whole warps
      const int i = base + tid;
      const unsigned bal = __ballot_sync(0xffffffffu, i < V && in_list(S[i]));
      const int w = (base >> 5) + warp;
      if (lane == 0 && w * 32 < V) bits[w] = bal;
    }
  };
  if (b1 < 0) {
    mark(in_list_whole);
  } else {
    mark(in_list_split);
  }
  __syncthreads();

  // ---- 3. the list in ascending lane order: each thread expands a contiguous run of words
  const int nwords = (V + 31) >> 5;
  const int wpt = (nwords + nth - 1) / nth;
  const int w0 = min(tid * wpt, nwords), w1 = min(w0 + wpt, nwords);
  int c = 0;
  for (int w = w0; w < w1; ++w) c += __popc(bits[w]);
  int nlist = 0;
  int at = block_exclusive_scan(c, hb.misc, nlist);
  for (int w = w0; w < w1; ++w) {
    for (uint32_t m = bits[w]; m != 0u; m &= m - 1u) {
      const int i = w * 32 + __ffs(static_cast<int>(m)) - 1;
      hb.ids[at] = i;
      hb.vals[at] = S[i];
      ++at;
    }
  }
  __syncthreads();

  // ---- 4. the k-th largest key: rank k - cgt among the lanes of b* (of its sub-bin b1 when split),
  //         with keys in [klo, khi]
  float thr = -INFINITY;
  if (!keep_all) {
    int r = k - cgt, ncand = nb;
    uint32_t klo = 0u, khi = 0xffffffffu, K = 0u;
    auto is_cand = [&](float y, uint32_t key) {
      return bin_of(y) == bstar && (b1 < 0 || sub_of(y) == b1) && key >= klo && key <= khi;
    };
    for (;;) {
      if (ncand <= kCandMax) {
        if (tid == 0) red.cand_n[0] = 0u;
        __syncthreads();
        for (int t = tid; t < nlist; t += nth) {
          const float y = hb.vals[t];
          const uint32_t key = order_key(y);
          if (is_cand(y, key)) {  // ncand <= kCandMax of them
            const uint32_t at = atomicAdd(red.cand_n, 1u);
            if (at < static_cast<uint32_t>(kCandMax)) red.cand[at] = key;
          }
        }
        __syncthreads();
        K = rank_candidates(r, red);
        break;
      }
      // smallest and largest candidate key (kPivots values, 2 used: red.i7's width)
      uint32_t mm[kPivots] = {};
      for (int t = tid; t < nlist; t += nth) {
        const float y = hb.vals[t];
        const uint32_t key = order_key(y);
        if (is_cand(y, key)) {
          mm[0] = key > mm[0] ? key : mm[0];
          mm[1] = ~key > mm[1] ? ~key : mm[1];
        }
      }
      block_allreduce<kPivots>(mm, OpMaxU32(), reinterpret_cast<uint32_t*>(red.i7), red.par_i7);
      const uint32_t kmin = ~mm[1], kmax = mm[0];
      if (kmin == kmax) {  // tied candidates
        K = kmin;
        break;
      }
      const int bits_span = 32 - __clz(static_cast<int>(kmax - kmin));
      const int shift = bits_span > 11 ? bits_span - 11 : 0;  // (kmax - kmin) >> shift < kHistBins
      clear_hist();  // after the reduction's barrier
      for (int t = tid; t < nlist; t += nth) {
        const float y = hb.vals[t];
        const uint32_t key = order_key(y);
        if (is_cand(y, key)) atomicAdd(hb.hist + ((key - kmin) >> shift), 1u);
      }
      __syncthreads();
      hist_find(hb.hist, r, hb.misc, sc);
      __syncthreads();
      const uint32_t b2 = static_cast<uint32_t>(sc[0]);
      r -= sc[1];
      ncand = sc[2];
      klo = kmin + (b2 << shift);
      const uint64_t top = static_cast<uint64_t>(klo) + ((1ull << shift) - 1ull);
      khi = top < kmax ? static_cast<uint32_t>(top) : kmax;
      if (shift == 0) {  // one key per bin
        K = klo;
        break;
      }
    }
    thr = key_to_float(K);
  }

  // ---- 5. softmax and top-p over the list, then S becomes the dense P row
  softmax_top_p(hb.vals, nlist, thr, ymax, p, red);  // its reductions' barriers follow every read of S
  zero_row(S, V);
  __syncthreads();
  for (int t = tid; t < nlist; t += nth) S[hb.ids[t]] = hb.vals[t];
  n_out = nlist;
  return true;
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
                                           float* S, TargetRed& red, const HistBufs hb = HistBufs{},
                                           int* hist_n = nullptr) {
  const int tid = threadIdx.x, nth = blockDim.x;
  // ---- 1. combined logits (CFG in float32), temperature, non-finite detection
  int flags = 0;
  float ymax = -INFINITY, ymin = INFINITY;  // ymin: smallest y above -inf (bracket and hist paths only)
  uint64_t amax = 0;
  const bool greedy = p.greedy != 0;
  const bool topk = p.top_k > 0 && p.top_k < V;
  const bool hist = topk && p.hist != 0 && V <= kHistMaxLanes;  // the caller passes hb with p.hist
  const bool bracket = topk && p.topk_select == kTopkBracket;
  const bool need_ymin = bracket || hist;
  if (greedy) {
    for_each_logit<T>(crow, urow, V, [&](int i, float c, float u) {
      const float x = urow ? cfg_combine(c, u, cfg) : c;
      flags |= target_logit_flags(x, 0.0f, true);
      const uint64_t k = (static_cast<uint64_t>(order_key(x)) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(i));
      amax = k > amax ? k : amax;
    });
  } else {
    // A sampling row needs only the NaN flag of y (flag 8) and ymax: a NaN x makes y NaN, an x of
    // +inf makes ymax +inf, and with no x above -inf ymax stays -inf (1/T > 0), so target_row_bad's
    // flags 1, 2 and 4 never change its answer here. A loop per ymin choice keeps the body tight.
    auto pass = [&](auto track_min) {
      for_each_logit<T>(crow, urow, V, [&](int i, float c, float u) {
        const float x = urow ? cfg_combine(c, u, cfg) : c;
        const float y = __fmul_rn(x, p.inv_temperature);
        flags |= y != y ? 8 : 0;
        ymax = fmaxf(ymax, y);
        if (decltype(track_min)::value) ymin = fminf(ymin, y > -INFINITY ? y : INFINITY);
        S[i] = y;
      });
    };
    if (need_ymin) {
      pass(std::true_type{});
    } else {
      pass(std::false_type{});
    }
    flags |= 4;  // see above: some x above -inf unless ymax is -inf, which target_row_bad checks
  }
  flags = block_allreduce1(flags, OpOrI(), red.i, red.par_i);
  if (greedy) {
    amax = block_allreduce1(amax, OpMaxU64(), red.u64, red.par_u64);
  } else if (need_ymin) {
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
    int n = -1;
    if (hist && topk_softmax_list(S, V, p, ymin, ymax, red, hb, n)) {
      if (hist_n) *hist_n = n;
      return false;
    }
    // top-k: keep the values >= the k-th largest (ties kept); the others get e = 0, as exp(-inf)
    float thr = -INFINITY;
    if (bracket) {
      thr = key_to_float(kth_key_bracket(S, V, p.top_k, ymin, ymax, red));
    } else if (topk) {
      // k-th largest value: the largest key K with #{key >= K} >= k (ties at the boundary kept).
      const uint32_t kth = search_last_true(0u, order_key(ymax), [&](const uint32_t* piv, bool* ok) {
        int cnt[kPivots];
        count_keys_at_least(S, V, piv, cnt, red);
#pragma unroll
        for (int m = 0; m < kPivots; ++m) ok[m] = cnt[m] >= p.top_k;
      });
      thr = key_to_float(kth);
    }
    softmax_top_p(S, V, thr, ymax, p, red);
  }
  return bad;
}

}  // namespace sjd
