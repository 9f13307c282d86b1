"""The simulator's CUDA semantics, checked on small kernels of its own (``csrc/sim/``).

Each test runs a kernel of ``PROBE`` below, compiled as the simulator compiles ``csrc/`` (the same
compiler, flags and include path as ``sjd_kernels.cuda.sim``, the race-checking build with its
instrumentation and ``race_check.cpp``) into a small program that launches it through
``sjd_sim::make_launcher`` and prints the results. Expected values follow the CUDA C++ Programming
Guide and PTX's ``shfl.sync`` / ``vote.sync`` / ``redux.sync``: warp shuffles (source lanes,
``width`` segments, lanes outside the exchange), votes and reductions in partial warps and in
groups of lanes with different masks, ``__syncthreads_count/and/or``, atomics' return values,
2D/3D indices, launch limits and the dynamic shared memory opt-in, bit intrinsics, the bf16 / fp16
conversions (against PyTorch's), and the race checks' handling of atomics on unwritten shared
memory. The loader's cache folder is checked last.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import REQUIRE_EXT  # noqa: E402

PROBE = r"""
// Small kernels for the simulator's semantics, run through sjd_sim's launcher; prints results.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

__global__ void shfl_k(int* out, int mode, int arg, int width) {
  const int v = 100 + static_cast<int>(threadIdx.x);
  int r = 0;
  if (mode == 0) r = __shfl_sync(0xffffffffu, v, arg, width);
  if (mode == 1) r = __shfl_xor_sync(0xffffffffu, v, arg, width);
  if (mode == 2) r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  if (mode == 3) r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  out[threadIdx.x] = r;
}

// a block of 48 threads: the second warp has 16 lanes; full masks name 16 lanes that do not exist
__global__ void partial_warp_k(int* out) {
  const int t = threadIdx.x;
  out[4 * t + 0] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
  out[4 * t + 1] = __reduce_add_sync(0xffffffffu, 1);
  out[4 * t + 2] = __shfl_sync(0xffffffffu, t, 20);          // lane 20 of warp 1 does not exist
  out[4 * t + 3] = __shfl_sync(0xffffffffu, t, (t & 31) ^ 1); // an existing lane
}

// lanes 0-15 and 16-31 exchange among themselves (one exchange, resp. two), then all 32 together
__global__ void groups_k(int* out) {
  const int lane = threadIdx.x & 31;
  int r;
  if (lane < 16) {
    r = __shfl_sync(0x0000ffffu, lane, 3);
  } else {
    r = __shfl_sync(0xffff0000u, lane, 17);
    r += __shfl_sync(0xffff0000u, lane, 18);
  }
  out[2 * lane] = r;
  out[2 * lane + 1] = __shfl_sync(0xffffffffu, 1000 + lane, lane ^ 16);
}

// lanes 16-31 exchange among themselves first, while lanes 0-15 already wait in a full-warp one
__global__ void nested_k(int* out) {
  const int lane = threadIdx.x & 31;
  int r = 0;
  if (lane >= 16) r = __reduce_add_sync(0xffff0000u, lane);
  out[lane] = r + __reduce_add_sync(0xffffffffu, 1) * 1000;
}

__global__ void mixed_ops_k(int* out) {
  const int lane = threadIdx.x & 31;
  if (lane < 16) out[lane] = __shfl_sync(0xffffffffu, lane, 0);
  else out[lane] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
}

__global__ void reduce_k(int* out) {
  const int lane = threadIdx.x & 31;
  const int v = lane - 10;
  out[0 + lane] = __reduce_min_sync(0xffffffffu, v);
  out[32 + lane] = __reduce_max_sync(0xffffffffu, v);
  out[64 + lane] = static_cast<int>(__reduce_min_sync(0xffffffffu, static_cast<unsigned>(v)));
  out[96 + lane] = static_cast<int>(__reduce_xor_sync(0xffffffffu, static_cast<unsigned>(lane)));
  out[128 + lane] = static_cast<int>(__reduce_and_sync(0xffffffffu, 0xf0u | (1u << (lane & 3))));
  out[160 + lane] = __all_sync(0xffffffffu, lane < 31) * 10 + __any_sync(0xffffffffu, lane == 31);
}

__global__ void dims_k(int* out) {
  const int lin = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int n = blockDim.x * blockDim.y * blockDim.z;
  const unsigned bal = __ballot_sync(0xffffffffu, 1);
  out[blk * n + lin] = static_cast<int>(threadIdx.x | threadIdx.y << 4 | threadIdx.z << 8 | blockIdx.x << 12 |
                                        blockIdx.y << 16 | blockIdx.z << 20) ^ (bal == 0xffffffffu ? 0 : 1 << 30);
}

__global__ void syncthreads_k(int* out, int exit_from) {
  const int t = threadIdx.x;
  if (t >= exit_from) return;
  const int c = __syncthreads_count(t % 3 == 0);
  const int a = __syncthreads_and(t < 1000);
  const int a2 = __syncthreads_and(t != 5);
  const int o = __syncthreads_or(t == 7);
  const int o2 = __syncthreads_or(0);
  if (t == 0) {
    out[0] = c; out[1] = a != 0; out[2] = a2 != 0; out[3] = o != 0; out[4] = o2 != 0;
  }
}

__global__ void atomics_k(int* out, unsigned* u) {
  __shared__ int s_max;
  __shared__ int s_cnt;
  const int t = threadIdx.x;
  if (t == 0) { s_max = INT_MIN; s_cnt = 0; }
  __syncthreads();
  atomicMax(&s_max, (t * 37) % 101);
  const int ticket = atomicAdd(&s_cnt, 1);
  atomicAdd(u, 1);                          // an int argument for an unsigned counter
  __syncthreads();
  if (t == 0) {
    out[0] = s_max;
    out[1] = s_cnt;
    int x = INT_MAX;
    out[2] = atomicAdd(&x, 1);              // the old value
    out[3] = x;                             // wrapped
    int y = 5;
    out[4] = atomicCAS(&y, 4, 9);
    out[5] = y;
    out[6] = atomicCAS(&y, 5, 9);
    out[7] = y;
    out[8] = atomicExch(&y, 3);
    out[9] = atomicSub(&y, 1);
    out[10] = y;
    out[11] = atomicMin(&y, -7);
    out[12] = y;
  }
  out[16 + t] = ticket;
}

__global__ void noop_k(int* out) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) out[0] += 1;
}

// launch bounds: a named constant, a literal with a second argument, and a template
constexpr int kProbeBound = 64;
__global__ void __launch_bounds__(kProbeBound) bounded_k(int* out) {
  if (threadIdx.x == 0) out[0] += 1;
}
__global__ void __launch_bounds__(96, 2) bounded_literal_k(int* out) {
  if (threadIdx.x == 0) out[0] += 1;
}
template <typename T, int N>
__global__ void __launch_bounds__(kProbeBound) bounded_tmpl_k(T* out) {
  if (threadIdx.x == 0) out[0] += N;
}

__global__ void smem_k(int* out) {
  SJD_SIM_DYNAMIC_SMEM(int, buf);
  buf[threadIdx.x] = 1;
  if (threadIdx.x == 0) out[0] += 1;
}

// race build: an atomic counter in shared memory that no thread initialised
__global__ void uninit_atomic_k(int* out) {
  __shared__ int s_cnt;
  atomicAdd(&s_cnt, 1);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s_cnt;
}

// race build: block 0 sets a static __shared__ value, the other blocks only read it
__global__ void static_smem_k(int* out) {
  __shared__ int s_v;
  if (blockIdx.x == 0 && threadIdx.x == 0) s_v = 7;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s_v;
}

// race build: two groups of one warp each exchange through shared memory, ordered by their own exchange
__global__ void group_exchange_k(int* out) {
  __shared__ int s[32];
  const int lane = threadIdx.x & 31;
  const unsigned m = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  s[lane] = lane * 3;
  __shfl_sync(m, 0, lane);
  out[lane] = s[lane ^ 1];
}

// race build: the same without the exchange
__global__ void group_exchange_racy_k(int* out) {
  __shared__ int s[32];
  const int lane = threadIdx.x & 31;
  s[lane] = lane * 3;
  out[lane] = s[lane ^ 1];
}

// a thread whose local array outgrows the simulator's fiber stack (thread 0 has returned by then)
__global__ void big_frame_k(int* out, int n) {
  if (threadIdx.x == 0) return;
  volatile char buf[n];  // a variable-length array (GNU C++): a frame of n bytes
  for (int i = n - 1; i >= 0; --i) buf[i] = static_cast<char>(i);
  out[0] = buf[n / 2];
}

// lanes 0-15 wait in a full-warp shuffle that lanes 16-31, waiting at __syncthreads, never reach
__global__ void warp_deadlock_k(int* out) {
  const int lane = threadIdx.x & 31;
  if (lane < 16) out[lane] = __shfl_sync(0xffffffffu, lane, 0);
  else __syncthreads();
}

static std::vector<int> run_int(const char* name, int n, const std::function<void(int*)>& f) {
  std::vector<int> out(n, 0);
  f(out.data());
  return out;
}

static void print(const std::vector<int>& v) {
  for (size_t i = 0; i < v.size(); ++i) std::printf("%s%d", i ? " " : "", v[i]);
  std::printf("\n");
}

int main(int argc, char** argv) {
  if (const char* o = std::getenv("SIM_ORDER")) sjd_sim::g_cfg.order = std::atoi(o);
  const std::string c = argc > 1 ? argv[1] : "";
  auto L = [](auto k, dim3 g, dim3 b, size_t smem) { return sjd_sim::make_launcher(k, g, b, smem); };
  try {
    if (c == "shfl") {
      std::vector<int> out(32);
      L(shfl_k, 1, 32, 0)(out.data(), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]));
      print(out);
    } else if (c == "partial_warp") {
      std::vector<int> out(48 * 4);
      L(partial_warp_k, 1, 48, 0)(out.data());
      print(out);
    } else if (c == "groups" || c == "nested" || c == "mixed_ops") {
      std::vector<int> out(64);
      L(c == "groups" ? groups_k : c == "nested" ? nested_k : mixed_ops_k, 1, 32, 0)(out.data());
      print(out);
    } else if (c == "reduce") {
      std::vector<int> out(192);
      L(reduce_k, 1, 32, 0)(out.data());
      print(out);
    } else if (c == "dims") {
      const dim3 g(2, 3, 2), b(4, 2, 4);
      std::vector<int> out(12 * 32);
      L(dims_k, g, b, 0)(out.data());
      print(out);
    } else if (c == "syncthreads") {
      std::vector<int> out(5);
      L(syncthreads_k, 1, 100, 0)(out.data(), std::atoi(argv[2]));
      print(out);
    } else if (c == "atomics") {
      std::vector<int> out(16 + 64);
      unsigned u = 0;
      L(atomics_k, 1, 64, 0)(out.data(), &u);
      out.push_back(static_cast<int>(u));
      print(out);
    } else if (c == "launch") {
      // block x y z, grid x y z: the error and whether the kernel ran
      int out = 0;
      const dim3 b(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]));
      const dim3 g(std::strtoul(argv[5], nullptr, 10), std::atoi(argv[6]), std::atoi(argv[7]));
      L(noop_k, g, b, 0)(&out);
      std::printf("%d %d\n", static_cast<int>(cudaGetLastError()), out);
    } else if (c == "bounds") {
      // argv[2]: the kernel, argv[3]: threads per block, launched as the sources launch (SJD_SIM_LAUNCH)
      int out = 0;
      const std::string k = argv[2];
      const int n = std::atoi(argv[3]);
      if (k == "bounded") SJD_SIM_LAUNCH(bounded_k, 1, n, 0, 0)(&out);
      if (k == "literal") SJD_SIM_LAUNCH(bounded_literal_k, 1, n, 0, 0)(&out);
      if (k == "tmpl") SJD_SIM_LAUNCH((bounded_tmpl_k<int, 1>), 1, n, 0, 0)(&out);
      if (k == "noop") SJD_SIM_LAUNCH(noop_k, 1, n, 0, 0)(&out);
      std::printf("%d %d\n", static_cast<int>(cudaGetLastError()), out);
    } else if (c == "smem") {
      // argv[2]: the attribute to set first (-1: none); argv[3]: the launch's bytes
      int out = 0;
      const int attr = std::atoi(argv[2]);
      int set = 0;
      if (attr >= 0)
        set = cudaFuncSetAttribute(reinterpret_cast<const void*>(smem_k), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   attr);
      L(smem_k, 1, 32, static_cast<size_t>(std::atoi(argv[3])))(&out);
      std::printf("%d %d %d\n", set, static_cast<int>(cudaGetLastError()), out);
    } else if (c == "intrinsics") {
      std::vector<long long> v = {
          __clz(0), __clz(1), __clz(-1), __clz(0x00010000), __ffs(0), __ffs(1), __ffs(INT_MIN), __ffs(0x50),
          __popc(0u), __popc(0xffffffffu), __popc(0x80000001u), __brev(1u), __brev(0x80000000u), __brev(0x12345678u),
          __umulhi(0xffffffffu, 0xffffffffu), __umulhi(0x10000u, 0x10000u), __float_as_uint(-0.0f),
          __float_as_uint(__uint_as_float(0x7fc00001u)), __float_as_uint(__uint_as_float(0x00000001u))};
      for (size_t i = 0; i < v.size(); ++i) std::printf("%s%lld", i ? " " : "", v[i]);
      std::printf("\n");
    } else if (c == "big_frame") {
      int out = 0;
      L(big_frame_k, 1, 2, 0)(&out, std::atoi(argv[2]));
      std::printf("%d\n", out);
    } else if (c == "warp_deadlock") {
      std::vector<int> out(32);
      L(warp_deadlock_k, 1, 32, 0)(out.data());
      print(out);
    } else if (c == "convert") {
      // stdin: float32 bits; stdout: bf16 bits, half bits, bf16->float bits, half->float bits (hex)
      unsigned x;
      while (std::scanf("%x", &x) == 1) {
        const float f = __uint_as_float(x);
        const __nv_bfloat16 b = __float2bfloat16_rn(f);
        const __half h = __float2half_rn(f);
        const uint16_t lo = static_cast<uint16_t>(x & 0xffff);
        std::printf("%x %x %x %x\n", b.x, h.x, __float_as_uint(__bfloat162float(__nv_bfloat16{lo})),
                    __float_as_uint(__half2float(__half{lo})));
      }
    } else if (c == "uninit_atomic" || c == "static_smem" || c == "group_exchange" || c == "group_exchange_racy") {
      std::vector<int> out(3 * 32);
      if (c == "uninit_atomic") L(uninit_atomic_k, 2, 32, 0)(out.data());
      if (c == "static_smem") L(static_smem_k, 3, 32, 0)(out.data());
      if (c == "group_exchange") L(group_exchange_k, 1, 32, 0)(out.data());
      if (c == "group_exchange_racy") L(group_exchange_racy_k, 1, 32, 0)(out.data());
      print(out);
    } else {
      std::printf("unknown case\n");
      return 2;
    }
  } catch (const std::exception& e) {
    std::printf("RuntimeError: %s\n", e.what());
  }
  return 0;
}
"""

ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}


def _build(out_dir, race):
    from sjd_kernels.cuda import sim
    try:
        cxx = sim._compiler()
    except sim.SimUnavailable as e:
        if REQUIRE_EXT:
            pytest.fail(f"SJD_REQUIRE_EXT=1 but no C++ compiler for the simulator: {e}")
        pytest.skip(str(e))
    src = out_dir / "probe.cpp"
    src.write_text(PROBE)
    inc = [f"-I{d}" for d in sim.include_dirs(sim.CSRC)]
    exe = out_dir / ("probe_race" if race else "probe")
    kernel_flags = [*sim.FLAGS, sim.launch_bounds_flag(PROBE), *(sim.RACE_KERNEL_FLAGS if race else ())]
    cmds = [[cxx, *kernel_flags, *inc, "-c", str(src), "-o", str(exe) + ".o"]]
    objs = [str(exe) + ".o"]
    if race:
        cmds.append([cxx, *sim.FLAGS, *sim.RACE_FLAGS, "-O2", *inc, "-c", str(sim.CSRC / "sim" / "race_check.cpp"),
                     "-o", str(exe) + ".rc.o"])
        objs.append(str(exe) + ".rc.o")
    cmds.append([cxx, *objs, "-o", str(exe)])
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    exe = _build(tmp_path_factory.mktemp("sim_probe"), race=False)

    def run(*args, order="forward", stdin=None):
        env = dict(os.environ, SIM_ORDER=str(ORDERS[order]))
        r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, input=stdin,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    return run


@pytest.fixture(scope="module")
def race_probe(tmp_path_factory):
    exe = _build(tmp_path_factory.mktemp("sim_probe_race"), race=True)

    def run(*args, order="shuffle"):
        env = dict(os.environ, SIM_ORDER=str(ORDERS[order]))
        r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    return run


def ints(out):
    assert not out.startswith("RuntimeError"), out
    return [int(x) for x in out.split()]


# ---------------------------------------------------------------- warp shuffles

LANES = range(32)
SHUFFLES = {
    # __shfl_sync: srcLane modulo width, in the caller's segment of width lanes; a negative srcLane too
    "idx-5-w8": ((0, 5, 8), [100 + (l & ~7) + 5 for l in LANES]),
    "idx-13-w8": ((0, 13, 8), [100 + (l & ~7) + 5 for l in LANES]),
    "idx-neg1": ((0, -1, 32), [131] * 32),
    # __shfl_xor_sync: a lane mask at or above width (PTX bfly: the source may lie in a lower
    # segment, never in a higher one) and above 31 (its low 5 bits)
    "xor-16-w16": ((1, 16, 16), [100 + l if l < 16 else 100 + l - 16 for l in LANES]),
    "xor-33": ((1, 33, 32), [100 + (l ^ 1) for l in LANES]),
    "xor-1-w2": ((1, 1, 2), [100 + (l ^ 1) for l in LANES]),
    # __shfl_up_sync / __shfl_down_sync: the own value where the source leaves the segment; delta's
    # low 5 bits
    "up-2-w4": ((2, 2, 4), [100 + l - 2 if l % 4 >= 2 else 100 + l for l in LANES]),
    "up-33": ((2, 33, 32), [100 + l - 1 if l >= 1 else 100 for l in LANES]),
    "down-3-w8": ((3, 3, 8), [100 + l + 3 if l % 8 < 5 else 100 + l for l in LANES]),
    "down-16": ((3, 16, 32), [100 + l + 16 if l < 16 else 100 + l for l in LANES]),
}


@pytest.mark.parametrize("name", list(SHUFFLES))
def test_shuffle_source_lanes(probe, name):
    args, want = SHUFFLES[name]
    for order in ORDERS:
        assert ints(probe("shfl", *args, order=order)) == want, order


@pytest.mark.parametrize("width", [64, 3, 0])
def test_shuffle_width_outside_1_to_32_is_an_error(probe, width):
    """CUDA leaves other widths undefined; the simulator read past its exchange row for them."""
    out = probe("shfl", 0, 40, width)
    assert out.startswith("RuntimeError") and f"width {width}" in out


def test_partial_warp_with_full_mask(probe):
    """A block of 48 threads: full masks in the second warp name 16 lanes that do not exist. CUDA
    evaluates votes and reductions over the non-exited lanes of the mask (no error); a shuffle from
    an absent lane is undefined (all bits set here), from a present one exact."""
    v = ints(probe("partial_warp"))
    for t in range(48):
        ballot, count, from20, partner = v[4 * t: 4 * t + 4]
        assert ballot == (-1 if t < 32 else 0xffff), t
        assert count == (32 if t < 32 else 16), t
        assert from20 == (20 if t < 32 else -1), t
        assert partner == t ^ 1, t


@pytest.mark.parametrize("order", list(ORDERS))
def test_groups_with_disjoint_masks_then_the_whole_warp(probe, order):
    """Lanes 0-15 exchange once among themselves, lanes 16-31 twice, then all 32 together: legal
    CUDA. The simulator refused it as "different masks" (or, with its exchange slots rotating per
    lane, could read another lane's value of a different exchange)."""
    v = ints(probe("groups", order=order))
    for lane in range(32):
        assert v[2 * lane] == (3 if lane < 16 else 17 + 18), lane
        assert v[2 * lane + 1] == 1000 + (lane ^ 16), lane


@pytest.mark.parametrize("order", list(ORDERS))
def test_a_group_exchanges_while_the_others_wait_for_the_whole_warp(probe, order):
    """Lanes 0-15 wait in a full-warp reduction while lanes 16-31 first reduce among themselves.
    Under "reverse" the simulator returned 392000 and 16376 instead of 32000 and 32376."""
    v = ints(probe("nested", order=order))
    assert v[:32] == [32000] * 16 + [32000 + sum(range(16, 32))] * 16


def test_different_intrinsics_with_one_mask_is_an_error(probe):
    out = probe("mixed_ops")
    assert out.startswith("RuntimeError") and "different warp intrinsics" in out


def test_warp_reductions_and_votes(probe):
    v = ints(probe("reduce", order="shuffle"))
    col = lambda k: set(v[32 * k: 32 * k + 32])  # noqa: E731
    assert col(0) == {-10} and col(1) == {21}          # __reduce_min/max_sync, signed
    assert col(2) == {0}                                  # unsigned: the negative values are large
    assert col(3) == {0}                                  # xor of 0..31
    assert col(4) == {0xf0}                               # and
    assert col(5) == {1}                                  # __all_sync false, __any_sync true


# ---------------------------------------------------------------- block-wide

def test_3d_launch_indices(probe):
    """blockDim (4, 2, 4), gridDim (2, 3, 2): threadIdx x fastest, warps of 32 consecutive linear
    threads, blockIdx over the grid."""
    v = ints(probe("dims"))
    assert len(v) == 12 * 32
    for bz in range(2):
        for by in range(3):
            for bx in range(2):
                for tz in range(4):
                    for ty in range(2):
                        for tx in range(4):
                            blk = bx + 2 * (by + 3 * bz)
                            lin = tx + 4 * (ty + 2 * tz)
                            want = tx | ty << 4 | tz << 8 | bx << 12 | by << 16 | bz << 20
                            assert v[blk * 32 + lin] == want


@pytest.mark.parametrize("exit_from", [100, 50])
def test_syncthreads_count_and_or(probe, exit_from):
    """Over the threads that have not exited (threads from ``exit_from`` on return first)."""
    n = exit_from
    assert ints(probe("syncthreads", exit_from)) == [sum(t % 3 == 0 for t in range(n)), 1, 0, 1, 0]


def test_atomics(probe):
    v = ints(probe("atomics", order="shuffle"))
    assert v[0] == max(t * 37 % 101 for t in range(64)) and v[1] == 64
    assert v[2:4] == [2**31 - 1, -(2**31)]            # atomicAdd returns the old value; int wraps
    assert v[4:8] == [5, 5, 5, 9]                       # atomicCAS: old value; swaps only on a match
    assert v[8:13] == [9, 3, 2, 2, -7]                  # atomicExch, atomicSub, atomicMin
    assert sorted(v[16:80]) == list(range(64))          # tickets: each old value once
    assert v[80] == 64                                  # atomicAdd(unsigned*, 1)


LAUNCHES = {
    "ok": ((32, 1, 1, 1, 1, 1), "0 1"),
    "z-64": ((1, 1, 64, 1, 1, 1), "0 1"),
    "z-65": ((1, 1, 65, 1, 1, 1), "9 0"),       # blockDim.z at most 64
    "y-1025": ((1, 1025, 1, 1, 1, 1), "9 0"),
    "1025-threads": ((1025, 1, 1, 1, 1, 1), "9 0"),
    "grid-x-2^31": ((1, 1, 1, 2**31, 1, 1), "9 0"),
    "grid-y-65536": ((1, 1, 1, 1, 65536, 1), "9 0"),
}


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_launch_configuration_limits(probe, name):
    args, want = LAUNCHES[name]
    assert probe("launch", *args).split() == want.split()


@pytest.mark.parametrize("attr,smem,want", [
    (-1, 48 * 1024, "0 0 1"),               # up to 48 KiB without the attribute
    (-1, 48 * 1024 + 4, "0 1 0"),           # above: cudaErrorInvalidValue, the kernel does not run
    (64 * 1024, 64 * 1024, "0 0 1"),        # after cudaFuncSetAttribute
    (64 * 1024, 64 * 1024 + 4, "0 1 0"),    # but not past the attribute
    (227 * 1024, 64 * 1024, "1 1 0"),       # an attribute above 227 KiB less the static shared memory
])
def test_dynamic_shared_memory_needs_the_opt_in(probe, attr, smem, want):
    """On the GPU a launch with over 48 KiB of dynamic shared memory fails unless
    cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) allowed it; the simulator ran
    any size up to 227 KiB."""
    assert probe("smem", attr, smem).split() == want.split()


@pytest.mark.parametrize("kernel,threads,want", [
    ("bounded", 64, "0 1"), ("bounded", 96, "701 0"),          # __launch_bounds__(kProbeBound = 64)
    ("literal", 96, "0 1"), ("literal", 128, "701 0"),         # __launch_bounds__(96, 2)
    ("tmpl", 64, "0 1"), ("tmpl", 65, "701 0"),                # a template launched as (k<int, 1>)
    ("noop", 1024, "0 1"),                                     # no bounds: the device's 1024
])
def test_launch_bounds_are_enforced(probe, kernel, threads, want):
    """On the GPU a launch with more threads per block than the kernel's __launch_bounds__ fails
    (cudaErrorLaunchOutOfResources, 701) and the kernel does not run; the simulator ignored the bounds."""
    assert probe("bounds", kernel, threads).split() == want.split()


def test_launch_bounds_of_the_sources():
    """The loader reads every kernel's bound from csrc/ (the define SJD_SIM_LAUNCH_BOUNDS of its
    build), and refuses a bound it cannot read rather than ignore it."""
    from sjd_kernels.cuda import sim
    got = {}
    for s in sim.SOURCES:
        got.update(sim.launch_bounds((sim.CSRC / s).read_text()))
    assert got == {"jacobi_rows_kernel": 1024, "sjd2_prepare_kernel": 256, "tree_rowcheck_kernel": 256,
                   "tree_verify_kernel": 1024, "verify_chain_kernel": 1024}
    n_src = sum((sim.CSRC / s).read_text().count("__launch_bounds__(") for s in sim.SOURCES)
    assert n_src == len(got)
    launch = "\nvoid go() { SJD_LAUNCH(k, 1, 1, 0, 0)(nullptr); }"
    assert sim.launch_bounds("constexpr int kB = 96;\n__global__ void __launch_bounds__(kB, 2) k(int* p) {}"
                             + launch) == {"k": 96}
    with pytest.raises(sim.SimUnavailable, match=r"__launch_bounds__\(NT\) of k"):
        sim.launch_bounds("template <int NT> __global__ void __launch_bounds__(NT) k(int* p) {}" + launch)
    for text in ("__global__ void __launch_bounds__(kA * 2) k(int* p) {}", "__global__ void __launch_bounds__(256u) "
                 "k(int* p) {}", "__global__ __launch_bounds__(256) void k(int* p) {}",
                 "__global__ void __launch_bounds__ (256) k(int* p) {}"):
        with pytest.raises(sim.SimUnavailable, match="a __launch_bounds__ the simulator cannot read"):
            sim.launch_bounds(text + launch)
    with pytest.raises(sim.SimUnavailable, match="k has __launch_bounds__ but is not launched by its name"):
        sim.launch_bounds("__global__ void __launch_bounds__(64) k(int* p) {}\n"
                          "void go() { auto f = k; SJD_LAUNCH(f, 1, 1, 0, 0)(nullptr); }")


def test_integer_and_bit_intrinsics(probe):
    v = ints(probe("intrinsics"))
    assert v == [32, 31, 0, 15, 0, 1, 32, 5, 0, 32, 2, 2**31, 1, 0x1E6A2C48, 0xFFFFFFFE, 1, 0x80000000,
                 0x7FC00001, 1]


# ---------------------------------------------------------------- conversions

def _f32_bits():
    special = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x807FFFFF,
               0x477FEFFF, 0x477FF000, 0x477FE000, 0x38800000, 0x387FFFFF, 0x33800000, 0x33000000, 0x33000001,
               0x32FFFFFF, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7F8000, 0x7FC00000, 0x7F800001, 0xFFC12345]
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, 2**32, (20000,), generator=g, dtype=torch.int64).tolist()
    # values around the fp16 range, and ties of both conversions
    near = torch.randint(0x30000000, 0x48000000, (20000,), generator=g, dtype=torch.int64)
    ties = (near & ~0xFFFF) | 0x8000
    return special + rnd + near.tolist() + ties.tolist() + (ties | 0x1000).tolist()


def test_bf16_and_fp16_conversions_match_torch(probe):
    """float -> bf16 / fp16 round to nearest even (ties, overflow to infinity, fp16 subnormals);
    bf16 / fp16 -> float exact, for every 16-bit pattern. NaNs are compared as NaNs."""
    bits = _f32_bits() + list(range(65536))
    out = probe("convert", stdin="\n".join(f"{b:x}" for b in bits) + "\n")
    rows = [[int(x, 16) for x in ln.split()] for ln in out.splitlines()]
    assert len(rows) == len(bits)
    f = torch.tensor([struct.unpack("<f", struct.pack("<I", b))[0] for b in bits], dtype=torch.float32)
    want_bf = f.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    want_h = f.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    lo = torch.tensor([b & 0xFFFF for b in bits], dtype=torch.int64).to(torch.int16)
    want_bf2f = lo.view(torch.bfloat16).float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    want_h2f = lo.view(torch.float16).float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    got = torch.tensor(rows, dtype=torch.int64)
    nan = torch.isnan(f)
    assert torch.equal(got[~nan, 0], want_bf[~nan]) and torch.equal(got[~nan, 1], want_h[~nan])
    # NaN in, NaN out (the payload CUDA returns is not modelled)
    assert bool(((got[nan, 0] & 0x7F80) == 0x7F80).all() and ((got[nan, 0] & 0x7F) != 0).all())
    assert bool(((got[nan, 1] & 0x7C00) == 0x7C00).all() and ((got[nan, 1] & 0x3FF) != 0).all())
    lnan = torch.isnan(lo.view(torch.bfloat16).float())
    assert torch.equal(got[~lnan, 2], want_bf2f[~lnan])
    hnan = torch.isnan(lo.view(torch.float16).float())
    assert torch.equal(got[~hnan, 3], want_h2f[~hnan])
    assert bool(((got[hnan, 3] & 0x7F800000) == 0x7F800000).all() and ((got[hnan, 3] & 0x7FFFFF) != 0).all())


# ---------------------------------------------------------------- race checks

def test_race_check_reports_an_atomic_on_unwritten_shared_memory(race_probe):
    """atomicAdd to a __shared__ counter no thread set reads garbage on the GPU; the old value of
    an atomic counts as a read of the word (the checks took atomics for plain writes)."""
    out = race_probe("uninit_atomic")
    assert "that no thread of the block wrote" in out and "s_cnt" in out


def test_race_check_reports_static_shared_memory_left_by_another_block(race_probe):
    """A static __shared__ value written by block 0 only: the plain build reads block 0's value in
    the later blocks (statics), the race-checking build reports the read."""
    out = race_probe("static_smem")
    assert "that no thread of the block wrote" in out and "s_v" in out and "block 1" in out


@pytest.mark.parametrize("order", list(ORDERS))
def test_race_check_orders_accesses_by_a_group_exchange(race_probe, order):
    """Two groups of lanes, each ordered by its own exchange: no report, the values read exact."""
    v = ints(race_probe("group_exchange", order=order))
    assert v[:32] == [3 * (lane ^ 1) for lane in range(32)]


def test_race_check_still_reports_a_missing_exchange(race_probe):
    out = race_probe("group_exchange_racy")
    assert "race on __shared__ s" in out


# ---------------------------------------------------------------- loader

def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    from pathlib import Path

    from sjd_kernels.cuda import sim
    default = Path.home() / ".cache" / "sjd_kernels" / "sim"
    monkeypatch.setenv("SJD_SIM_CACHE", "")
    assert sim.cache_dir() == default                    # set but empty: the default, not the cwd
    monkeypatch.setenv("SJD_SIM_CACHE", "~/simcache-x")
    assert sim.cache_dir() == Path.home() / "simcache-x"  # ~ expanded
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SJD_SIM_CACHE", "rel")
    assert sim.cache_dir() == tmp_path / "rel" and sim.cache_dir().is_absolute()
    monkeypatch.delenv("SJD_SIM_CACHE")
    assert sim.cache_dir() == default


def test_object_cache_key_covers_the_compiler_version(monkeypatch, tmp_path):
    """Objects built by another compiler at the same path are not reused."""
    pytest.importorskip("pybind11")
    from sjd_kernels.cuda import sim
    try:
        cxx = sim._compiler()
    except sim.SimUnavailable as e:
        pytest.skip(str(e))
    (tmp_path / "a.cu").write_text("int f() { return 1; }\n")
    built = []
    monkeypatch.setattr(sim, "_run", lambda cmd, verbose: (built.append(cmd), open(cmd[-1], "w").close()))
    args = (cxx, tmp_path / "a.cu", ["-O1"], [tmp_path], [], tmp_path / "cache", False)
    o1 = sim._object(*args)
    assert sim._object(*args) == o1 and len(built) == 1
    monkeypatch.setattr(sim, "_compiler_version", lambda c: "another compiler 99.0")
    assert sim._object(*args) != o1 and len(built) == 2


def test_concurrent_loads_give_one_module():
    """Threads that load the simulator at once get the same module object (one build, one import)."""
    from concurrent.futures import ThreadPoolExecutor

    from _util import sim_module
    from sjd_kernels.cuda import sim
    first = sim_module()
    saved = dict(sim._modules)
    sim._modules.clear()
    try:
        with ThreadPoolExecutor(4) as ex:
            mods = list(ex.map(lambda _: sim.load(), range(8)))
    finally:
        sim._modules.clear()
        sim._modules.update(saved)
    assert all(m is mods[0] for m in mods)
    assert mods[0].__file__ == first.__file__


@pytest.mark.parametrize("kib,ok", [(100, True), (220, False)])
def test_a_thread_stack_overflow_is_reported(probe, kib, ok):
    """Threads are fibers with 192 KiB stacks (a GPU thread's local memory is larger): a frame that
    outgrows it fails the launch instead of overwriting the neighbouring fiber's stack unnoticed."""
    out = probe("big_frame", kib * 1024, order="forward")
    if ok:
        assert not out.startswith("RuntimeError"), out
    else:
        assert out.startswith("RuntimeError") and "overflowed its 192 KiB stack" in out


@pytest.mark.parametrize("order", list(ORDERS))
def test_a_warp_exchange_that_half_the_warp_never_reaches_is_a_deadlock_error(probe, order):
    out = probe("warp_deadlock", order=order)
    assert out.startswith("RuntimeError") and "deadlock" in out
