// Raw CUDA kernel of the generic diffusion update (DDIM step / DDIM inversion / DDPM step).
// Per-element math is vesselfast::diffusion_update from step_math.h, the same function the CPU kernel
// runs, so the CPU tests cover it. No torch headers here (see cuda_launchers.h).
#include <cstdint>

#include "dtype_util.cuh"
#include "vesselfast/cuda_launchers.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace cuda {
namespace {

constexpr int kPerThread = 4;  // elements per thread per block iteration (kThreads * 4 per block)

// grid.x blocks stride over one sample, grid.y strides over samples (coefficients loaded once per
// sample in registers). The switches are template parameters: no branches in the element loop.
template <typename T, bool CLIP, bool USE_EPS, bool NOISE, bool X0>
__global__ void __launch_bounds__(kThreads) diffusion_step_kernel(const T* __restrict__ x, const T* __restrict__ eps,
                                                                   const T* __restrict__ z,
                                                                   const float* __restrict__ coef, T* __restrict__ out,
                                                                   T* __restrict__ x0_out, int64_t batch,
                                                                   int64_t per_sample) {
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const float* cb = coef + b * kNumStepCoef;
    const StepCoef c{cb[0], cb[1], cb[2], cb[3], cb[4], cb[5]};
    const int64_t base = b * per_sample;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kPerThread;
    for (int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads * kPerThread; start < per_sample;
         start += stride) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int64_t i = start + k * kThreads + threadIdx.x;  // coalesced: consecutive threads, consecutive i
        if (i < per_sample) {
          const int64_t j = base + i;
          float x0;
          const float zi = NOISE ? to_f32(z[j]) : 0.f;
          const float o = diffusion_update(to_f32(x[j]), to_f32(eps[j]), zi, c, CLIP, USE_EPS, &x0);
          out[j] = from_f32<T>(o);
          if (X0) x0_out[j] = from_f32<T>(x0);
        }
      }
    }
  }
}

template <typename T, bool CLIP, bool USE_EPS, bool NOISE, bool X0>
cudaError_t launch4(const void* x, const void* eps, const void* z, const float* coef, void* out, void* x0,
                    int64_t batch, int64_t per_sample, cudaStream_t stream) {
  const dim3 grid(blocks_for(per_sample, kPerThread), static_cast<unsigned>(batch < 65535 ? batch : 65535));
  diffusion_step_kernel<T, CLIP, USE_EPS, NOISE, X0><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(eps), static_cast<const T*>(z), coef, static_cast<T*>(out),
      static_cast<T*>(x0), batch, per_sample);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* eps, const void* z, const float* coef, void* out, void* x0,
                         int64_t batch, int64_t per_sample, bool clip, bool use_eps, cudaStream_t stream) {
  const bool noise = z != nullptr, want_x0 = x0 != nullptr;
#define VF_CASE(C, U, N, X)                                                                          \
  if (clip == C && use_eps == U && noise == N && want_x0 == X)                                      \
    return launch4<T, C, U, N, X>(x, eps, z, coef, out, x0, batch, per_sample, stream);
  VF_STEP_FLAG_CASES(VF_CASE)
#undef VF_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_diffusion_step(const void* x, const void* eps, const void* z, const float* coef, void* out,
                                  void* x0_out, int64_t batch, int64_t per_sample, DType dtype, bool clip,
                                  bool use_eps, cudaStream_t stream) {
  if (batch <= 0 || per_sample <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(x, eps, z, coef, out, x0_out, batch, per_sample, clip, use_eps, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, eps, z, coef, out, x0_out, batch, per_sample, clip, use_eps, stream);
    case DType::kFloat16:
      return launch_typed<__half>(x, eps, z, coef, out, x0_out, batch, per_sample, clip, use_eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace vesselfast
