// Host interface of the tree_verify kernels (csrc/tree_verify.cu); plain C++, no PyTorch.
#pragma once

#include <cstdint>

namespace sjd {

// Everything one tree_verify call needs. Pointers are device pointers (0 = absent). Shapes and
// meanings follow sjd_kernels/reference/tree.py (tree_verify); logits strides are in elements, the
// last dimension is contiguous. dtype codes as in jacobi_step.h (0 f32, 1 f16, 2 bf16).
struct TreeVerifyArgs {
  int dtype = 0;
  const void* logits = nullptr;  // [B, N, V]
  int64_t logits_sb = 0, logits_sn = 0;
  const void* uncond = nullptr;  // null: no CFG
  int64_t uncond_sb = 0, uncond_sn = 0;
  const float* cfg_scale = nullptr;  // [B]
  const int64_t* tokens = nullptr;   // [B, N]
  const int64_t* parent = nullptr;   // [B, N]
  const int64_t* depth = nullptr;    // [B, N]
  const int64_t* sib = nullptr;      // [B, N]
  const int64_t* q_slot = nullptr;   // [B, N]
  const int64_t* pos = nullptr;      // [B]
  const int64_t* seed = nullptr;     // [B]
  const int64_t* step = nullptr;     // [B]
  const int64_t* forced = nullptr;   // [B, forced_len] or null
  int64_t forced_len = 0;
  const float* q_state = nullptr;    // [B, R, V]
  const int32_t* q_kind = nullptr;   // [B, R]
  int32_t* status = nullptr;         // [4]
  int B = 0, N = 0, V = 0, R = 0, max_depth = 0;
  double temperature = 1.0;
  int top_k = 0;
  double top_p = 1.0;
  int features = 0;                  // jacobi_step.h Feature bits; kFeatBracketTopk applies here
  int64_t* num_accepted = nullptr;   // [B]
  int64_t* path = nullptr;           // [B, max_depth + 1]
  int64_t* out_tokens = nullptr;     // [B, max_depth + 1]
  int32_t* rowflag = nullptr;        // [B, N] scratch
  float* rowbuf = nullptr;           // [B, V] when V > tree_verify_max_smem_lanes(), else null
  int device = 0;
  void* stream = nullptr;            // cudaStream_t
};

// Launches the two kernels (row check, walk) on args.stream; throws std::runtime_error /
// std::invalid_argument.
void tree_verify_launch(const TreeVerifyArgs& args);

// The largest V whose row fits in shared memory on ``device`` (larger V needs args.rowbuf).
int tree_verify_max_smem_lanes(int device);

}  // namespace sjd
