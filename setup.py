"""Build of vesselfast and its compiled extension ``vesselfast._C``.

What gets compiled is decided here and printed:
- the C++ CPU kernels (OpenMP) always, unless ``VESSELFAST_NO_EXT=1``;
- the CUDA kernels too when torch is a CUDA build and a CUDA toolkit is found
  (``VESSELFAST_NO_CUDA=1`` skips them, ``VESSELFAST_FORCE_CUDA=1`` insists).
``kernels/`` (Triton) and ``export/`` install as ``vesselfast.kernels`` and ``vesselfast.export``.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "vesselfast", "vesselfast.ops", "vesselfast.diffusion", "vesselfast.models",
    "vesselfast.data", "vesselfast.pipeline", "vesselfast.kernels", "vesselfast.export", "vesselfast.shipped",
]
PACKAGE_DATA = {"vesselfast.shipped": ["*.onnx"]}  # the shipped segmenter (docs/MODELS.md)
PACKAGE_DIR = {"vesselfast.kernels": "kernels", "vesselfast.export": "export"}


def _say(msg):
    print(f"[vesselfast setup] {msg}", file=sys.stderr, flush=True)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("VESSELFAST_NO_EXT"):
        _say("VESSELFAST_NO_EXT set: building no extension (ops use the torch/triton backends)")
        return [], {}
    from torch.utils import cpp_extension as ce
    import torch

    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # setuptools wants relative paths
    sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
                  + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # torch >= 2.14's headers need C++20; older ones are built and tested with C++17.
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"
    cxx = ["-O3", "-fopenmp", std, "-ffp-contract=off"]
    # -march=native would make a wheel that crashes on older CPUs; opt in for a local build.
    if _flag("VESSELFAST_NATIVE"):
        cxx.append("-march=native")
    extra = {"cxx": cxx}
    define_macros = []

    cuda_reason = None
    if _flag("VESSELFAST_NO_CUDA"):
        cuda_reason = "VESSELFAST_NO_CUDA set"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is a CPU build"
    elif ce.CUDA_HOME is None:
        cuda_reason = "no CUDA toolkit found (set CUDA_HOME)"
    with_cuda = cuda_reason is None or _flag("VESSELFAST_FORCE_CUDA")

    if with_cuda:
        sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
                       + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
        extra["nvcc"] = ["-O3", std, "--use_fast_math", "-fmad=false"]
        define_macros.append(("VESSELFAST_WITH_CUDA", "1"))
        ext = ce.CUDAExtension("vesselfast._C", sources, include_dirs=include_dirs,
                               define_macros=define_macros, extra_compile_args=extra,
                               extra_link_args=["-fopenmp"])
        _say(f"building vesselfast._C: C++ CPU kernels + CUDA kernels (CUDA_HOME={ce.CUDA_HOME})")
    else:
        ext = ce.CppExtension("vesselfast._C", sources, include_dirs=include_dirs,
                              define_macros=define_macros, extra_compile_args=extra,
                              extra_link_args=["-fopenmp"])
        _say(f"building vesselfast._C: C++ CPU kernels only ({cuda_reason})")
    build_ext = ce.BuildExtension.with_options(use_ninja=ce.is_ninja_available())
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules, cmdclass=cmdclass)
