// Host interface of the sjd2_prepare kernel (csrc/sjd2_prepare.cu); plain C++, no PyTorch.
#pragma once

#include <cstdint>

namespace sjd {

// Everything one sjd2_prepare call needs. Pointers are device pointers, every tensor contiguous;
// shapes and meanings follow sjd_kernels/reference/sjd2_prepare.py. dtype codes as in
// jacobi_step.h (0 f32, 1 f16, 2 bf16) for the embedding table and the output.
struct Sjd2PrepareArgs {
  int dtype = 0;
  const void* embed = nullptr;        // [Vt, d]
  const float* mean = nullptr;        // [d]
  const float* std_ = nullptr;        // [d]
  const float* level_table = nullptr; // [K+1, d]
  const float* alpha = nullptr;       // [K+1]
  const float* sigma = nullptr;       // [K+1]
  const int64_t* tokens = nullptr;    // [B, N]
  const int64_t* positions = nullptr; // [B, N]
  const int64_t* seed = nullptr;      // [B]
  const int64_t* commit_end = nullptr;   // [B]
  const int64_t* fresh_start = nullptr;  // [B]
  const int64_t* row_end = nullptr;      // [B]
  float* latent = nullptr;            // [B, R, d] (read and written)
  int32_t* level = nullptr;           // [B, R] (read and written)
  void* out = nullptr;                // [B, N, d]
  int32_t* status = nullptr;          // [4] device status (bit 32 of status[0] on a clamped id or level)
  int64_t B = 0, N = 0, R = 0, Vt = 0;
  int d = 0, K = 0;
  int device = 0;
  void* stream = nullptr;             // cudaStream_t
};

// Launches the kernel (one block per input slot) on args.stream; throws std::runtime_error /
// std::invalid_argument.
void sjd2_prepare_launch(const Sjd2PrepareArgs& args);

}  // namespace sjd
