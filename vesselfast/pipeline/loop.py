"""One training loop for every stage that trains (generators, segmenters): step budget, progress bar,
periodic in-stage checkpoints, exact resume, NaN/Inf guard, and the same on every rank of a
distributed run (one loss average and one NaN verdict per step, rank 0 writes the checkpoints)."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import torch
from tqdm import tqdm

from vesselfast.errors import UserError
from vesselfast import testhooks
from vesselfast.checkpoint import load_checkpoint
from vesselfast.pipeline import dist
from vesselfast.pipeline.rundir import LOG, RunDir


class NonFiniteLoss(UserError):
    pass


def _all_finite(obj) -> bool:
    """True when every floating tensor in a (nested) state dict is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


def run_training(step_fn: Callable[[int], torch.Tensor], steps: int, state: Dict[str, object], rng: torch.Generator,
                 desc: str, run: Optional[RunDir] = None, stage: Optional[str] = None, ckpt_every: int = 200,
                 log_every: int = 50) -> Dict[str, float]:
    """Calls ``step_fn(step)`` for step in [start, steps), where start comes from the stage's partial
    checkpoint when one exists. ``state``: name -> object with state_dict/load_state_dict (models, EMA,
    optimisers, schedulers); they, ``rng`` (one per rank) and torch's global generator (dropout) are what a
    checkpoint holds, so a resumed run continues bit for bit. Returns timing info."""
    start = 0
    partial = run.partial_path(stage) if run is not None else None
    last_saved: Optional[int] = None
    if partial is not None and dist.broadcast(partial.exists()):  # rank 0's view decides for every rank
        ck = load_checkpoint(partial, kind=f"{stage}.partial", fix="delete it to restart the stage from step 0")
        for name, obj in state.items():
            obj.load_state_dict(ck["state"][name])
        start = last_saved = int(ck["step"])
        _restore_rngs(ck, rng, desc)
        LOG.info(f"{desc}: resuming at step {start}/{steps}")

    def state_dicts():
        return {n: o.state_dict() for n, o in state.items()}

    def save(step):
        rngs = dist.gather([(rng.get_state(), torch.get_rng_state())])  # every rank's, for an exact resume
        run.save_partial(stage, {"kind": f"{stage}.partial", "step": step, "rng": rngs[0][0], "rng_ranks": rngs,
                                 "world": dist.world(), "state": state_dicts()})

    def stop(what: str, step: int):
        kept = (f"the last good in-stage checkpoint {partial} (step {last_saved}) is kept" if last_saved is not None
                else "no in-stage checkpoint was written yet")
        raise NonFiniteLoss(f"{desc}: {what} at step {step}; stopped, {kept}. Lower the learning rate "
                            "(--set generator.lr= / segmenter.lr=) or use precision fp32, in a new --out")

    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False, dynamic_ncols=True,
               disable=None if dist.is_main() else True)
    ema_loss = None
    try:
        for step in range(start, steps):
            testhooks.kill_point(f"{stage}:{step}")
            loss = dist.mean(float(step_fn(step)))
            if not math.isfinite(loss):
                stop(f"loss is {loss}", step + 1)
            ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}")
            if (step + 1) % log_every == 0 or step + 1 == steps:
                LOG.info(f"{desc}: step {step + 1}/{steps} loss {ema_loss:.4f}")
            if partial is not None and (step + 1) % ckpt_every == 0 and step + 1 < steps:
                # a finite loss can come with weights the step just made infinite: never save those
                if not _all_finite(state_dicts()):
                    stop("the weights became non-finite", step + 1)
                save(step + 1)
                last_saved = step + 1
        if start < steps and not _all_finite(state_dicts()):
            stop("the weights became non-finite", steps)
    finally:
        bar.close()
    return {"seconds": time.perf_counter() - t0, "steps": steps - start, "final_loss": ema_loss or float("nan")}


def _restore_rngs(ck: Dict, rng: torch.Generator, desc: str) -> None:
    ranks = ck.get("rng_ranks")
    if ranks is None:  # checkpoints from before distributed training: one generator
        rng.set_state(ck["rng"])
        return
    if len(ranks) != dist.world():
        LOG.warning(f"{desc}: checkpoint written by {len(ranks)} process(es), resumed by {dist.world()}: the "
                    "data order from here on differs from an uninterrupted run")
    if dist.rank() < len(ranks):
        rng.set_state(ranks[dist.rank()][0])
        torch.set_rng_state(ranks[dist.rank()][1])
