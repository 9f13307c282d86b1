// Host-side bookkeeping shared by the kernels that keep one float32 row of V lanes in dynamic
// shared memory (jacobi_step rows, tree_verify): the block size, the largest V that fits on a
// device, and the one-time opt-in above 48 KiB. No PyTorch.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace sjd {

constexpr int kMaxDevices = 64;

// Threads of a row block: about 16 lanes per thread, 128 to max_threads, a multiple of 32; rows
// kept in global memory (V too large for shared memory) take max_threads.
inline int row_block_threads(int V, bool global_rows, int max_threads) {
  if (global_rows) return max_threads;
  const int t = ((V + 15) / 16 + 31) / 32 * 32;
  return t < 128 ? 128 : (t > max_threads ? max_threads : t);
}

// One instance per kernel family (a file-scope static); thread-safe, cached per device.
class RowSmemCache {
 public:
  // The largest V whose float row fits beside the kernel's static shared memory on ``device``
  // (``kernel``: any instantiation; they share the static layout).
  int max_lanes(int device, const void* kernel, const char* op) {
    require_device(device, op);
    device = resolve(device);
    const int cached = dev_[device].max_lanes.load();
    if (cached >= 0) return cached;
    int optin = 0;
    SJD_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes a{};
    SJD_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
    int lanes = (optin - static_cast<int>(a.sharedSizeBytes)) / static_cast<int>(sizeof(float));
    lanes = lanes > 0 ? lanes : 0;
    dev_[device].max_lanes.store(lanes);
    return lanes;
  }

  // Without a global row buffer the row must fit in shared memory: a clear error when it does not.
  void require_fits(int device, const void* kernel, int V, const char* op, const char* rowbuf_shape) {
    const int lanes = max_lanes(device, kernel, op);
    if (V > lanes)
      throw std::runtime_error(std::string("sjd_kernels._C.") + op + ": V = " + std::to_string(V) +
                               " lanes do not fit in shared memory (at most " + std::to_string(lanes) +
                               " on this device); pass a " + rowbuf_shape + " float32 rowbuf");
  }

  // Opt ``kernel`` (the instantiation for dtype code 0..2) in to ``bytes`` of dynamic shared
  // memory on ``device``, once per size increase; nothing to do up to 48 KiB.
  void opt_in(int device, int dtype, const void* kernel, int bytes) {
    if (bytes <= 48 * 1024) return;
    device = resolve(device);
    std::atomic<int>& done = dev_[device].dyn_set[dtype];
    if (done.load() >= bytes) return;
    SJD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done.store(bytes);
  }

 private:
  // The cache's index of ``device``: a negative index is the runtime's current device (as in
  // require_device), never an index before the array.
  static int resolve(int device) {
    if (device < 0) SJD_CUDA_CHECK(cudaGetDevice(&device));
    SJD_REQUIRE(device >= 0 && device < kMaxDevices, "device index above 63");
    return device;
  }

  struct Device {
    std::atomic<int> max_lanes{-1};
    std::atomic<int> dyn_set[3]{};
  };
  Device dev_[kMaxDevices];
};

}  // namespace sjd
