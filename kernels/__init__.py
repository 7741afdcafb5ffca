"""Triton kernels of the fused ops, installed as ``vesselfast.kernels`` (a top-level ``kernels``
package would clash with an existing PyPI package).

- ``diffusion_step``: the generic DDIM / DDIM-inversion / DDPM update (same math as
  ``csrc/include/vesselfast/step_math.h``), entry ``diffusion_step(x, eps, coef, noise, clip, need_x0)``.
- ``vessel_loss``: the vessel-weighted noise loss, ``vessel_noise_loss_fwd(eps, eps_hat, w)`` and
  ``vessel_noise_loss_bwd(grad, eps, eps_hat, w, sum_w)``.

Callers go through ``vesselfast.ops`` (backend ``triton``), never here. The kernels run on CUDA tensors,
or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them;
``tests/test_kernels_compile.py`` also compiles them for sm_90 without a GPU. Importing this package
does not import triton: the submodules do.
"""
