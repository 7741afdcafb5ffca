"""torch.distributed for the pipeline, in one place: the rest of the code asks ``rank()``, ``world()``,
``shard()``, ``gather()``... and never calls ``torch.distributed`` itself.

Started by ``torchrun --nproc_per_node=N -m vesselfast train ...`` (torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); :func:`init_from_env` joins the process group: gloo on CPU,
NCCL on GPU (one GPU per process, ``cuda:LOCAL_RANK``). Without torchrun, or with one process, nothing is
initialised and every helper is the identity: a plain run takes exactly the code path it took before
scale-out existed (same numbers bit for bit).

Conventions (docs/DISTRIBUTED.md):
- training: DistributedDataParallel; the configured batch size is the *global* batch, split evenly
  over the processes; each rank draws its own crops from its own generator (:func:`rank_seed`).
- inversion, synthesis, pseudo-labelling, calibration and evaluation: each rank takes a contiguous
  share of the batches / images (:func:`shard`), the results are all-gathered in rank order
  (:func:`gather`), so every rank ends with the same tensors as one process would compute.
- only rank 0 writes (checkpoints, logs, pictures, metrics, report); the run directory must be on a
  file system every node sees; stages end with a barrier.
"""
from __future__ import annotations

import datetime
import os
import warnings
from typing import Any, Callable, List, Sequence, TypeVar

import torch
import torch.distributed as tdist

from vesselfast.errors import UserError

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes; True when this is a multi-process run.
    One process (no torchrun, or WORLD_SIZE=1) initialises nothing."""
    if is_distributed():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
        tdist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30),
                                 device_id=torch.device("cuda", local_rank()))
    else:
        tdist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return True


def shutdown() -> None:
    """Leave the process group together: a barrier first, so that no rank tears gloo down while another
    still has a collective in flight."""
    if is_distributed():
        tdist.barrier()
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device(configured: str) -> str:
    """The device this process computes on: ``cuda`` means this rank's GPU under torchrun."""
    if configured == "cuda" and is_distributed():
        return f"cuda:{local_rank()}"
    return configured


def rank_seed(seed: int) -> int:
    """Seed of this rank's training generator; rank 0 (and a single process) keeps ``seed``, every other
    rank gets a stream of its own derived from (seed, rank), so no two (stage, rank) pairs share one."""
    if rank() == 0:
        return seed
    import numpy as np

    state = np.random.SeedSequence([seed, rank()]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def per_rank_batch(global_batch: int, option: str) -> int:
    if global_batch % world():
        raise UserError(f"{option}={global_batch} is the global batch and must divide evenly over the "
                        f"{world()} processes; use a multiple of {world()}")
    return global_batch // world()


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def shard(items: Sequence[T]) -> List[T]:
    """This rank's contiguous share of ``items`` (rank order = item order, sizes differ by at most one)."""
    items = list(items)
    n, w, r = len(items), world(), rank()
    return items[r * n // w:(r + 1) * n // w]


def gather(part: List[T]) -> List[T]:
    """Every rank's ``part`` (a list of picklable objects), concatenated in rank order, on every rank.
    With :func:`shard` this restores the order of the original items."""
    if not is_distributed():
        return list(part)
    parts: List[Any] = [None] * world()
    tdist.all_gather_object(parts, list(part))
    return [x for p in parts for x in p]


def own_batches(n: int, batch_size: int) -> List[int]:
    """Start indices of this rank's share of the batches 0, b, 2b, ... < n."""
    return shard(range(0, n, batch_size))


def own_rows(n: int, batch_size: int) -> int:
    return sum(min(batch_size, n - i) for i in own_batches(n, batch_size))


def gather_tensor_batches(compute: Callable[[List[int]], torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """``compute(batch_starts)`` on this rank's share of the batches (:func:`own_batches`); the per-rank
    results (rows in batch order) concatenated in rank order: the same rows, same batches, as
    ``compute(all starts)`` in one process."""
    parts = gather([compute(own_batches(n, batch_size)).cpu()])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (so decisions such as "is this stage done" are taken once)."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result, or its UserError, reaches every rank."""
    if not is_distributed():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except UserError as exc:
            outcome = ("error", str(exc))
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise UserError(outcome[1] if is_main() else f"(rank {rank()}, from rank 0) {outcome[1]}")
    return outcome[1]


def mean(value: float) -> float:
    """Average of a float over the ranks (the logged loss, and one NaN verdict for all ranks)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t)
    return float(t.item()) / world()


def total(value: int) -> int:
    return int(sum(gather([value])))


def wrap(model: torch.nn.Module, device_name: str) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` for training (the model itself in one process).
    BatchNorm becomes SyncBatchNorm on GPUs; on CPU torch has no SyncBatchNorm, so there the statistics of
    a training batch are per rank (docs/DISTRIBUTED.md)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    # 1x1 convolutions: the gradient's strides differ from the weight's only in size-1 dimensions (the
    # same memory layout), which DDP reports as a possible slowdown; nothing to act on.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    if device_name.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[torch.device(device_name).index])
    return DistributedDataParallel(model)


def inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them before each
    forward, but the last training step updates each rank's copy from its own batch."""
    if is_distributed():
        for b in inner(model).buffers():
            tdist.broadcast(b.data, src=0)
