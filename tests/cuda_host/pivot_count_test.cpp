// Host check of csrc/pivot_count.cuh (tests/test_cuda_host_logic.py compiles and runs it): the
// bucket of a key among 7 sorted pivots and the packed byte counters, against direct counts.
// Exit status 0 and "ok <checks>" on success; the first mismatch is printed and the status is 1.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>
#include <algorithm>

#include "pivot_count.cuh"

using sjd::kBucketFlush;
using sjd::kBucketPivots;

static int direct_bucket(uint32_t key, const uint32_t* piv) {
  int b = 0;
  for (int m = 0; m < kBucketPivots; ++m) b += key >= piv[m] ? 1 : 0;
  return b;
}

// What count_keys_at_least does in one thread: lanes in chunks of kBucketFlush, then a flush.
static void packed_counts(const std::vector<uint32_t>& keys, const uint32_t* piv, int (&cnt)[kBucketPivots]) {
  for (int m = 0; m < kBucketPivots; ++m) cnt[m] = 0;
  for (size_t i0 = 0; i0 < keys.size(); i0 += kBucketFlush) {
    const size_t end = std::min(keys.size(), i0 + kBucketFlush);
    uint32_t lo = 0u, hi = 0u;
    for (size_t i = i0; i < end; ++i) sjd::bucket_count(keys[i], piv, lo, hi);
    sjd::bucket_flush(lo, hi, cnt);
  }
}

int main() {
  std::mt19937_64 rng(12345);
  long checks = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    uint32_t piv[kBucketPivots];
    const int kind = trial % 4;
    for (int m = 0; m < kBucketPivots; ++m) {
      uint32_t v = static_cast<uint32_t>(rng());
      if (kind == 1) v = static_cast<uint32_t>(rng() % 5);             // small, many ties
      if (kind == 2) v = 0xFFFFFFFFu - static_cast<uint32_t>(rng() % 3);  // at the top of the range
      if (kind == 3 && m > 0 && rng() % 2) v = piv[m - 1];              // repeated pivots
      piv[m] = v;
    }
    std::sort(piv, piv + kBucketPivots);
    // keys: random, each pivot and its neighbours, the extremes; long runs of one bucket so a
    // byte counter reaches 255 before its flush
    std::vector<uint32_t> keys;
    const int n = static_cast<int>(rng() % 1200);
    for (int i = 0; i < n; ++i) keys.push_back(static_cast<uint32_t>(rng()));
    for (int m = 0; m < kBucketPivots; ++m)
      for (int d = -1; d <= 1; ++d) keys.push_back(piv[m] + static_cast<uint32_t>(d));
    keys.push_back(0u);
    keys.push_back(0xFFFFFFFFu);
    const uint32_t same = piv[static_cast<int>(rng() % kBucketPivots)];
    const int run = trial % 7 == 0 ? 255 + static_cast<int>(rng() % 600) : 0;
    for (int i = 0; i < run; ++i) keys.push_back(same);
    std::shuffle(keys.begin(), keys.end(), rng);

    int want[kBucketPivots] = {0, 0, 0, 0, 0, 0, 0};
    for (uint32_t k : keys) {
      const int b = direct_bucket(k, piv);
      if (sjd::pivot_bucket(k, piv) != b) {
        std::printf("pivot_bucket(%u) = %d, want %d (trial %d)\n", k, sjd::pivot_bucket(k, piv), b, trial);
        return 1;
      }
      uint32_t lo = 0u, hi = 0u;
      sjd::bucket_count(k, piv, lo, hi);
      const uint32_t expect = 1u << (8 * (b & 3));
      if ((b >= 4 ? hi : lo) != expect || (b >= 4 ? lo : hi) != 0u) {
        std::printf("bucket_count(%u): lo %08x hi %08x, bucket %d (trial %d)\n", k, lo, hi, b, trial);
        return 1;
      }
      for (int m = 0; m < kBucketPivots; ++m) want[m] += k >= piv[m] ? 1 : 0;
      ++checks;
    }
    int got[kBucketPivots];
    packed_counts(keys, piv, got);
    for (int m = 0; m < kBucketPivots; ++m) {
      if (got[m] != want[m]) {
        std::printf("count >= piv[%d]: %d, want %d (trial %d, %zu keys)\n", m, got[m], want[m], trial, keys.size());
        return 1;
      }
    }
  }
  std::printf("ok %ld\n", checks);
  return 0;
}
