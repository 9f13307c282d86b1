// Host interface of the jacobi_step kernels (csrc/jacobi_step.cu); plain C++, no PyTorch.
#pragma once

#include <cstdint>

namespace sjd {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Optional code paths of the rows kernel (JacobiStepArgs::features), each giving the same results
// as the default path; they exist to be timed against it (benchmarks/NOTES.md).
enum Feature : int {
  kFeatBracketTopk = 1,  // top-k threshold by the bracket selection (target.cuh) instead of the 7-pivot search
  kFeatListRaces = 2,    // exponential races over a list of the lanes with P > 0 (one Philox call per
                         // listed lane) instead of every group of 4 lanes of the row
  kFeatHistTopk = 4,     // top-k by one histogram pass, then the softmax and top-p over the list of
                         // kept lanes (target.cuh, topk_softmax_list); rows in shared memory, V <= 65536
  kFeatAll = 7,
};

// Everything one jacobi_step call needs. Pointers are device pointers (0 = absent). Shapes and
// meanings follow sjd_kernels/reference/jacobi_step.py; logits strides are in elements, the last
// dimension is contiguous.
struct JacobiStepArgs {
  int dtype = kF32;  // of logits and uncond (the wrapper makes them equal)
  const void* logits = nullptr;
  int64_t logits_sb = 0, logits_sj = 0;
  const void* uncond = nullptr;  // null: no CFG
  int64_t uncond_sb = 0, uncond_sj = 0;
  const float* cfg_scale = nullptr;  // [B]
  const int64_t* drafts = nullptr;   // [B, W]
  const int64_t* win_len = nullptr;  // [B]
  const int64_t* pos = nullptr;      // [B]
  const int64_t* seed = nullptr;     // [B]
  const int64_t* step = nullptr;     // [B]
  const int64_t* forced = nullptr;   // [B, forced_len] or null
  int64_t forced_len = 0;
  float* q_state = nullptr;  // [B, R, V] ([B, R, C] in the sparse form)
  int32_t* q_kind = nullptr; // [B, R]
  float* p_prev = nullptr;   // [B, R, V] or null ([B, R, C] in the sparse form)
  int32_t* q_idx = nullptr;  // sparse form: [B, R, C] lane ids (ascending, then 2^31-1); null: dense
  int C = 0;                 // sparse form: entries per slot
  int32_t* status = nullptr; // [4]
  int B = 0, W = 0, V = 0, R = 0;
  double temperature = 1.0;
  int top_k = 0;
  int features = 0;  // Feature bits
  double top_p = 1.0;
  int mode = 0;
  double beta = 0.0;
  int vp_form = 0;
  double vp_eps = 1e-6;
  int tail_init = 0;
  int64_t* num_accepted = nullptr;  // [B]
  int64_t* tokens = nullptr;        // [B, W+1]
  int64_t* next_drafts = nullptr;   // [B, W]
  int64_t* scratch = nullptr;       // [B, W+1, 4]
  float* rowbuf = nullptr;          // [B, W+1, V] when V > jacobi_step_max_smem_lanes(), else null
  int device = 0;
  void* stream = nullptr;           // cudaStream_t
};

// Launches the two kernels on args.stream; throws std::runtime_error / std::invalid_argument.
void jacobi_step_launch(const JacobiStepArgs& args);

// The largest V whose row fits in shared memory on ``device`` (larger V needs args.rowbuf).
int jacobi_step_max_smem_lanes(int device);

// Test helper: out[i] = Philox word of lane i for (seed, position, step, stream), i < n.
void philox_fill_launch(uint32_t* out, int64_t n, int64_t seed, int64_t position, int64_t step, int64_t stream,
                        int device, void* cuda_stream);

}  // namespace sjd
