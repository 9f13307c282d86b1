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
// reverse exposes most missing barriers and buffers reused too early. A warp intrinsic waits for
// the lanes of its mask that have not exited (lanes beyond the block's size count as exited), as
// PTX's *.sync instructions do; groups of lanes with different masks exchange independently (the
// branches of a divergent warp), and a shuffle that reads a lane outside the exchange gets all bits
// set (CUDA: undefined). Threads of a block waiting at different __syncthreads call sites, threads
// waiting at a barrier the others never reach, different warp intrinsics with one mask at the same
// time and a shuffle width other than 1, 2, 4, 8, 16 or 32 are errors (a RuntimeError from the
// launch), not hangs. A launch outside the device's limits (1024 threads, 1024 x 1024 x 64 in
// block dimensions, 2^31 - 1 x 65535 x 65535 blocks) fails as on the GPU, and so does one with over
// 48 KiB of dynamic shared memory unless cudaFuncSetAttribute raised the kernel's limit (to at most
// 227 KiB less its static shared memory): cudaGetLastError reports it. A launch with more threads per
// block than the kernel's __launch_bounds__ fails too (cudaErrorLaunchOutOfResources): the macro
// cannot attach a value to a function in C++, so the loader reads each source's bounds
// (sjd_kernels.cuda.sim.launch_bounds) and passes them as SJD_SIM_LAUNCH_BOUNDS ("name:threads,...");
// SJD_SIM_LAUNCH looks the launched kernel's name up there.
//
// What it does not model: the GPU's floating-point library (expf, logf, powf here are the host
// libm's, within an ulp or two of CUDA's), fused multiply-add contraction (compile with
// -ffp-contract=off), memory ordering between blocks, timing, and uninitialised static __shared__
// variables: they are statics here, which keep what the block before
// wrote (dynamic shared memory starts as 0xff bytes in every block; the race-checking build below
// reports reads of either before a write). Results are therefore checked against
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
#include <cctype>
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
#include <type_traits>
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
  int op = 0;                  // warp barriers: the intrinsic of the current phase (XOp)
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
  uint64_t xres = 0;         // the result of its last warp exchange, set when the exchange completes
};

// A warp exchange in progress: the lanes of its mask (those that have not exited) publish a value
// and, for a shuffle, the lane they read; the last to arrive computes every lane's result into its
// Fiber::xres. Exchanges with different masks may be in progress at the same time (divergent
// branches of one warp, each exchanging among its own lanes); each has a record of ``bars``. A lane
// waits in at most one, so 32 records suffice.
struct Warp {
  Barrier bars[32];
  unsigned used = 0;       // the records of ``bars`` with lanes waiting
  unsigned live = 0;       // lanes of this warp that exist and have not returned
  uint64_t val[32]{};      // each arrived lane's value
  int8_t src[32]{};        // shuffles: the lane each arrived lane reads
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
void race_atomic(const void* p, size_t n, const void* pc, bool reads = true);
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

enum XOp { kXShfl = 1, kXBallot, kXOr, kXAnd, kXXor, kXAdd, kXMin, kXMax, kXUMin, kXUMax };
// What a shuffle returns from a lane that does not take part in it (outside the mask, or exited):
// undefined in CUDA; all bits set here (a NaN float, -1), as unwritten shared memory reads.
constexpr uint64_t kUndefined = ~0ull;

// Completes the exchange of ``w.bars[k]``: every lane of it gets its result.
SJD_SIM_RT inline void complete_exchange(Warp& w, int k, Fiber* lanes0) {
  Barrier& b = w.bars[k];
  const unsigned lanes = b.mask & w.live;
#ifdef SJD_SIM_RACE
  race_warp_event(w, lanes);
#endif
  uint32_t r = b.op == kXAnd ? ~0u : b.op == kXMin ? 0x7fffffffu : b.op == kXUMin ? ~0u
             : b.op == kXMax ? 0x80000000u : 0u;
  for (int l = 0; l < 32; ++l) {
    if (!((lanes >> l) & 1u)) continue;
    const uint32_t v = static_cast<uint32_t>(w.val[l]);
    switch (b.op) {
      case kXBallot: if (v) r |= 1u << l; break;
      case kXOr: r |= v; break;
      case kXAnd: r &= v; break;
      case kXXor: r ^= v; break;
      case kXAdd: r += v; break;
      case kXMin: if (static_cast<int32_t>(v) < static_cast<int32_t>(r)) r = v; break;
      case kXMax: if (static_cast<int32_t>(v) > static_cast<int32_t>(r)) r = v; break;
      case kXUMin: if (v < r) r = v; break;
      case kXUMax: if (v > r) r = v; break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!((lanes >> l) & 1u)) continue;
    if (b.op == kXShfl) {
      const int s = w.src[l];
      lanes0[l].xres = ((lanes >> s) & 1u) ? w.val[s] : kUndefined;
    } else {
      lanes0[l].xres = r;
    }
  }
  w.used &= ~(1u << k);
  b.arrived = 0;
  ++b.gen;
  ++g_run.releases;
}

// The calling lane takes part in the exchange ``op`` among the lanes of ``mask`` that have not
// exited, publishing ``v`` (a shuffle: reading lane ``src``); returns its result once all of them
// have arrived.
SJD_SIM_RT inline uint64_t warp_exchange(unsigned mask, int op, uint64_t v, int src = 0) {
  const int wi = g_run.cur->linear >> 5;
  Warp& w = g_run.blk->warps[wi];
  const int lane = lane_id();
  if (!((mask >> lane) & 1u)) fail("warp intrinsic called by a lane outside its mask");
  int k = -1;
  for (unsigned u = w.used; u != 0; u &= u - 1) {
    const int j = __builtin_ctz(u);
    if (w.bars[j].mask == mask) {
      k = j;
      break;
    }
  }
  if (k < 0) {
    k = __builtin_ctz(~w.used);  // a lane waits in at most one record: one of the 32 is free
    w.used |= 1u << k;
    w.bars[k].mask = mask;
    w.bars[k].op = op;
  } else if (w.bars[k].op != op) {
    fail("different warp intrinsics with the same mask in one warp at the same time");
  }
  Barrier& b = w.bars[k];
  w.val[lane] = v;
  w.src[lane] = static_cast<int8_t>(src);
  const uint64_t gen = b.gen;
  if (++b.arrived >= __builtin_popcount(mask & w.live))
    complete_exchange(w, k, &g_run.blk->fibers[32 * wi]);  // the last to arrive goes on without a switch
  else
    wait_on(b, gen);
  return g_run.cur->xres;
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
  for (unsigned u = w.used; u != 0; u &= u - 1) {
    const int k = __builtin_ctz(u);
    if (w.bars[k].arrived >= __builtin_popcount(w.bars[k].mask & w.live))
      complete_exchange(w, k, &g_run.blk->fibers[f->linear & ~31]);
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
// The lowest bytes of each fiber's stack hold a pattern checked when the block ends: a thread whose
// frames outgrew kStack (large local arrays) is reported instead of silently overwriting the stack
// of the thread below it.
constexpr size_t kStackGuard = 64;
constexpr unsigned char kStackGuardByte = 0x5c;

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
    std::memset(f.ctx.uc_stack.ss_sp, kStackGuardByte, kStackGuard);
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
  for (int t = 0; t < nthreads && g_run.error.empty(); ++t) {
    const unsigned char* lo = reinterpret_cast<const unsigned char*>(st.mem.get() + kStack * static_cast<size_t>(t));
    for (size_t i = 0; i < kStackGuard; ++i)
      if (lo[i] != kStackGuardByte) {
        g_run.error = "thread " + std::to_string(t) + " of block (" + std::to_string(g_run.block_idx.x) + ", " +
                      std::to_string(g_run.block_idx.y) + ", " + std::to_string(g_run.block_idx.z) +
                      ") overflowed its " + std::to_string(kStack / 1024) +
                      " KiB stack in the simulator (local arrays too large)";
        break;
      }
  }
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

// The device's limits (a Hopper-class GPU): dynamic shared memory a kernel may take without
// cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize), and with it at most.
constexpr int kDynSmemDefault = 48 * 1024;
constexpr int kSmemOptin = 227 * 1024;
constexpr int kStaticSmem = 24 * 1024;  // a bound on the kernels' static shared memory

// Each kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, where set.
inline std::mutex g_attr_mutex;
inline std::vector<std::pair<const void*, int>> g_dyn_smem_attr;
inline void set_max_dynamic_smem(const void* kernel, int bytes) {
  const std::lock_guard<std::mutex> hold(g_attr_mutex);
  for (auto& e : g_dyn_smem_attr)
    if (e.first == kernel) {
      e.second = bytes;
      return;
    }
  g_dyn_smem_attr.emplace_back(kernel, bytes);
}
inline int max_dynamic_smem(const void* kernel) {
  const std::lock_guard<std::mutex> hold(g_attr_mutex);
  for (const auto& e : g_dyn_smem_attr)
    if (e.first == kernel) return e.second;
  return kDynSmemDefault;
}

// The max-threads argument of a kernel's __launch_bounds__: ``kernel`` is the launch's kernel
// expression as written (e.g. "(sjd2_prepare_kernel<T, VEC>)"), ``table`` the source's
// SJD_SIM_LAUNCH_BOUNDS; 1024 (the device's limit) for a kernel without bounds.
inline int launch_bound(const char* kernel, const char* table) {
  std::string k(kernel);
  k = k.substr(0, k.find('<'));
  const auto ident = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  size_t e = k.size();
  while (e > 0 && !ident(k[e - 1])) --e;
  size_t b = e;
  while (b > 0 && ident(k[b - 1])) --b;
  const std::string name = k.substr(b, e - b);
  const std::string t(table);
  for (size_t pos = 0; pos < t.size();) {
    size_t end = t.find(',', pos);
    if (end == std::string::npos) end = t.size();
    const std::string entry = t.substr(pos, end - pos);
    const size_t colon = entry.find(':');
    if (colon != std::string::npos && entry.substr(0, colon) == name) return std::atoi(entry.c_str() + colon + 1);
    pos = end + 1;
  }
  return 1024;
}

SJD_SIM_RT inline void launch(const void* kernel, dim3 grid, dim3 block, size_t smem,
                              const std::function<void()>& body, int max_threads = 1024) {
  const LaunchLock lock;
  ++g_cfg.launches;
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    g_last_error = 9;  // cudaErrorInvalidConfiguration
    return;
  }
  if (nthreads > static_cast<unsigned long long>(max_threads)) {
    g_last_error = 701;  // cudaErrorLaunchOutOfResources: more threads than __launch_bounds__ allows
    return;
  }
  // above 48 KiB only as far as the kernel's attribute allows (cudaFuncSetAttribute)
  if (smem > static_cast<size_t>(max_dynamic_smem(kernel))) {
    g_last_error = 1;  // cudaErrorInvalidValue
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
  int max_threads;
  template <typename... A>
  void operator()(A&&... a) const {
    auto k = kernel;
    std::function<void()> body = [&]() { k(a...); };
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, body, max_threads);
  }
};

template <typename... P>
Launcher<P...> make_launcher(void (*k)(P...), dim3 g, dim3 b, size_t smem, int max_threads = 1024) {
  return Launcher<P...>{k, g, b, smem, max_threads};
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
#define __syncthreads_and(pred) (sjd_sim_block_count(!(pred), __FILE__, __LINE__) == 0)
#define __syncthreads_count(pred) sjd_sim_block_count((pred), __FILE__, __LINE__)

// The lane a shuffle reads, as PTX's shfl.sync computes it: ``b``'s low 5 bits, segments of
// ``width`` lanes, and the own lane when the source falls outside the segment (``up``: below it;
// ``down``, ``bfly``: above it). ``width`` must be a power of two from 1 to 32.
enum ShflMode { kShflIdx, kShflUp, kShflDown, kShflBfly };
SJD_SIM_RT inline int sjd_sim_shfl_src(ShflMode mode, int b, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    ::sjd_sim::fail("warp shuffle with width " + std::to_string(width) + " (a power of two from 1 to 32)");
  const int lane = ::sjd_sim::lane_id();
  const int seg = 31 & ~(width - 1);                       // the lane bits that name the segment
  const int min_lane = lane & seg;
  const int max_lane = mode == kShflUp ? min_lane : min_lane | (31 & ~seg);
  const int b5 = b & 31;
  int j = lane;
  bool ok = true;
  switch (mode) {
    case kShflIdx: j = min_lane | (b5 & ~seg); ok = j <= max_lane; break;
    case kShflUp: j = lane - b5; ok = j >= max_lane; break;
    case kShflDown: j = lane + b5; ok = j <= max_lane; break;
    case kShflBfly: j = lane ^ b5; ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}
template <typename T>
SJD_SIM_RT inline T sjd_sim_shfl(unsigned mask, T v, ShflMode mode, int b, int width) {
  const int src = sjd_sim_shfl_src(mode, b, width);
  return ::sjd_sim::from_bits<T>(::sjd_sim::warp_exchange(mask, ::sjd_sim::kXShfl, ::sjd_sim::bits_of(v), src));
}
template <typename T>
SJD_SIM_RT inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return sjd_sim_shfl(mask, v, kShflIdx, src, width);
}
template <typename T>
SJD_SIM_RT inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return sjd_sim_shfl(mask, v, kShflBfly, lane_mask, width);
}
template <typename T>
SJD_SIM_RT inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return sjd_sim_shfl(mask, v, kShflUp, static_cast<int>(delta & 31u), width);
}
template <typename T>
SJD_SIM_RT inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return sjd_sim_shfl(mask, v, kShflDown, static_cast<int>(delta & 31u), width);
}
// Votes and reductions over the lanes of ``mask`` that have not exited.
SJD_SIM_RT inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::sjd_sim::warp_exchange(mask, ::sjd_sim::kXBallot, pred != 0));
}
SJD_SIM_RT inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
SJD_SIM_RT inline int __all_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::sjd_sim::warp_exchange(mask, ::sjd_sim::kXAnd, pred != 0)) != 0;
}
#define SJD_SIM_REDUCE(name, T, op)                                                                  \
  SJD_SIM_RT inline T name(unsigned mask, T v) {                                                     \
    return static_cast<T>(static_cast<uint32_t>(                                                     \
        ::sjd_sim::warp_exchange(mask, ::sjd_sim::op, static_cast<uint32_t>(v))));                    \
  }
SJD_SIM_REDUCE(__reduce_or_sync, unsigned, kXOr)
SJD_SIM_REDUCE(__reduce_and_sync, unsigned, kXAnd)
SJD_SIM_REDUCE(__reduce_xor_sync, unsigned, kXXor)
SJD_SIM_REDUCE(__reduce_add_sync, int, kXAdd)
SJD_SIM_REDUCE(__reduce_add_sync, unsigned, kXAdd)
SJD_SIM_REDUCE(__reduce_min_sync, int, kXMin)
SJD_SIM_REDUCE(__reduce_max_sync, int, kXMax)
SJD_SIM_REDUCE(__reduce_min_sync, unsigned, kXUMin)
SJD_SIM_REDUCE(__reduce_max_sync, unsigned, kXUMax)
#undef SJD_SIM_REDUCE

// ---- atomics (fibers never interleave inside one) -----------------------------------------------
#ifdef SJD_SIM_RACE
#define SJD_SIM_ATOMIC(a) ::sjd_sim::race_atomic((a), sizeof(*(a)), __builtin_return_address(0))
#define SJD_SIM_ATOMIC_STORE(a) ::sjd_sim::race_atomic((a), sizeof(*(a)), __builtin_return_address(0), false)
#else
#define SJD_SIM_ATOMIC(a) ((void)0)
#define SJD_SIM_ATOMIC_STORE(a) ((void)0)
#endif
namespace sjd_sim {
// The value argument takes the pointer's type (converted, as CUDA's overloads convert it).
template <typename T>
struct same { using type = T; };
// Integer arithmetic wraps around, as on the GPU (signed overflow is undefined in C++).
template <typename T>
inline T wrap_add(T a, T b) {
  if constexpr (std::is_integral_v<T>)
    return static_cast<T>(static_cast<std::make_unsigned_t<T>>(a) + static_cast<std::make_unsigned_t<T>>(b));
  else
    return a + b;
}
}  // namespace sjd_sim
#define SJD_SIM_ARG(T) typename ::sjd_sim::same<T>::type
template <typename T>
SJD_SIM_RT inline T atomicAdd(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC(a); T o = *a; *a = ::sjd_sim::wrap_add(o, v); return o; }
template <typename T>
SJD_SIM_RT inline T atomicSub(T* a, SJD_SIM_ARG(T) v) {
  SJD_SIM_ATOMIC(a); T o = *a; *a = static_cast<T>(static_cast<std::make_unsigned_t<T>>(o) - static_cast<std::make_unsigned_t<T>>(v)); return o;
}
template <typename T>
SJD_SIM_RT inline T atomicExch(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC_STORE(a); T o = *a; *a = v; return o; }
template <typename T>
SJD_SIM_RT inline T atomicOr(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC(a); T o = *a; *a = o | v; return o; }
template <typename T>
SJD_SIM_RT inline T atomicAnd(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC(a); T o = *a; *a = o & v; return o; }
template <typename T>
SJD_SIM_RT inline T atomicXor(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC(a); T o = *a; *a = o ^ v; return o; }
template <typename T>
SJD_SIM_RT inline T atomicMin(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC(a); T o = *a; *a = v < o ? v : o; return o; }
template <typename T>
SJD_SIM_RT inline T atomicMax(T* a, SJD_SIM_ARG(T) v) { SJD_SIM_ATOMIC(a); T o = *a; *a = v > o ? v : o; return o; }
template <typename T>
SJD_SIM_RT inline T atomicCAS(T* a, SJD_SIM_ARG(T) cmp, SJD_SIM_ARG(T) v) {
  SJD_SIM_ATOMIC(a); T o = *a; if (o == cmp) *a = v; return o;
}
#undef SJD_SIM_ARG

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
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline unsigned __brev(unsigned v) {
  v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
  v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
  v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
  v = ((v >> 8) & 0x00ff00ffu) | ((v & 0x00ff00ffu) << 8);
  return (v >> 16) | (v << 16);
}
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return v == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(v)) + 1; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

using std::isfinite;
using std::max;
using std::min;

// Launch: SJD_LAUNCH(kernel, grid, block, smem, stream)(args...) in the sources.
#ifndef SJD_SIM_LAUNCH_BOUNDS
#define SJD_SIM_LAUNCH_BOUNDS ""
#endif
#define SJD_SIM_LAUNCH(kernel, grid, block, smem, stream) \
  ::sjd_sim::make_launcher(kernel, grid, block, smem, ::sjd_sim::launch_bound(#kernel, SJD_SIM_LAUNCH_BOUNDS))
#define SJD_SIM_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::sjd_sim::g_run.dyn_smem)
