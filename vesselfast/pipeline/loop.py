"""One training loop for every stage that trains (generators, segmenters): step budget, progress bar,
periodic in-stage checkpoints, exact resume, NaN/Inf guard."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import torch
from tqdm import tqdm

from vesselfast.errors import UserError
from vesselfast.pipeline.rundir import LOG, RunDir, load_checkpoint, save_checkpoint


class NonFiniteLoss(UserError):
    pass


def run_training(step_fn: Callable[[int], torch.Tensor], steps: int, state: Dict[str, object], rng: torch.Generator,
                 desc: str, run: Optional[RunDir] = None, stage: Optional[str] = None, ckpt_every: int = 200,
                 log_every: int = 50) -> Dict[str, float]:
    """Calls ``step_fn(step)`` for step in [start, steps), where start comes from the stage's partial
    checkpoint when one exists. ``state``: name -> object with state_dict/load_state_dict (models, EMA,
    optimisers, schedulers); they and ``rng`` are what a checkpoint holds, so a resumed run continues
    bit for bit. Returns timing info."""
    start = 0
    partial = run.partial_path(stage) if run is not None else None
    if partial is not None and partial.exists():
        ck = load_checkpoint(partial, kind=f"{stage}.partial")
        for name, obj in state.items():
            obj.load_state_dict(ck["state"][name])
        rng.set_state(ck["rng"])
        start = int(ck["step"])
        LOG.info(f"{desc}: resuming at step {start}/{steps}")

    def save(step):
        save_checkpoint(partial, {"kind": f"{stage}.partial", "step": step, "rng": rng.get_state(),
                                  "state": {n: o.state_dict() for n, o in state.items()}})

    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    ema_loss = None
    for step in range(start, steps):
        loss = float(step_fn(step))
        if not math.isfinite(loss):
            bar.close()
            raise NonFiniteLoss(f"{desc}: loss is {loss} at step {step + 1}; stopped. The last good checkpoint "
                                f"({'step ' + str(step - step % ckpt_every) if partial else 'none'}) is kept; lower "
                                "the learning rate (--set ...lr=) or use precision fp32, then re-run to resume")
        ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            LOG.info(f"{desc}: step {step + 1}/{steps} loss {ema_loss:.4f}")
        if partial is not None and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            save(step + 1)
    bar.close()
    return {"seconds": time.perf_counter() - t0, "steps": steps - start, "final_loss": ema_loss or float("nan")}
