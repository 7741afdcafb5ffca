// CPU kernel of the generic diffusion update (DDIM step / DDIM inversion / DDPM step).
// Templated on the storage codec (float32 / bfloat16 / float16, see cpu_dtype.h) and the loop-invariant
// switches, so the inner loop has no branches and vectorises (including the clip and the 16-bit
// conversions); threads split the flat element range with at::parallel_for (OpenMP in torch's CPU builds).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "vesselfast/checks.h"

// After the torch headers: applies to the kernels below only. Lets GCC if-convert float selects (clip,
// NaN handling of the conversions) into vector blends; no result changes (see cpu_dtype.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "vesselfast/cpu_dtype.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace {

template <typename C, bool CLIP, bool USE_EPS, bool NOISE, bool X0>
struct Update {
  using S = typename C::storage;
  // The element loop; inlined into one function per instruction set below, vectorised for each.
  __attribute__((always_inline)) static inline void loop(const S* __restrict x, const S* __restrict eps,
                                                         const S* __restrict z, S* __restrict out,
                                                         S* __restrict x0_out, const StepCoef& c, int64_t begin,
                                                         int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      float x0;
      const float zi = NOISE ? C::load(z[i]) : 0.f;
      const float o = diffusion_update(C::load(x[i]), C::load(eps[i]), zi, c, CLIP, USE_EPS, &x0);
      out[i] = C::store(o);
      if (X0) x0_out[i] = C::store(x0);
    }
  }
  static void generic(const S* x, const S* eps, const S* z, S* out, S* x0, const StepCoef& c, int64_t b, int64_t e) {
    loop(x, eps, z, out, x0, c, b, e);
  }
#if VF_X86_DISPATCH
  VF_TARGET_AVX2 static void avx2(const S* x, const S* eps, const S* z, S* out, S* x0, const StepCoef& c, int64_t b,
                                  int64_t e) {
    loop(x, eps, z, out, x0, c, b, e);
  }
  VF_TARGET_AVX512 static void avx512(const S* x, const S* eps, const S* z, S* out, S* x0, const StepCoef& c,
                                      int64_t b, int64_t e) {
    loop(x, eps, z, out, x0, c, b, e);
  }
#endif
#if VF_X86_DISPATCH
  // Float32 without x0 only: the loop in blocks whose results reach `out` through non-temporal stores
  // (cpu::streamed). Chosen when the call moves more bytes than the last-level cache holds
  // (cpu::stream_stores_pay), where `out` cannot stay cached for its next reader anyway.
  static constexpr bool kCanStream = std::is_same<S, float>::value && !X0;
  __attribute__((always_inline)) static inline void block(const S* x, const S* eps, const S* z, const StepCoef& c,
                                                          int64_t i, int64_t n, S* dst) {
    loop(x + i, eps + i, NOISE ? z + i : z, dst, nullptr, c, 0, n);
  }
  VF_TARGET_AVX2 static void avx2_nt(const S* x, const S* eps, const S* z, S* out, const StepCoef& c, int64_t b,
                                     int64_t e) {
    cpu::streamed<cpu::Isa::kAvx2, Update>(out, b, e, x, eps, z, c);
  }
  VF_TARGET_AVX512 static void avx512_nt(const S* x, const S* eps, const S* z, S* out, const StepCoef& c,
                                         int64_t b, int64_t e) {
    cpu::streamed<cpu::Isa::kAvx512, Update>(out, b, e, x, eps, z, c);
  }
#endif
  static void range(cpu::Isa isa, bool stream, const S* x, const S* eps, const S* z, S* out, S* x0,
                    const StepCoef& c, int64_t b, int64_t e) {
#if VF_X86_DISPATCH
    if constexpr (kCanStream) {
      if (stream && isa == cpu::Isa::kAvx512) return avx512_nt(x, eps, z, out, c, b, e);
      if (stream && isa == cpu::Isa::kAvx2) return avx2_nt(x, eps, z, out, c, b, e);
    }
    if (isa == cpu::Isa::kAvx512) return avx512(x, eps, z, out, x0, c, b, e);
    if (isa == cpu::Isa::kAvx2) return avx2(x, eps, z, out, x0, c, b, e);
#endif
    (void)isa;
    (void)stream;
    generic(x, eps, z, out, x0, c, b, e);
  }
};

template <typename C, bool CLIP, bool USE_EPS, bool NOISE, bool X0>
void run(const at::Tensor& x, const at::Tensor& eps, const at::Tensor* noise, const at::Tensor& coef,
         at::Tensor& out, at::Tensor& x0) {
  using S = typename C::storage;
  const int64_t batch = x.size(0), per_sample = x.numel() / batch;
  const S* xp = static_cast<const S*>(x.data_ptr());
  const S* ep = static_cast<const S*>(eps.data_ptr());
  const S* zp = NOISE ? static_cast<const S*>(noise->data_ptr()) : nullptr;
  S* op = static_cast<S*>(out.data_ptr());
  S* x0p = X0 ? static_cast<S*>(x0.data_ptr()) : nullptr;
  const float* cp = coef.data_ptr<float>();
  const cpu::Isa isa = cpu::active_isa();
  // bytes of the pass: x, eps (and the noise) read, out written
  const int64_t moved = x.numel() * static_cast<int64_t>(sizeof(S)) * (NOISE ? 4 : 3);
  const bool stream = cpu::stream_stores_pay(moved);
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    // The range may straddle samples: walk it one sample segment at a time.
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / per_sample;
      const int64_t seg_end = std::min(end, (b + 1) * per_sample);
      const float* cb = cp + b * kNumStepCoef;
      const StepCoef c{cb[0], cb[1], cb[2], cb[3], cb[4], cb[5]};
      Update<C, CLIP, USE_EPS, NOISE, X0>::range(isa, stream, xp, ep, zp, op, x0p, c, i, seg_end);
      i = seg_end;
    }
  });
}

template <typename C>
void dispatch_flags(bool clip, bool use_eps, bool noise, bool need_x0, const at::Tensor& x,
                    const at::Tensor& eps, const at::Tensor* z, const at::Tensor& coef, at::Tensor& out,
                    at::Tensor& x0) {
#define VF_CASE(CL, U, N, X)                                         \
  if (clip == CL && use_eps == U && noise == N && need_x0 == X) {    \
    run<C, CL, U, N, X>(x, eps, z, coef, out, x0);                   \
    return;                                                          \
  }
  VF_STEP_FLAG_CASES(VF_CASE)
#undef VF_CASE
}

// Fills `out` (and `x0` when need_x0) from x, eps and the optional noise; every tensor already checked.
void diffusion_step_into(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                         const at::Tensor* z, bool clip, at::Tensor& out, at::Tensor& x0, bool need_x0) {
  // b == 0 for every sample (DDPM) means eps' is never needed: skip its division entirely.
  const float* cp = coef.data_ptr<float>();
  bool use_eps = false;
  for (int64_t b = 0; b < coef.size(0); ++b) use_eps = use_eps || cp[b * kNumStepCoef + 3] != 0.f;
  const bool has_noise = z != nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_flags<cpu::F32>(clip, use_eps, has_noise, need_x0, x, eps, z, coef, out, x0); break;
    case at::kBFloat16: dispatch_flags<cpu::BF16>(clip, use_eps, has_noise, need_x0, x, eps, z, coef, out, x0); break;
    case at::kHalf: dispatch_flags<cpu::F16>(clip, use_eps, has_noise, need_x0, x, eps, z, coef, out, x0); break;
    default: TORCH_CHECK(false, "unreachable");
  }
}

std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                                                      const at::Tensor& coef,
                                                      const c10::optional<at::Tensor>& noise, bool clip,
                                                      bool need_x0) {
  const at::Tensor* z = check_step_inputs(x, eps, coef, noise, kNumStepCoef);
  at::Tensor out = at::empty_like(x);
  at::Tensor x0 = need_x0 ? at::empty_like(x) : at::empty({0}, x.options());
  diffusion_step_into(x, eps, coef, z, clip, out, x0, need_x0);
  return {out, x0};
}

// The same update written into a caller's buffer: sampling loops reuse one buffer instead of allocating
// (and, under glibc malloc, page-faulting in) a fresh output every step.
void diffusion_step_out_cpu(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                            const c10::optional<at::Tensor>& noise, bool clip, at::Tensor& out) {
  const at::Tensor* z = check_step_inputs(x, eps, coef, noise, kNumStepCoef);
  check_out(out, x, {&x, &eps, z});
  at::Tensor unused;
  diffusion_step_into(x, eps, coef, z, clip, out, unused, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(vesselfast, CPU, m) {
  m.impl("diffusion_step", &diffusion_step_cpu);
  m.impl("diffusion_step_out", &diffusion_step_out_cpu);
}

}  // namespace vesselfast
