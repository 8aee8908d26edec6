// CUDA multi-tensor EMA: ema = ema + w * (param - ema), w = 1 - decay, fp32 math, in place, optional
// bf16/fp16 teacher copy written in the same pass. Tensors are cut into kChunk-element chunks; one
// thread block per chunk; the addresses of up to kMaxTensors tensors and the (tensor, chunk) of up to
// kMaxBlocks blocks travel in the kernel's argument struct (< 4 KiB), so a launch needs no device-side
// table and no host-to-device copy. Launches are repeated only when a struct fills (ViT-B: ~6 launches
// per dtype group instead of ~200 per-parameter kernels). Vectorized 4-wide when all pointers of a
// tensor are 16-byte aligned.
//
// This file owns the kernel and ema_cuda::launch (dtype codes -> template instantiation), nothing else:
// it includes no torch header (Args, the constants and launch() are declared in ema_cuda.h), so nvcc
// compiles it in seconds and it compiles on machines with nvcc but a CPU torch. The torch-facing entry
// point (argument checks, device guard, current stream, grouping tensors into Args) is
// ema_update_cuda in ema_cuda_host.cpp.
#include "ema_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace d2v {
namespace ema_cuda {

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

namespace {

template <typename P, typename L, bool kLow>
cudaError_t launch_t(const Args& a, int blocks, float w, cudaStream_t s) {
  ema_kernel<P, L, kLow><<<blocks, kThreads, 0, s>>>(a, w);
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_p(Dtype low, const Args& a, int blocks, float w, cudaStream_t s) {
  switch (low) {
    case Dtype::kNone: return launch_t<P, float, false>(a, blocks, w, s);
    case Dtype::kBFloat16: return launch_t<P, __nv_bfloat16, true>(a, blocks, w, s);
    case Dtype::kHalf: return launch_t<P, __half, true>(a, blocks, w, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch(Dtype param, Dtype low, const Args& a, int blocks, float w, cudaStream_t stream) {
  switch (param) {
    case Dtype::kFloat: return launch_p<float>(low, a, blocks, w, stream);
    case Dtype::kBFloat16: return launch_p<__nv_bfloat16>(low, a, blocks, w, stream);
    case Dtype::kHalf: return launch_p<__half>(low, a, blocks, w, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ema_cuda
}  // namespace d2v
