"""Fused ops, one public function each, with a backend registry (see registry.py).

One module per compiled op holds its reference, fake kernels, autograd, backends and public functions:
``diffusion_step`` (``ddim_step``, ``ddim_inverse_step``, ``ddpm_step``), ``vessel_loss``
(``vessel_noise_loss``) and ``group_norm`` (``group_norm_act``). Importing this package loads the extension
(vesselfast._ext) and registers the ops with torch, so ``torch.compile`` can trace the public functions
from the first call.
Callers use these and never choose a backend; ``VESSELFAST_BACKEND`` or ``backend=`` overrides ``auto``.
"""
from vesselfast.ops.diffusion_step import (  # noqa: F401
    ddim_inverse_step, ddim_inverse_step_reference, ddim_step, ddim_step_reference, ddpm_step,
    ddpm_step_reference, pred_x0_reference)
from vesselfast.ops.group_norm import group_norm_act, group_norm_act_reference  # noqa: F401
from vesselfast.ops.registry import BACKENDS, OPS, BackendUnavailable, describe  # noqa: F401
from vesselfast.ops.vessel_loss import vessel_noise_loss, vessel_noise_loss_reference  # noqa: F401
