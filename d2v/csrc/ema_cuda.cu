// CUDA multi-tensor EMA: ema = ema + w * (param - ema), w = 1 - decay, fp32 math, in place, optional
// bf16/fp16 teacher copy written in the same pass. Tensors are cut into kChunk-element chunks; one
// thread block per chunk; the addresses of up to kMaxTensors tensors and the (tensor, chunk) of up to
// kMaxBlocks blocks travel in the kernel's argument struct (< 4 KiB), so a launch needs no device-side
// table and no host-to-device copy. Launches are repeated only when a struct fills (ViT-B: ~6 launches
// per dtype group instead of ~200 per-parameter kernels). Vectorized 4-wide when all pointers of a
// tensor are 16-byte aligned.
//
// The kernel part compiles without torch (nvcc -DD2V_KERNEL_ONLY -c csrc/ema_cuda.cu) for a syntax check
// on machines with nvcc but a CPU torch; the launcher needs a CUDA torch (setup.py builds it there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace d2v {
namespace ema_cuda {

constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 1 << 16;
constexpr int kThreads = 512;

struct Args {
  float* ema[kMaxTensors];
  const void* par[kMaxTensors];
  void* low[kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char tensor[kMaxBlocks];
  int chunk[kMaxBlocks];
};
static_assert(sizeof(Args) <= 4096, "kernel argument struct must fit in 4 KiB");

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }

template <typename P, typename L, bool kLow>
__global__ void __launch_bounds__(kThreads) ema_kernel(Args args, float w) {
  const int b = blockIdx.x;
  const int t = args.tensor[b];
  const int64_t start = static_cast<int64_t>(args.chunk[b]) * kChunk;
  const int64_t n = min(static_cast<int64_t>(kChunk), args.numel[t] - start);
  float* __restrict__ e = args.ema[t] + start;
  const P* __restrict__ p = static_cast<const P*>(args.par[t]) + start;
  L* __restrict__ l = kLow ? static_cast<L*>(args.low[t]) + start : nullptr;
  // 4-wide vector path when every pointer of this chunk is aligned to its 4-element vector
  const bool aligned = reinterpret_cast<uintptr_t>(e) % sizeof(Vec4<float>) == 0 &&
                       reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<P>) == 0 &&
                       (!kLow || reinterpret_cast<uintptr_t>(l) % sizeof(Vec4<L>) == 0);
  int64_t done = 0;
  if (aligned) {
    const int64_t n4 = n / 4;
    for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
      Vec4<float> x = reinterpret_cast<const Vec4<float>*>(e)[i];
      const Vec4<P> q = reinterpret_cast<const Vec4<P>*>(p)[i];
      Vec4<L> y;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x.v[j] = x.v[j] + w * (to_f(q.v[j]) - x.v[j]);
        if (kLow) y.v[j] = from_f<L>(x.v[j]);
      }
      reinterpret_cast<Vec4<float>*>(e)[i] = x;
      if (kLow) reinterpret_cast<Vec4<L>*>(l)[i] = y;
    }
    done = n4 * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    const float x = e[i];
    const float y = x + w * (to_f(p[i]) - x);
    e[i] = y;
    if (kLow) l[i] = from_f<L>(y);
  }
}

#ifdef D2V_KERNEL_ONLY  // instantiate every variant for the torch-free syntax check
template __global__ void ema_kernel<float, float, false>(Args, float);
template __global__ void ema_kernel<__nv_bfloat16, float, false>(Args, float);
template __global__ void ema_kernel<__half, float, false>(Args, float);
template __global__ void ema_kernel<float, __nv_bfloat16, true>(Args, float);
template __global__ void ema_kernel<__nv_bfloat16, __nv_bfloat16, true>(Args, float);
template __global__ void ema_kernel<__half, __half, true>(Args, float);
#endif

}  // namespace ema_cuda
}  // namespace d2v

#ifndef D2V_KERNEL_ONLY
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ema.h"

namespace d2v {

namespace {
using namespace ema_cuda;

template <typename P, typename L, bool kLow>
void launch(const Args& a, int blocks, float w, cudaStream_t s) {
  ema_kernel<P, L, kLow><<<blocks, kThreads, 0, s>>>(a, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename P>
void launch_p(const Args& a, int blocks, float w, cudaStream_t s, int low) {
  if (low == 0) launch<P, float, false>(a, blocks, w, s);
  else if (low == 1) launch<P, __nv_bfloat16, true>(a, blocks, w, s);
  else launch<P, __half, true>(a, blocks, w, s);
}

void launch_any(at::ScalarType pt, const Args& a, int blocks, float w, cudaStream_t s, int low) {
  if (pt == at::kFloat) launch_p<float>(a, blocks, w, s, low);
  else if (pt == at::kBFloat16) launch_p<__nv_bfloat16>(a, blocks, w, s, low);
  else launch_p<__half>(a, blocks, w, s, low);
}
}  // namespace

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
    for (const int low : {0, 1, 2}) {
      if ((low == 0) == has_low) continue;
      const at::ScalarType lt = low == 1 ? at::kBFloat16 : at::kHalf;
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
            launch_any(pt, a, nb, w, stream, low);
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
      if (nb > 0) launch_any(pt, a, nb, w, stream, low);
    }
  }
}

}  // namespace d2v
#endif  // D2V_KERNEL_ONLY
