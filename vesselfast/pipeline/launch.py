"""``vesselfast train``'s plain function: every check that can refuse the run first, then the run
directory, the log's first lines and the method (run.py)."""
from __future__ import annotations

from typing import Dict, Sequence

from vesselfast.pipeline import dist
from vesselfast.pipeline.cache import StageCache, open_reuse
from vesselfast.pipeline.config import RunConfig, dump, settle_precision, to_dict
from vesselfast.pipeline.inputs import describe, domain_warnings, load_inputs
from vesselfast.pipeline.rundir import LOG, RunDir
from vesselfast.pipeline.run import run_method
from vesselfast.pipeline.stages import Context


def run_pipeline(cfg: RunConfig, out: str, reuse: Sequence[str] = ()) -> Dict:
    """Runs (or resumes) the method into ``out``; returns the target-test metrics per model key. Stages
    finished with the same identity in a ``reuse`` run directory are taken from there. Everything that
    can be refused (options, data, batch split) is checked before the run directory is touched, so bad
    input leaves nothing behind; a start that fails later, before any stage wrote a file, removes the run
    directory it created (the corrected command then starts afresh instead of meeting this config)."""
    dist.per_rank_batch(cfg.generator.batch_size, "generator.batch_size")
    dist.per_rank_batch(cfg.segmenter.batch_size, "segmenter.batch_size")
    reuse_dirs = open_reuse(reuse, out)
    inputs = load_inputs(cfg)
    run = RunDir(out, writer=dist.is_main())
    precision, precision_warning = settle_precision(cfg, dist.broadcast(run.saved_config()))
    resuming = dist.run_on_main(lambda: run.open(dump(cfg)))
    if not run.writer:
        run.mute_log()
    try:
        from vesselfast import allocator

        where = f", {dist.world()} processes ({'nccl' if cfg.device.startswith('cuda') else 'gloo'})" \
            if dist.is_distributed() else ""
        LOG.info(f"{'resuming' if resuming else 'starting'} run in {out} (preset {cfg.preset}, device {cfg.device}"
                 f"{where}, allocator {allocator.current()}, {precision})")
        if precision_warning:
            LOG.warning(precision_warning)
        LOG.info(describe(inputs, cfg))
        for line in domain_warnings(inputs, cfg):
            LOG.warning(line)
        if reuse_dirs:
            LOG.info(f"reusing finished stages of the same identity from {', '.join(str(r.root) for r in reuse_dirs)}")
        ctx = Context(StageCache(to_dict(cfg), run, reuse_dirs), run, cfg.seed, dist.device(cfg.device), cfg.ckpt_every)
        return run_method(cfg, ctx, inputs)
    except Exception:  # not Ctrl-C: "re-run the same command to resume" keeps meaning what it says
        run.close()
        run.discard_if_unused()
        raise
    finally:
        run.close()
