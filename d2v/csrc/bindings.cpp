// The one binding file of d2v._C: CPU (OpenMP) ops always, CUDA ops when built with D2V_WITH_CUDA.
#include "ema.h"

namespace {
std::vector<at::Tensor> or_empty(const c10::optional<std::vector<at::Tensor>>& v) {
  return v ? *v : std::vector<at::Tensor>{};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v fused ops: EMA (CPU OpenMP twin; CUDA multi-tensor kernel when built with CUDA)";
  m.def(
      "ema_update_cpu",
      [](const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double decay,
         const c10::optional<std::vector<at::Tensor>>& out_lowp) {
        d2v::ema_update_cpu(ema, params, decay, or_empty(out_lowp));
      },
      "In place: ema = ema + (1 - decay) * (param - ema) over CPU tensor lists (OpenMP over chunks)",
      py::arg("ema"), py::arg("params"), py::arg("decay"), py::arg("out_lowp") = py::none());
#ifdef D2V_WITH_CUDA
  m.def(
      "ema_update_cuda",
      [](const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double decay,
         const c10::optional<std::vector<at::Tensor>>& out_lowp) {
        d2v::ema_update_cuda(ema, params, decay, or_empty(out_lowp));
      },
      "In place, CUDA multi-tensor launch: ema = ema + (1 - decay) * (param - ema)", py::arg("ema"),
      py::arg("params"), py::arg("decay"), py::arg("out_lowp") = py::none());
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
