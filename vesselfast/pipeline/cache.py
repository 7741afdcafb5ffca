"""The stage cache: a stage's identity, its config slice, and finish / resume / reuse.

A stage's *identity* is the SHA-256 of its name, the run seed (each stage's random stream derives from
both, see seeds.py), the *config slice* it declares and the identities of the stages it consumes. The
slice is not a list kept beside the code: it is the only config the stage's code receives
(:class:`ConfigSlice`, read-only), so the code cannot read a key its identity omits. Two runs whose stage
has the same identity compute the same result, so ``vesselfast train --reuse OTHER_RUN`` takes it from
there instead of recomputing it. Identities are recorded in stages.json.

What a stage receives besides its slice is plumbing that changes no result: the device, the run
directory, how often to checkpoint.

``STAGE_FORMAT`` is part of every identity: bump it when a change to the code alters what an existing
stage computes from the same config, so that no run reuses a result the current code would not produce.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from vesselfast import testhooks
from vesselfast.pipeline import dist
from vesselfast.pipeline.rundir import LOG, RunDir

STAGE_FORMAT = 3


class UndeclaredConfigKey(LookupError):
    """A stage read a config key its slice (and so its identity) does not declare: a bug in the stage."""


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        raise TypeError("a config slice hands out values, not sections")
    return value


def config_value(cfg: Mapping[str, Any], dotted: str) -> Any:
    """``cfg`` as a nested dict; ``"generator.lr"`` -> cfg["generator"]["lr"]."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"config slice names unknown config key {dotted!r}")
        node = node[part]
    return node


class ConfigSlice:
    """The declared keys of a config (dotted names) as a read-only object: ``view.generator.lr``.
    Reading an undeclared key raises :class:`UndeclaredConfigKey`; lists come back as tuples."""

    def __init__(self, cfg: Mapping[str, Any], keys: Iterable[str], _prefix: str = ""):
        keys = tuple(sorted(set(keys)))
        values = {k: _frozen(config_value(cfg, k)) for k in keys} if not _prefix else cfg
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_prefix", _prefix)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        dotted = self._prefix + name
        if dotted in self._values:
            return self._values[dotted]
        if any(k.startswith(dotted + ".") for k in self._values):
            return ConfigSlice(self._values, (), dotted + ".")
        raise UndeclaredConfigKey(f"config key {dotted!r} is not in this stage's slice (add it to the stage's "
                                  "declared keys, which makes it part of the stage's identity)")

    def __setattr__(self, name, value):
        raise AttributeError("a config slice is read-only")

    def values(self) -> Dict[str, Any]:
        """Every declared key -> value (the slice's part of the identity)."""
        return dict(self._values)


def stage_identity(name: str, seed: int, view: ConfigSlice, inputs: Mapping[str, str]) -> str:
    payload = {"format": STAGE_FORMAT, "stage": name, "seed": seed, "config": view.values(),
               "inputs": dict(sorted(inputs.items()))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Runs stages into a run directory: each stage's result is loaded when it finished before in this
    directory with the same identity, else adopted from a ``--reuse`` directory that finished a stage of
    that identity, else computed, saved atomically and marked done."""

    def __init__(self, cfg: Mapping[str, Any], run: RunDir, reuse: Sequence[RunDir] = ()):
        self.cfg, self.run, self.reuse = cfg, run, list(reuse)
        self.identities: Dict[str, str] = {}

    def choice(self, dotted: str) -> Any:
        """A config value that decides which keys a stage declares (its sampler, its calibration mode);
        the stage must then declare ``dotted`` itself, so the value is part of its identity."""
        return _frozen(config_value(self.cfg, dotted))

    def identify(self, name: str, keys: Iterable[str], inputs: Sequence[str] = ()) -> ConfigSlice:
        """The slice of ``keys`` for the stage ``name`` consuming the stages ``inputs``; records its identity."""
        view = ConfigSlice(self.cfg, keys)
        self.identities[name] = stage_identity(name, self.cfg["seed"], view,
                                               {n: self.identities[n] for n in inputs})
        return view

    def stage(self, name: str, keys: Iterable[str], inputs: Sequence[str],
              compute: Callable[[ConfigSlice], Dict]) -> Dict:
        """The result of stage ``name``: ``compute(slice)`` returns the tensors to keep plus an optional
        "_info" dict for stages.json (seconds are added here)."""
        view = self.identify(name, keys, inputs)
        identity = self.identities[name]
        if dist.broadcast(self.run.is_done(name, identity)):  # rank 0's view decides, for every rank
            return self._loaded(name)
        reused = dist.run_on_main(lambda: self._adopt(name, identity))
        dist.barrier()
        if reused:
            LOG.info(f"stage {name}: reused from {reused} (same identity {identity})")
            return self._loaded(name)
        testhooks.kill_point(f"{name}:start")
        LOG.info(f"stage {name}: start")
        t = time.perf_counter()
        result = compute(view)
        info = result.pop("_info", {})
        seconds = time.perf_counter() - t
        self.run.finish(name, result, {"seconds": round(seconds, 2), "identity": identity, **info})  # rank 0 only
        dist.barrier()  # the stage's files exist before any rank goes on
        LOG.info(f"stage {name}: done in {seconds:.1f} s")
        testhooks.record_state(name, result)
        return result

    def _loaded(self, name: str) -> Dict:
        result = self.run.load(name)
        testhooks.record_state(name, result)
        return result

    def _adopt(self, name: str, identity: str) -> Optional[str]:
        for other in self.reuse:
            other_stage = other.find(identity)
            if other_stage is not None:
                self.run.adopt(name, other, other_stage)
                return str(other.root)
        return None


def open_reuse(paths: Sequence[str], out: str) -> List[RunDir]:
    """Run directories to take finished stages from (read-only); each must hold a vesselfast run."""
    from vesselfast.errors import UserError

    dirs = []
    for p in paths:
        other = RunDir(p, writer=False)
        if not (other.root / "stages.json").is_file():
            raise UserError(f"--reuse {p}: no stages.json there; point it at a run directory made by vesselfast train")
        if other.root.resolve() == RunDir(out).root.resolve():
            raise UserError(f"--reuse {p}: is the run directory itself (--out); a re-run resumes it anyway")
        dirs.append(other)
    return dirs
