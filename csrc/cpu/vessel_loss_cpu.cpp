// CPU kernels of the vessel-weighted noise loss (forward: per-sample reductions, backward: one
// elementwise pass). Sums accumulate in float over short blocks (vectorisable) and in double across
// blocks, so 16M-element samples keep float32-level accuracy.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "vesselfast/checks.h"

// After the torch headers: lets GCC vectorise the 16-bit conversions of cpu_dtype.h (see there).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "vesselfast/cpu_dtype.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace {

struct Sums {
  double d2 = 0, wd2 = 0, w = 0;
};

constexpr int64_t kBlock = 1024;

template <typename C, bool W>
struct Loops {
  using S = typename C::storage;

  // Sums over [begin, end): float over kBlock-element blocks (vectorised), double across blocks.
  __attribute__((always_inline)) static inline Sums reduce_body(const S* __restrict eps, const S* __restrict eps_hat,
                                                                const S* __restrict w, int64_t begin, int64_t end) {
    Sums s;
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t i1 = std::min(end, i0 + kBlock);
      float d2 = 0.f, wd2 = 0.f, ws = 0.f;
#pragma omp simd reduction(+ : d2, wd2, ws)
      for (int64_t i = i0; i < i1; ++i) {
        const float d = C::load(eps[i]) - C::load(eps_hat[i]);
        d2 += d * d;
        if (W) {
          const float wi = C::load(w[i]);
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

  // grad_hat = m2g * (inv_n_half + w * inv_wsum1) * (eps - eps_hat) over [begin, end).
  __attribute__((always_inline)) static inline void grad_body(const S* __restrict ep, const S* __restrict hp,
                                                              const S* __restrict wp, S* __restrict gp, float m2g,
                                                              float inv_n_half, float inv_wsum1, int64_t begin,
                                                              int64_t end) {
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) {
      const float d = C::load(ep[k]) - C::load(hp[k]);
      const float wk = W ? C::load(wp[k]) : 0.f;
      gp[k] = C::store(m2g * loss_weight(wk, inv_n_half, inv_wsum1) * d);
    }
  }

  static Sums reduce_generic(const S* e, const S* h, const S* w, int64_t b, int64_t x) { return reduce_body(e, h, w, b, x); }
  static void grad_generic(const S* e, const S* h, const S* w, S* g, float m, float n, float s, int64_t b, int64_t x) {
    grad_body(e, h, w, g, m, n, s, b, x);
  }
#if VF_X86_DISPATCH
  VF_TARGET_AVX2 static Sums reduce_avx2(const S* e, const S* h, const S* w, int64_t b, int64_t x) {
    return reduce_body(e, h, w, b, x);
  }
  VF_TARGET_AVX512 static Sums reduce_avx512(const S* e, const S* h, const S* w, int64_t b, int64_t x) {
    return reduce_body(e, h, w, b, x);
  }
  VF_TARGET_AVX2 static void grad_avx2(const S* e, const S* h, const S* w, S* g, float m, float n, float s, int64_t b,
                                       int64_t x) {
    grad_body(e, h, w, g, m, n, s, b, x);
  }
  VF_TARGET_AVX512 static void grad_avx512(const S* e, const S* h, const S* w, S* g, float m, float n, float s,
                                           int64_t b, int64_t x) {
    grad_body(e, h, w, g, m, n, s, b, x);
  }
  // Float32 gradients larger than the last-level cache: the same body in blocks streamed to `g`
  // (cpu::streamed; see diffusion_step_cpu.cpp).
  static constexpr bool kCanStream = std::is_same<S, float>::value;
  __attribute__((always_inline)) static inline void block(const S* e, const S* h, const S* w, float m, float n,
                                                          float s, int64_t i, int64_t cnt, S* dst) {
    grad_body(e + i, h + i, W ? w + i : w, dst, m, n, s, 0, cnt);
  }
  VF_TARGET_AVX2 static void grad_avx2_nt(const S* e, const S* h, const S* w, S* g, float m, float n, float s,
                                          int64_t b, int64_t x) {
    cpu::streamed<cpu::Isa::kAvx2, Loops>(g, b, x, e, h, w, m, n, s);
  }
  VF_TARGET_AVX512 static void grad_avx512_nt(const S* e, const S* h, const S* w, S* g, float m, float n, float s,
                                              int64_t b, int64_t x) {
    cpu::streamed<cpu::Isa::kAvx512, Loops>(g, b, x, e, h, w, m, n, s);
  }
#endif
  static Sums reduce(cpu::Isa isa, const S* e, const S* h, const S* w, int64_t b, int64_t x) {
#if VF_X86_DISPATCH
    if (isa == cpu::Isa::kAvx512) return reduce_avx512(e, h, w, b, x);
    if (isa == cpu::Isa::kAvx2) return reduce_avx2(e, h, w, b, x);
#endif
    (void)isa;
    return reduce_generic(e, h, w, b, x);
  }
  static void grad(cpu::Isa isa, bool stream, const S* e, const S* h, const S* w, S* g, float m, float n, float s,
                   int64_t b, int64_t x) {
#if VF_X86_DISPATCH
    if constexpr (kCanStream) {
      if (stream && isa == cpu::Isa::kAvx512) return grad_avx512_nt(e, h, w, g, m, n, s, b, x);
      if (stream && isa == cpu::Isa::kAvx2) return grad_avx2_nt(e, h, w, g, m, n, s, b, x);
    }
    if (isa == cpu::Isa::kAvx512) return grad_avx512(e, h, w, g, m, n, s, b, x);
    if (isa == cpu::Isa::kAvx2) return grad_avx2(e, h, w, g, m, n, s, b, x);
#endif
    (void)isa;
    (void)stream;
    grad_generic(e, h, w, g, m, n, s, b, x);
  }
};

template <typename C, bool W>
void forward(const at::Tensor& eps, const at::Tensor& eps_hat, const at::Tensor* w, at::Tensor& loss,
             at::Tensor& sum_w) {
  using T = typename C::storage;
  const int64_t batch = eps.size(0), n = eps.numel() / batch;
  const T* ep = static_cast<const T*>(eps.data_ptr());
  const T* hp = static_cast<const T*>(eps_hat.data_ptr());
  const T* wp = W ? static_cast<const T*>(w->data_ptr()) : nullptr;
  // Chunks of whole blocks; each chunk reduces into its own slot, then samples combine their chunks
  // in a fixed order (results do not depend on the thread count).
  const int64_t chunk = std::max<int64_t>(kBlock, ((n + 63) / 64 + kBlock - 1) / kBlock * kBlock);
  const int64_t chunks_per_sample = (n + chunk - 1) / chunk;
  std::vector<Sums> partial(batch * chunks_per_sample);
  const cpu::Isa isa = cpu::active_isa();
  // Grain: at least ~32K elements per thread, so small inputs stay on the calling thread (waking the
  // pool costs more than they take, and far more when another process holds a core).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / chunk);
  at::parallel_for(0, batch * chunks_per_sample, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / chunks_per_sample, c = j % chunks_per_sample;
      const int64_t lo = b * n + c * chunk, hi = b * n + std::min(n, (c + 1) * chunk);
      partial[j] = Loops<C, W>::reduce(isa, ep, hp, wp, lo, hi);
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

template <typename C, bool W>
void backward(const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& eps_hat, const at::Tensor* w,
              const at::Tensor& sum_w, at::Tensor& grad_hat) {
  using T = typename C::storage;
  const int64_t n = eps.numel() / eps.size(0);
  const T* __restrict ep = static_cast<const T*>(eps.data_ptr());
  const T* __restrict hp = static_cast<const T*>(eps_hat.data_ptr());
  const T* __restrict wp = W ? static_cast<const T*>(w->data_ptr()) : nullptr;
  T* __restrict gp = static_cast<T*>(grad_hat.data_ptr());
  const float* g = grad.data_ptr<float>();
  const float* swp = sum_w.data_ptr<float>();
  const cpu::Isa isa = cpu::active_isa();
  // bytes of the pass: eps, eps_hat (and w) read, the gradient written
  const bool stream = cpu::stream_stores_pay(eps.numel() * static_cast<int64_t>(sizeof(T)) * (W ? 4 : 3));
  at::parallel_for(0, eps.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / n, seg_end = std::min(end, (b + 1) * n);
      // -2 g (0.5/n + w/(sum_w+1)) d, with the sample's constants hoisted.
      const float m2g = -2.f * g[b];
      const float inv_n_half = 0.5f / static_cast<float>(n);
      const float inv_wsum1 = 1.f / (swp[b] + 1.f);
      Loops<C, W>::grad(isa, stream, ep, hp, wp, gp, m2g, inv_n_half, inv_wsum1, i, seg_end);
      i = seg_end;
    }
  });
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
    if (has_w) forward<C, true>(eps, eps_hat, &*w, loss, sum_w);
    else forward<C, false>(eps, eps_hat, nullptr, loss, sum_w);
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
    if (has_w) backward<C, true>(g, eps, eps_hat, &*w, sw, grad_hat);
    else backward<C, false>(g, eps, eps_hat, nullptr, sw, grad_hat);
  })
  return grad_hat;
}

}  // namespace

TORCH_LIBRARY_IMPL(vesselfast, CPU, m) {
  m.impl("vessel_noise_loss_fwd", &vessel_noise_loss_fwd_cpu);
  m.impl("vessel_noise_loss_bwd", &vessel_noise_loss_bwd_cpu);
}

}  // namespace vesselfast
