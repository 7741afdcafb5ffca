"""Loading of the compiled extension ``vesselfast._C``, once, with the reason when it is missing."""
import functools

import torch  # noqa: F401  (must be imported first: _C links against libtorch/libc10)


@functools.lru_cache(maxsize=None)
def load():
    """Returns (module or None, reason string when None)."""
    try:
        from vesselfast import _C
    except ImportError as exc:
        return None, (f"the compiled extension vesselfast._C is not importable ({exc}); "
                      "reinstall without VESSELFAST_NO_EXT, e.g. `pip install -e .`")
    from vesselfast.ops.library import register

    register()  # fake kernels and autograd of torch.ops.vesselfast.*
    return _C, ""


def cpu_built() -> bool:
    return load()[0] is not None


def cuda_built() -> bool:
    mod, _ = load()
    return bool(mod is not None and mod.built_with_cuda())
