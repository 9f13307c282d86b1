// sjd2_prepare: SJD2's model inputs with the window's DDIM update fused in, CUDA version of
// sjd_kernels/reference/sjd2_prepare.py (see that file for the contract; the Triton twin is
// sjd_kernels/triton/sjd2_prepare.py).
//
// One block per input slot (b, i). Every thread reads the slot's flags, and the ring level of a
// window position, once; the block then walks the embedding dimension in chunks of VEC lanes
// (16-byte loads of the table row and the output, 16 or 32 bytes of each float32 row) and does
// everything in registers: the table row's gather, the position noise of a position entering the
// window (Philox group j of counter (j, position, 0, STREAM_SJD2_NOISE), Box-Muller from its words
// 0 and 1), the normalisation, the DDIM step, the level embedding and the cast. Each latent lane is
// read and written by the same thread; the level is written by thread 0 after a barrier, when
// every thread of the block has read it. Window positions of one request occupy distinct ring
// slots (the op's contract), so blocks never share a slot. A token the slot reads outside the
// table, or a ring level outside 0..K, is clamped into range and thread 0 sets bit 32 of status[0]
// (one atomicOr per such slot), as the reference does.
//
// Rounding follows the reference operation by operation (no FMA contraction, IEEE division and
// square root, round-to-nearest casts), so every output that draws no noise is bit-identical to
// the reference; the noise's logf and cosf may differ from PyTorch's by an ulp or so.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "jacobi_step.h"
#include "rng.cuh"
#include "sampling.cuh"
#include "sjd2_prepare.h"
#include "state.cuh"

namespace sjd {
namespace {

constexpr int kMaxThreads = 256;

// N consecutive elements as one aligned access (16 bytes at most per instruction).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

__device__ __forceinline__ int clamp_level(int k, int K) { return k < 0 ? 0 : (k > K ? K : k); }

// Standard normal noise of lane j (rng contract of sjd2.noise.position_noise).
__device__ __forceinline__ float position_noise(const RowRng& rr, uint32_t j) {
  const Philox4 w = rr.group(j);
  const float u1 = __fmul_rn(__fadd_rn(static_cast<float>(w.w[0] >> 8), 0.5f), 5.9604644775390625e-08f);
  const float u2 = __fmul_rn(static_cast<float>(w.w[1] >> 8), 5.9604644775390625e-08f);
  return __fmul_rn(sqrtf(__fmul_rn(-2.0f, logf(u1))), cosf(__fmul_rn(6.283185307179586f, u2)));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) sjd2_prepare_kernel(const Sjd2PrepareArgs p) {
  const int64_t slot = blockIdx.x;  // b * N + i
  const int64_t b = slot / p.N;
  const int64_t P = p.positions[slot];
  const int64_t tok_in = p.tokens[slot];
  const int64_t tok = tok_in < 0 ? 0 : (tok_in >= p.Vt ? p.Vt - 1 : tok_in);  // unread slots may hold any id
  const bool valid = P >= 0;
  const bool win = valid && P >= p.commit_end[b];
  const bool fresh = win && P >= p.fresh_start[b];
  const int64_t r = valid ? P % p.R : 0;
  int32_t* lev = p.level + b * p.R + r;
  const int k_old = fresh ? p.K : (win ? *lev : 0);
  const bool step = win && P < p.row_end[b] && k_old > 0;
  const int k_new = win ? (step ? k_old - 1 : k_old) : 0;
  const bool noisy = win && k_new > 0;
  const bool draw = fresh && p.K > 0;
  const bool reads = (valid && !win) || step || (win && k_new == 0);
  const bool bad = (reads && tok != tok_in) || (win && !fresh && (k_old < 0 || k_old > p.K));
  if (bad && threadIdx.x == 0) atomicOr(p.status + kStatusErr, kErrPrepare);
  // levels outside 0..K in the ring are not the op's own; table reads stay in bounds regardless
  const int ko = clamp_level(k_old, p.K), kp = clamp_level(k_new, p.K);
  const float a_k = p.alpha[ko];
  const float s_k = step ? p.sigma[ko] : 1.0f;
  const float a_p = p.alpha[kp];
  const float ratio = __fdiv_rn(p.sigma[kp], s_k);
  const RowRng rr(draw ? p.seed[b] : 0, P, 0, kStreamSjd2Noise);

  const int d = p.d;
  const T* erow = static_cast<const T*>(p.embed) + tok * d;
  float* lrow = p.latent + (b * p.R + r) * d;
  const float* trow = p.level_table + static_cast<int64_t>(kp) * d;
  T* orow = static_cast<T*>(p.out) + slot * d;

  for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
    if (!valid) {
      Pack<T, VEC> z;
#pragma unroll
      for (int v = 0; v < VEC; ++v) z.v[v] = from_float<T>(0.0f);
      store_pack<T, VEC>(orow + c, z);
      continue;
    }
    const Pack<T, VEC> e = load_pack<T, VEC>(erow + c);
    if (!win) {  // a committed token: its embedding, bit for bit
      store_pack<T, VEC>(orow + c, e);
      continue;
    }
    const Pack<float, VEC> mu = load_pack<float, VEC>(p.mean + c);
    const Pack<float, VEC> sd = load_pack<float, VEC>(p.std_ + c);
    Pack<float, VEC> x;
    if (draw) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x.v[v] = position_noise(rr, static_cast<uint32_t>(c + v));
    } else {
      x = load_pack<float, VEC>(lrow + c);
    }
    if (step) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float eh = __fdiv_rn(__fsub_rn(to_float(e.v[v]), mu.v[v]), sd.v[v]);
        x.v[v] = __fadd_rn(__fmul_rn(a_p, eh), __fmul_rn(ratio, __fsub_rn(x.v[v], __fmul_rn(a_k, eh))));
      }
    }
    store_pack<float, VEC>(lrow + c, x);
    if (noisy) {
      const Pack<float, VEC> lv = load_pack<float, VEC>(trow + c);
      Pack<T, VEC> y;
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        y.v[v] = from_float<T>(__fadd_rn(__fadd_rn(__fmul_rn(x.v[v], sd.v[v]), mu.v[v]), lv.v[v]));
      store_pack<T, VEC>(orow + c, y);
    } else {  // level 0 reached: the token's embedding itself
      store_pack<T, VEC>(orow + c, e);
    }
  }
  __syncthreads();  // every thread has read *lev
  if (win && threadIdx.x == 0) *lev = k_new;
}

template <typename T, int VEC>
void launch(const Sjd2PrepareArgs& p, int64_t slots, cudaStream_t st) {
  int threads = ((p.d + VEC - 1) / VEC + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  SJD_LAUNCH((sjd2_prepare_kernel<T, VEC>), static_cast<unsigned>(slots), threads, 0, st)(p);
  SJD_CHECK_LAUNCH("sjd2_prepare_kernel");
}

bool aligned16(const void* ptr) { return (reinterpret_cast<std::uintptr_t>(ptr) & 15u) == 0; }

// The 16-byte path when every row starts on a 16-byte boundary, else one lane per access.
template <typename T>
void dispatch(const Sjd2PrepareArgs& p, int64_t slots, cudaStream_t st) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.d % kVec == 0 && aligned16(p.embed) && aligned16(p.mean) && aligned16(p.std_) &&
                   aligned16(p.level_table) && aligned16(p.latent) && aligned16(p.out);
  if (vec)
    launch<T, kVec>(p, slots, st);
  else
    launch<T, 1>(p, slots, st);
}

}  // namespace

void sjd2_prepare_launch(const Sjd2PrepareArgs& a) {
  SJD_REQUIRE(a.dtype == kF32 || a.dtype == kF16 || a.dtype == kBF16, "sjd2_prepare: dtype code must be 0, 1 or 2");
  // B * N itself could wrap in 64 bits for huge sizes: compare by division
  SJD_REQUIRE(a.B >= 0 && a.N >= 0 && (a.N == 0 || a.B <= 2147483647 / a.N), "sjd2_prepare: need 0 <= B * N < 2^31");
  SJD_REQUIRE(a.d >= 1 && a.K >= 0 && a.Vt >= 1 && a.R >= 1, "sjd2_prepare: need d >= 1, K >= 0, Vt >= 1, R >= 1");
  if (a.B * a.N == 0) return;
  SJD_REQUIRE(a.embed && a.mean && a.std_ && a.level_table && a.alpha && a.sigma && a.tokens && a.positions &&
                  a.seed && a.commit_end && a.fresh_start && a.row_end && a.latent && a.level && a.out && a.status,
              "sjd2_prepare: a required pointer is null");
  require_device(a.device, "sjd2_prepare");
  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  const int64_t slots = a.B * a.N;
  switch (a.dtype) {
    case kF32: dispatch<float>(a, slots, st); break;
    case kF16: dispatch<__half>(a, slots, st); break;
    default: dispatch<__nv_bfloat16>(a, slots, st); break;
  }
}

}  // namespace sjd
