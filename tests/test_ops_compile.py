"""The public fused functions under ``torch.compile(fullgraph=True)``, cold: a new interpreter compiles a
function calling each of ``ddim_step``, ``ddim_inverse_step``, ``ddpm_step`` and ``vessel_noise_loss``
(forward and backward) before anything has called them eagerly, as a user's training script would.
It must trace as one graph that a second call reuses, through the compiled ops ``torch.ops.vesselfast.*``
when the extension is built, and give the eager result (to 1e-6: the same kernels, the coefficient
tables computed in the graph) and the float64 reference to within float32 rounding (no worse than 4x the
plain float32 reference, as in tests/test_ops_backends.py). The second case hides the extension (as a
``VESSELFAST_NO_EXT=1`` build would): the functions fall back to the torch reference and must still trace.
One subprocess per case: the extension is loaded, and the ops registered, once per interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vesselfast import _ext

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
if sys.argv[1] == "hidden":
    sys.modules["vesselfast._C"] = None  # import fails: the build has no extension
import torch
from vesselfast import ops

graphs = []
backend = torch._dynamo.lookup_backend(sys.argv[2])

def recording(gm, example_inputs):
    # the backend named on the command line, noting the functions each graph calls
    graphs.append(sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"}))
    return backend(gm, example_inputs)

g = torch.Generator().manual_seed(0)
x, eps, z = (torch.randn(3, 2, 16, 16, generator=g) for _ in range(3))
x = 1.5 * x  # some x0 outside [-1, 1]: the clip matters
w = (torch.rand(x.shape, generator=g) < 0.3).float()
abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
t = torch.tensor([998, 400, 3])
ab_t, ab_prev, ab_next = abar[t], abar[t - 1], abar[t + 1]
ab_s, ab_s_prev = float(abar[500]), float(abar[450])  # scalar alpha_bars: the coefficient cache's path

def every_public(x, eps, z, w):
    # each public function once; the step functions with return_x0, the loss on x as the prediction
    return {"ddim_step": ops.ddim_step(x, eps, ab_s, ab_s_prev, eta=0.5, noise=z, return_x0=True),
            "ddim_inverse_step": ops.ddim_inverse_step(x, eps, ab_t, ab_next, return_x0=True),
            "ddpm_step": ops.ddpm_step(x, eps, ab_t, ab_prev, noise=z, return_x0=True),
            "vessel_noise_loss": (ops.vessel_noise_loss(eps, x, w),)}

def reference(x, eps, z, w):
    return {"ddim_step": ops.ddim_step_reference(x, eps, ab_s, ab_s_prev, 0.5, z),
            "ddim_inverse_step": ops.ddim_inverse_step_reference(x, eps, ab_t, ab_next),
            "ddpm_step": ops.ddpm_step_reference(x, eps, ab_t, ab_prev, z),
            "vessel_noise_loss": (ops.vessel_noise_loss_reference(eps, x, w).mean(),)}

def run(fn, dtype):
    # fn's outputs and the loss's gradient w.r.t. the prediction x, detached, in a dict
    xx = x.detach().to(dtype).requires_grad_()
    res = fn(xx, eps.to(dtype), z.to(dtype), w.to(dtype))
    res["vessel_noise_loss"][0].backward()
    res = {k: [t.detach() for t in v] for k, v in res.items()}
    res["vessel_noise_loss"].append(xx.grad)
    return res

# the process's first call of a public function is the compiled one; the second call reuses its graph
compiled = torch.compile(every_public, fullgraph=True, backend=recording)
got = run(compiled, torch.float32)
run(compiled, torch.float32)
eager, want, f32 = run(every_public, torch.float32), run(reference, torch.float64), run(reference, torch.float32)
diff = lambda a, b: float((a.double() - b.double()).abs().max())
out = {"extension": ops.OPS["ddim_step"].pick("cpu") == "cpu", "graphs": graphs, "errors": {
    # max |compiled - eager|, max |compiled - float64 reference| and what the latter may be
    name: [max(map(diff, got[name], eager[name])), max(map(diff, got[name], want[name])),
           max(4 * diff(a, b) + 1e-7 * float(b.abs().max()) for a, b in zip(f32[name], want[name]))]
    for name in got}}
print("RESULT" + json.dumps(out))
"""


def _run_cold(extension: str, backend: str) -> dict:
    env = dict(os.environ)
    env.pop("VESSELFAST_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", _SCRIPT, extension, backend], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("extension, backend", [
    pytest.param("built", "inductor",
                 marks=pytest.mark.skipif(not _ext.cpu_built(), reason="vesselfast._C not built")),
    # the torch fallback: what matters is that it traces (Dynamo and AOT autograd); inductor's code
    # generation for plain torch ops would only add ~20 s of C++ compilation on a cold cache
    ("hidden", "aot_eager")], ids=["built", "hidden"])
def test_public_functions_compile_cold(extension, backend):
    result = _run_cold(extension, backend)
    assert result["extension"] == (extension == "built")
    assert len(result["graphs"]) == 1, result["graphs"]  # one graph: no break, no recompilation
    fused = {op for op in result["graphs"][0] if op.startswith("vesselfast.")}
    assert fused == ({"vesselfast.diffusion_step", "vesselfast.vessel_noise_loss_fwd"}
                     if extension == "built" else set()), result["graphs"][0]
    assert set(result["errors"]) == {"ddim_step", "ddim_inverse_step", "ddpm_step", "vessel_noise_loss"}
    for name, (vs_eager, vs_ref, allowed) in result["errors"].items():
        assert vs_eager <= 1e-6, (name, vs_eager)
        assert vs_ref <= allowed, (name, vs_ref, allowed)
