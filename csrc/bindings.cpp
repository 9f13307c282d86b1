// sjd_kernels._C: the thin Python layer over the torch-free kernels. Tensors arrive as integers
// (data_ptr), streams as integers (torch.cuda.Stream.cuda_stream). std::runtime_error and
// std::invalid_argument become RuntimeError and ValueError in Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.cuh"
#include "jacobi_step.h"

namespace py = pybind11;

#ifndef SJD_BUILT_ARCHS
#define SJD_BUILT_ARCHS ""
#endif

namespace {

std::vector<std::string> built_archs() {
  std::vector<std::string> out;
  std::stringstream ss(SJD_BUILT_ARCHS);
  std::string tok;
  while (std::getline(ss, tok, ','))
    if (!tok.empty()) out.push_back(tok);
  return out;
}

int device_count() { return sjd::device_count_noexcept(); }

std::string device_error() {
  std::string why;
  sjd::device_count_noexcept(&why);
  return why;
}

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void jacobi_step(int dtype, std::uintptr_t logits, int64_t logits_sb, int64_t logits_sj, std::uintptr_t uncond,
                 int64_t uncond_sb, int64_t uncond_sj, std::uintptr_t cfg_scale, std::uintptr_t drafts,
                 std::uintptr_t win_len, std::uintptr_t pos, std::uintptr_t seed, std::uintptr_t step,
                 std::uintptr_t forced, int64_t forced_len, std::uintptr_t q_state, std::uintptr_t q_kind,
                 std::uintptr_t p_prev, std::uintptr_t status, int B, int W, int V, int R, double temperature,
                 int top_k, double top_p, int mode, double beta, int vp_form, double vp_eps, int tail_init,
                 std::uintptr_t num_accepted, std::uintptr_t tokens, std::uintptr_t next_drafts,
                 std::uintptr_t scratch, std::uintptr_t rowbuf, int device, std::uintptr_t stream) {
  sjd::JacobiStepArgs a;
  a.dtype = dtype;
  a.logits = ptr<const void>(logits);
  a.logits_sb = logits_sb;
  a.logits_sj = logits_sj;
  a.uncond = ptr<const void>(uncond);
  a.uncond_sb = uncond_sb;
  a.uncond_sj = uncond_sj;
  a.cfg_scale = ptr<const float>(cfg_scale);
  a.drafts = ptr<const int64_t>(drafts);
  a.win_len = ptr<const int64_t>(win_len);
  a.pos = ptr<const int64_t>(pos);
  a.seed = ptr<const int64_t>(seed);
  a.step = ptr<const int64_t>(step);
  a.forced = ptr<const int64_t>(forced);
  a.forced_len = forced_len;
  a.q_state = ptr<float>(q_state);
  a.q_kind = ptr<int32_t>(q_kind);
  a.p_prev = ptr<float>(p_prev);
  a.status = ptr<int32_t>(status);
  a.B = B;
  a.W = W;
  a.V = V;
  a.R = R;
  a.temperature = temperature;
  a.top_k = top_k;
  a.top_p = top_p;
  a.mode = mode;
  a.beta = beta;
  a.vp_form = vp_form;
  a.vp_eps = vp_eps;
  a.tail_init = tail_init;
  a.num_accepted = ptr<int64_t>(num_accepted);
  a.tokens = ptr<int64_t>(tokens);
  a.next_drafts = ptr<int64_t>(next_drafts);
  a.scratch = ptr<int64_t>(scratch);
  a.rowbuf = ptr<float>(rowbuf);
  a.device = device;
  a.stream = reinterpret_cast<void*>(stream);
  sjd::jacobi_step_launch(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sjd_kernels CUDA kernels (torch-free; pointers and streams are passed as integers)";
  m.def("built_archs", &built_archs, "SASS architectures compiled in, e.g. ['80', '90', '90a']");
  m.def("device_count", &device_count, "visible CUDA devices; 0 when there is no device or no driver");
  m.def("device_error", &device_error, "why device_count() is 0 (empty when devices are visible)");
  m.def("runtime_version", &runtime_version, "CUDA runtime version linked in (e.g. 13000)");
  m.def("driver_version", &driver_version, "CUDA driver version (0 when there is no driver)");
  m.def("jacobi_step_max_smem_lanes", &sjd::jacobi_step_max_smem_lanes, py::arg("device"),
        "largest V kept in shared memory on this device; larger V needs rowbuf",
        py::call_guard<py::gil_scoped_release>());
  m.def("jacobi_step", &jacobi_step, py::arg("dtype"), py::arg("logits"), py::arg("logits_sb"), py::arg("logits_sj"),
        py::arg("uncond"), py::arg("uncond_sb"), py::arg("uncond_sj"), py::arg("cfg_scale"), py::arg("drafts"),
        py::arg("win_len"), py::arg("pos"), py::arg("seed"), py::arg("step"), py::arg("forced"),
        py::arg("forced_len"), py::arg("q_state"), py::arg("q_kind"), py::arg("p_prev"), py::arg("status"),
        py::arg("B"), py::arg("W"), py::arg("V"), py::arg("R"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::arg("mode"), py::arg("beta"), py::arg("vp_form"), py::arg("vp_eps"),
        py::arg("tail_init"), py::arg("num_accepted"), py::arg("tokens"), py::arg("next_drafts"),
        py::arg("scratch"), py::arg("rowbuf"), py::arg("device"), py::arg("stream"),
        "launch jacobi_step on `stream` (see sjd_kernels/cuda/jacobi_step.py for the tensor contract)",
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "philox_fill",
      [](std::uintptr_t out_ptr, int64_t n, int64_t seed, int64_t position, int64_t step, int64_t stream,
         std::uintptr_t stream_ptr, int device) {
        sjd::philox_fill_launch(reinterpret_cast<uint32_t*>(out_ptr), n, seed, position, step, stream, device,
                                reinterpret_cast<void*>(stream_ptr));
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("position"), py::arg("step"), py::arg("stream"),
      py::arg("stream_ptr"), py::arg("device") = -1,
      "fill n uint32 Philox words (lanes 0..n-1 of rng.lane_words) at out_ptr on stream_ptr",
      py::call_guard<py::gil_scoped_release>());
}
