"""The processes of a ``torchrun`` job: who this one is, its device, and collectives that cannot hang forever.

``torchrun`` (also ``srun torchrun`` under Slurm) starts one process per GPU and gives each ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. A plain
``ftsgd train`` has none of them (or ``WORLD_SIZE=1``): :func:`init` then returns a one-process
:class:`World` without creating a process group, and every helper here is a no-op, so a single-process
run is exactly what it was before multi-process training existed.

Every collective runs under the process group's timeout (``FTSGD_DIST_TIMEOUT`` seconds, default 1800): a
peer that stops answering fails the job instead of hanging it. A peer that dies is noticed sooner, by
Gloo's closed connection or by ``torchrun``, which stops the other processes when one exits.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ftsgd.errors import FtsgdError, UsageError
from ftsgd.utils.device import resolve_device

__all__ = [
    "TIMEOUT_ENV",
    "World",
    "all_ranks",
    "all_reduce_sum",
    "barrier",
    "decided_by_rank0",
    "gather_objects",
    "init",
    "is_peer_failure",
    "launched_world_size",
    "local_tensor",
    "max_over_ranks",
    "multi_process",
    "seed_rank",
    "shutdown",
]

TIMEOUT_ENV = "FTSGD_DIST_TIMEOUT"
"""Environment variable: seconds a collective may wait for the other processes (default 1800)."""
_DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes:
        device: The device this process trains on (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        rank: Global rank, 0-based; rank 0 prints and writes the run directory.
        size: Number of processes in the job (1: a plain run, no process group).
        local_rank: Rank on this node, which picks the GPU.
        backend: ``"nccl"`` on CUDA, ``"gloo"`` on the CPU, ``""`` for a plain run.
    """

    device: torch.device
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process (a process group exists)."""
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when not launched by torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def _timeout() -> timedelta:
    seconds = _env_int(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)
    if seconds < 1:
        raise UsageError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


def _local_device(device_name: str, local_rank: int) -> torch.device:
    """One device per local rank: ``cuda:LOCAL_RANK``, or the CPU."""
    device = resolve_device(device_name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(
            f"LOCAL_RANK {local_rank} but only {count} GPU(s) are visible on this node: start at most {count} "
            "processes per node (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(device_name: str) -> World:
    """Join the job torchrun started (NCCL on CUDA, Gloo on the CPU), or describe a plain one-process run.

    Args:
        device_name: ``train.device`` (``auto``, ``cpu``, ``cuda``); it means the same on every rank.

    Returns:
        The :class:`World`. The process group is destroyed at interpreter exit.
    """
    size = launched_world_size()
    if size == 1:
        return World(device=resolve_device(device_name))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _local_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=_timeout(),
            device_id=device if device.type == "cuda" else None,
        )
        atexit.register(shutdown)
    return World(device=device, rank=rank, size=size, local_rank=local_rank, backend=backend)


def shutdown() -> None:
    """Destroy the process group (a no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def multi_process() -> bool:
    """Whether this process is one of several in a process group (collectives do something)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (unchanged in a one-process run)."""
    if multi_process():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process (so all of them take the same branch)."""
    if not multi_process():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of any process (e.g. the peak memory of the busiest GPU)."""
    if not multi_process():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a one-process run)."""
    if not multi_process():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and give every process its result (or its error), in a job.

    What only one process may do (take the run directory's lock, clear or read what it holds) is done
    once, and the others act on the same decision instead of racing rank 0 for the directory. An
    :class:`~ftsgd.errors.FtsgdError` on rank 0 is raised on every process with the same message and
    exit code, so the job ends at once rather than at a collective's timeout. In a one-process run,
    just ``decide()``.
    """
    if not multi_process():
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except FtsgdError as exc:
            box[0] = ("error", str(exc), exc.exit_code)
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise _RankZeroError(box[0][1], box[0][2])
    return box[0][1]


class _RankZeroError(FtsgdError):
    """Rank 0's error, as the other processes of its job raise it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def barrier() -> None:
    """Wait until every process got here (no-op in a one-process run)."""
    if multi_process():
        dist.barrier()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP ``DTensor``, else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def seed_rank(seed: int, rank: int) -> None:
    """Give rank ``rank > 0`` its own RNG stream (dropout, drop-path), a pure function of ``(seed, rank)``.

    Rank 0 keeps the stream of a one-process run; the other ranks must not draw the same dropout masks
    for different images.
    """
    digest = hashlib.blake2b(f"ftsgd-rank:{seed}:{rank}".encode(), digest_size=8).digest()
    s = int.from_bytes(digest, "little") & (2**63 - 1)
    torch.manual_seed(s)
    random.seed(s)


_PEER_FAILURE_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl",
    "gloo",
    "socket",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed: another process died, stopped answering, or timed out."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _PEER_FAILURE_SIGNS)
