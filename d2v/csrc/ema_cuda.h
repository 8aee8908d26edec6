// The interface between the CUDA EMA kernel (ema_cuda.cu, compiled by nvcc) and its torch-facing host
// side (ema_cuda_host.cpp, compiled by the C++ compiler): the kernel's argument struct, the chunking
// constants and a launcher that takes dtype codes instead of at::ScalarType. Plain C++ and the CUDA
// runtime only, no torch/ATen/c10/pybind header: nvcc never parses torch's headers, which is what made
// ema_cuda.cu take minutes to compile (once for the host pass, once more per GPU architecture).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace d2v {
namespace ema_cuda {

constexpr int kMaxTensors = 48;  // tensor slots per launch
constexpr int kMaxBlocks = 320;  // thread blocks (chunks) per launch
constexpr int kChunk = 1 << 16;  // elements per chunk, one thread block each
constexpr int kThreads = 512;    // threads per block

// One launch: the addresses and sizes of up to kMaxTensors tensors (slot t: ema fp32, param, optional
// low-precision copy, all of numel[t] contiguous elements) and, for block b of the grid, the slot
// tensor[b] and the chunk index chunk[b] inside that tensor. Passed by value as the kernel argument.
struct Args {
  float* ema[kMaxTensors];
  const void* par[kMaxTensors];
  void* low[kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char tensor[kMaxBlocks];
  int chunk[kMaxBlocks];
};
static_assert(sizeof(Args) <= 4096, "kernel argument struct must fit in 4 KiB");

// Element types the launcher knows. Params: kFloat, kBFloat16 or kHalf. The low-precision copy: kNone
// (not written; Args::low is ignored), kBFloat16 or kHalf.
enum class Dtype : int { kNone = 0, kFloat = 1, kBFloat16 = 2, kHalf = 3 };

// Launches ema_kernel over the first `blocks` entries of `a` (1 <= blocks <= kMaxBlocks) on `stream`
// with w = 1 - decay. Returns cudaGetLastError() after the launch (cudaSuccess when it was queued), or
// cudaErrorInvalidValue without launching for a dtype pair it has no kernel for.
cudaError_t launch(Dtype param, Dtype low, const Args& a, int blocks, float w, cudaStream_t stream);

}  // namespace ema_cuda
}  // namespace d2v
