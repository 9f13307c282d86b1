// verify_chain: verification alone for given target and draft laws, CUDA version of
// sjd_kernels/reference/verify_chain.py (same draws, same tokens; see that file for the contract).
//
// One block per request. Its threads first take the window's rows in turn: gather
// target[j, D_j] and draft[j, D_j], draw the acceptance uniform (stream ACCEPT, word 0 of lane
// group 0 at position pos + j), and a block reduction gives the first rejected row m and the
// error flags. Then the block reads rows m of both laws once: each thread takes groups of 4
// consecutive lanes (one Philox call of stream RESID per group) and keeps its best packed race
// entry of the residual max(0, target - draft) (the target itself on the bonus row), and a second
// reduction gives the winner (largest key, lowest lane on ties, as the reference's argmax). Only a
// residual without mass (rounding) reads the target row again for the target's race. No other row
// is read, nothing is synchronised with the host, and the outputs have fixed shapes, so a call can
// be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "jacobi_step.h"
#include "rng.cuh"
#include "sampling.cuh"
#include "state.cuh"
#include "verify_chain.h"

namespace sjd {
namespace {

constexpr int kMaxThreads = 1024;

struct Params {
  const void* target;
  int64_t t_sb, t_sj;
  const void* draft;
  int64_t d_sb, d_sj;
  const int64_t* ids;
  const int64_t* win_len;
  const int64_t* pos;
  const int64_t* seed;
  const int64_t* step;
  int32_t* status;
  int W, V;
  int64_t* num_accepted;
  int64_t* tokens;
};

struct OpMinI {
  using T = int;
  __device__ __forceinline__ static T identity() { return 0x7fffffff; }
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// True where x can be a probability: finite and not negative (NaN fails the comparison).
__device__ __forceinline__ bool is_prob(float x) { return x >= 0.0f && isfinite(x); }

// This thread's best packed race entry over row m (lanes 4g..4g+3 of its groups g, one Philox call
// of `rr` each): weights max(0, x - q) with `qrow` (a rejected draft's residual), else x (the
// target). Sets bit 1 of `flags` on a value read that is no probability (NaN, infinite, negative).
template <typename T>
__device__ __forceinline__ uint64_t row_race(const T* prow, const T* qrow, const RowRng& rr, int V, int& flags) {
  uint64_t best = 0ull;
  for (int g = threadIdx.x; g < ((V + 3) >> 2); g += blockDim.x) {
    const Philox4 w = rr.group(static_cast<uint32_t>(g));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int lane = 4 * g + k;
      if (lane >= V) break;
      const float x = to_float<T>(prow[lane]);
      const float q = qrow != nullptr ? to_float<T>(qrow[lane]) : 0.0f;
      if (!is_prob(x) || !is_prob(q)) flags |= 1;
      const float r = qrow != nullptr ? fmaxf(__fsub_rn(x, q), 0.0f) : x;
      best = umax64(best, race_pack(r, exponential(w.w[k]), static_cast<uint32_t>(lane)));
    }
  }
  return best;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) verify_chain_kernel(const Params p) {
  __shared__ int red_i[2 * kMaxWarps];
  __shared__ int red_m[2 * kMaxWarps];
  __shared__ uint64_t red_u[2 * kMaxWarps];
  int par_i = 0, par_m = 0, par_u = 0;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, nth = blockDim.x;
  const int W = p.W, V = p.V;
  const int64_t wl64 = p.win_len[b];
  const int wl = static_cast<int>(wl64 < 0 ? 0 : (wl64 > W ? W : wl64));
  const int64_t pos = p.pos[b], seed = p.seed[b], step = p.step[b];
  const T* trow0 = static_cast<const T*>(p.target) + b * p.t_sb;
  const T* drow0 = W > 0 ? static_cast<const T*>(p.draft) + b * p.d_sb : nullptr;

  // ---- 1. acceptance of every draft row (entries of ids outside [0, V) read as 0: rejected)
  int first = wl, flags = 0;  // flags: 1 an entry that is no probability, 2 an id out of range
  for (int j = tid; j < wl; j += nth) {
    const int64_t D = p.ids[b * W + j];
    float Pd = 0.0f, Qd = 0.0f;
    if (D >= 0 && D < V) {
      Pd = to_float<T>(trow0[j * p.t_sj + D]);
      Qd = to_float<T>(drow0[j * p.d_sj + D]);
      if (!is_prob(Pd) || !is_prob(Qd)) flags |= 1;
    } else {
      flags |= 2;
    }
    const float u = uniform24(RowRng(seed, pos + j, step, kStreamAccept).group(0).w[0]);
    if (!(__fmul_rn(u, Qd) < Pd)) first = first < j ? first : j;
  }
  const int m = block_allreduce1(first, OpMinI(), red_m, par_m);

  // ---- 2. row m: the residual race of a rejected draft, or the target's race on the bonus row
  const bool resid = m < wl;
  const T* prow = trow0 + m * p.t_sj;
  const T* qrow = resid ? drow0 + m * p.d_sj : nullptr;
  const RowRng rr(seed, pos + m, step, kStreamResid);
  const uint64_t best = block_allreduce1(row_race(prow, qrow, rr, V, flags), OpMaxU64(), red_u, par_u);
  flags = block_allreduce1(flags, OpOrI(), red_i, par_i);
  int64_t cand = race_winner(best);
  const bool zero = resid && cand < 0;
  if (zero) {
    // no residual mass (only rounding makes target - draft vanish where the draft was rejected):
    // the target's race with the same noise, a second pass over the row (block-uniform branch;
    // the values it reads were checked by the first pass)
    int unused = 0;
    cand = race_winner(block_allreduce1(row_race<T>(prow, nullptr, rr, V, unused), OpMaxU64(), red_u, par_u));
  }
  if (cand < 0) flags |= 1;  // the row m of the target has no positive entry
  const bool bad = flags != 0;

  // ---- 3. outputs
  if (tid == 0) {
    const int err = ((flags & 1) ? kErrNonfinite : 0) | ((flags & 2) ? kErrDraftRange : 0);
    if (err) atomicOr(p.status + kStatusErr, err);
    if (zero && !bad) atomicAdd(p.status + kStatusZeroResid, 1);
    p.num_accepted[b] = bad ? -1 : m;
  }
  for (int j = tid; j <= W; j += nth) {
    int64_t t = -1;
    if (!bad) t = j < m ? p.ids[b * W + j] : (j == m ? cand : -1);
    p.tokens[b * (W + 1) + j] = t;
  }
}

template <typename T>
void launch(const Params& p, int B, int threads, cudaStream_t st) {
  if (threads == 0) {
    // about 4 lane groups (16 lanes) per thread over the row m, 64 to 1024 threads: a request's
    // row is one block's work, so at small batches the block's width is the parallelism
    threads = ((p.V + 15) / 16 + 31) / 32 * 32;
    threads = threads < 64 ? 64 : (threads > kMaxThreads ? kMaxThreads : threads);
  }
  SJD_LAUNCH(verify_chain_kernel<T>, B, threads, 0, st)(p);
  SJD_CHECK_LAUNCH("verify_chain_kernel");
}

}  // namespace

void verify_chain_launch(const VerifyChainArgs& a) {
  SJD_REQUIRE(a.dtype == kF32 || a.dtype == kF16 || a.dtype == kBF16, "verify_chain: dtype code must be 0, 1 or 2");
  SJD_REQUIRE(a.B >= 1 && a.B <= 2147483647, "verify_chain: B must be >= 1");
  SJD_REQUIRE(a.W >= 0 && a.V >= 1, "verify_chain: need W >= 0 and V >= 1");
  SJD_REQUIRE(a.target && (a.draft || a.W == 0) && (a.ids || a.W == 0) && a.win_len && a.pos && a.seed && a.step &&
                  a.status && a.num_accepted && a.tokens,
              "verify_chain: a required pointer is null");
  SJD_REQUIRE(a.threads == 0 || (a.threads >= 32 && a.threads <= kMaxThreads && a.threads % 32 == 0),
              "verify_chain: threads must be 0 (automatic) or a multiple of 32 in [32, 1024], got " +
                  std::to_string(a.threads));
  require_device(a.device, "verify_chain");
  Params p{};
  p.target = a.target;
  p.t_sb = a.target_sb;
  p.t_sj = a.target_sj;
  p.draft = a.draft;
  p.d_sb = a.draft_sb;
  p.d_sj = a.draft_sj;
  p.ids = a.ids;
  p.win_len = a.win_len;
  p.pos = a.pos;
  p.seed = a.seed;
  p.step = a.step;
  p.status = a.status;
  p.W = a.W;
  p.V = a.V;
  p.num_accepted = a.num_accepted;
  p.tokens = a.tokens;
  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kF32: launch<float>(p, a.B, a.threads, st); break;
    case kF16: launch<__half>(p, a.B, a.threads, st); break;
    default: launch<__nv_bfloat16>(p, a.B, a.threads, st); break;
  }
}

}  // namespace sjd
