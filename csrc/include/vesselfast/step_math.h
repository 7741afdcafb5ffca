// Per-element math shared by the CPU and CUDA kernels, so the CPU tests cover what the GPU runs.
// Everything is float32: inputs of any floating dtype are widened to float before these are called.
#pragma once

#if defined(__CUDACC__)
#define VF_HD __host__ __device__ __forceinline__
#else
#define VF_HD inline
#endif

namespace vesselfast {

// Per-sample coefficients of the generic diffusion update (computed in float64 on the host, see
// vesselfast/ops/diffusion_step.py). With x0 = clip(cx * x - ce * eps) and eps' = (cx * x - x0) / ce:
//   out = a * x0 + b * eps' + d * x + s * z
// DDIM step:      a = sqrt(abar_prev), b = sqrt(1 - abar_prev - sigma^2), d = 0, s = sigma
// DDIM inversion: a = sqrt(abar_next), b = sqrt(1 - abar_next),           d = 0, s = 0
// DDPM step:      a = posterior coef of x0, b = 0, d = posterior coef of x_t,     s = sigma_t
struct StepCoef {
  float cx, ce, a, b, d, s;
};
constexpr int kNumStepCoef = 6;

// Two independent selects (not nested): vectorises on CPU (maxps/minps-like blends), NaN passes through.
// Expands CASE(clip, use_eps, noise, x0) once per combination of the step kernels' compile-time
// switches; the CPU and CUDA dispatchers both select their template instance with it.
#define VF_STEP_FLAG_CASES(CASE)                                                                  \
  CASE(true, true, true, true) CASE(true, true, true, false) CASE(true, true, false, true)        \
  CASE(true, true, false, false) CASE(true, false, true, true) CASE(true, false, true, false)     \
  CASE(true, false, false, true) CASE(true, false, false, false) CASE(false, true, true, true)    \
  CASE(false, true, true, false) CASE(false, true, false, true) CASE(false, true, false, false)   \
  CASE(false, false, true, true) CASE(false, false, true, false) CASE(false, false, false, true)  \
  CASE(false, false, false, false)

VF_HD float clip_unit(float v) {
  v = v < -1.f ? -1.f : v;
  return v > 1.f ? 1.f : v;
}

// Returns out; writes the (clipped) x0 prediction to *x0_out.
VF_HD float diffusion_update(float x, float eps, float z, const StepCoef& c, bool clip, bool use_eps,
                             float* x0_out) {
  const float scaled = c.cx * x;
  float x0 = scaled - c.ce * eps;
  if (clip) x0 = clip_unit(x0);
  *x0_out = x0;
  float out = c.a * x0 + c.d * x + c.s * z;
  if (use_eps) out += c.b * ((scaled - x0) / c.ce);
  return out;
}

// Vessel-weighted noise loss of one element, d = eps - eps_hat:
//   contribution to the per-sample loss = (0.5 / n + w / (sum_w + 1)) * d^2  =  k(w) * d^2
// and d loss / d eps_hat = -2 * k(w) * d.
VF_HD float loss_weight(float w, float inv_n_half, float inv_wsum1) { return inv_n_half + w * inv_wsum1; }

}  // namespace vesselfast
