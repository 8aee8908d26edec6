// Host side of the CUDA multi-tensor EMA: ema_update_cuda, the torch-facing entry point bound in
// bindings.cpp. It owns what needs torch (the argument checks, the device guard, the current stream, the
// tensors' addresses, dtype codes for the launcher, turning a launch error into c10::Error) and groups
// the tensors into ema_cuda::Args; the kernel and its launcher live in ema_cuda.cu, which includes no
// torch header (see ema_cuda.h). Compiled by the C++ compiler like every *.cpp here: empty unless built
// with D2V_WITH_CUDA, so the CPU-only build compiles it too.
#ifdef D2V_WITH_CUDA
#include "ema.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ema_cuda.h"

namespace d2v {

namespace {
using namespace ema_cuda;

// the launcher's code of a param dtype that check_ema_args let through (fp32/bf16/fp16)
Dtype dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return Dtype::kFloat;
  if (t == at::kBFloat16) return Dtype::kBFloat16;
  return Dtype::kHalf;
}

void launch_checked(Dtype pt, Dtype low, const Args& a, int blocks, float w, cudaStream_t s) {
  const cudaError_t err = ema_cuda::launch(pt, low, a, blocks, w, s);
  TORCH_CHECK(err == cudaSuccess, "d2v ema_update_: CUDA kernel launch failed: ", cudaGetErrorString(err));
}
}  // namespace

// ema: fp32, contiguous, on one CUDA device; params[i]: fp32/bf16/fp16 of ema[i]'s shape; out_lowp: empty
// or one bf16/fp16 tensor of ema[i]'s shape per pair. All enqueued on the current stream of ema[0]'s device.
void ema_update_cuda(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double decay,
                     const std::vector<at::Tensor>& out_lowp) {
  check_ema_args(ema, params, out_lowp, /*want_cuda=*/true);
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float w = static_cast<float>(1.0 - decay);
  const bool has_low = !out_lowp.empty();
  // one pass per (param dtype, low dtype) group; inside a group, fill the struct and launch when full
  for (const auto pt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const Dtype low : {Dtype::kNone, Dtype::kBFloat16, Dtype::kHalf}) {
      if ((low == Dtype::kNone) == has_low) continue;
      const at::ScalarType lt = low == Dtype::kBFloat16 ? at::kBFloat16 : at::kHalf;
      const Dtype pc = dtype_code(pt);
      Args a;
      int nt = 0, nb = 0;
      for (size_t i = 0; i < ema.size(); ++i) {
        if (params[i].scalar_type() != pt || (has_low && out_lowp[i].scalar_type() != lt)) continue;
        const int64_t n = ema[i].numel();
        if (n == 0) continue;
        a.ema[nt] = ema[i].data_ptr<float>();
        a.par[nt] = params[i].data_ptr();
        a.low[nt] = has_low ? out_lowp[i].data_ptr() : nullptr;
        a.numel[nt] = n;
        const int64_t chunks = (n + kChunk - 1) / kChunk;
        TORCH_CHECK(chunks < (int64_t(1) << 31), "d2v ema_update_: tensor ", i, " is too large");
        for (int64_t c = 0; c < chunks; ++c) {
          a.tensor[nb] = static_cast<unsigned char>(nt);
          a.chunk[nb] = static_cast<int>(c);
          ++nb;
          const bool last_chunk = c == chunks - 1;
          if (nb == kMaxBlocks || (last_chunk && nt + 1 == kMaxTensors)) {
            launch_checked(pc, low, a, nb, w, stream);
            nb = 0;
            if (!last_chunk) {  // the tensor continues in the next launch: keep it as slot 0
              a.ema[0] = a.ema[nt];
              a.par[0] = a.par[nt];
              a.low[0] = a.low[nt];
              a.numel[0] = a.numel[nt];
              nt = 0;
            } else {
              nt = -1;
            }
          }
        }
        ++nt;
      }
      if (nb > 0) launch_checked(pc, low, a, nb, w, stream);
    }
  }
}

}  // namespace d2v
#endif  // D2V_WITH_CUDA
