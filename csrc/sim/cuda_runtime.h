// Stand-in for the CUDA runtime header when csrc/ is compiled for the CPU simulator (sjd_sim.h):
// the few runtime calls the launchers make, answered for one simulated Hopper-class device.
#pragma once

#include "sjd_sim.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  size_t constSizeBytes = 0;
  size_t localSizeBytes = 0;
  int maxThreadsPerBlock = 1024;
  int numRegs = 0;
  int maxDynamicSharedSizeBytes = 48 * 1024;
};

namespace sjd_sim {
inline thread_local int g_device = 0;
constexpr int kSimSharedOptin = kSmemOptin;
constexpr int kSimStaticShared = kStaticSmem;
}  // namespace sjd_sim

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (simulator)";
    case cudaErrorInvalidValue: return "invalid argument (simulator)";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch (simulator: more threads "
                                               "per block than the kernel's __launch_bounds__)";
    default: return "error (simulator)";
  }
}
inline cudaError_t cudaGetLastError() {
  const int e = ::sjd_sim::g_last_error;
  ::sjd_sim::g_last_error = 0;
  return static_cast<cudaError_t>(e);
}
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = ::sjd_sim::g_device; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  ::sjd_sim::g_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  if (a != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = ::sjd_sim::kSimSharedOptin;
  return cudaSuccess;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* kernel) {
  *a = cudaFuncAttributes{};
  a->sharedSizeBytes = ::sjd_sim::kSimStaticShared;
  a->maxDynamicSharedSizeBytes = ::sjd_sim::max_dynamic_smem(kernel);
  return cudaSuccess;
}
// The kernel's dynamic shared memory limit, checked at its launches (at most the opt-in limit less
// its static shared memory).
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > ::sjd_sim::kSimSharedOptin - ::sjd_sim::kSimStaticShared) return cudaErrorInvalidValue;
  ::sjd_sim::set_max_dynamic_smem(kernel, value);
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 0; return cudaSuccess; }
