// CPU twin of the CUDA multi-tensor EMA (ema_cuda.cu): all tensors are cut into fixed chunks and the
// chunk list is shared by one OpenMP loop, so small and large parameters balance across threads in a
// single parallel region (the CUDA kernel uses the same chunking, one chunk per thread block).
#include "ema.h"

#include <omp.h>

#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace d2v {

namespace {
constexpr int64_t kChunk = 1 << 15;  // elements per work item (128 KiB of fp32 shadow)
constexpr int64_t kParallelMin = 1 << 18;

// fp32 -> bf16 round-to-nearest-even on the bits (as c10::BFloat16, NaN kept quiet), written so that the
// loop vectorizes: c10's scalar conversion made the bf16-teacher pass 3x slower
inline uint16_t bf16_rne(float y) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return y != y ? uint16_t{0x7FC0} : static_cast<uint16_t>(r);
}

template <typename P, typename L, bool kLow>
inline void ema_chunk(float* __restrict e, const P* __restrict p, L* __restrict l, int64_t n, float w) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = e[j];
    const float y = x + w * (static_cast<float>(p[j]) - x);
    e[j] = y;
    if constexpr (kLow) {
      if constexpr (std::is_same_v<L, c10::BFloat16>) {
        reinterpret_cast<uint16_t*>(l)[j] = bf16_rne(y);
      } else {
        l[j] = static_cast<L>(y);
      }
    }
  }
}

template <typename P, typename L, bool kLow>
void ema_dispatch_low(float* e, const void* p, void* l, int64_t n, float w) {
  ema_chunk<P, L, kLow>(e, static_cast<const P*>(p), static_cast<L*>(l), n, w);
}

using ChunkFn = void (*)(float*, const void*, void*, int64_t, float);

template <typename P>
ChunkFn pick_low(const c10::optional<at::ScalarType>& low) {
  if (!low) return &ema_dispatch_low<P, float, false>;
  if (*low == at::kBFloat16) return &ema_dispatch_low<P, c10::BFloat16, true>;
  return &ema_dispatch_low<P, c10::Half, true>;
}

ChunkFn pick(at::ScalarType param, const c10::optional<at::ScalarType>& low) {
  switch (param) {
    case at::kFloat: return pick_low<float>(low);
    case at::kBFloat16: return pick_low<c10::BFloat16>(low);
    case at::kHalf: return pick_low<c10::Half>(low);
    default: TORCH_CHECK(false, "d2v ema_update_: unsupported param dtype ", param);
  }
}

struct Work {
  float* ema;
  const void* par;
  void* low;
  int64_t n;
  ChunkFn fn;
};
}  // namespace

void check_ema_args(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                    const std::vector<at::Tensor>& out_lowp, bool want_cuda) {
  TORCH_CHECK(ema.size() == params.size(), "d2v ema_update_: ", ema.size(), " ema tensors vs ", params.size(),
              " params");
  TORCH_CHECK(out_lowp.empty() || out_lowp.size() == ema.size(), "d2v ema_update_: ", out_lowp.size(),
              " out_lowp tensors vs ", ema.size(), " ema tensors");
  for (size_t i = 0; i < ema.size(); ++i) {
    const auto& e = ema[i];
    const auto& p = params[i];
    TORCH_CHECK(e.is_cuda() == want_cuda && p.is_cuda() == want_cuda, "d2v ema_update_: pair ", i, " must be on ",
                want_cuda ? "CUDA" : "CPU", ", got ", e.device(), " and ", p.device());
    TORCH_CHECK(e.scalar_type() == at::kFloat, "d2v ema_update_: ema tensor ", i, " must be float32, got ",
                e.scalar_type());
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "d2v ema_update_: param ", i, " must be float32/bf16/fp16, got ", p.scalar_type());
    TORCH_CHECK(e.sizes() == p.sizes(), "d2v ema_update_: pair ", i, " shapes differ: ", e.sizes(), " vs ",
                p.sizes());
    TORCH_CHECK(e.is_contiguous() && p.is_contiguous(), "d2v ema_update_: pair ", i, " must be contiguous");
    if (!out_lowp.empty()) {
      const auto& l = out_lowp[i];
      TORCH_CHECK(l.sizes() == e.sizes() && l.is_contiguous() && l.device() == e.device() &&
                      (l.scalar_type() == at::kBFloat16 || l.scalar_type() == at::kHalf),
                  "d2v ema_update_: out_lowp ", i, " must be a contiguous bf16/fp16 tensor of shape ", e.sizes(),
                  " on ", e.device());
    }
  }
}

void ema_update_cpu(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double decay,
                    const std::vector<at::Tensor>& out_lowp) {
  check_ema_args(ema, params, out_lowp, /*want_cuda=*/false);
  const float w = static_cast<float>(1.0 - decay);
  std::vector<Work> work;
  int64_t total = 0;
  for (size_t i = 0; i < ema.size(); ++i) {
    const int64_t n = ema[i].numel();
    total += n;
    c10::optional<at::ScalarType> low;
    if (!out_lowp.empty()) low = out_lowp[i].scalar_type();
    const ChunkFn fn = pick(params[i].scalar_type(), low);
    float* e = ema[i].data_ptr<float>();
    const char* p = static_cast<const char*>(params[i].data_ptr());
    char* l = out_lowp.empty() ? nullptr : static_cast<char*>(out_lowp[i].data_ptr());
    const int64_t ps = params[i].element_size(), ls = out_lowp.empty() ? 0 : out_lowp[i].element_size();
    for (int64_t s = 0; s < n; s += kChunk) {
      work.push_back({e + s, p + s * ps, l ? l + s * ls : nullptr, std::min(kChunk, n - s), fn});
    }
  }
  const int64_t n_work = static_cast<int64_t>(work.size());
  // a parallel region costs a thread wake-up (microseconds idle, milliseconds on a loaded machine): only
  // for updates of at least kParallelMin elements (the grain torch itself uses is 32768)
  const bool parallel = total >= kParallelMin && n_work > 1;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (parallel)
  for (int64_t c = 0; c < n_work; ++c) {
    const Work& u = work[c];
    u.fn(u.ema, u.par, u.low, u.n, w);
  }
}

}  // namespace d2v
