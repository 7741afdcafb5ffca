// Torch glue of the CUDA kernels: checks, output allocation, current stream, then the raw launchers of
// csrc/cuda/*.cu (cuda_launchers.h). Compiled only in CUDA builds (setup.py defines VESSELFAST_WITH_CUDA
// and adds csrc/cuda/*.cpp); registers the CUDA implementations of the schemas in csrc/vesselfast.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "vesselfast/checks.h"
#include "vesselfast/cuda_launchers.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace {

cuda::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "vesselfast: unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "vesselfast: ", name, " must be a CUDA tensor for the cuda backend, got ", t.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vesselfast: ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

const at::Tensor* check_cuda_step_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                                         const c10::optional<at::Tensor>& noise) {
  check_cuda(x, "x");
  return check_step_inputs(x, eps, coef, noise, kNumStepCoef);
}

void diffusion_step_into(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef, const at::Tensor* z,
                         bool clip, at::Tensor& out, void* x0_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  // Unlike the CPU kernel, never skip eps' for DDPM (b == 0): knowing that would need a device->host
  // sync per step (and break CUDA graph capture), while the extra division is free in a memory-bound
  // kernel; b * eps' adds exactly 0 when b == 0 (abar_t < 1, so ce > 0).
  const bool use_eps = true;
  const int64_t batch = x.size(0), per_sample = batch ? x.numel() / batch : 0;
  check_launch(cuda::launch_diffusion_step(x.data_ptr(), eps.data_ptr(), z ? z->data_ptr() : nullptr,
                                           coef.data_ptr<float>(), out.data_ptr(), x0_out, batch, per_sample,
                                           to_dtype(x), clip, use_eps,
                                           c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "diffusion_step");
}

std::tuple<at::Tensor, at::Tensor> diffusion_step_cuda(const at::Tensor& x, const at::Tensor& eps,
                                                       const at::Tensor& coef, const c10::optional<at::Tensor>& noise,
                                                       bool clip, bool need_x0) {
  const at::Tensor* z = check_cuda_step_inputs(x, eps, coef, noise);
  at::Tensor out = at::empty_like(x);
  at::Tensor x0 = need_x0 ? at::empty_like(x) : at::empty({0}, x.options());
  diffusion_step_into(x, eps, coef, z, clip, out, need_x0 ? x0.data_ptr() : nullptr);
  return {out, x0};
}

void diffusion_step_out_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                             const c10::optional<at::Tensor>& noise, bool clip, at::Tensor& out) {
  const at::Tensor* z = check_cuda_step_inputs(x, eps, coef, noise);
  check_out(out, x, {&x, &eps, z});
  diffusion_step_into(x, eps, coef, z, clip, out, nullptr);
}

void check_loss_inputs(const at::Tensor& eps, const at::Tensor& eps_hat, const c10::optional<at::Tensor>& w) {
  check_cuda(eps, "eps");
  check_float_input(eps, "eps");
  check_like(eps_hat, eps, "eps_hat");
  if (w.has_value() && w->defined()) check_like(*w, eps, "w");
}

std::tuple<at::Tensor, at::Tensor> vessel_noise_loss_fwd_cuda(const at::Tensor& eps, const at::Tensor& eps_hat,
                                                              const c10::optional<at::Tensor>& w) {
  check_loss_inputs(eps, eps_hat, w);
  const c10::cuda::CUDAGuard guard(eps.device());
  const int64_t batch = eps.size(0), n = batch ? eps.numel() / batch : 0;
  const auto fopts = eps.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({batch}, fopts), sum_w = at::empty({batch}, fopts);
  const size_t ws_bytes = cuda::vessel_loss_workspace_bytes(batch, n);
  at::Tensor ws = at::empty({static_cast<int64_t>((ws_bytes + 3) / 4)}, fopts);
  const bool has_w = w.has_value() && w->defined();
  check_launch(cuda::launch_vessel_loss_fwd(eps.data_ptr(), eps_hat.data_ptr(), has_w ? w->data_ptr() : nullptr,
                                            loss.data_ptr<float>(), sum_w.data_ptr<float>(), ws.data_ptr(), batch, n,
                                            to_dtype(eps),
                                            c10::cuda::getCurrentCUDAStream(eps.device().index()).stream()),
               "vessel_noise_loss_fwd");
  return {loss, sum_w};
}

at::Tensor vessel_noise_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& eps_hat,
                                      const c10::optional<at::Tensor>& w, const at::Tensor& sum_w) {
  check_loss_inputs(eps, eps_hat, w);
  const int64_t batch = eps.size(0), n = batch ? eps.numel() / batch : 0;
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.numel() == batch && sum_w.scalar_type() == at::kFloat &&
                  sum_w.numel() == batch && grad.device() == eps.device() && sum_w.device() == eps.device(),
              "vesselfast: grad_loss and sum_w must be float32 [B] on ", eps.device());
  const c10::cuda::CUDAGuard guard(eps.device());
  const at::Tensor g = grad.contiguous(), sw = sum_w.contiguous();
  at::Tensor grad_hat = at::empty_like(eps_hat);
  const bool has_w = w.has_value() && w->defined();
  check_launch(cuda::launch_vessel_loss_bwd(g.data_ptr<float>(), sw.data_ptr<float>(), eps.data_ptr(),
                                            eps_hat.data_ptr(), has_w ? w->data_ptr() : nullptr, grad_hat.data_ptr(),
                                            batch, n, to_dtype(eps),
                                            c10::cuda::getCurrentCUDAStream(eps.device().index()).stream()),
               "vessel_noise_loss_bwd");
  return grad_hat;
}

}  // namespace

TORCH_LIBRARY_IMPL(vesselfast, CUDA, m) {
  m.impl("diffusion_step", &diffusion_step_cuda);
  m.impl("diffusion_step_out", &diffusion_step_out_cuda);
  m.impl("vessel_noise_loss_fwd", &vessel_noise_loss_fwd_cuda);
  m.impl("vessel_noise_loss_bwd", &vessel_noise_loss_bwd_cuda);
}

}  // namespace vesselfast
