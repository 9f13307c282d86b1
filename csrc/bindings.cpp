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
#include "sjd2_prepare.h"
#include "tree_kv_update.h"
#include "tree_verify.h"
#include "verify_chain.h"

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
                 std::uintptr_t scratch, std::uintptr_t rowbuf, int device, std::uintptr_t stream,
                 std::uintptr_t q_idx, int C, int features) {
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
  a.q_idx = ptr<int32_t>(q_idx);
  a.C = C;
  a.status = ptr<int32_t>(status);
  a.B = B;
  a.W = W;
  a.V = V;
  a.R = R;
  a.temperature = temperature;
  a.top_k = top_k;
  a.features = features;
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

// The same bindings also build the CPU simulator's module (csrc/sim/sjd_sim.h defines SJD_SIM); each
// simulator build links an entry point of its own name that calls PyInit__C_sim
// (sjd_kernels/cuda/sim.py), so that several builds load in one process.
#if defined(SJD_SIM)
#define SJD_MODULE_NAME _C_sim
#else
#define SJD_MODULE_NAME _C
#endif

PYBIND11_MODULE(SJD_MODULE_NAME, m) {
  m.doc() = "sjd_kernels CUDA kernels (torch-free; pointers and streams are passed as integers)";
#if defined(SJD_SIM)
  m.def(
      "sim_configure",
      [](int order, uint64_t seed) {
        SJD_REQUIRE(order >= 0 && order <= 2, "sim_configure: order must be 0, 1 or 2");
        sjd_sim::g_cfg.order = order;
        sjd_sim::g_cfg.seed = seed;
      },
      py::arg("order"), py::arg("seed"),
      "order of the threads between barriers: 0 forward, 1 reverse, 2 shuffled by seed");
  m.def(
      "sim_stats", []() { return py::make_tuple(sjd_sim::g_cfg.launches, sjd_sim::g_cfg.switches); },
      "(kernel launches, fiber switches) so far on this thread");
#endif
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
        py::arg("scratch"), py::arg("rowbuf"), py::arg("device"), py::arg("stream"), py::arg("q_idx") = 0,
        py::arg("C") = 0, py::arg("features") = 0,
        "launch jacobi_step on `stream` (see sjd_kernels/cuda/jacobi_step.py for the tensor contract)",
        py::call_guard<py::gil_scoped_release>());
  m.def("tree_verify_max_smem_lanes", &sjd::tree_verify_max_smem_lanes, py::arg("device"),
        "largest V tree_verify keeps in shared memory on this device; larger V needs rowbuf",
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "tree_verify",
      [](int dtype, std::uintptr_t logits, int64_t logits_sb, int64_t logits_sn, std::uintptr_t uncond,
         int64_t uncond_sb, int64_t uncond_sn, std::uintptr_t cfg_scale, std::uintptr_t tokens, std::uintptr_t parent,
         std::uintptr_t depth, std::uintptr_t sib, std::uintptr_t q_slot, std::uintptr_t pos, std::uintptr_t seed,
         std::uintptr_t step, std::uintptr_t forced, int64_t forced_len, std::uintptr_t q_state,
         std::uintptr_t q_kind, std::uintptr_t status, int B, int N, int V, int R, int max_depth, double temperature,
         int top_k, double top_p, std::uintptr_t num_accepted, std::uintptr_t path, std::uintptr_t out_tokens,
         std::uintptr_t rowflag, std::uintptr_t rowbuf, int device, std::uintptr_t stream, int features) {
        sjd::TreeVerifyArgs a;
        a.dtype = dtype;
        a.logits = ptr<const void>(logits);
        a.logits_sb = logits_sb;
        a.logits_sn = logits_sn;
        a.uncond = ptr<const void>(uncond);
        a.uncond_sb = uncond_sb;
        a.uncond_sn = uncond_sn;
        a.cfg_scale = ptr<const float>(cfg_scale);
        a.tokens = ptr<const int64_t>(tokens);
        a.parent = ptr<const int64_t>(parent);
        a.depth = ptr<const int64_t>(depth);
        a.sib = ptr<const int64_t>(sib);
        a.q_slot = ptr<const int64_t>(q_slot);
        a.pos = ptr<const int64_t>(pos);
        a.seed = ptr<const int64_t>(seed);
        a.step = ptr<const int64_t>(step);
        a.forced = ptr<const int64_t>(forced);
        a.forced_len = forced_len;
        a.q_state = ptr<const float>(q_state);
        a.q_kind = ptr<const int32_t>(q_kind);
        a.status = ptr<int32_t>(status);
        a.B = B;
        a.N = N;
        a.V = V;
        a.R = R;
        a.max_depth = max_depth;
        a.temperature = temperature;
        a.top_k = top_k;
        a.top_p = top_p;
        a.features = features;
        a.num_accepted = ptr<int64_t>(num_accepted);
        a.path = ptr<int64_t>(path);
        a.out_tokens = ptr<int64_t>(out_tokens);
        a.rowflag = ptr<int32_t>(rowflag);
        a.rowbuf = ptr<float>(rowbuf);
        a.device = device;
        a.stream = reinterpret_cast<void*>(stream);
        sjd::tree_verify_launch(a);
      },
      py::arg("dtype"), py::arg("logits"), py::arg("logits_sb"), py::arg("logits_sn"), py::arg("uncond"),
      py::arg("uncond_sb"), py::arg("uncond_sn"), py::arg("cfg_scale"), py::arg("tokens"), py::arg("parent"),
      py::arg("depth"), py::arg("sib"), py::arg("q_slot"), py::arg("pos"), py::arg("seed"), py::arg("step"),
      py::arg("forced"), py::arg("forced_len"), py::arg("q_state"), py::arg("q_kind"), py::arg("status"), py::arg("B"),
      py::arg("N"), py::arg("V"), py::arg("R"), py::arg("max_depth"), py::arg("temperature"), py::arg("top_k"),
      py::arg("top_p"), py::arg("num_accepted"), py::arg("path"), py::arg("out_tokens"), py::arg("rowflag"),
      py::arg("rowbuf"), py::arg("device"), py::arg("stream"), py::arg("features") = 0,
      "launch tree_verify on `stream` (see sjd_kernels/cuda/tree_verify.py for the tensor contract)",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "verify_chain",
      [](int dtype, std::uintptr_t target, int64_t target_sb, int64_t target_sj, std::uintptr_t draft,
         int64_t draft_sb, int64_t draft_sj, std::uintptr_t ids, std::uintptr_t win_len, std::uintptr_t pos,
         std::uintptr_t seed, std::uintptr_t step, std::uintptr_t status, int B, int W, int V,
         std::uintptr_t num_accepted, std::uintptr_t tokens, int device, std::uintptr_t stream, int threads) {
        sjd::VerifyChainArgs a;
        a.dtype = dtype;
        a.target = ptr<const void>(target);
        a.target_sb = target_sb;
        a.target_sj = target_sj;
        a.draft = ptr<const void>(draft);
        a.draft_sb = draft_sb;
        a.draft_sj = draft_sj;
        a.ids = ptr<const int64_t>(ids);
        a.win_len = ptr<const int64_t>(win_len);
        a.pos = ptr<const int64_t>(pos);
        a.seed = ptr<const int64_t>(seed);
        a.step = ptr<const int64_t>(step);
        a.status = ptr<int32_t>(status);
        a.B = B;
        a.W = W;
        a.V = V;
        a.num_accepted = ptr<int64_t>(num_accepted);
        a.tokens = ptr<int64_t>(tokens);
        a.threads = threads;
        a.device = device;
        a.stream = reinterpret_cast<void*>(stream);
        sjd::verify_chain_launch(a);
      },
      py::arg("dtype"), py::arg("target"), py::arg("target_sb"), py::arg("target_sj"), py::arg("draft"),
      py::arg("draft_sb"), py::arg("draft_sj"), py::arg("ids"), py::arg("win_len"), py::arg("pos"), py::arg("seed"),
      py::arg("step"), py::arg("status"), py::arg("B"), py::arg("W"), py::arg("V"), py::arg("num_accepted"),
      py::arg("tokens"), py::arg("device"), py::arg("stream"), py::arg("threads") = 0,
      "launch verify_chain on `stream` (see sjd_kernels/cuda/verify_chain.py for the tensor contract)",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "sjd2_prepare",
      [](int dtype, std::uintptr_t embed, std::uintptr_t mean, std::uintptr_t std_, std::uintptr_t level_table,
         std::uintptr_t alpha, std::uintptr_t sigma, std::uintptr_t tokens, std::uintptr_t positions,
         std::uintptr_t seed, std::uintptr_t commit_end, std::uintptr_t fresh_start, std::uintptr_t row_end,
         std::uintptr_t latent, std::uintptr_t level, std::uintptr_t out, std::uintptr_t status, int64_t B,
         int64_t N, int64_t R, int64_t Vt, int d, int K, int device, std::uintptr_t stream) {
        sjd::Sjd2PrepareArgs a;
        a.dtype = dtype;
        a.embed = ptr<const void>(embed);
        a.mean = ptr<const float>(mean);
        a.std_ = ptr<const float>(std_);
        a.level_table = ptr<const float>(level_table);
        a.alpha = ptr<const float>(alpha);
        a.sigma = ptr<const float>(sigma);
        a.tokens = ptr<const int64_t>(tokens);
        a.positions = ptr<const int64_t>(positions);
        a.seed = ptr<const int64_t>(seed);
        a.commit_end = ptr<const int64_t>(commit_end);
        a.fresh_start = ptr<const int64_t>(fresh_start);
        a.row_end = ptr<const int64_t>(row_end);
        a.latent = ptr<float>(latent);
        a.level = ptr<int32_t>(level);
        a.out = ptr<void>(out);
        a.status = ptr<int32_t>(status);
        a.B = B;
        a.N = N;
        a.R = R;
        a.Vt = Vt;
        a.d = d;
        a.K = K;
        a.device = device;
        a.stream = reinterpret_cast<void*>(stream);
        sjd::sjd2_prepare_launch(a);
      },
      py::arg("dtype"), py::arg("embed"), py::arg("mean"), py::arg("std"), py::arg("level_table"), py::arg("alpha"),
      py::arg("sigma"), py::arg("tokens"), py::arg("positions"), py::arg("seed"), py::arg("commit_end"),
      py::arg("fresh_start"), py::arg("row_end"), py::arg("latent"), py::arg("level"), py::arg("out"),
      py::arg("status"), py::arg("B"),
      py::arg("N"), py::arg("R"), py::arg("Vt"), py::arg("d"), py::arg("K"), py::arg("device"), py::arg("stream"),
      "launch sjd2_prepare on `stream` (see sjd_kernels/cuda/sjd2_prepare.py for the tensor contract)",
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
  m.def(
      "tree_kv_update",
      [](std::uintptr_t cache, std::uintptr_t ptr_table, int ptr_align, int64_t stride_layer, int64_t stride_kv,
         int64_t stride_row, int64_t stride_head, int64_t stride_slot, std::uintptr_t path, std::uintptr_t cache_len,
         std::uintptr_t status, int layers, int R, int H, int P, int64_t S, int D, int elem_size, int device,
         std::uintptr_t stream) {
        sjd::TreeKvUpdateArgs a;
        a.cache = reinterpret_cast<void*>(cache);
        a.ptr_table = reinterpret_cast<const int64_t*>(ptr_table);
        a.ptr_align = ptr_align;
        a.stride_layer = stride_layer;
        a.stride_kv = stride_kv;
        a.stride_row = stride_row;
        a.stride_head = stride_head;
        a.stride_slot = stride_slot;
        a.path = reinterpret_cast<const int64_t*>(path);
        a.cache_len = reinterpret_cast<const int64_t*>(cache_len);
        a.status = reinterpret_cast<int32_t*>(status);
        a.layers = layers;
        a.R = R;
        a.H = H;
        a.P = P;
        a.S = S;
        a.D = D;
        a.elem_size = elem_size;
        a.device = device;
        a.stream = reinterpret_cast<void*>(stream);
        return sjd::tree_kv_update_launch(a);
      },
      py::arg("cache"), py::arg("ptr_table"), py::arg("ptr_align"), py::arg("stride_layer"), py::arg("stride_kv"),
      py::arg("stride_row"), py::arg("stride_head"), py::arg("stride_slot"), py::arg("path"), py::arg("cache_len"),
      py::arg("status"), py::arg("layers"), py::arg("R"), py::arg("H"), py::arg("P"), py::arg("S"), py::arg("D"),
      py::arg("elem_size"), py::arg("device"), py::arg("stream"),
      "launch tree_kv_update on `stream` (stacked cache, or cache=0 and a device ptr_table); returns the access "
      "width in bytes (see sjd_kernels/cuda/tree_kv_update.py)",
      py::call_guard<py::gil_scoped_release>());
}
