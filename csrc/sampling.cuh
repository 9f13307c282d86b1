// Block-level building blocks of the sampling kernels: deterministic reductions, order-preserving
// float keys, and the packed exponential-race key.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sjd {

constexpr int kMaxWarps = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// float -> T, round to nearest even (the PyTorch cast).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Monotone map float -> uint32 (a < b  <=>  key(a) < key(b) for non-NaN floats). -0 is mapped
// like +0 so that equal floats get equal keys, as float comparisons (and torch) treat them.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t b = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_to_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Exponential race entry for lane i: (w / E) bits in the high word, ~i in the low word, so that a
// 64-bit max picks the largest key and, among equal keys, the lowest lane. Keys are positive
// floats (or +0), whose bit patterns order like their values; lanes with w <= 0 pack to 0,
// below every real entry.
__device__ __forceinline__ uint64_t race_pack(float w, float expo, uint32_t lane) {
  if (!(w > 0.0f)) return 0ull;
  const float key = __fdiv_rn(w, expo);
  return (static_cast<uint64_t>(__float_as_uint(key)) << 32) | static_cast<uint64_t>(~lane);
}
__device__ __forceinline__ int64_t race_winner(uint64_t packed) {
  return packed == 0ull ? int64_t(-1) : static_cast<int64_t>(~static_cast<uint32_t>(packed));
}
__device__ __forceinline__ uint64_t umax64(uint64_t a, uint64_t b) { return a > b ? a : b; }

struct OpMaxU64 {
  using T = uint64_t;
  __device__ __forceinline__ static T identity() { return 0ull; }
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct OpMaxF {
  using T = float;
  __device__ __forceinline__ static T identity() { return -INFINITY; }
  __device__ __forceinline__ T operator()(T a, T b) const { return fmaxf(a, b); }
};
struct OpSumF {
  using T = float;
  __device__ __forceinline__ static T identity() { return 0.0f; }
  __device__ __forceinline__ T operator()(T a, T b) const { return __fadd_rn(a, b); }
};
struct OpSumI {
  using T = int;
  __device__ __forceinline__ static T identity() { return 0; }
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct OpOrI {
  using T = int;
  __device__ __forceinline__ static T identity() { return 0; }
  __device__ __forceinline__ T operator()(T a, T b) const { return a | b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SJD_SIM)
template <>
__device__ __forceinline__ int warp_allreduce<int, OpSumI>(int v, OpSumI) { return __reduce_add_sync(0xffffffffu, v); }
template <>
__device__ __forceinline__ int warp_allreduce<int, OpOrI>(int v, OpOrI) {
  return static_cast<int>(__reduce_or_sync(0xffffffffu, static_cast<unsigned>(v)));
}
#endif

// Reduce N values across the block with a single __syncthreads; every thread gets the results.
// ``buf`` is shared memory of 2 * kMaxWarps * N elements used as a ping-pong pair selected by
// ``parity``, so back-to-back reductions need no second barrier: a buffer is rewritten only after
// the barrier of the reduction in between, by which time every thread has read it. After the
// barrier every warp combines the per-warp partials with the same butterfly, so float sums are
// deterministic and identical in all threads (and across runs and CUDA-graph replays).
// blockDim.x must be a multiple of 32. Every reduction on one buffer must use the same N (pad the
// values otherwise): the two halves are N-sized, and with mixed N one reduction's half overlaps the
// other half of the reduction before it, which slow warps may still be reading (the CPU simulator,
// sjd_kernels.cuda.sim, catches this).
template <int N, typename T, typename Op>
__device__ __forceinline__ void block_allreduce(T (&v)[N], Op op, T* buf, int& parity) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_allreduce(v[k], op);
  T* b = buf + parity * (kMaxWarps * N);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) b[warp * N + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_allreduce(lane < nw ? b[lane * N + k] : Op::identity(), op);
  parity ^= 1;
}

template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce1(T v, Op op, T* buf, int& parity) {
  T a[1] = {v};
  block_allreduce<1>(a, op, buf, parity);
  return a[0];
}

// r[0..V) = 0 by the block (shared or global memory): 16-byte stores when r is 16-byte aligned and
// V a multiple of 4.
__device__ __forceinline__ void zero_row(float* __restrict__ r, int V) {
  if ((V & 3) == 0 && (reinterpret_cast<uintptr_t>(r) & 15u) == 0) {
    float4* r4 = reinterpret_cast<float4*>(r);
    for (int i = threadIdx.x; i < (V >> 2); i += blockDim.x) r4[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) r[i] = 0.0f;
  }
}

// Exclusive prefix sum of one int per thread over the block (blockDim a multiple of 32); the block
// total goes to ``total``. ``buf`` holds kMaxWarps + 1 ints of shared memory.
__device__ __forceinline__ int block_exclusive_scan(int v, int* buf, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) buf[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nw ? buf[lane] : 0;
    int s = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < nw) buf[lane] = s - w;
    if (lane == 31) buf[kMaxWarps] = s;
  }
  __syncthreads();
  const int out = buf[warp] + x - v;
  total = buf[kMaxWarps];
  __syncthreads();  // buf may be reused at once
  return out;
}

// Largest x in [lo, hi] with pred(x) true, for a predicate that is true at lo and monotone
// (true, ..., true, false, ..., false). Each round evaluates kPivots pivots in one pass over the
// data (``eval(piv, ok)`` sets ok[m] = pred(piv[m]) for all m, block-uniformly), shrinking the
// range about (kPivots + 1)-fold: 12 rounds for a 32-bit range instead of 32 bisection steps.
constexpr int kPivots = 7;
template <typename Eval>
__device__ __forceinline__ uint32_t search_last_true(uint32_t lo, uint32_t hi, Eval&& eval) {
  while (lo < hi) {
    const uint64_t span = static_cast<uint64_t>(hi) - lo;  // >= 1
    uint32_t piv[kPivots];
#pragma unroll
    for (int m = 0; m < kPivots; ++m)  // non-decreasing, in (lo, hi], the last one is hi
      piv[m] = lo + 1u + static_cast<uint32_t>(((span - 1) * static_cast<uint64_t>(m + 1)) / kPivots);
    bool ok[kPivots];
    eval(piv, ok);
    uint32_t new_lo = lo, new_hi = hi;
#pragma unroll
    for (int m = kPivots - 1; m >= 0; --m) {
      if (ok[m]) {
        new_lo = piv[m];
        break;
      }
      new_hi = piv[m] - 1u;
    }
    lo = new_lo;
    hi = new_hi;
  }
  return lo;
}

// CFG combine of one lane in float32, as the reference: u + s * (c - u), except that a lane at -inf in
// both rows (a token masked before the head's output) stays -inf instead of -inf - -inf = NaN.
__device__ __forceinline__ float cfg_combine(float c, float u, float s) {
  const float x = __fadd_rn(u, __fmul_rn(s, __fsub_rn(c, u)));
  return (c == -INFINITY && u == -INFINITY) ? -INFINITY : x;
}

// Calls f(i, c_i, u_i) for every lane i < n of a row of logits (and of the unconditional row when
// ``u`` is not null), as float. Rows may start at any element offset (image-token slices of a
// larger vocabulary): a scalar head peels lanes up to the next 16-byte boundary, then 16-byte
// vector loads, then a scalar tail. When the two rows are misaligned relative to each other the
// whole row is read with scalar loads.
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* __restrict__ c, const T* __restrict__ u, int n, F&& f) {
  constexpr int N = 16 / sizeof(T);
  const int tid = threadIdx.x, nth = blockDim.x;
  const uintptr_t ac = reinterpret_cast<uintptr_t>(c);
  bool vec = (ac % sizeof(T)) == 0;
  if (u != nullptr && (reinterpret_cast<uintptr_t>(u) & 15u) != (ac & 15u)) vec = false;
  int head = vec ? static_cast<int>(((16u - (ac & 15u)) & 15u) / sizeof(T)) : n;
  if (head > n) head = n;
  for (int i = tid; i < head; i += nth) f(i, to_float(c[i]), u ? to_float(u[i]) : 0.0f);
  if (head >= n) return;
  const int nvec = (n - head) / N;
  const uint4* cv = reinterpret_cast<const uint4*>(c + head);
  const uint4* uv = u ? reinterpret_cast<const uint4*>(u + head) : nullptr;
  for (int v = tid; v < nvec; v += nth) {
    const uint4 craw = __ldg(cv + v);
    const uint4 uraw = uv ? __ldg(uv + v) : craw;
    // The 16 loaded bytes as N elements: memcpy, not a cast of &craw to T* (reading a uint4 object
    // through a T lvalue breaks the aliasing rules); the compiler turns it into register moves.
    T ce[N], ue[N];
    memcpy(ce, &craw, sizeof(craw));
    memcpy(ue, &uraw, sizeof(uraw));
#pragma unroll
    for (int e = 0; e < N; ++e) f(head + v * N + e, to_float(ce[e]), uv ? to_float(ue[e]) : 0.0f);
  }
  for (int i = head + nvec * N + tid; i < n; i += nth) f(i, to_float(c[i]), u ? to_float(u[i]) : 0.0f);
}

}  // namespace sjd
