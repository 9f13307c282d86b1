// A CPU executor for this package's CUDA kernels, for machines without a GPU.
//
// The kernels in csrc/ are compiled as plain C++ with this folder first on the include path
// (its cuda_runtime.h, cuda_bf16.h and cuda_fp16.h stand in for the toolkit's). Every CUDA thread
// of a block is a fiber (ucontext) of one OS thread; blocks run one after another, and launches
// one at a time in a process (launches from several threads take turns). A fiber runs
// until it reaches a barrier: __syncthreads and its variants for the block, and for its warp every
// lane-exchanging intrinsic (__shfl*_sync, __ballot_sync, __reduce_*_sync). So shared memory,
// warp shuffles and block reductions behave as on the GPU for code that synchronises as CUDA
// requires, while code that forgets a barrier can read stale shared memory. The order in which
// threads run from one barrier to the next is set by `sim_configure`: forward (the lowest-numbered
// runnable thread always goes next, so the first warps run as far ahead of the others as the
// barriers allow), reverse (the highest first) or shuffled sweeps; a test run under forward and
// reverse exposes most missing barriers and buffers reused too early. Threads of a block
// waiting at different __syncthreads call sites, threads waiting at a barrier the others never
// reach, warp intrinsics called by lanes with different masks, and a launch over 1024 threads or
// 227 KiB of dynamic shared memory are errors (a RuntimeError from the launch), not hangs.
//
// What it does not model: the GPU's floating-point library (expf, logf, powf here are the host
// libm's, within an ulp or two of CUDA's), fused multiply-add contraction (compile with
// -ffp-contract=off), memory ordering between blocks, timing. Results are therefore checked against
// the reference as the Triton interpreter's are: same tokens up to rare rounding at sampling
// boundaries. It exists for correctness only.
//
// Built with race checks (SJD_SIM_RACE; `sjd_kernels.cuda.sim.load(race=True)`), the kernel sources
// are compiled with -fsanitize=thread, whose hooks (csrc/sim/race_check.cpp, not the sanitizer's
// runtime) see every load and store of the kernels and check them against the CUDA rules: two
// accesses to the same shared or global bytes by different threads, at least one a write and not
// both atomic, race unless a __syncthreads (or, within a warp, a warp exchange both took part in)
// lies between them; threads of different blocks of one launch never synchronise. A read of shared
// memory that no thread of the block wrote is reported too. The launch then fails with the first
// reports, each with both source lines. The runtime below is not instrumented (SJD_SIM_RT).
#pragma once

#define SJD_SIM 1

#include <math.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// ---- language keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

#ifdef SJD_SIM_RACE
#define SJD_SIM_RT __attribute__((no_sanitize_thread, noinline))
#else
#define SJD_SIM_RT
#endif

namespace sjd_sim {

struct Barrier {
  uint64_t gen = 0;
  int arrived = 0;
  unsigned mask = 0;           // warp barriers: the mask of the current phase
  const char* file = nullptr;  // block barriers: the call site of the current phase
  int line = 0;
};

struct Fiber {
  ucontext_t ctx;    // only to enter the fiber the first time
  jmp_buf jb;        // where it yielded
  bool started = false;
  dim3 tid;
  int linear = 0;
  bool done = false;
  const Barrier* wait = nullptr;
  uint64_t wait_gen = 0;
  uint64_t n_block_ops = 0;  // block exchanges so far (rotation of the exchange slots)
  uint64_t n_warp_ops = 0;   // warp exchanges so far
};

struct Warp {
  Barrier bar;
  unsigned live = 0;       // lanes of this warp that exist and have not returned
  uint64_t val[3][32]{};   // exchange slots, used in rotation
#ifdef SJD_SIM_RACE
  uint32_t vc[32][32]{};   // race checks: each lane's vector clock over the lanes of its warp
#endif
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier bar;
  int live = 0;
  int acc[3] = {0, 0, 0};  // __syncthreads_or accumulators, in rotation
  const std::function<void()>* body = nullptr;
};

struct Config {
  int order = 0;        // 0 forward, 1 reverse, 2 shuffled by seed
  uint64_t seed = 0;
  uint64_t launches = 0;
  uint64_t switches = 0;
};

// The configuration (sim_configure) and the counters (sim_stats) belong to the calling thread.
inline thread_local Config g_cfg;

// One launch runs at a time in a process: the kernels' static __shared__ arrays are plain statics
// here, and the bindings release the GIL, so launches from two Python threads take turns on
// g_launch_mutex. The state of the running launch is therefore process-wide, not thread_local:
// it is read at every threadIdx, barrier and (race build) load and store, where a thread_local in
// this shared library costs a __tls_get_addr call (and, in the race build, used to be recorded as
// a global access).
// g_owner is the thread pointer of the thread that holds the launch (null between launches), so
// code of another thread that reaches the race hooks (instrumented host code) can tell it is not
// the launch's.
inline std::mutex g_launch_mutex;
inline std::atomic<const void*> g_owner{nullptr};
struct Launch {
  Block* blk = nullptr;
  Fiber* cur = nullptr;
  ucontext_t sched;
  jmp_buf sched_jb;
  dim3 block_idx, block_dim, grid_dim;
  unsigned char* dyn_smem = nullptr;
  std::string error;  // first error of the current launch
  uint64_t releases = 0;  // barriers opened so far
};
inline Launch g_run;  // one object, so the race checks can leave its bytes out in one range

inline bool this_thread_runs_the_launch() {
  return g_owner.load(std::memory_order_relaxed) == __builtin_thread_pointer();
}

#ifdef SJD_SIM_RACE
// csrc/sim/race_check.cpp
void race_launch_begin(const unsigned char* dyn, size_t smem);
void race_block_begin(const Block& blk, const char* stack_lo, size_t stack_bytes);
void race_warp_event(Warp& w, unsigned lanes);
void race_atomic(const void* p, size_t n, const void* pc);
std::string race_launch_end();
#endif

// Switches: a fiber is entered once with swapcontext and afterwards resumed with _longjmp, which,
// unlike swapcontext, does not save and restore the signal mask (a system call per switch).
SJD_SIM_RT inline void yield_to_scheduler() {
  if (!_setjmp(g_run.cur->jb)) _longjmp(g_run.sched_jb, 1);
}

[[noreturn]] SJD_SIM_RT inline void fail(const std::string& what) {
  // A kernel-side error ends the whole launch: record it and return to the scheduler for good.
  if (g_run.error.empty()) g_run.error = what;
  g_run.cur->done = true;
  _longjmp(g_run.sched_jb, 1);
}

SJD_SIM_RT inline void wait_on(const Barrier& b, uint64_t gen) {
  g_run.cur->wait = &b;
  g_run.cur->wait_gen = gen;
  yield_to_scheduler();
}

// ---- block barrier -----------------------------------------------------------------------------
SJD_SIM_RT inline void release_if_complete(Barrier& b, int expected) {
  if (b.arrived > 0 && b.arrived >= expected) {
    b.arrived = 0;
    ++b.gen;
    ++g_run.releases;
  }
}

// The calling thread arrives at ``b``, which opens once ``expected`` threads have; until then it
// waits (the last to arrive goes on without a switch).
SJD_SIM_RT inline void arrive(Barrier& b, int expected) {
  const uint64_t gen = b.gen;
  ++b.arrived;
  release_if_complete(b, expected);
  if (b.gen == gen) wait_on(b, gen);
}

// ``file:line``: the __syncthreads call site. Threads of one phase at different sites are an error
// (CUDA allows __syncthreads in conditional code only when the whole block takes the same branch;
// the hardware would count them together and go on with mismatched phases).
SJD_SIM_RT inline void block_sync(const char* file, int line) {
  Barrier& b = g_run.blk->bar;
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
  } else if (b.line != line || std::strcmp(b.file, file) != 0) {
    fail(std::string("__syncthreads under divergent control flow: threads wait at ") + b.file + ":" +
         std::to_string(b.line) + " and at " + file + ":" + std::to_string(line));
  }
  arrive(b, g_run.blk->live);
}

// ---- warp exchange -----------------------------------------------------------------------------
SJD_SIM_RT inline int lane_id() { return g_run.cur->linear & 31; }
SJD_SIM_RT inline Warp& my_warp() { return g_run.blk->warps[g_run.cur->linear >> 5]; }

// Every lane of ``mask`` publishes ``v``; returns the slot row all of them published into.
SJD_SIM_RT inline const uint64_t* warp_exchange(unsigned mask, uint64_t v) {
  Warp& w = my_warp();
  const int lane = lane_id();
  if (!((mask >> lane) & 1u)) fail("warp intrinsic called by a lane outside its mask");
  const int slot = static_cast<int>(g_run.cur->n_warp_ops++ % 3);
  w.val[slot][lane] = v;
  Barrier& b = w.bar;
  if (b.arrived == 0) {
    b.mask = mask;
  } else if (b.mask != mask) {
    fail("warp intrinsics with different masks in one warp at the same time");
  }
  if ((mask & ~w.live) != 0) fail("warp intrinsic's mask names a lane that has exited or does not exist");
  const int expected = __builtin_popcount(mask & w.live);
#ifdef SJD_SIM_RACE
  if (b.arrived + 1 >= expected) race_warp_event(w, mask & w.live);  // this arrival completes the exchange
#endif
  arrive(b, expected);
  return w.val[slot];
}

template <typename T>
inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "warp exchange of a type over 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// ---- the scheduler -----------------------------------------------------------------------------
SJD_SIM_RT inline void fiber_entry() {
  (*g_run.blk->body)();
  Fiber* f = g_run.cur;
  f->done = true;
  --g_run.blk->live;
  Warp& w = g_run.blk->warps[f->linear >> 5];
  w.live &= ~(1u << (f->linear & 31));
  // A block barrier or warp exchange waiting only on this thread completes now.
  release_if_complete(g_run.blk->bar, g_run.blk->live);
  if (w.bar.arrived > 0) {
#ifdef SJD_SIM_RACE
    if (w.bar.arrived >= __builtin_popcount(w.bar.mask & w.live)) race_warp_event(w, w.bar.mask & w.live);
#endif
    release_if_complete(w.bar, __builtin_popcount(w.bar.mask & w.live));
  }
  _longjmp(g_run.sched_jb, 1);  // never returns into uc_link
}

// Fiber stacks of this OS thread, grown to the largest block so far; not zero-filled, so the
// pages are only touched as deep as the threads' frames go.
struct Stacks {
  std::unique_ptr<char[]> mem;
  size_t size = 0;
};
inline Stacks& stacks() {
  static thread_local Stacks s;
  return s;
}

constexpr size_t kStack = 192 * 1024;

SJD_SIM_RT inline void run_block(int nthreads, const std::function<void()>& body) {
  Block blk;
  blk.fibers.resize(nthreads);
  const int nwarps = (nthreads + 31) / 32;
  blk.warps.resize(nwarps);
  for (int w = 0; w < nwarps; ++w) {
    const int n = std::min(32, nthreads - 32 * w);
    blk.warps[w].live = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  }
  blk.live = nthreads;
  blk.body = &body;
  Stacks& st = stacks();
  if (st.size < kStack * static_cast<size_t>(nthreads)) {
    st.size = kStack * static_cast<size_t>(nthreads);
    st.mem.reset(new char[st.size]);
  }
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = blk.fibers[t];
    f.linear = t;
    const dim3 d = g_run.block_dim;
    f.tid = dim3(t % d.x, (t / d.x) % d.y, t / (d.x * d.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = st.mem.get() + kStack * static_cast<size_t>(t);
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &g_run.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  g_run.blk = &blk;
#ifdef SJD_SIM_RACE
  race_block_begin(blk, st.mem.get(), kStack * static_cast<size_t>(nthreads));
#endif
  std::vector<int> order(nthreads);
  for (int t = 0; t < nthreads; ++t) order[t] = g_cfg.order == 1 ? nthreads - 1 - t : t;
  std::mt19937_64 rng(g_cfg.seed * 0x9E3779B97F4A7C15ull + g_cfg.launches);
  // forward / reverse: always resume the first runnable thread in that order, so the first warps
  // run as far ahead of the others as the barriers allow (the skew that exposes a buffer reused
  // too early); shuffle: sweeps over all threads in a new random order each time.
  const bool greedy = g_cfg.order != 2;
  size_t i = 0;
  uint64_t switches = 0;  // into g_cfg at the end (a thread_local: not touched per switch)
  uint64_t releases = g_run.releases;
  bool progressed = false;
  while (blk.live > 0 && g_run.error.empty()) {
    if (i == order.size()) {
      if (!progressed) {
        g_run.error = "deadlock: " + std::to_string(blk.live) +
                  " threads wait at barriers that the others never reach (a __syncthreads or warp "
                  "intrinsic under divergent control flow)";
        break;
      }
      if (!greedy) std::shuffle(order.begin(), order.end(), rng);
      i = 0;
      progressed = false;
    }
    Fiber& f = blk.fibers[order[i]];
    if (f.done || (f.wait && f.wait->gen == f.wait_gen)) {
      ++i;
      continue;
    }
    f.wait = nullptr;
    g_run.cur = &f;
    ++switches;
    if (!_setjmp(g_run.sched_jb)) {
      if (!f.started) {
        f.started = true;
        swapcontext(&g_run.sched, &f.ctx);
      } else {
        _longjmp(f.jb, 1);
      }
    }
    g_run.cur = nullptr;
    progressed = true;
    if (greedy && g_run.releases != releases) {
      releases = g_run.releases;
      i = 0;  // a barrier opened: the first threads in the order go first again
    } else {
      ++i;
    }
  }
  g_cfg.switches += switches;
  g_run.blk = nullptr;
}

// Last launch error, as cudaGetLastError reports it (then cleared).
inline thread_local int g_last_error = 0;

// Holds g_launch_mutex for the launch and marks this thread as its owner.
struct LaunchLock {
  std::lock_guard<std::mutex> hold{g_launch_mutex};
  LaunchLock() { g_owner.store(__builtin_thread_pointer(), std::memory_order_relaxed); }
  ~LaunchLock() { g_owner.store(nullptr, std::memory_order_relaxed); }
};

SJD_SIM_RT inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const LaunchLock lock;
  ++g_cfg.launches;
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    g_last_error = 9;  // cudaErrorInvalidConfiguration
    return;
  }
  if (smem > 227 * 1024) {
    g_last_error = 9;
    return;
  }
  // Dynamic shared memory, 16-byte aligned, then kCanary guard bytes. Uninitialised shared memory
  // reads as 0xff bytes (NaN floats, -1 integers), so a read before a write shows; a guard byte
  // that changed is a write past the end.
  constexpr size_t kCanary = 256;
  std::vector<unsigned char> dyn(smem + 16 + kCanary);
  unsigned char* base = dyn.data();
  base += (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
  g_run.dyn_smem = base;
#ifdef SJD_SIM_RACE
  race_launch_begin(base, smem);
#endif
  g_run.grid_dim = grid;
  g_run.block_dim = block;
  g_run.error.clear();
  for (unsigned z = 0; z < grid.z && g_run.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && g_run.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && g_run.error.empty(); ++x) {
        g_run.block_idx = dim3(x, y, z);
        std::memset(base, 0xff, smem);
        std::memset(base + smem, 0xa5, kCanary);
        run_block(static_cast<int>(nthreads), body);
        for (size_t i = 0; i < kCanary && g_run.error.empty(); ++i)
          if (base[smem + i] != 0xa5)
            g_run.error = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                      ") wrote past the end of its " + std::to_string(smem) + " bytes of dynamic shared memory";
      }
  g_run.dyn_smem = nullptr;
#ifdef SJD_SIM_RACE
  {
    std::string races = race_launch_end();
    if (g_run.error.empty()) g_run.error = races;
  }
#endif
  if (!g_run.error.empty()) {
    std::string e = "sjd_kernels simulator: " + g_run.error;
    g_run.error.clear();
    throw std::runtime_error(e);
  }
}

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    auto k = kernel;
    std::function<void()> body = [&]() { k(a...); };
    launch(grid, block, smem, body);
  }
};

template <typename... P>
Launcher<P...> make_launcher(void (*k)(P...), dim3 g, dim3 b, size_t smem) {
  return Launcher<P...>{k, g, b, smem};
}

}  // namespace sjd_sim

// ---- built-in variables -----------------------------------------------------------------------
#define threadIdx (::sjd_sim::g_run.cur->tid)
#define blockIdx (::sjd_sim::g_run.block_idx)
#define blockDim (::sjd_sim::g_run.block_dim)
#define gridDim (::sjd_sim::g_run.grid_dim)

// ---- synchronisation and warp intrinsics --------------------------------------------------------
#define __syncthreads() ::sjd_sim::block_sync(__FILE__, __LINE__)

// Counts the threads whose ``pred`` holds. Three accumulators in rotation: a call clears the next
// call's slot before its barrier, when every reader of that slot's previous use has passed.
SJD_SIM_RT inline int sjd_sim_block_count(int pred, const char* file, int line) {
  using namespace ::sjd_sim;
  const int n = static_cast<int>(g_run.cur->n_block_ops++ % 3);
  Block* b = g_run.blk;
  b->acc[(n + 1) % 3] = 0;
  b->acc[n] += (pred != 0);
  block_sync(file, line);
  return b->acc[n];
}
#define __syncthreads_or(pred) (sjd_sim_block_count((pred), __FILE__, __LINE__) != 0)

template <typename T>
SJD_SIM_RT inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const uint64_t* row = ::sjd_sim::warp_exchange(mask, ::sjd_sim::bits_of(v));
  const int lane = ::sjd_sim::lane_id();
  const int base = lane & ~(width - 1);
  return ::sjd_sim::from_bits<T>(row[base + (src & (width - 1))]);
}
template <typename T>
SJD_SIM_RT inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const uint64_t* row = ::sjd_sim::warp_exchange(mask, ::sjd_sim::bits_of(v));
  const int lane = ::sjd_sim::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return ::sjd_sim::from_bits<T>(row[src]);
}
template <typename T>
SJD_SIM_RT inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const uint64_t* row = ::sjd_sim::warp_exchange(mask, ::sjd_sim::bits_of(v));
  const int lane = ::sjd_sim::lane_id();
  const int in_seg = lane & (width - 1);
  const int src = in_seg >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::sjd_sim::from_bits<T>(row[src]);
}
SJD_SIM_RT inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* row = ::sjd_sim::warp_exchange(mask, pred != 0);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && row[l]) r |= 1u << l;
  return r;
}
SJD_SIM_RT inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  const uint64_t* row = ::sjd_sim::warp_exchange(mask, v);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) r |= static_cast<unsigned>(row[l]);
  return r;
}
SJD_SIM_RT inline int __reduce_add_sync(unsigned mask, int v) {
  const uint64_t* row = ::sjd_sim::warp_exchange(mask, static_cast<uint32_t>(v));
  uint32_t r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) r += static_cast<uint32_t>(row[l]);
  return static_cast<int>(r);
}

// ---- atomics (fibers never interleave inside one) -----------------------------------------------
#ifdef SJD_SIM_RACE
#define SJD_SIM_ATOMIC(a) ::sjd_sim::race_atomic((a), sizeof(*(a)), __builtin_return_address(0))
#else
#define SJD_SIM_ATOMIC(a) ((void)0)
#endif
template <typename T>
SJD_SIM_RT inline T atomicAdd(T* a, T v) { SJD_SIM_ATOMIC(a); T o = *a; *a = o + v; return o; }
template <typename T>
SJD_SIM_RT inline T atomicOr(T* a, T v) { SJD_SIM_ATOMIC(a); T o = *a; *a = o | v; return o; }
template <typename T>
SJD_SIM_RT inline T atomicMin(T* a, T v) { SJD_SIM_ATOMIC(a); T o = *a; *a = v < o ? v : o; return o; }

// ---- loads, stores, arithmetic intrinsics -------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return v == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(v)) + 1; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

using std::isfinite;
using std::max;
using std::min;

// Launch: SJD_LAUNCH(kernel, grid, block, smem, stream)(args...) in the sources.
#define SJD_SIM_LAUNCH(kernel, grid, block, smem, stream) ::sjd_sim::make_launcher(kernel, grid, block, smem)
#define SJD_SIM_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::sjd_sim::g_run.dyn_smem)
