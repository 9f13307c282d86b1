// Host-side error handling and small helpers shared by every op (no PyTorch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

// Kernel launches and dynamic shared memory go through these two macros so that the same sources
// also compile for the CPU simulator (csrc/sim/sjd_sim.h, which defines SJD_SIM): there a launch
// runs every block's threads as fibers, and the dynamic shared memory is a host buffer.
#if defined(SJD_SIM)
#define SJD_LAUNCH(kernel, grid, block, smem, stream) SJD_SIM_LAUNCH(kernel, grid, block, smem, stream)
#define SJD_DYNAMIC_SMEM(type, name) SJD_SIM_DYNAMIC_SMEM(type, name)
#else
#define SJD_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define SJD_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace sjd {

inline std::string cuda_error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("sjd_kernels CUDA error in ") + what + " (" + file + ":" +
                           std::to_string(line) + "): " + cuda_error_text(e));
}

#define SJD_CUDA_CHECK(expr)                                                   \
  do {                                                                         \
    cudaError_t sjd_err_ = (expr);                                             \
    if (sjd_err_ != cudaSuccess) ::sjd::throw_cuda(sjd_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// After every launch: configuration errors (bad grid, too much shared memory) surface here.
#define SJD_CHECK_LAUNCH(kernel_name)                                          \
  do {                                                                         \
    cudaError_t sjd_err_ = cudaGetLastError();                                 \
    if (sjd_err_ != cudaSuccess) ::sjd::throw_cuda(sjd_err_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)

#define SJD_REQUIRE(cond, msg)                                                 \
  do {                                                                         \
    if (!(cond)) throw std::invalid_argument(std::string("sjd_kernels: ") + (msg)); \
  } while (0)

// A real number for an error message, as %.9g (std::to_string prints 1e-300 as 0.000000).
inline std::string fmt_real(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// A temperature the kernels can use: 0 (greedy), or positive with a finite float32 value and a finite
// float32 reciprocal (the rows are scaled by 1 / float(T)). The Python ops check the temperature as a
// double against the float32 bounds first, so a double that rounds onto a bound passes here only.
inline bool temperature_ok(double t) {
  if (t == 0.0) return true;
  if (!(t > 0.0)) return false;  // negative or NaN
  const float f = static_cast<float>(t);
  const float inv = 1.0f / f;
  return f > 0.0f && f <= 3.4028234663852886e38f && inv <= 3.4028234663852886e38f;
}

// Number of visible devices; 0 (never an exception) when there is no device or no driver.
inline int device_count_noexcept(std::string* why = nullptr) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (why) *why = cuda_error_text(e);
    return 0;
  }
  if (why) *why = n > 0 ? std::string("") : std::string("cudaGetDeviceCount reported 0 devices");
  return n;
}

// Every kernel entry starts here: a clear RuntimeError instead of a crash when no device can run
// the kernel, and the runtime's current device set to the tensors' device.
inline void require_device(int device, const char* op) {
  std::string why;
  int n = device_count_noexcept(&why);
  if (n <= 0)
    throw std::runtime_error(std::string("sjd_kernels._C.") + op + ": no CUDA device is visible (" + why +
                             "); use backend='torch' on this machine");
  if (device < 0) return;  // the runtime's current device
  if (device >= n)
    throw std::runtime_error(std::string("sjd_kernels._C.") + op + ": device index " + std::to_string(device) +
                             " out of range (" + std::to_string(n) + " visible)");
  int cur = -1;
  SJD_CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != device) SJD_CUDA_CHECK(cudaSetDevice(device));
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace sjd
