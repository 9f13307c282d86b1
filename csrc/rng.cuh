// Philox4x32-10, the CUDA twin of sjd_kernels/rng.py (bit for bit; see that file for the contract).
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (lane / 4, position, step, stream), each taken mod 2^32
//   word    = philox(counter, key)[lane % 4]
#pragma once

#include <cstdint>

namespace sjd {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Streams (must equal sjd_kernels.rng.STREAM_*).
constexpr uint32_t kStreamAccept = 1;
constexpr uint32_t kStreamResid = 2;
constexpr uint32_t kStreamDraft = 3;
constexpr uint32_t kStreamCouple = 4;
constexpr uint32_t kStreamCoupleRes = 5;
constexpr uint32_t kStreamTail = 6;
constexpr uint32_t kStreamGumbel = 7;
constexpr uint32_t kStreamTree = 8;
constexpr uint32_t kStreamTreeAccept = 9;
constexpr uint32_t kStreamTreeResid = 10;
constexpr uint32_t kStreamSjd2Noise = 11;  // SJD2 position noise (sjd2_prepare)

struct Philox4 {
  uint32_t w[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The counter/key of one (seed, position, step, stream) row; lanes 4g..4g+3 come from group g.
struct RowRng {
  uint32_t pos, step, stream, k0, k1;
  __device__ __forceinline__ RowRng(int64_t seed, int64_t position, int64_t step_, uint32_t stream_)
      : pos(static_cast<uint32_t>(static_cast<uint64_t>(position))),
        step(static_cast<uint32_t>(static_cast<uint64_t>(step_))),
        stream(stream_),
        k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
  __device__ __forceinline__ Philox4 group(uint32_t g) const { return philox4x32_10(g, pos, step, stream, k0, k1); }
};

// Acceptance uniform u = (word >> 8) * 2^-24 in [0, 1).
__device__ __forceinline__ float uniform24(uint32_t word) {
  return __fmul_rn(static_cast<float>(word >> 8), 5.9604644775390625e-08f);
}

// Exp(1) noise -log((u24 + 0.5) * 2^-24) in float32, with the accurate logf (the reference uses
// torch.log): u24 + 0.5 rounds in float32 exactly as the reference's float32 add does.
__device__ __forceinline__ float exponential(uint32_t word) {
  const float u = __fmul_rn(__fadd_rn(static_cast<float>(word >> 8), 0.5f), 5.9604644775390625e-08f);
  // floor at 2^-25 as rng.E_FLOOR: u rounds to 1.0 for u24 = 2^24 - 1, where -logf(u) = -0.0
  return fmaxf(-logf(u), 2.98023223876953125e-08f);
}

// Uniform id in [0, vocab) by rejection from the 4 words of lane group 0 (rng.uniform_token).
__device__ __forceinline__ int64_t uniform_token(int64_t seed, int64_t position, int64_t step, uint32_t stream,
                                                 int64_t vocab) {
  const Philox4 w = RowRng(seed, position, step, stream).group(0);
  const uint64_t two32 = 1ull << 32;
  const uint64_t lim = two32 - (two32 % static_cast<uint64_t>(vocab));
  uint32_t pick = w.w[3];
#pragma unroll
  for (int i = 3; i >= 0; --i)
    if (static_cast<uint64_t>(w.w[i]) < lim) pick = w.w[i];
  return static_cast<int64_t>(static_cast<uint64_t>(pick) % static_cast<uint64_t>(vocab));
}

}  // namespace sjd
