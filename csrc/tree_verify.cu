// tree_verify: recursive rejection sampling over a draft tree, CUDA version of
// sjd_kernels/reference/tree.py (tree_verify). Two launches on the caller's stream, no host
// synchronisation (CUDA-graph capturable):
//   rowcheck grid (N, B): the reference flags a request whose target row of ANY valid node (walked
//            or not) is non-finite at a position that is not forced, so every such row is read
//            once (target_row_bad, the shared definition) and a flag goes to scratch.
//   walk     grid (B): one block per request. Tree structure and draft ids are checked with
//            shared-memory counters; then the block walks from the root: the target row of the
//            current node goes to S (shared memory, or a global row for large V) with the shared
//            pipeline of target.cuh, children are tried in sibling order with the sibling law
//            q_k (q with the earlier siblings' tokens removed and renormalised; the removed tokens
//            are read from a 16-entry shared list, never materialised as a V-vector), acceptance
//            u_k * q_k(x) < p_k(x), on rejection S = norm(max(0, p_k - q_k)) (zero sum: keep p_k,
//            counted), descend into the accepted child; at the node where every child fails the
//            final token is the exponential race over S with STREAM_TREE_RESID noise.
// Rounding as the reference (nvcc --fmad=false, IEEE division); only the order of the float sums
// (softmax, sum(q_k), sum(r)) differs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "jacobi_step.h"
#include "rng.cuh"
#include "row_smem.cuh"
#include "sampling.cuh"
#include "state.cuh"
#include "target.cuh"
#include "tree_verify.h"

namespace sjd {
namespace {

// Constants of sjd_kernels/reference/tree.py (the state codes: state.cuh).
constexpr int kMaxSiblings = 16, kMaxNodes = 1024;
constexpr int kMaxThreads = 1024;
constexpr int kRowcheckThreads = 256;

struct Params {
  const void* logits;
  int64_t l_sb, l_sn;
  const void* uncond;
  int64_t u_sb, u_sn;
  const float* cfg_scale;
  const int64_t* tokens;
  const int64_t* parent;
  const int64_t* depth;
  const int64_t* sib;
  const int64_t* q_slot;
  const int64_t* pos;
  const int64_t* seed;
  const int64_t* step;
  const int64_t* forced;
  int64_t forced_len;
  const float* q_state;
  const int32_t* q_kind;
  int32_t* status;
  int B, N, V, R, max_depth;
  TargetLaw law;
  float inv_v;
  int64_t* num_accepted;
  int64_t* path;
  int64_t* out;
  int32_t* rowflag;
  float* rowbuf;
};

__device__ __forceinline__ int64_t forced_at(const Params& p, int64_t b, int64_t position) {
  return forced_token(p.forced, p.forced_len, b, position);
}

template <typename T>
__global__ void __launch_bounds__(kRowcheckThreads) tree_rowcheck_kernel(const Params p) {
  __shared__ int red_i[2 * kMaxWarps];
  __shared__ float red_f[2 * kMaxWarps];
  int par_i = 0, par_f = 0;
  const int64_t b = blockIdx.x, i = blockIdx.y;  // requests on grid x (grid y stops at 65535; N <= 1024)
  const int64_t at = b * p.N + i;
  const int64_t par = p.parent[at], dep = p.depth[at];
  const bool node = i == 0 || par >= 0;
  const int64_t f = forced_at(p, b, p.pos[b] + (dep > 0 ? dep : 0));
  if (!node || f >= 0) {  // block-uniform
    if (threadIdx.x == 0) p.rowflag[at] = 0;
    return;
  }
  const T* crow = static_cast<const T*>(p.logits) + b * p.l_sb + i * p.l_sn;
  const T* urow = p.uncond ? static_cast<const T*>(p.uncond) + b * p.u_sb + i * p.u_sn : nullptr;
  const float cfg = urow ? p.cfg_scale[b] : 0.0f;
  const bool greedy = p.law.greedy != 0;
  int flags = 0;
  float ymax = -INFINITY;
  for_each_logit<T>(crow, urow, p.V, [&](int, float c, float u) {
    const float x = urow ? cfg_combine(c, u, cfg) : c;
    const float y = greedy ? 0.0f : __fmul_rn(x, p.law.inv_temperature);
    flags |= target_logit_flags(x, y, greedy);
    ymax = fmaxf(ymax, y);
  });
  flags = block_allreduce1(flags, OpOrI(), red_i, par_i);
  ymax = block_allreduce1(ymax, OpMaxF(), red_f, par_f);
  if (threadIdx.x == 0) p.rowflag[at] = target_row_bad(flags, ymax, greedy) ? 1 : 0;
}

// kGlobalRows: the target row lives in p.rowbuf; otherwise in dynamic shared memory (the compiler
// then uses shared loads and stores), followed by the hist_topk path's buffers when p.law.hist.
template <typename T, bool kGlobalRows>
__global__ void __launch_bounds__(kMaxThreads) tree_verify_kernel(const Params p) {
  SJD_DYNAMIC_SMEM(unsigned char, smem_dyn);
  __shared__ uint64_t red_u64_1[2 * kMaxWarps];
  __shared__ float red_f[2 * kMaxWarps];
  __shared__ int red_i[2 * kMaxWarps];
  __shared__ int red_i7[2 * kMaxWarps * kPivots];
  __shared__ float red_f7[2 * kMaxWarps * kPivots];
  __shared__ int s_nch[kMaxNodes];             // children of each node
  __shared__ unsigned s_sibmask[kMaxNodes];    // sibling orders seen under each node (clamped to 0..16)
  __shared__ int s_kid[kMaxSiblings];          // children of the current node, by sibling order
  __shared__ int64_t s_ktok[kMaxSiblings];
  __shared__ uint32_t cand[kCandMax];
  __shared__ uint32_t cand_n[2];
  int par_u1 = 0, par_f = 0, par_i = 0, par_i7 = 0, par_f7 = 0;
  TargetRed red{red_u64_1, par_u1, red_f, par_f, red_i, par_i, red_i7, par_i7, red_f7, par_f7, cand, cand_n};

  const int64_t b = blockIdx.x;
  const int N = p.N, V = p.V, R = p.R;
  const int tid = threadIdx.x, nth = blockDim.x;
  const int64_t base = b * N;
  const int64_t L1 = static_cast<int64_t>(p.max_depth) + 1;
  const int64_t pos = p.pos[b];

  // ---- 1. errors: structure (reference structure_errors), draft ids, row flags of every node
  for (int i = tid; i < N; i += nth) {
    s_nch[i] = 0;
    s_sibmask[i] = 0u;
  }
  __syncthreads();
  int bad = 0;
  for (int i = tid; i < N; i += nth) {
    const int64_t par = p.parent[base + i], dep = p.depth[base + i];
    if (!(i == 0 || par >= 0)) continue;  // padding slot
    if (p.rowflag[base + i]) bad |= kErrNonfinite;
    if (dep > p.max_depth || dep < 0) bad |= kErrTreeIndex;
    if (i == 0) {
      if (par != -1 || dep != 0) bad |= kErrTreeIndex;
      continue;
    }
    const int64_t pc = par < N - 1 ? par : N - 1;
    const bool par_valid = pc == 0 || p.parent[base + pc] >= 0;
    const bool par_ok = par < i && par_valid;
    if (!(par_ok && dep == p.depth[base + pc] + 1)) bad |= kErrTreeIndex;
    const int64_t sb = p.sib[base + i];
    if (par_ok) {
      atomicAdd(&s_nch[pc], 1);
      const unsigned bit = 1u << static_cast<int>(sb < 0 ? 0 : (sb > kMaxSiblings ? kMaxSiblings : sb));
      if (atomicOr(&s_sibmask[pc], bit) & bit) bad |= kErrTreeIndex;  // two children with one order
      // a child's id outside [0, V) that is not the forced id of its position
      const int64_t tok = p.tokens[base + i];
      if (sb >= 0 && sb < kMaxSiblings && (tok < 0 || tok >= V)) {
        const int64_t dp = p.depth[base + pc];
        const int64_t fp = forced_at(p, b, pos + (dp > 0 ? dp : 0));
        if (!(fp >= 0 && tok == fp)) bad |= kErrDraftRange;
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < N; i += nth) {
    const int64_t par = p.parent[base + i];
    if (!(i == 0 || par >= 0)) continue;
    const int nch = s_nch[i];
    const int64_t qs = p.q_slot[base + i];
    if (nch > kMaxSiblings || (nch > 0 && (qs < 0 || qs >= R))) bad |= kErrTreeIndex;
    if (i > 0 && par < i && (par == 0 || p.parent[base + par] >= 0)) {
      const int64_t sb = p.sib[base + i];
      if (sb < 0 || sb >= s_nch[par]) bad |= kErrTreeIndex;
    }
  }
  bad = block_allreduce1(bad, OpOrI(), red.i, red.par_i);
  if (bad) {
    for (int64_t j = tid; j < L1; j += nth) {
      p.path[b * L1 + j] = -1;
      p.out[b * L1 + j] = -1;
    }
    if (tid == 0) {
      p.num_accepted[b] = -1;
      atomicOr(p.status + kStatusErr, bad);
    }
    return;
  }

  // ---- 2. the walk (every branch below is block-uniform)
  for (int64_t j = tid; j < L1; j += nth) {
    p.path[b * L1 + j] = j == 0 ? 0 : -1;
    p.out[b * L1 + j] = -1;
  }
  float* S = kGlobalRows ? p.rowbuf + b * static_cast<int64_t>(V) : reinterpret_cast<float*>(smem_dyn);
  const HistBufs hb = hist_bufs_after_row(smem_dyn, V);
  TargetLaw law = p.law;
  if (kGlobalRows) law.hist = 0;  // the launcher never sets it there; a constant drops the path's code
  const int64_t seed = p.seed[b], step = p.step[b];
  const T* lrow0 = static_cast<const T*>(p.logits) + b * p.l_sb;
  const T* urow0 = p.uncond ? static_cast<const T*>(p.uncond) + b * p.u_sb : nullptr;
  const float cfg = urow0 ? p.cfg_scale[b] : 0.0f;
  int64_t cur = 0;
  int64_t m = 0;
  int n_zero = 0;
  while (true) {
    const int64_t cpos = pos + m;  // cur is at depth m; its children's position
    const int64_t f = forced_at(p, b, cpos);
    if (tid < kMaxSiblings) s_kid[tid] = -1;
    __syncthreads();
    for (int i = tid + 1; i < N; i += nth) {
      if (p.parent[base + i] == cur) {  // a well-formed tree: sibling orders 0..n-1, n <= 16
        const int sb = static_cast<int>(p.sib[base + i]);
        s_kid[sb] = i;
        s_ktok[sb] = p.tokens[base + i];
      }
    }
    __syncthreads();
    int nk = 0;
    while (nk < kMaxSiblings && s_kid[nk] >= 0) ++nk;
    int64_t acc = -1, last = -1;
    if (f >= 0) {
      // forced position: the child equal to the forced id (first in sibling order), else the id itself
      for (int k = 0; k < nk; ++k)
        if (s_ktok[k] == f) {
          acc = s_kid[k];
          break;
        }
      last = f;
    } else {
      target_row<T>(lrow0 + cur * p.l_sn, urow0 ? urow0 + cur * p.u_sn : nullptr, cfg, V, law, S, red, hb);
      __syncthreads();  // S complete
      if (nk > 0) {
        const int64_t qs0 = p.q_slot[base + cur];
        const int64_t slot = qs0 < 0 ? 0 : (qs0 >= R ? R - 1 : qs0);
        const int kind = p.q_kind[b * R + slot] & kKindMask;
        const float* qrow = p.q_state + (b * R + slot) * V;
        const int64_t first = s_ktok[0];
        const float inv_v = p.inv_v;
        auto q_of = [&](int v) -> float {
          return kind == kKindDense ? qrow[v] : (kind == kKindUniform ? inv_v : (v == first ? 1.0f : 0.0f));
        };
        const RowRng racc(seed, cpos, step, kStreamTreeAccept);
        for (int k = 0; k < nk; ++k) {
          // q * keep_k, keep_k removing the tokens of siblings 0..k-1 (as the reference: q * 0.0 or q * 1.0)
          auto qm_of = [&](int v) -> float {
            bool kept = true;
            for (int r = 0; r < k; ++r) kept &= s_ktok[r] != v;
            return __fmul_rn(q_of(v), kept ? 1.0f : 0.0f);
          };
          float z = 0.0f;
          for (int v = tid; v < V; v += nth) z = __fadd_rn(z, qm_of(v));
          z = block_allreduce1(z, OpSumF(), red.f, red.par_f);
          auto qk_of = [&](int v) -> float { return z > 0.0f ? __fdiv_rn(qm_of(v), z) : 0.0f; };
          const int64_t x = s_ktok[k];
          const bool inr = x >= 0 && x < V;
          const float qx = inr ? qk_of(static_cast<int>(x)) : 0.0f;
          const float px = inr ? S[x] : 0.0f;
          if (!(qx > 0.0f)) continue;  // a token its law could not have produced: skipped
          const float u = uniform24(racc.group(static_cast<uint32_t>(k) >> 2).w[k & 3]);
          if (__fmul_rn(u, qx) < px) {
            acc = s_kid[k];
            break;
          }
          // rejected: p <- norm(max(0, p - q_k)); a zero sum (rounding only) keeps p and is counted
          auto r_of = [&](int v) -> float {
            const float d = __fsub_rn(S[v], qk_of(v));
            return d < 0.0f ? 0.0f : d;  // torch.clamp(min=0) keeps NaN
          };
          float zr = 0.0f;
          for (int v = tid; v < V; v += nth) zr = __fadd_rn(zr, r_of(v));
          zr = block_allreduce1(zr, OpSumF(), red.f, red.par_f);
          if (zr > 0.0f) {
            for (int v = tid; v < V; v += nth) S[v] = __fdiv_rn(r_of(v), zr);  // same thread, same lanes
            __syncthreads();
          } else {
            ++n_zero;
          }
        }
      }
      if (acc < 0) {
        const RowRng rres(seed, cpos, step, kStreamTreeResid);
        uint64_t kb = 0ull;
        for (int g = tid; g < (V + 3) >> 2; g += nth) {
          float P4[4];
          bool any = false;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            P4[e] = 4 * g + e < V ? S[4 * g + e] : 0.0f;
            any |= P4[e] > 0.0f;
          }
          if (!any) continue;  // zero-weight lanes never win: skip the Philox rounds
          const Philox4 w = rres.group(static_cast<uint32_t>(g));
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (P4[e] > 0.0f) kb = umax64(kb, race_pack(P4[e], exponential(w.w[e]), 4u * g + e));
        }
        kb = block_allreduce1(kb, OpMaxU64(), red.u64, red.par_u64);
        last = race_winner(kb);
      }
    }
    if (acc >= 0 && m < p.max_depth) {
      if (tid == 0) {
        p.out[b * L1 + m] = p.tokens[base + acc];
        p.path[b * L1 + m + 1] = acc;
      }
      ++m;
      cur = acc;
      __syncthreads();  // every thread has read s_kid / s_ktok before the next node rewrites them
    } else {
      if (tid == 0) p.out[b * L1 + m] = last;
      break;
    }
  }
  if (tid == 0) {
    p.num_accepted[b] = m;
    if (n_zero > 0) atomicAdd(p.status + kStatusZeroResid, n_zero);
  }
}

RowSmemCache g_rows;  // per-device shared-memory facts of tree_verify_kernel

template <typename T>
void launch_all(Params prm, int device, int dtype, cudaStream_t st) {
  const dim3 grid_check(static_cast<unsigned>(prm.B), static_cast<unsigned>(prm.N));
  SJD_LAUNCH(tree_rowcheck_kernel<T>, grid_check, kRowcheckThreads, 0, st)(prm);
  SJD_CHECK_LAUNCH("tree_rowcheck_kernel");
  const bool global_rows = prm.rowbuf != nullptr;
  int smem = global_rows ? 0 : prm.V * static_cast<int>(sizeof(float));
  // the hist_topk path as in jacobi_step's launcher: rows in shared memory with room for its buffers
  if (prm.law.hist) {
    const int hs = hist_topk_smem(global_rows, prm.law.greedy, prm.law.top_k, prm.V,
                                  g_rows.max_lanes(device, reinterpret_cast<const void*>(tree_verify_kernel<T, false>),
                                                   "tree_verify"));
    if (hs > 0)
      smem = hs;
    else
      prm.law.hist = 0;
  }
  const int threads = row_block_threads(prm.V, global_rows, kMaxThreads);
  if (global_rows) {
    SJD_LAUNCH((tree_verify_kernel<T, true>), prm.B, threads, smem, st)(prm);
  } else {
    g_rows.opt_in(device, dtype, reinterpret_cast<const void*>(tree_verify_kernel<T, false>), smem);
    SJD_LAUNCH((tree_verify_kernel<T, false>), prm.B, threads, smem, st)(prm);
  }
  SJD_CHECK_LAUNCH("tree_verify_kernel");
}

}  // namespace

int tree_verify_max_smem_lanes(int device) {
  return g_rows.max_lanes(device, reinterpret_cast<const void*>(tree_verify_kernel<float, false>),
                         "tree_verify_max_smem_lanes");
}

void tree_verify_launch(const TreeVerifyArgs& a) {
  SJD_REQUIRE(a.dtype == kF32 || a.dtype == kF16 || a.dtype == kBF16, "tree_verify: dtype code must be 0, 1 or 2");
  SJD_REQUIRE(a.B >= 1, "tree_verify: B must be >= 1, got " + std::to_string(a.B));
  SJD_REQUIRE(a.N >= 1 && a.N <= kMaxNodes, "tree_verify: N must be in [1, 1024], got " + std::to_string(a.N));
  SJD_REQUIRE(a.V >= 1, "tree_verify: V must be >= 1");
  SJD_REQUIRE(a.R >= 1, "tree_verify: ring R must be >= 1");
  SJD_REQUIRE((a.features & ~kFeatAll) == 0, "tree_verify: features must be a mask of bits 1, 2 and 4, got " +
                                                 std::to_string(a.features));
  SJD_REQUIRE(a.max_depth >= 0 && a.max_depth < a.N, "tree_verify: max_depth must be in [0, N-1]");
  SJD_REQUIRE(a.top_k >= 0 && a.top_k <= a.V, "tree_verify: top_k must be in [0, V]");
  SJD_REQUIRE(temperature_ok(a.temperature), "tree_verify: temperature must be 0 (greedy) or a positive float32 with a "
                                             "finite float32 reciprocal, got " + fmt_real(a.temperature));
  SJD_REQUIRE(a.top_p > 0.0 && a.top_p <= 1.0, "tree_verify: top_p must be in (0, 1]");
  SJD_REQUIRE(a.logits && a.tokens && a.parent && a.depth && a.sib && a.q_slot && a.pos && a.seed && a.step &&
                  a.q_state && a.q_kind && a.status && a.num_accepted && a.path && a.out_tokens && a.rowflag,
              "tree_verify: a required pointer is null");
  SJD_REQUIRE(!a.uncond || a.cfg_scale, "tree_verify: cfg_scale is required with uncond");
  SJD_REQUIRE(!a.forced || a.forced_len > 0, "tree_verify: forced_len must be > 0 with forced");
  require_device(a.device, "tree_verify");
  SJD_REQUIRE(a.device < kMaxDevices, "device index above 63");
  if (!a.rowbuf)
    g_rows.require_fits(a.device, reinterpret_cast<const void*>(tree_verify_kernel<float, false>), a.V, "tree_verify",
                        "[B, V]");
  Params p{};
  p.logits = a.logits;
  p.l_sb = a.logits_sb;
  p.l_sn = a.logits_sn;
  p.uncond = a.uncond;
  p.u_sb = a.uncond_sb;
  p.u_sn = a.uncond_sn;
  p.cfg_scale = a.cfg_scale;
  p.tokens = a.tokens;
  p.parent = a.parent;
  p.depth = a.depth;
  p.sib = a.sib;
  p.q_slot = a.q_slot;
  p.pos = a.pos;
  p.seed = a.seed;
  p.step = a.step;
  p.forced = a.forced;
  p.forced_len = a.forced ? a.forced_len : 0;
  p.q_state = a.q_state;
  p.q_kind = a.q_kind;
  p.status = a.status;
  p.B = a.B;
  p.N = a.N;
  p.V = a.V;
  p.R = a.R;
  p.max_depth = a.max_depth;
  p.law.greedy = a.temperature == 0.0;
  // PyTorch computes tensor / python_float on CUDA as tensor * (1.0f / float(T)).
  p.law.inv_temperature = p.law.greedy ? 0.0f : 1.0f / static_cast<float>(a.temperature);
  p.law.top_k = a.top_k;
  p.law.use_top_p = static_cast<float>(a.top_p) < 1.0f;  // top_p is a float32: 0.99999999 rounds to 1, off
  p.law.top_p = static_cast<float>(a.top_p);
  p.law.topk_select = (a.features & kFeatBracketTopk) ? kTopkBracket : kTopkPivots;
  p.law.hist = (a.features & kFeatHistTopk) ? 1 : 0;
  p.inv_v = static_cast<float>(1.0 / static_cast<double>(a.V));
  p.num_accepted = a.num_accepted;
  p.path = a.path;
  p.out = a.out_tokens;
  p.rowflag = a.rowflag;
  p.rowbuf = a.rowbuf;
  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kF32: launch_all<float>(p, a.device, kF32, st); break;
    case kF16: launch_all<__half>(p, a.device, kF16, st); break;
    default: launch_all<__nv_bfloat16>(p, a.device, kBF16, st); break;
  }
}

}  // namespace sjd
