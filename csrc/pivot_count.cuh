// Counting a row's keys against 7 sorted pivots in one pass (count_keys_at_least in target.cuh).
//
// A lane's bucket b = #{m : key >= piv[m]} (0..7) is found by a 3-level binary search (the pivots
// are non-decreasing, so key >= piv[m] holds exactly for m < b), and the lane adds 1 to byte b of
// two packed 32-bit counters (buckets 0-3 and 4-7). A thread flushes them into cnt every
// kBucketFlush lanes (a byte holds 255), where cnt[m] += #{lanes with bucket > m} =
// #{lanes with key >= piv[m]}. Per lane: 3 compares, 4 selects and a shifted add, instead of 7
// compare-and-add pairs on 7 counters.
//
// Host and device code, so that tests/cuda_host/ can check it against a direct count on the CPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SJD_HD __host__ __device__ __forceinline__
#else
#define SJD_HD inline
#endif

namespace sjd {

constexpr int kBucketPivots = 7;
constexpr int kBucketFlush = 255;  // lanes per thread between flushes (one byte per bucket)

// The 3-level binary search over non-decreasing piv[0..6]: key >= piv[3] (t1), then against
// piv[5] or piv[1] (t2), then against piv[6], piv[4], piv[2] or piv[0] (t3). The bucket
// #{m : key >= piv[m]} is 4 t1 + 2 t2 + t3.
SJD_HD void pivot_search(uint32_t key, const uint32_t* piv, bool& t1, bool& t2, bool& t3) {
  t1 = key >= piv[3];
  t2 = key >= (t1 ? piv[5] : piv[1]);
  t3 = key >= (t1 ? (t2 ? piv[6] : piv[4]) : (t2 ? piv[2] : piv[0]));
}

// #{m : key >= piv[m]} (0..7).
SJD_HD int pivot_bucket(uint32_t key, const uint32_t* piv) {
  bool t1, t2, t3;
  pivot_search(key, piv, t1, t2, t3);
  return (t1 ? 4 : 0) + (t2 ? 2 : 0) + (t3 ? 1 : 0);
}

// Adds one lane with this key to the packed byte counters: byte (b & 3) of hi when b >= 4, else
// of lo, for its bucket b (the three answers pick the byte directly, without forming b).
SJD_HD void bucket_count(uint32_t key, const uint32_t* piv, uint32_t& lo, uint32_t& hi) {
  bool t1, t2, t3;
  pivot_search(key, piv, t1, t2, t3);
  const uint32_t one = 1u << ((t2 ? 16u : 0u) + (t3 ? 8u : 0u));
  if (t1) {
    hi += one;
  } else {
    lo += one;
  }
}

// cnt[m] += #{counted lanes with bucket > m}; the counters are then free to reuse.
SJD_HD void bucket_flush(uint32_t lo, uint32_t hi, int (&cnt)[kBucketPivots]) {
  int above = 0;  // lanes in buckets b > m, accumulated from the top bucket down
#pragma unroll
  for (int m = kBucketPivots - 1; m >= 0; --m) {
    const int b = m + 1;  // the bucket that joins "above m"
    const uint32_t word = b >= 4 ? hi : lo;
    above += static_cast<int>((word >> (8 * (b & 3))) & 0xffu);
    cnt[m] += above;
  }
}

}  // namespace sjd

#undef SJD_HD
