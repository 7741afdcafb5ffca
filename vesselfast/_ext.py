"""The compiled extension ``vesselfast._C``, imported once, when this module is first imported.

Importing ``_C`` defines the ops ``torch.ops.vesselfast.*`` (schemas and device kernels, csrc/); each op
module of :mod:`vesselfast.ops` then registers their fake kernels and autograd at its own import. The
outcome is kept as plain module state (:data:`MODULE`, :data:`ERROR`), so that asking whether the
extension is there is a constant lookup, also for ``torch.compile``. A build without the extension
(``VESSELFAST_NO_EXT=1``, or a failed build) leaves :data:`MODULE` None and the ops on their torch backend.
"""
import torch  # noqa: F401  (must be imported first: _C links against libtorch/libc10)

try:
    from vesselfast import _C as MODULE
    ERROR = ""
except ImportError as exc:
    MODULE = None
    ERROR = (f"the compiled extension vesselfast._C is not importable ({exc}); "
             "reinstall without VESSELFAST_NO_EXT, e.g. `pip install -e .`")
CUDA_BUILT = bool(MODULE is not None and MODULE.built_with_cuda())


def load():
    """Returns (module or None, reason string when None)."""
    return MODULE, ERROR


def cpu_built() -> bool:
    return MODULE is not None


def cuda_built() -> bool:
    return CUDA_BUILT
