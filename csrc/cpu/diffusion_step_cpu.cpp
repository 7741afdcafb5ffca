// CPU kernel of the generic diffusion update (DDIM step / DDIM inversion / DDPM step).
// Templated on the loop-invariant switches so the inner loop has no branches and vectorises;
// threads split the flat element range with at::parallel_for (OpenMP in torch's CPU builds).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vesselfast/checks.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace {

template <typename T, bool CLIP, bool USE_EPS, bool NOISE, bool X0>
void update_range(const T* x, const T* eps, const T* z, T* out, T* x0_out, const StepCoef& c,
                  int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float x0;
    const float zi = NOISE ? static_cast<float>(z[i]) : 0.f;
    const float o = diffusion_update(static_cast<float>(x[i]), static_cast<float>(eps[i]), zi, c, CLIP,
                                     USE_EPS, &x0);
    out[i] = static_cast<T>(o);
    if (X0) x0_out[i] = static_cast<T>(x0);
  }
}

template <typename T, bool CLIP, bool USE_EPS, bool NOISE, bool X0>
void run(const at::Tensor& x, const at::Tensor& eps, const at::Tensor* noise, const at::Tensor& coef,
         at::Tensor& out, at::Tensor& x0) {
  const int64_t batch = x.size(0), per_sample = x.numel() / batch;
  const T* xp = x.data_ptr<T>();
  const T* ep = eps.data_ptr<T>();
  const T* zp = NOISE ? noise->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* x0p = X0 ? x0.data_ptr<T>() : nullptr;
  const float* cp = coef.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    // The range may straddle samples: walk it one sample segment at a time.
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / per_sample;
      const int64_t seg_end = std::min(end, (b + 1) * per_sample);
      const float* cb = cp + b * kNumStepCoef;
      const StepCoef c{cb[0], cb[1], cb[2], cb[3], cb[4], cb[5]};
      update_range<T, CLIP, USE_EPS, NOISE, X0>(xp, ep, zp, op, x0p, c, i, seg_end);
      i = seg_end;
    }
  });
}

template <typename T>
void dispatch_flags(bool clip, bool use_eps, bool noise, bool need_x0, const at::Tensor& x,
                    const at::Tensor& eps, const at::Tensor* z, const at::Tensor& coef, at::Tensor& out,
                    at::Tensor& x0) {
#define VF_CASE(C, U, N, X)                                          \
  if (clip == C && use_eps == U && noise == N && need_x0 == X) {     \
    run<T, C, U, N, X>(x, eps, z, coef, out, x0);                    \
    return;                                                          \
  }
  VF_CASE(true, true, true, true) VF_CASE(true, true, true, false) VF_CASE(true, true, false, true)
  VF_CASE(true, true, false, false) VF_CASE(true, false, true, true) VF_CASE(true, false, true, false)
  VF_CASE(true, false, false, true) VF_CASE(true, false, false, false) VF_CASE(false, true, true, true)
  VF_CASE(false, true, true, false) VF_CASE(false, true, false, true) VF_CASE(false, true, false, false)
  VF_CASE(false, false, true, true) VF_CASE(false, false, true, false) VF_CASE(false, false, false, true)
  VF_CASE(false, false, false, false)
#undef VF_CASE
}

std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                                                      const at::Tensor& coef,
                                                      const c10::optional<at::Tensor>& noise, bool clip,
                                                      bool need_x0) {
  check_float_input(x, "x");
  check_like(eps, x, "eps");
  check_coef(coef, x, kNumStepCoef);
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) check_like(*noise, x, "noise");
  // b == 0 for every sample (DDPM) means eps' is never needed: skip its division entirely.
  const bool use_eps = coef.select(1, 3).ne(0).any().item<bool>();
  at::Tensor out = at::empty_like(x);
  at::Tensor x0 = need_x0 ? at::empty_like(x) : at::empty({0}, x.options());
  const at::Tensor* z = has_noise ? &*noise : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_flags<float>(clip, use_eps, has_noise, need_x0, x, eps, z, coef, out, x0); break;
    case at::kBFloat16: dispatch_flags<c10::BFloat16>(clip, use_eps, has_noise, need_x0, x, eps, z, coef, out, x0); break;
    case at::kHalf: dispatch_flags<c10::Half>(clip, use_eps, has_noise, need_x0, x, eps, z, coef, out, x0); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return {out, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(vesselfast, CPU, m) { m.impl("diffusion_step", &diffusion_step_cpu); }

}  // namespace vesselfast
