// Input checks shared by the CPU and CUDA glue: one message per failure, naming the argument.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <initializer_list>

namespace vesselfast {

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              "vesselfast: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type(),
              " (use backend='torch' for other dtypes)");
  TORCH_CHECK(t.is_contiguous(), "vesselfast: ", name,
              " must be contiguous (call .contiguous(); the public ops do this for you)");
  TORCH_CHECK(t.dim() >= 1 && t.size(0) >= 1, "vesselfast: ", name, " needs a leading batch dimension");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_float_input(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "vesselfast: ", name, " has shape ", t.sizes(), ", expected ",
              ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "vesselfast: ", name, " has dtype ",
              t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "vesselfast: ", name, " is on ", t.device(), ", expected ",
              ref.device());
}

inline void check_coef(const at::Tensor& coef, const at::Tensor& x, int64_t ncoef) {
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.is_contiguous() && coef.dim() == 2 &&
                  coef.size(0) == x.size(0) && coef.size(1) == ncoef && coef.device() == x.device(),
              "vesselfast: coef must be a contiguous float32 [B, ", ncoef, "] tensor on ", x.device());
}

// The generic step's inputs: x, eps and the optional noise alike, coef a float32 [B, ncoef] table.
// Returns the noise tensor, or nullptr when there is none.
inline const at::Tensor* check_step_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& coef,
                                           const c10::optional<at::Tensor>& noise, int64_t ncoef) {
  check_float_input(x, "x");
  check_like(eps, x, "eps");
  check_coef(coef, x, ncoef);
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) check_like(*noise, x, "noise");
  return has_noise ? &*noise : nullptr;
}

// `out` of an out= op: like `ref`, and sharing no memory with any input (the kernels read their inputs
// through restrict pointers while writing `out`).
inline void check_out(const at::Tensor& out, const at::Tensor& ref, std::initializer_list<const at::Tensor*> inputs) {
  check_like(out, ref, "out");
  for (const at::Tensor* in : inputs) {
    if (in == nullptr) continue;
    TORCH_CHECK(at::get_overlap_status(out, *in) == at::MemOverlapStatus::No,
                "vesselfast: out shares memory with an input; pass a separate buffer (e.g. torch.empty_like(x))");
  }
}

}  // namespace vesselfast
