// Launchers of the raw CUDA kernels (csrc/cuda/*.cu). Plain C++ interface, no torch headers: the .cu
// files compile with nvcc alone (CI checks that without a GPU or a CUDA build of torch) and the torch
// glue in csrc/cuda/ops_cuda.cpp calls these with device pointers and the current stream.
// Every launcher returns the cudaError_t of its launch (cudaSuccess when there was nothing to do).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace vesselfast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Generic diffusion update (step_math.h): out = a*x0 + b*eps' + d*x + s*z per element.
// x, eps, z (may be null: no noise), out, x0_out (may be null: not wanted) point to batch*per_sample
// elements of `dtype`, contiguous; coef is float32 [batch, 6] in device memory.
cudaError_t launch_diffusion_step(const void* x, const void* eps, const void* z, const float* coef, void* out,
                                  void* x0_out, int64_t batch, int64_t per_sample, DType dtype, bool clip,
                                  bool use_eps, cudaStream_t stream);

// Vessel-weighted noise loss forward. Deterministic two-pass reduction: per-block partial sums go to
// `workspace` (vessel_loss_workspace_bytes(batch, per_sample) bytes of device memory), then one block
// per sample adds them in a fixed order. w may be null (w = 0). loss and sum_w are float32 [batch].
size_t vessel_loss_workspace_bytes(int64_t batch, int64_t per_sample);
cudaError_t launch_vessel_loss_fwd(const void* eps, const void* eps_hat, const void* w, float* loss,
                                   float* sum_w, void* workspace, int64_t batch, int64_t per_sample,
                                   DType dtype, cudaStream_t stream);

// Gradient w.r.t. eps_hat: grad_hat = -2 g[b] (0.5/n + w/(sum_w[b]+1)) (eps - eps_hat).
// grad and sum_w are float32 [batch] in device memory; grad_hat has `dtype`.
cudaError_t launch_vessel_loss_bwd(const float* grad, const float* sum_w, const void* eps, const void* eps_hat,
                                   const void* w, void* grad_hat, int64_t batch, int64_t per_sample, DType dtype,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace vesselfast
