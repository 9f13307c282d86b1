// tree_kv_update: move the accepted tree path's K/V into place, CUDA version of
// sjd_kernels/reference/tree.py (tree_kv_update, tree_kv_update_list).
//
// One launch for every layer, K and V, row and KV head: grid (head groups, 2 * layers, R). Each
// block owns the [S, D] planes of its heads in one (layer, K/V, row), so blocks never touch the
// same memory. A block first reads its row's path into shared memory and checks it (an entry
// 0 <= path[j] < j, a source slot >= S, or cache_len < 0 make the row malformed: nothing of it
// moves, and the block of head group 0 / layer 0 / K sets bit 4 of status[0] with one atomicOr; no
// host synchronisation). Then it copies in rounds over the flattened (head, j, unit) items, j-major
// within a head, each round "all loads into registers, __syncthreads, all stores".
//
// Why this is safe in place (path [0, 2, 3] into slots [0, 1, 2]: slot 2 is read for j = 1 and
// written for j = 2): with path[j] >= j a slot X is read only by entries j < X and written only by
// entry X. Those readers come earlier in the item order, so they are in the same round as the
// writer (the barrier orders their loads before its store) or in an earlier round (whose barrier
// the writer has passed). A load never reads a slot written by an earlier round, since earlier
// rounds write slots j' <= j <= path[j] and j' = path[j] would be an entry that does not move.
// One barrier per round is therefore enough.
//
// Accesses are global-space and L2-cached (ld/st.global.cg: every byte is touched once; never the
// non-coherent path, since the kernel writes what it reads), `Unit` bytes wide: 16 (uint4) when
// D * elem_size, every stride in bytes and every base address are multiples of 16, else 8, 4 or 2
// (the widest that divides them all). The kernel is templated on that width only: a copy needs no
// dtype, and bits move unchanged (NaN payloads and signed zeros included).
//
// Two configurations of the same kernel. Batch <= 2 (one request, with or without its CFG row):
// one block per (head, layer, K/V, row) and one unit per thread, so the whole plane's path moves
// in a single round with the shortest chain path -> load -> barrier -> store, and the most blocks
// to spread over the SMs. Larger batches: a block takes a group of heads of one (layer, K/V, row)
// and each thread keeps 4 units in flight per round, for fewer, fuller blocks.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "state.cuh"
#include "tree_kv_update.h"

namespace sjd {
namespace {

constexpr int kMaxPath = 8192;    // entries of the shared path copy (32 KB)

struct MoveParams {
  char* cache;                 // stacked layout base, or null
  const int64_t* ptr_table;    // table layout, or null
  int64_t sb_layer, sb_kv, sb_row, sb_head, sb_slot;  // strides in bytes
  const int64_t* path;
  const int64_t* cache_len;
  int32_t* status;
  int H, P, units_per_row, heads_per_block;
  int64_t S;
};

template <typename Unit, int kUnroll>
__global__ void tree_kv_update_kernel(const MoveParams p) {
  SJD_DYNAMIC_SMEM(int, s_src);  // [P]: path[j] when entry j moves, else -1
  const int r = blockIdx.z;
  const int lk = blockIdx.y;      // layer * 2 + (0 = K, 1 = V)
  const int P = p.P;
  const int64_t cl = p.cache_len[r];
  int bad = cl < 0;
  for (int j = threadIdx.x; j < P; j += blockDim.x) {
    const int64_t q = p.path[static_cast<int64_t>(r) * P + j];
    const bool used = q >= 0;
    bad |= used && (q < j || q >= p.S - (cl < 0 ? 0 : cl));  // not cl + q >= S: the sum can wrap
    s_src[j] = (used && q != j && q <= INT_MAX) ? static_cast<int>(q) : -1;
  }
  if (__syncthreads_or(bad)) {
    if (blockIdx.x == 0 && lk == 0 && threadIdx.x == 0) atomicOr(p.status + kStatusErr, kErrTreeIndex);
    return;
  }

  char* plane;
  if (p.ptr_table != nullptr)
    plane = reinterpret_cast<char*>(p.ptr_table[lk]) + r * p.sb_row;
  else
    plane = p.cache + (lk >> 1) * p.sb_layer + (lk & 1) * p.sb_kv + r * p.sb_row;
  const int h0 = blockIdx.x * p.heads_per_block;
  const int nh = min(p.heads_per_block, p.H - h0);
  const int U = p.units_per_row;
  const int per_head = P * U;
  const int total = nh * per_head;  // < 2^31: checked on the host
  const int step = blockDim.x * kUnroll;

  for (int base = 0; base < total; base += step) {  // block-uniform trip count: the barrier is safe
    Unit v[kUnroll];
    Unit* dst[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      dst[k] = nullptr;
      const int n = base + k * blockDim.x + threadIdx.x;
      if (n < total) {
        const int hh = n / per_head;
        const int rem = n - hh * per_head;
        const int j = rem / U;
        const int u = rem - j * U;
        const int q = s_src[j];
        if (q >= 0) {
          char* head = plane + static_cast<int64_t>(h0 + hh) * p.sb_head + static_cast<int64_t>(u) * sizeof(Unit);
          v[k] = __ldcg(reinterpret_cast<const Unit*>(head + (cl + q) * p.sb_slot));
          dst[k] = reinterpret_cast<Unit*>(head + (cl + j) * p.sb_slot);
        }
      }
    }
    // every source of this round is in registers before any destination is written
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (dst[k] != nullptr) __stcg(dst[k], v[k]);
  }
}

template <typename Unit>
void launch_width(const MoveParams& prm, int layers, int R, bool low_latency, cudaStream_t st) {
  const int per_head = prm.P * prm.units_per_row;
  const int smem = prm.P * static_cast<int>(sizeof(int));
  const dim3 grid(static_cast<unsigned>((prm.H + prm.heads_per_block - 1) / prm.heads_per_block),
                  static_cast<unsigned>(2 * layers), static_cast<unsigned>(R));
  if (low_latency) {
    int threads = ((per_head + 31) / 32) * 32;
    threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
    auto* kernel = tree_kv_update_kernel<Unit, 1>;
    SJD_LAUNCH(kernel, grid, threads, smem, st)(prm);
  } else {
    auto* kernel = tree_kv_update_kernel<Unit, 4>;
    SJD_LAUNCH(kernel, grid, 256, smem, st)(prm);
  }
  SJD_CHECK_LAUNCH("tree_kv_update_kernel");
}

bool divides(int64_t unit, int64_t x) { return x % unit == 0; }

}  // namespace

int tree_kv_update_launch(const TreeKvUpdateArgs& a) {
  const bool table = a.cache == nullptr;
  SJD_REQUIRE(!table || a.ptr_table != nullptr, "tree_kv_update: need a cache pointer or a ptr_table");
  SJD_REQUIRE(!table || (a.ptr_align >= 1 && a.ptr_align <= 16 && (a.ptr_align & (a.ptr_align - 1)) == 0),
              "tree_kv_update: ptr_align must be a power of two in [1, 16] with a ptr_table, got " +
                  std::to_string(a.ptr_align));
  // an empty path (P = 0) may have no storage: the kernel then reads only cache_len
  SJD_REQUIRE((a.path || a.P == 0) && a.cache_len && a.status,
              "tree_kv_update: path (when P > 0), cache_len and status are required");
  SJD_REQUIRE(a.elem_size == 1 || a.elem_size == 2 || a.elem_size == 4 || a.elem_size == 8,
              "tree_kv_update: elem_size must be 1, 2, 4 or 8 bytes, got " + std::to_string(a.elem_size));
  SJD_REQUIRE(a.layers >= 1 && 2 * static_cast<int64_t>(a.layers) <= 65535,
              "tree_kv_update: layers must be in [1, 32767], got " + std::to_string(a.layers));
  SJD_REQUIRE(a.R >= 0 && a.R <= 65535, "tree_kv_update: R (rows) must be in [0, 65535], got " + std::to_string(a.R));
  SJD_REQUIRE(a.H >= 1 && a.D >= 1 && a.S >= 1 && a.S <= INT_MAX,
              "tree_kv_update: need H >= 1, D >= 1 and 1 <= S <= 2^31 - 1");
  SJD_REQUIRE(a.P >= 0 && a.P <= kMaxPath, "tree_kv_update: path length P must be in [0, " +
                                               std::to_string(kMaxPath) + "], got " + std::to_string(a.P));
  require_device(a.device, "tree_kv_update");
  if (a.R == 0) return 0;

  const int64_t E = a.elem_size;
  const int64_t row_bytes = static_cast<int64_t>(a.D) * E;
  const int64_t base_addr = table ? a.ptr_align : static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.cache));
  int unit = 16;
  while (unit > E && !(divides(unit, row_bytes) && divides(unit, base_addr) && divides(unit, a.stride_row * E) &&
                       divides(unit, a.stride_head * E) && divides(unit, a.stride_slot * E) &&
                       (table || (divides(unit, a.stride_layer * E) && divides(unit, a.stride_kv * E)))))
    unit /= 2;
  SJD_REQUIRE(divides(E, base_addr), "tree_kv_update: a base address is not aligned to the element size");

  MoveParams p{};
  p.cache = static_cast<char*>(a.cache);
  p.ptr_table = table ? a.ptr_table : nullptr;
  p.sb_layer = a.stride_layer * E;
  p.sb_kv = a.stride_kv * E;
  p.sb_row = a.stride_row * E;
  p.sb_head = a.stride_head * E;
  p.sb_slot = a.stride_slot * E;
  p.path = a.path;
  p.cache_len = a.cache_len;
  p.status = a.status;
  p.H = a.H;
  p.P = a.P;
  p.S = a.S;
  p.units_per_row = static_cast<int>(row_bytes / unit);
  const int64_t per_head = static_cast<int64_t>(a.P) * p.units_per_row;
  SJD_REQUIRE(per_head < (int64_t{1} << 30), "tree_kv_update: path length x head dim too large");
  const bool low_latency = a.R <= 2;
  if (low_latency || per_head == 0) {
    p.heads_per_block = 1;
  } else {
    // about one round of 256 threads x 4 units per block
    int64_t hpb = 1024 / per_head;
    p.heads_per_block = static_cast<int>(hpb < 1 ? 1 : (hpb > a.H ? a.H : hpb));
  }

  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  switch (unit) {
    case 16: launch_width<uint4>(p, a.layers, a.R, low_latency, st); break;
    case 8: launch_width<uint2>(p, a.layers, a.R, low_latency, st); break;
    case 4: launch_width<uint32_t>(p, a.layers, a.R, low_latency, st); break;
    case 2: launch_width<uint16_t>(p, a.layers, a.R, low_latency, st); break;
    default: launch_width<uint8_t>(p, a.layers, a.R, low_latency, st); break;
  }
  return unit;
}

}  // namespace sjd
