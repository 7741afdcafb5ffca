// CPU kernels of the vessel-weighted noise loss (forward: per-sample reductions, backward: one
// elementwise pass). Sums accumulate in float over short blocks (vectorisable) and in double across
// blocks, so 16M-element samples keep float32-level accuracy.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "vesselfast/checks.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace {

struct Sums {
  double d2 = 0, wd2 = 0, w = 0;
};

constexpr int64_t kBlock = 1024;

template <typename T, bool W>
Sums reduce_range(const T* eps, const T* eps_hat, const T* w, int64_t begin, int64_t end) {
  Sums s;
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t i1 = std::min(end, i0 + kBlock);
    float d2 = 0.f, wd2 = 0.f, ws = 0.f;
#pragma omp simd reduction(+ : d2, wd2, ws)
    for (int64_t i = i0; i < i1; ++i) {
      const float d = static_cast<float>(eps[i]) - static_cast<float>(eps_hat[i]);
      d2 += d * d;
      if (W) {
        const float wi = static_cast<float>(w[i]);
        wd2 += wi * d * d;
        ws += wi;
      }
    }
    s.d2 += d2;
    s.wd2 += wd2;
    s.w += ws;
  }
  return s;
}

template <typename T, bool W>
void forward(const at::Tensor& eps, const at::Tensor& eps_hat, const at::Tensor* w, at::Tensor& loss,
             at::Tensor& sum_w) {
  const int64_t batch = eps.size(0), n = eps.numel() / batch;
  const T* ep = eps.data_ptr<T>();
  const T* hp = eps_hat.data_ptr<T>();
  const T* wp = W ? w->data_ptr<T>() : nullptr;
  // Chunks of whole blocks; each chunk reduces into its own slot, then samples combine their chunks
  // in a fixed order (results do not depend on the thread count).
  const int64_t chunk = std::max<int64_t>(kBlock, ((n + 63) / 64 + kBlock - 1) / kBlock * kBlock);
  const int64_t chunks_per_sample = (n + chunk - 1) / chunk;
  std::vector<Sums> partial(batch * chunks_per_sample);
  at::parallel_for(0, batch * chunks_per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / chunks_per_sample, c = j % chunks_per_sample;
      const int64_t lo = b * n + c * chunk, hi = b * n + std::min(n, (c + 1) * chunk);
      partial[j] = reduce_range<T, W>(ep, hp, wp, lo, hi);
    }
  });
  float* lp = loss.data_ptr<float>();
  float* swp = sum_w.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    Sums s;
    for (int64_t c = 0; c < chunks_per_sample; ++c) {
      const Sums& p = partial[b * chunks_per_sample + c];
      s.d2 += p.d2;
      s.wd2 += p.wd2;
      s.w += p.w;
    }
    lp[b] = static_cast<float>(0.5 * s.d2 / static_cast<double>(n) + s.wd2 / (s.w + 1.0));
    swp[b] = static_cast<float>(s.w);
  }
}

template <typename T, bool W>
void backward(const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& eps_hat, const at::Tensor* w,
              const at::Tensor& sum_w, at::Tensor& grad_hat) {
  const int64_t batch = eps.size(0), n = eps.numel() / batch;
  const T* ep = eps.data_ptr<T>();
  const T* hp = eps_hat.data_ptr<T>();
  const T* wp = W ? w->data_ptr<T>() : nullptr;
  T* gp = grad_hat.data_ptr<T>();
  const float* g = grad.data_ptr<float>();
  const float* swp = sum_w.data_ptr<float>();
  at::parallel_for(0, eps.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / n, seg_end = std::min(end, (b + 1) * n);
      // -2 g (0.5/n + w/(sum_w+1)) d, with the sample's constants hoisted.
      const float m2g = -2.f * g[b];
      const float inv_n_half = 0.5f / static_cast<float>(n);
      const float inv_wsum1 = 1.f / (swp[b] + 1.f);
#pragma omp simd
      for (int64_t k = i; k < seg_end; ++k) {
        const float d = static_cast<float>(ep[k]) - static_cast<float>(hp[k]);
        const float wk = W ? static_cast<float>(wp[k]) : 0.f;
        gp[k] = static_cast<T>(m2g * loss_weight(wk, inv_n_half, inv_wsum1) * d);
      }
      i = seg_end;
    }
  });
}

#define VF_FLOAT_TYPES(TYPE, ...)                                                   \
  switch (TYPE) {                                                                   \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                       \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }            \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                    \
    default: TORCH_CHECK(false, "unreachable");                                     \
  }

void check_inputs(const at::Tensor& eps, const at::Tensor& eps_hat, const c10::optional<at::Tensor>& w) {
  check_float_input(eps, "eps");
  check_like(eps_hat, eps, "eps_hat");
  if (w.has_value() && w->defined()) check_like(*w, eps, "w");
}

std::tuple<at::Tensor, at::Tensor> vessel_noise_loss_fwd_cpu(const at::Tensor& eps, const at::Tensor& eps_hat,
                                                             const c10::optional<at::Tensor>& w) {
  check_inputs(eps, eps_hat, w);
  const auto opts = eps.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({eps.size(0)}, opts), sum_w = at::empty({eps.size(0)}, opts);
  const bool has_w = w.has_value() && w->defined();
  VF_FLOAT_TYPES(eps.scalar_type(), {
    if (has_w) forward<T, true>(eps, eps_hat, &*w, loss, sum_w);
    else forward<T, false>(eps, eps_hat, nullptr, loss, sum_w);
  })
  return {loss, sum_w};
}

at::Tensor vessel_noise_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& eps_hat,
                                     const c10::optional<at::Tensor>& w, const at::Tensor& sum_w) {
  check_inputs(eps, eps_hat, w);
  const int64_t batch = eps.size(0);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.numel() == batch && sum_w.numel() == batch,
              "vesselfast: grad_loss and sum_w must be float32 [B]");
  const at::Tensor g = grad.contiguous(), sw = sum_w.contiguous();
  at::Tensor grad_hat = at::empty_like(eps_hat);
  const bool has_w = w.has_value() && w->defined();
  VF_FLOAT_TYPES(eps.scalar_type(), {
    if (has_w) backward<T, true>(g, eps, eps_hat, &*w, sw, grad_hat);
    else backward<T, false>(g, eps, eps_hat, nullptr, sw, grad_hat);
  })
  return grad_hat;
}

}  // namespace

TORCH_LIBRARY_IMPL(vesselfast, CPU, m) {
  m.impl("vessel_noise_loss_fwd", &vessel_noise_loss_fwd_cpu);
  m.impl("vessel_noise_loss_bwd", &vessel_noise_loss_bwd_cpu);
}

}  // namespace vesselfast
