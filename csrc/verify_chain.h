// Host interface of the verify_chain kernel (csrc/verify_chain.cu); plain C++, no PyTorch.
#pragma once

#include <cstdint>

namespace sjd {

// Everything one verify_chain call needs. Pointers are device pointers (0 = absent). Shapes and
// meanings follow sjd_kernels/reference/verify_chain.py; strides are in elements, the last
// dimension of both laws is contiguous. dtype codes as in jacobi_step.h (0 f32, 1 f16, 2 bf16);
// target and draft share one dtype (the wrapper converts).
struct VerifyChainArgs {
  int dtype = 0;
  const void* target = nullptr;  // [B, W+1, V]
  int64_t target_sb = 0, target_sj = 0;
  const void* draft = nullptr;   // [B, W, V] (unread when W = 0)
  int64_t draft_sb = 0, draft_sj = 0;
  const int64_t* ids = nullptr;      // [B, W]
  const int64_t* win_len = nullptr;  // [B]
  const int64_t* pos = nullptr;      // [B]
  const int64_t* seed = nullptr;     // [B]
  const int64_t* step = nullptr;     // [B]
  int32_t* status = nullptr;         // [4]
  int B = 0, W = 0, V = 0;
  int64_t* num_accepted = nullptr;   // [B]
  int64_t* tokens = nullptr;         // [B, W+1]
  int threads = 0;                   // threads per block: 0 = chosen from V, else a multiple of 32 in [32, 1024]
  int device = 0;
  void* stream = nullptr;            // cudaStream_t
};

// Launches the kernel (one block per request) on args.stream; throws std::runtime_error /
// std::invalid_argument.
void verify_chain_launch(const VerifyChainArgs& args);

}  // namespace sjd
