// jacobi_step: the fused step after the LM head, CUDA version of sjd_kernels/reference/jacobi_step.py.
//
// Two launches on the caller's stream, no host synchronisation (CUDA-graph capturable):
//   rows   grid (B, W+1): one block per used row j <= win_len[b]. The row's target law P is built
//          in shared memory (CFG, 1/T, top-k threshold by a 7-pivot search over order-preserving
//          keys, softmax, top-p threshold by the same search over probability bits, or the greedy
//          one-hot), then one fused pass over the vocabulary runs every exponential race the row
//          needs (residual or bonus, fresh draft, coupling redraw, Gumbel) and writes the row's new
//          state. Per-row results go to scratch. Optional paths with the same results (Feature in
//          jacobi_step.h, timed against the default): the bracket top-k selection (target.cuh), the
//          races over a shared-memory list of the lanes with P > 0 followed by a write-only pass, and
//          the hist_topk path (target.cuh): top-k by a histogram, then the softmax, top-p, VP
//          normaliser, races and state writes over the list of kept lanes.
//   commit grid (B): first rejection m, committed tokens, next drafts, tail initialisation and
//          tail q_kind, error outputs.
// Sparse state (q_idx != null): a slot holds C ascending lane ids with the values of Qt (q_state)
// and P (p_prev); lanes are looked up by binary search, and the new entries are an ordered block-wide
// compaction of the lanes with P > 0 written after every read of the slot (see DESIGN.md).
// Every float operation is rounded as the reference rounds it on CUDA: nvcc runs with
// --fmad=false, division by the temperature is a multiply by its float reciprocal (what PyTorch
// does for a tensor / Python-scalar division on CUDA), and torch.pow's special exponents are
// mirrored. Sums are taken in a different order than torch's reductions, so probabilities may
// differ in the last bit; samples then differ only when two race keys are that close (rare).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "jacobi_step.h"
#include "rng.cuh"
#include "row_smem.cuh"
#include "sampling.cuh"
#include "state.cuh"
#include "target.cuh"

namespace sjd {
namespace {

// Constants of sjd_kernels/reference/jacobi_step.py (the state codes: state.cuh).
constexpr int kModeSjd = 0, kModeCoupling = 1, kModeGumbel = 2, kModeGumbelJacobi = 3;
constexpr int kVpAdd = 0, kVpLog = 1;
constexpr int kTailUniform = 0, kTailLeft = 1;

// torch.pow(tensor, python_float) on CUDA special-cases these exponents (a copy for 1, sqrt, rsqrt,
// reciprocal, x*x, x*x*x, 1/(x*x) in double); the log-form VP mirrors them so rounding agrees.
enum PowCode : int { kPowGeneric = 0, kPowOne, kPowSqrt, kPowRsqrt, kPowRecip, kPowSquare, kPowCube, kPowInvSquare };

// Per-row scratch layout ([B, W+1, 4] int64).
constexpr int kScAccept = 0, kScCand = 1, kScNew = 2, kScBad = 3;

constexpr int kMaxThreads = 1024;
constexpr int kListMax = 2048;  // lanes a row may list for kFeatListRaces (more: the dense races)

struct Params {
  const void* logits;
  int64_t l_sb, l_sj;
  const void* uncond;
  int64_t u_sb, u_sj;
  const float* cfg_scale;
  const int64_t* drafts;
  const int64_t* win_len;
  const int64_t* pos;
  const int64_t* seed;
  const int64_t* step;
  const int64_t* forced;
  int64_t forced_len;
  float* q_state;
  int32_t* q_kind;
  float* p_prev;
  int32_t* q_idx;  // sparse form: [B, R, C] ascending lane ids; null: dense rows of V
  int C;
  int32_t* status;
  int B, W, V, R;
  int greedy;
  float inv_temperature;
  int top_k;
  int use_top_p;
  float top_p;
  int features;
  int mode;
  int use_vp;
  int has_prev;
  float beta;
  int vp_form;
  float vp_eps;
  int pow_code;
  float pow_exp;
  int tail_init;
  float inv_v;
  int64_t* num_accepted;
  int64_t* tokens;
  int64_t* next_drafts;
  int64_t* scratch;
  float* rowbuf;
};

__device__ __forceinline__ int64_t forced_at(const Params& p, int b, int64_t position) {
  return forced_token(p.forced, p.forced_len, b, position);
}

__device__ __forceinline__ int64_t slot_of(int64_t position, int R) {
  const int64_t s = position % R;
  return s < 0 ? s + R : s;
}

__device__ __forceinline__ float pow_scalar(float x, int code, float e) {
  switch (code) {
    case kPowOne: return x;
    case kPowSqrt: return __fsqrt_rn(x);
    case kPowRsqrt: return rsqrtf(x);
    case kPowRecip: return __fdiv_rn(1.0f, x);
    case kPowSquare: return __fmul_rn(x, x);
    case kPowCube: return __fmul_rn(__fmul_rn(x, x), x);
    case kPowInvSquare: return __double2float_rn(__ddiv_rn(1.0, static_cast<double>(__fmul_rn(x, x))));
    default: return powf(x, e);
  }
}

// Unnormalised predicted target of one lane (reference vp_predict before the division by the sum).
__device__ __forceinline__ float vp_weight(const Params& p, float P, float pp) {
  if (p.vp_form == kVpAdd) {
    const float w = __fadd_rn(P, __fmul_rn(p.beta, __fsub_rn(P, pp)));
    return w < 0.0f ? 0.0f : w;  // torch.clamp(min=0) keeps NaN
  }
  const float r = __fdiv_rn(__fadd_rn(P, p.vp_eps), __fadd_rn(pp, p.vp_eps));
  return __fmul_rn(P, pow_scalar(r, p.pow_code, p.pow_exp));
}

// Word e (0..3) of a Philox group, by selects (an indexed read would put the group in local memory).
__device__ __forceinline__ uint32_t philox_word(const Philox4& w, uint32_t e) {
  const uint32_t lo = (e & 1u) ? w.w[1] : w.w[0];
  const uint32_t hi = (e & 1u) ? w.w[3] : w.w[2];
  return (e & 2u) ? hi : lo;
}

// Entry of ``key`` among the C ascending ids of a sparse slot, -1 when absent (binary search).
__device__ __forceinline__ int sparse_find(const int32_t* __restrict__ idx, int C, int64_t key) {
  int lo = 0, hi = C;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(idx[mid]) < key) lo = mid + 1;
    else hi = mid;
  }
  return lo < C && static_cast<int64_t>(idx[lo]) == key ? lo : -1;
}

// kGlobalRows: the row lives in p.rowbuf (V above shared memory); otherwise in dynamic shared memory,
// and the instantiation lets the compiler see it (shared loads, stores and atomics, not generic ones).
template <typename T, bool kGlobalRows>
__global__ void __launch_bounds__(kMaxThreads) jacobi_rows_kernel(const Params p) {
  SJD_DYNAMIC_SMEM(unsigned char, smem_dyn);
  __shared__ uint64_t red_u64_1[2 * kMaxWarps];
  __shared__ uint64_t red_u64_6[2 * kMaxWarps * 6];
  __shared__ float red_f[2 * kMaxWarps];
  __shared__ int red_i[2 * kMaxWarps];
  __shared__ int red_i7[2 * kMaxWarps * kPivots];
  __shared__ float red_f7[2 * kMaxWarps * kPivots];
  __shared__ int scan_buf[kMaxWarps + 1];
  __shared__ uint32_t cand[kCandMax];
  __shared__ uint32_t cand_n[2];
  __shared__ int lane_list[kListMax];  // kFeatListRaces: lanes with P > 0
  __shared__ int list_n;
  int par_u1 = 0, par_u6 = 0, par_f = 0, par_i = 0, par_i7 = 0, par_f7 = 0;

  const int b = blockIdx.x;  // requests on grid x (grid y stops at 65535)
  const int j = blockIdx.y;
  const int W = p.W, V = p.V;
  const int tid = threadIdx.x, nth = blockDim.x;
  const int64_t wl64 = p.win_len[b];
  const int wl = static_cast<int>(wl64 < 0 ? 0 : (wl64 > W ? W : wl64));
  if (j > wl) return;  // padding rows are not read at all

  const int64_t posj = p.pos[b] + j;
  const int64_t slot = slot_of(posj, p.R);
  const int64_t f = forced_at(p, b, posj);
  const bool is_forced = f >= 0;
  const bool is_draft = j < wl;
  const int64_t D = j < W ? p.drafts[static_cast<int64_t>(b) * W + j] : 0;
  const bool in_range = D >= 0 && D < V;
  const int kind_all = p.q_kind[static_cast<int64_t>(b) * p.R + slot];
  const int kind = kind_all & kKindMask;
  const bool sparse = p.q_idx != nullptr;
  const int64_t row_off = (static_cast<int64_t>(b) * p.R + slot) * (sparse ? p.C : V);
  float* __restrict__ qrow = p.q_state + row_off;
  float* __restrict__ prow = p.has_prev ? p.p_prev + row_off : nullptr;
  int32_t* __restrict__ irow = sparse ? p.q_idx + row_off : nullptr;
  const int64_t seed = p.seed[b], step = p.step[b];
  float* S = kGlobalRows ? p.rowbuf + (static_cast<int64_t>(b) * (W + 1) + j) * V : reinterpret_cast<float*>(smem_dyn);

  // ---- 1-2. target law P in S (shared pipeline of target.cuh; a bad row's P is all zeros)
  const T* crow = static_cast<const T*>(p.logits) + b * p.l_sb + j * p.l_sj;
  const T* urow = p.uncond ? static_cast<const T*>(p.uncond) + b * p.u_sb + j * p.u_sj : nullptr;
  const float cfg = urow ? p.cfg_scale[b] : 0.0f;
  const TargetLaw law{p.greedy, p.inv_temperature, p.top_k, p.use_top_p, p.top_p,
                      (p.features & kFeatBracketTopk) ? kTopkBracket : kTopkPivots,
                      (!kGlobalRows && (p.features & kFeatHistTopk)) ? 1 : 0};  // never set with global rows
  TargetRed red{red_u64_1, par_u1, red_f, par_f, red_i, par_i, red_i7, par_i7, red_f7, par_f7, cand, cand_n};
  // kFeatHistTopk: its buffers follow the row in dynamic shared memory (the launcher sets the bit
  // only for rows in shared memory and sizes the allocation for them)
  const HistBufs hb = hist_bufs_after_row(smem_dyn, V);
  int hist_n = -1;  // the list's length when the hist_topk path built P
  const bool bad = target_row<T>(crow, urow, cfg, V, law, S, red, hb, &hist_n);
  __syncthreads();  // P complete and visible to every thread

  // ---- 3. row scalars: verification of the draft, coupling decision
  const bool row_bad = bad && !is_forced;
  const bool draft_bad = is_draft && !in_range && !(is_forced && D == f);
  const bool gj = p.mode == kModeGumbelJacobi;
  const bool gum = gj || p.mode == kModeGumbel;
  const float Pd = in_range ? S[D] : 0.0f;
  // Stored law of a dense-kind slot at lane i (sparse: the entry with id i, else 0).
  auto qstored = [&](int64_t i) -> float {
    if (!sparse) return qrow[i];
    const int e = sparse_find(irow, p.C, i);
    return e >= 0 ? qrow[e] : 0.0f;
  };
  // Previous target row at lane i. Sparse slots keep only lanes where that row was positive; lanes
  // where this row's P is 0 get no VP weight either way (additive form with beta >= 0: the clamp;
  // log form: P times a finite power), so they skip the search.
  auto pp_of = [&](int64_t i, float P) -> float {
    if (!sparse) return prow[i];
    if (!(P > 0.0f)) return 0.0f;
    const int e = sparse_find(irow, p.C, i);
    return e >= 0 ? prow[e] : 0.0f;
  };
  float Qd = 0.0f;
  if (in_range) Qd = kind == kKindDense ? qstored(D) : (kind == kKindUniform ? p.inv_v : 1.0f);
  const float u_acc = uniform24(RowRng(seed, posj, step, kStreamAccept).group(0).w[0]);
  const bool accept0 = __fmul_rn(u_acc, Qd) < Pd;
  const bool live = !row_bad && !is_forced;
  // Only a draft row's slot holds this position's previous row; the bonus slot's row is stale and
  // the bonus draws from Qt = P.
  const bool use_vp_row = p.use_vp && (kind_all & kFlagPrev) != 0 && is_draft && j >= 1 && !row_bad;

  // Passes that only matter where P > 0 run over the hist_topk list when there is one (it holds every
  // such lane, ascending): entries t < n_src, lane lane_at(t).
  const int n_src = hist_n >= 0 ? hist_n : V;
  auto lane_at = [&](int t) -> int { return hist_n >= 0 ? hb.ids[t] : t; };
  // The VP weight is zero where P is, except in the additive form with beta < 0.
  const bool vp_zero_off_support = !(p.vp_form == kVpAdd && !(p.beta >= 0.0f));
  const bool vp_on_list = hist_n >= 0 && vp_zero_off_support;

  float vp_sum = 0.0f;
  if (use_vp_row) {
    float s = 0.0f;
    if (vp_on_list) {
      for (int t = tid; t < n_src; t += nth) {
        const int i = lane_at(t);
        s = __fadd_rn(s, vp_weight(p, S[i], pp_of(i, S[i])));
      }
    } else {
      for (int i = tid; i < V; i += nth) s = __fadd_rn(s, vp_weight(p, S[i], pp_of(i, S[i])));
    }
    vp_sum = block_allreduce1(s, OpSumF(), red_f, par_f);
  }
  // Sparse state: a row whose support does not fit the slot drafts this position uniformly.
  bool ovf = false;
  int n_sup = 0;
  if (sparse && j >= 1 && !is_forced && !row_bad) {
    int c = 0;
    for (int t = tid; t < n_src; t += nth) c += S[lane_at(t)] > 0.0f ? 1 : 0;
    n_sup = block_allreduce1(c, OpSumI(), red_i, par_i);
    ovf = n_sup > p.C;
  }
  // Qt of lane i (the law new drafts are drawn from and the state stores).
  auto qt_of = [&](int64_t i, float P) -> float {
    if (ovf) return p.inv_v;
    if (!use_vp_row) return P;
    // no positive finite sum (all zero, or an overflow): P itself, as the reference
    return vp_sum > 0.0f && vp_sum <= 3.402823466e+38f ? __fdiv_rn(vp_weight(p, P, pp_of(i, P)), vp_sum) : P;
  };
  auto qold_of = [&](int64_t i) -> float {
    return kind == kKindDense ? qstored(i) : (kind == kKindUniform ? p.inv_v : (i == D ? 1.0f : 0.0f));
  };

  bool keep = false;
  if (p.mode == kModeCoupling && live && is_draft && j >= 1) {
    const float qt_d = in_range ? qt_of(D, Pd) : 0.0f;
    const float u_c = uniform24(RowRng(seed, posj, step, kStreamCouple).group(0).w[0]);
    keep = __fmul_rn(u_c, Qd) < qt_d;
  }

  const bool need_g = live && (gj || (gum && j >= 1));
  const bool need_resid = live && !gj && is_draft && !accept0;
  const bool need_bonus = live && !gj && !is_draft;
  const bool need_draft =
      live && j >= 1 && (p.mode == kModeSjd || (p.mode == kModeCoupling && !is_draft) || (gum && ovf));
  const bool need_couple = live && p.mode == kModeCoupling && is_draft && j >= 1 && !keep;
  const bool write_state = j >= 1 && !row_bad && !draft_bad;
  const bool need_qold = need_resid || need_couple;
  const bool need_qt = need_draft || need_couple || write_state;

  // Every thread has read qrow[D], prow[D] and q_kind above before any lane of the row is rewritten.
  __syncthreads();

  // ---- 4. one pass over the vocabulary: all races of the row, and the state write
  // k[0] residual max(0, P - Qold) or, on the bonus row, k[1] P (RESID noise), k[2] Qt (DRAFT),
  // k[3] max(0, Qt - Qold), k[4] Qt (both COUPLE_RES), k[5] P (GUMBEL, step 0)
  uint64_t k[6] = {0ull, 0ull, 0ull, 0ull, 0ull, 0ull};
  const bool any_race = need_g || need_resid || need_bonus || need_draft || need_couple;
  // kFeatListRaces: every race weight is zero where P is (residual, bonus and Gumbel race over P;
  // the draft and coupling races over Qt, which is P, a VP weight of P in log form or in additive
  // form with beta >= 0, never the uniform law of an overflowing sparse row), so the races may run
  // over the lanes with P > 0 alone: one Philox call per listed lane instead of one per group of 4
  // lanes of the whole row (all of whose groups draw when a warp holds one lane with P > 0).
  bool listed = false;
  if ((p.features & kFeatListRaces) && any_race && !ovf &&
      (!use_vp_row || vp_zero_off_support)) {
    const int lane = tid & 31;
    if (tid == 0) list_n = 0;
    __syncthreads();
    for (int base = 0; base < n_src; base += nth) {  // block-uniform trip count: the ballot sees whole warps
      const int t = base + tid;
      const int i = t < n_src ? lane_at(t) : 0;
      const bool has_p = t < n_src && S[i] > 0.0f;
      const unsigned bal = __ballot_sync(0xffffffffu, has_p);
      int at = 0;
      if (lane == 0 && bal != 0u) at = atomicAdd(&list_n, __popc(bal));
      at = __shfl_sync(0xffffffffu, at, 0) + __popc(bal & ((1u << lane) - 1u));
      if (has_p && at < kListMax) lane_list[at] = i;
    }
    __syncthreads();
    const int nl = list_n;
    listed = nl <= kListMax;
    if (listed) {
      const RowRng r_res(seed, posj, step, kStreamResid);
      const RowRng r_dr(seed, posj, step, kStreamDraft);
      const RowRng r_cr(seed, posj, step, kStreamCoupleRes);
      const RowRng r_g(seed, posj, 0, kStreamGumbel);
      for (int t = tid; t < nl; t += nth) {
        const int i = lane_list[t];
        const uint32_t g = static_cast<uint32_t>(i) >> 2, e = static_cast<uint32_t>(i) & 3u;
        const float P = S[i];
        const float Qt = need_qt ? qt_of(i, P) : 0.0f;
        const float Qo = need_qold ? qold_of(i) : 0.0f;
        if (need_resid || need_bonus) {
          const float E = exponential(philox_word(r_res.group(g), e));
          if (need_resid) k[0] = umax64(k[0], race_pack(__fsub_rn(P, Qo), E, i));
          else k[1] = umax64(k[1], race_pack(P, E, i));
        }
        if (need_draft && Qt > 0.0f)
          k[2] = umax64(k[2], race_pack(Qt, exponential(philox_word(r_dr.group(g), e)), i));
        if (need_couple && Qt > 0.0f) {
          const float E = exponential(philox_word(r_cr.group(g), e));
          k[4] = umax64(k[4], race_pack(Qt, E, i));
          k[3] = umax64(k[3], race_pack(__fsub_rn(Qt, Qo), E, i));
        }
        if (need_g) k[5] = umax64(k[5], race_pack(P, exponential(philox_word(r_g.group(g), e)), i));
      }
      // its barrier also orders every read of the old row (qold_of, qt_of) before the writes below
      block_allreduce<6>(k, OpMaxU64(), red_u64_6, par_u6);
      if (write_state && !sparse && hist_n >= 0) {
        // P is zero off the hist_topk list, and so is Qt (P or a VP weight of P on this path): the
        // listed lanes' Qt first (its VP weight reads their old p_prev), then zeros in 16-byte
        // stores, then the listed values. P stays in S, so hb.vals takes Qt.
        for (int t = tid; t < hist_n; t += nth) hb.vals[t] = qt_of(hb.ids[t], S[hb.ids[t]]);
        __syncthreads();  // every read of the old row is done
        zero_row(qrow, V);
        if (prow) zero_row(prow, V);
        __syncthreads();  // the zeros before the listed values at the same addresses
        for (int t = tid; t < hist_n; t += nth) {
          const int i = hb.ids[t];
          qrow[i] = hb.vals[t];
          if (prow) prow[i] = S[i];
        }
      } else if (write_state && !sparse) {
        for (int i = tid; i < V; i += nth) {  // this thread reads lane i's old p_prev (VP) before writing it
          const float P = S[i];
          qrow[i] = qt_of(i, P);
          if (prow) prow[i] = P;
        }
      }
    }
  }
  if (!listed && (any_race || write_state)) {
    const RowRng r_res(seed, posj, step, kStreamResid);
    const RowRng r_dr(seed, posj, step, kStreamDraft);
    const RowRng r_cr(seed, posj, step, kStreamCoupleRes);
    const RowRng r_g(seed, posj, 0, kStreamGumbel);
    const int ngroups = (V + 3) >> 2;
    for (int g = tid; g < ngroups; g += nth) {
      float P4[4], Qo4[4], Qt4[4];
      bool anyP = false, anyQt = false;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 4 * g + e;
        const bool ok = i < V;
        P4[e] = ok ? S[i] : 0.0f;
        Qt4[e] = (ok && need_qt) ? qt_of(i, P4[e]) : 0.0f;
        // the residual race reads lanes with P > 0, the coupling redraw lanes with Qt > 0
        Qo4[e] = (ok && need_qold && (P4[e] > 0.0f || Qt4[e] > 0.0f)) ? qold_of(i) : 0.0f;
        anyP |= P4[e] > 0.0f;
        anyQt |= Qt4[e] > 0.0f;
      }
      // Lanes with zero weight never win, so groups without weight skip the Philox rounds.
      if ((need_resid || need_bonus) && anyP) {
        const Philox4 w = r_res.group(g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!(P4[e] > 0.0f)) continue;
          const uint32_t i = 4u * g + e;
          const float E = exponential(w.w[e]);
          if (need_resid) k[0] = umax64(k[0], race_pack(__fsub_rn(P4[e], Qo4[e]), E, i));
          else k[1] = umax64(k[1], race_pack(P4[e], E, i));
        }
      }
      if (need_draft && anyQt) {
        const Philox4 w = r_dr.group(g);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (Qt4[e] > 0.0f) k[2] = umax64(k[2], race_pack(Qt4[e], exponential(w.w[e]), 4u * g + e));
      }
      if (need_couple && anyQt) {
        const Philox4 w = r_cr.group(g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!(Qt4[e] > 0.0f)) continue;
          const uint32_t i = 4u * g + e;
          const float E = exponential(w.w[e]);
          k[4] = umax64(k[4], race_pack(Qt4[e], E, i));
          k[3] = umax64(k[3], race_pack(__fsub_rn(Qt4[e], Qo4[e]), E, i));
        }
      }
      if (need_g && anyP) {
        const Philox4 w = r_g.group(g);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (P4[e] > 0.0f) k[5] = umax64(k[5], race_pack(P4[e], exponential(w.w[e]), 4u * g + e));
      }
      if (write_state && !sparse) {
        // Same thread, same lanes as the reads above: the row is read before it is overwritten.
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * g + e;
          if (i < V) {
            qrow[i] = Qt4[e];
            if (prow) prow[i] = P4[e];
          }
        }
      }
    }
    block_allreduce<6>(k, OpMaxU64(), red_u64_6, par_u6);
  }
  if (sparse && write_state && !is_forced && !ovf) {
    // Ordered compaction of the support (lanes with P > 0) into the slot. Every read of the old
    // entries (qstored, pp_of) is finished block-wide before the pass that overwrites them: first
    // the Qt values (which still search the old ids and p_prev), then the ids and P.
    __syncthreads();
    for (int pass = 0; pass < 2; ++pass) {
      int base_out = 0;
      for (int base = 0; base < n_src; base += 4 * nth) {  // entries of the list (or lanes), ascending
        const int t0 = base + 4 * tid;
        float P4[4];
        int L4[4];
        int c = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          L4[e] = t0 + e < n_src ? lane_at(t0 + e) : 0;
          P4[e] = t0 + e < n_src ? S[L4[e]] : 0.0f;
          c += P4[e] > 0.0f ? 1 : 0;
        }
        int total = 0;
        int at = base_out + block_exclusive_scan(c, scan_buf, total);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!(P4[e] > 0.0f)) continue;
          if (pass == 0) {
            qrow[at] = qt_of(L4[e], P4[e]);
          } else {
            irow[at] = L4[e];
            if (prow) prow[at] = P4[e];
          }
          ++at;
        }
        base_out += total;
      }
      __syncthreads();
    }
    for (int c = n_sup + tid; c < p.C; c += nth) {
      irow[c] = kIdxPad;
      qrow[c] = 0.0f;
      if (prow) prow[c] = 0.0f;
    }
  }
  if (need_resid && k[0] == 0ull) {
    // Zero residual mass (rounding only, or an adversarial stored law): race over P with the same
    // RESID noise. Rare, so it is a second pass rather than a third key in every race above.
    const RowRng r_res(seed, posj, step, kStreamResid);
    uint64_t kp = 0ull;
    for (int g = tid; g < (V + 3) >> 2; g += nth) {
      float P4[4];
      bool anyP = false;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        P4[e] = 4 * g + e < V ? S[4 * g + e] : 0.0f;
        anyP |= P4[e] > 0.0f;
      }
      if (!anyP) continue;
      const Philox4 w = r_res.group(g);
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (P4[e] > 0.0f) kp = umax64(kp, race_pack(P4[e], exponential(w.w[e]), 4u * g + e));
    }
    k[1] = block_allreduce1(kp, OpMaxU64(), red_u64_1, par_u1);
  }

  // ---- 5. the row's outcome
  if (tid == 0) {
    const int64_t g = race_winner(k[5]);
    bool accept = accept0;
    int64_t cand = -1, nd = -1;
    if (gj) {
      accept = D == g;
      cand = g;
    } else if (need_resid) {
      cand = race_winner(k[0]);
      if (cand < 0) {  // zero residual mass: only rounding can cause it; draw from P and count it
        atomicAdd(p.status + kStatusZeroResid, 1);
        cand = race_winner(k[1]);
      }
    } else if (need_bonus) {
      cand = race_winner(k[1]);
    }
    if (is_forced) {
      accept = D == f;
      cand = f;
    }
    if (j >= 1) {
      if (is_forced) {
        nd = f;
      } else if (gum) {
        nd = ovf ? race_winner(k[2]) : g;
      } else if (p.mode == kModeSjd || !is_draft) {
        nd = race_winner(k[2]);
      } else if (keep) {
        nd = D;
      } else if (need_couple) {
        nd = race_winner(k[3]);
        if (nd < 0) {
          atomicAdd(p.status + kStatusZeroCouple, 1);
          nd = race_winner(k[4]);
        }
      }
    }
    const int badbits = (row_bad ? kErrNonfinite : 0) | (draft_bad ? kErrDraftRange : 0);
    if (badbits) atomicOr(p.status + kStatusErr, badbits);
    if (ovf) atomicAdd(p.status + kStatusOverflow, 1);
    int64_t* sc = p.scratch + (static_cast<int64_t>(b) * (W + 1) + j) * 4;
    sc[kScAccept] = accept ? 1 : 0;
    sc[kScCand] = cand;
    sc[kScNew] = nd;
    sc[kScBad] = badbits;
    if (write_state)
      p.q_kind[static_cast<int64_t>(b) * p.R + slot] =
          is_forced ? kKindOnehot : (ovf ? kKindUniform : (kKindDense | (p.has_prev ? kFlagPrev : 0)));
  }
}

__global__ void jacobi_commit_kernel(const Params p) {
  __shared__ int s_m, s_bad;
  const int b = blockIdx.x;
  const int W = p.W, tid = threadIdx.x, nth = blockDim.x;
  const int64_t wl64 = p.win_len[b];
  const int wl = static_cast<int>(wl64 < 0 ? 0 : (wl64 > W ? W : wl64));
  const int64_t* sc = p.scratch + static_cast<int64_t>(b) * (W + 1) * 4;
  if (tid == 0) {
    s_m = wl;
    s_bad = 0;
  }
  __syncthreads();
  for (int j = tid; j <= wl; j += nth) {
    if (j < wl && sc[j * 4 + kScAccept] == 0) atomicMin(&s_m, j);
    if (sc[j * 4 + kScBad] != 0) atomicOr(&s_bad, 1);
  }
  __syncthreads();
  const int m = s_m;
  const bool rb = s_bad != 0;
  const int64_t last = sc[m * 4 + kScCand];
  const int64_t pos = p.pos[b], seed = p.seed[b], step = p.step[b];
  if (tid == 0) p.num_accepted[b] = rb ? -1 : m;
  for (int j = tid; j <= W; j += nth) {
    int64_t t = j < m ? p.drafts[static_cast<int64_t>(b) * W + j] : (j == m ? last : -1);
    p.tokens[static_cast<int64_t>(b) * (W + 1) + j] = rb ? -1 : t;
  }
  for (int i = tid; i < W; i += nth) {
    const int64_t src = static_cast<int64_t>(m) + 1 + i;  // row feeding next_drafts[i]
    int64_t nd;
    if (src <= wl) {
      nd = sc[src * 4 + kScNew];
    } else {
      const int64_t tpos = pos + src;
      const int64_t ft = forced_at(p, b, tpos);
      if (ft >= 0) {
        nd = ft;
      } else if (p.tail_init == kTailUniform) {
        nd = uniform_token(seed, tpos, step, kStreamTail, p.V);
      } else {
        // Left neighbour: the nearest earlier entry that is a row draft or a forced tail token,
        // else the last committed token.
        nd = last;
        for (int k = i - 1; k >= 0; --k) {
          const int64_t sk = static_cast<int64_t>(m) + 1 + k;
          if (sk <= wl) {
            nd = sc[sk * 4 + kScNew];
            break;
          }
          const int64_t fk = forced_at(p, b, pos + sk);
          if (fk >= 0) {
            nd = fk;
            break;
          }
        }
      }
      // A left copy of an id outside [0, V) (a forced structural token) draws uniformly instead.
      bool uniform_law = ft < 0 && p.tail_init == kTailUniform;
      if (ft < 0 && p.tail_init != kTailUniform && (nd < 0 || nd >= p.V)) {
        nd = uniform_token(seed, tpos, step, kStreamTail, p.V);
        uniform_law = true;
      }
      if (!rb)
        p.q_kind[static_cast<int64_t>(b) * p.R + slot_of(tpos, p.R)] = uniform_law ? kKindUniform : kKindOnehot;
    }
    p.next_drafts[static_cast<int64_t>(b) * W + i] = rb ? -1 : nd;
  }
}

__global__ void philox_fill_kernel(uint32_t* out, int64_t n, int64_t seed, int64_t position, int64_t step,
                                   uint32_t stream) {
  const RowRng r(seed, position, step, stream);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; 4 * g < n;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 w = r.group(static_cast<uint32_t>(g));
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (4 * g + e < n) out[4 * g + e] = w.w[e];
  }
}

int pow_code_for(double beta, float* exp_out) {
  *exp_out = static_cast<float>(beta);
  if (beta == 1.0) return kPowOne;
  if (beta == 0.5) return kPowSqrt;
  if (beta == -0.5) return kPowRsqrt;
  if (beta == -1.0) return kPowRecip;
  const double d = static_cast<double>(static_cast<float>(beta));
  if (d == 2.0) return kPowSquare;
  if (d == 3.0) return kPowCube;
  if (d == -2.0) return kPowInvSquare;
  return kPowGeneric;
}

RowSmemCache g_rows;  // per-device shared-memory facts of jacobi_rows_kernel

template <typename T>
void launch_all(Params prm, int device, int dtype, cudaStream_t st) {
  const bool global_rows = prm.rowbuf != nullptr;
  const int threads = row_block_threads(prm.V, global_rows, kMaxThreads);
  int smem = global_rows ? 0 : prm.V * static_cast<int>(sizeof(float));
  // kFeatHistTopk applies to sampling rows with top-k, in shared memory, when its buffers fit beside
  // the row (about 6k lanes fewer than the row alone); otherwise the call takes the default path.
  if (prm.features & kFeatHistTopk) {
    const int hs = hist_topk_smem(global_rows, prm.greedy, prm.top_k, prm.V,
                                  g_rows.max_lanes(device, reinterpret_cast<const void*>(jacobi_rows_kernel<T, false>),
                                                   "jacobi_step"));
    if (hs > 0)
      smem = hs;
    else
      prm.features &= ~kFeatHistTopk;
  }
  if (!global_rows) g_rows.opt_in(device, dtype, reinterpret_cast<const void*>(jacobi_rows_kernel<T, false>), smem);
  const dim3 grid(static_cast<unsigned>(prm.B), static_cast<unsigned>(prm.W + 1));
  if (global_rows)
    SJD_LAUNCH((jacobi_rows_kernel<T, true>), grid, threads, smem, st)(prm);
  else
    SJD_LAUNCH((jacobi_rows_kernel<T, false>), grid, threads, smem, st)(prm);
  SJD_CHECK_LAUNCH("jacobi_rows_kernel");
  SJD_LAUNCH(jacobi_commit_kernel, prm.B, 128, 0, st)(prm);
  SJD_CHECK_LAUNCH("jacobi_commit_kernel");
}

}  // namespace

int jacobi_step_max_smem_lanes(int device) {
  return g_rows.max_lanes(device, reinterpret_cast<const void*>(jacobi_rows_kernel<float, false>),
                         "jacobi_step_max_smem_lanes");
}

void jacobi_step_launch(const JacobiStepArgs& a) {
  SJD_REQUIRE(a.dtype == kF32 || a.dtype == kF16 || a.dtype == kBF16, "jacobi_step: dtype code must be 0, 1 or 2");
  SJD_REQUIRE(a.B >= 1, "jacobi_step: B must be >= 1, got " + std::to_string(a.B));
  SJD_REQUIRE(a.W >= 0 && a.W + 1 <= 65535, "jacobi_step: W + 1 must be at most 65535 (grid y), got W = " +
                                                std::to_string(a.W));
  SJD_REQUIRE(a.V >= 1, "jacobi_step: V must be >= 1");
  SJD_REQUIRE(a.R >= a.W + 1, "jacobi_step: ring R must be >= W + 1");
  SJD_REQUIRE(a.top_k >= 0 && a.top_k <= a.V, "jacobi_step: top_k must be in [0, V]");
  SJD_REQUIRE((a.features & ~kFeatAll) == 0, "jacobi_step: features must be a mask of bits 1, 2 and 4, got " +
                                                 std::to_string(a.features));
  SJD_REQUIRE(temperature_ok(a.temperature), "jacobi_step: temperature must be 0 (greedy) or a positive float32 with a "
                                             "finite float32 reciprocal, got " + fmt_real(a.temperature));
  SJD_REQUIRE(a.top_p > 0.0 && a.top_p <= 1.0, "jacobi_step: top_p must be in (0, 1]");
  SJD_REQUIRE(a.mode >= kModeSjd && a.mode <= kModeGumbelJacobi, "jacobi_step: mode code must be 0..3");
  SJD_REQUIRE(a.vp_form == kVpAdd || a.vp_form == kVpLog, "jacobi_step: vp_form code must be 0 or 1");
  SJD_REQUIRE(a.tail_init == kTailUniform || a.tail_init == kTailLeft, "jacobi_step: tail_init code must be 0 or 1");
  SJD_REQUIRE(a.logits && (a.drafts || a.W == 0) && a.win_len && a.pos && a.seed && a.step && a.q_state && a.q_kind &&
                  a.status && a.num_accepted && a.tokens && a.scratch && (a.next_drafts || a.W == 0),
              "jacobi_step: a required pointer is null");
  SJD_REQUIRE(!a.uncond || a.cfg_scale, "jacobi_step: cfg_scale is required with uncond");
  SJD_REQUIRE(!a.forced || a.forced_len > 0, "jacobi_step: forced_len must be > 0 with forced");
  SJD_REQUIRE(!a.q_idx || a.C >= 1, "jacobi_step: C (sparse entries per slot) must be >= 1 with q_idx");
  require_device(a.device, "jacobi_step");
  SJD_REQUIRE(a.device < kMaxDevices, "device index above 63");
  if (!a.rowbuf)
    g_rows.require_fits(a.device, reinterpret_cast<const void*>(jacobi_rows_kernel<float, false>), a.V, "jacobi_step",
                        "[B, W+1, V]");

  Params p{};
  p.logits = a.logits;
  p.l_sb = a.logits_sb;
  p.l_sj = a.logits_sj;
  p.uncond = a.uncond;
  p.u_sb = a.uncond_sb;
  p.u_sj = a.uncond_sj;
  p.cfg_scale = a.cfg_scale;
  p.drafts = a.drafts;
  p.win_len = a.win_len;
  p.pos = a.pos;
  p.seed = a.seed;
  p.step = a.step;
  p.forced = a.forced;
  p.forced_len = a.forced ? a.forced_len : 0;
  p.q_state = a.q_state;
  p.q_kind = a.q_kind;
  p.p_prev = a.p_prev;
  p.q_idx = a.q_idx;
  p.C = a.q_idx ? a.C : 0;
  p.status = a.status;
  p.B = a.B;
  p.W = a.W;
  p.V = a.V;
  p.R = a.R;
  p.greedy = a.temperature == 0.0;
  // PyTorch computes tensor / python_float on CUDA as tensor * (1.0f / float(T)).
  p.inv_temperature = p.greedy ? 0.0f : 1.0f / static_cast<float>(a.temperature);
  p.top_k = a.top_k;
  p.use_top_p = static_cast<float>(a.top_p) < 1.0f;  // top_p is a float32: 0.99999999 rounds to 1, off
  p.top_p = static_cast<float>(a.top_p);
  p.features = a.features;
  p.mode = a.mode;
  p.has_prev = a.p_prev != nullptr;
  p.use_vp = p.has_prev && a.beta != 0.0 && (a.mode == kModeSjd || a.mode == kModeCoupling);
  p.beta = static_cast<float>(a.beta);
  p.vp_form = a.vp_form;
  p.vp_eps = static_cast<float>(a.vp_eps);
  p.pow_code = pow_code_for(a.beta, &p.pow_exp);
  p.tail_init = a.tail_init;
  p.inv_v = static_cast<float>(1.0 / static_cast<double>(a.V));
  p.num_accepted = a.num_accepted;
  p.tokens = a.tokens;
  p.next_drafts = a.next_drafts;
  p.scratch = a.scratch;
  p.rowbuf = a.rowbuf;

  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kF32: launch_all<float>(p, a.device, kF32, st); break;
    case kF16: launch_all<__half>(p, a.device, kF16, st); break;
    default: launch_all<__nv_bfloat16>(p, a.device, kBF16, st); break;
  }
}

void philox_fill_launch(uint32_t* out, int64_t n, int64_t seed, int64_t position, int64_t step, int64_t stream,
                        int device, void* cuda_stream) {
  SJD_REQUIRE(n >= 0, "philox_fill: n must be >= 0");
  require_device(device, "philox_fill");
  if (n == 0) return;
  SJD_REQUIRE(out != nullptr, "philox_fill: out is null");
  const int64_t groups = (n + 3) / 4;
  const int threads = 256;
  const int64_t blocks64 = (groups + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 4096 ? blocks64 : 4096);
  SJD_LAUNCH(philox_fill_kernel, blocks, threads, 0, static_cast<cudaStream_t>(cuda_stream))(
      out, n, seed, position, step, static_cast<uint32_t>(static_cast<uint64_t>(stream)));
  SJD_CHECK_LAUNCH("philox_fill_kernel");
}

}  // namespace sjd
