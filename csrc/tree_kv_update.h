// Host interface of the tree_kv_update kernel (csrc/tree_kv_update.cu); plain C++, no PyTorch.
#pragma once

#include <cstdint>

namespace sjd {

// One in-place move of the accepted tree path's K/V (sjd_kernels/reference/tree.py, tree_kv_update):
// for every row r and entry j with path[r, j] >= 0, slot cache_len[r] + j of every layer, of K and
// V, of every KV head takes the old contents of slot cache_len[r] + path[r, j]. Device pointers;
// strides in elements, the last (D) dimension contiguous.
//
// Two layouts. Stacked: `cache` is the base of [layers, 2, R, H, S, D] with strides
// stride_layer, stride_kv, stride_row, stride_head, stride_slot. Table: `cache` is null and
// `ptr_table` is a device array [2 * layers] of base addresses k0, v0, k1, v1, ... of per-layer
// [R, H, S, D] tensors that share stride_row, stride_head, stride_slot (stride_layer and stride_kv
// are unused); `ptr_align` is the largest power of two (<= 16) dividing every one of those
// addresses (the caller knows them without reading the table back).
struct TreeKvUpdateArgs {
  void* cache = nullptr;
  const int64_t* ptr_table = nullptr;
  int ptr_align = 0;  // table layout only
  int64_t stride_layer = 0, stride_kv = 0, stride_row = 0, stride_head = 0, stride_slot = 0;
  const int64_t* path = nullptr;       // [R, P], contiguous
  const int64_t* cache_len = nullptr;  // [R]
  int32_t* status = nullptr;           // [4]; bit 4 of status[0] for a malformed row
  int layers = 0, R = 0, H = 0, P = 0, D = 0;
  int64_t S = 0;
  int elem_size = 0;  // bytes per element (2 for bf16/fp16, 4 for fp32): a copy needs nothing else
  int device = 0;
  void* stream = nullptr;  // cudaStream_t
};

// Launches one kernel on args.stream; throws std::invalid_argument for bad arguments and
// std::runtime_error for CUDA errors. Returns the access width chosen, in bytes (16, 8, 4 or 2).
int tree_kv_update_launch(const TreeKvUpdateArgs& args);

}  // namespace sjd
