// Fused EMA of teacher parameters: ema = ema + w * (param - ema), w = 1 - decay, in fp32, in place,
// optionally writing a bf16/fp16 copy of the new ema (the low-precision teacher) in the same pass.
// CPU twin (ema.cpp, OpenMP) and CUDA multi-tensor kernel (ema_cuda.cu, torch-free, launched from
// ema_cuda_host.cpp); bound in bindings.cpp.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace d2v {

// Checks shared by both paths; throws c10::Error naming the offending pair.
void check_ema_args(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                    const std::vector<at::Tensor>& out_lowp, bool want_cuda);

void ema_update_cpu(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double decay,
                    const std::vector<at::Tensor>& out_lowp);

#ifdef D2V_WITH_CUDA
void ema_update_cuda(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double decay,
                     const std::vector<at::Tensor>& out_lowp);
#endif

}  // namespace d2v
