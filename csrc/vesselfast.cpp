// Registration of every vesselfast op, in one place. Device implementations register themselves in
// csrc/cpu/*.cpp and csrc/cuda/*.cpp with TORCH_LIBRARY_IMPL; this file owns the schemas and the
// Python module object that `import vesselfast._C` loads.
#include <torch/extension.h>
#include <torch/library.h>

#include "vesselfast/cpu_dtype.h"

TORCH_LIBRARY(vesselfast, m) {
  // Generic diffusion update (DDIM step, DDIM inversion step, DDPM ancestral step), see step_math.h.
  // coef: float32 [B, 6] per-sample coefficients. Returns (out, x0); x0 is empty unless need_x0.
  m.def("diffusion_step(Tensor x, Tensor eps, Tensor coef, Tensor? noise, bool clip, bool need_x0)"
        " -> (Tensor, Tensor)");
  // The same update into a caller's buffer `out` (no x0), which must not overlap x, eps or noise.
  m.def("diffusion_step_out(Tensor x, Tensor eps, Tensor coef, Tensor? noise, bool clip, Tensor(a!) out) -> ()");
  // Vessel-weighted noise loss, per sample. Returns (loss [B] float32, sum_w [B] float32).
  m.def("vessel_noise_loss_fwd(Tensor eps, Tensor eps_hat, Tensor? w) -> (Tensor, Tensor)");
  // Gradient w.r.t. eps_hat given grad_loss [B] and the sum_w saved by the forward.
  m.def("vessel_noise_loss_bwd(Tensor grad_loss, Tensor eps, Tensor eps_hat, Tensor? w, Tensor sum_w)"
        " -> Tensor");
  // Group norm of a channels_last x [B, C, H, W] with a per-sample affine scale, shift (float32 [B, C]) and
  // an optional SiLU (vesselfast/ops/group_norm.py). Returns (y like x, mean, rstd float32 [B, groups]).
  m.def("group_norm_act_fwd(Tensor x, Tensor scale, Tensor shift, int groups, float eps, bool silu)"
        " -> (Tensor, Tensor, Tensor)");
  // Gradients (dx, dscale, dshift) from grad (like x, channels_last) and the forward's mean and rstd.
  m.def("group_norm_act_bwd(Tensor grad, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, int groups,"
        " bool silu) -> (Tensor, Tensor, Tensor)");
}

namespace {
bool built_with_cuda() {
#ifdef VESSELFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vesselfast compiled ops (registered as torch.ops.vesselfast.*)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("openmp_threads", []() { return at::get_num_threads(); }, "threads the CPU kernels use");
  m.def("stream_store_bytes", []() { return vesselfast::cpu::last_level_cache_bytes(); },
        "the CPU kernels stream their float32 output past this many bytes moved per call (0: never)");
}
