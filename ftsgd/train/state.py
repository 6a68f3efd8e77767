"""What a run carries from step to step and across a resume, and the provenance it records.

A resumed run ends with exactly the weights of an uninterrupted one because everything it needs is
either a pure function of the recipe and the step counters (the data order, augmentations and learning
rate) or in ``checkpoint.pt``: the counters and history (:class:`RunState`), the model, optimizer,
scaler and EMA states, and every process's RNG states (:func:`checkpoint_payload`). The checkpoint has
the one-process format whatever the number of processes, so a run may resume on another number of them.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftsgd import __version__
from ftsgd.errors import UsageError
from ftsgd.model.weights import copy_off_file, load_checkpoint_state
from ftsgd.train.parallel import (
    full_model_state,
    full_optimizer_state,
    load_model_state,
    load_optimizer_state,
)
from ftsgd.train.precision import CHECKPOINT_KEY
from ftsgd.utils.device import get_rng_state, set_rng_state
from ftsgd.utils.distributed import gather_objects, seed_rank

__all__ = ["RunState", "checkpoint_payload", "restore_rng", "restore_weights", "versions"]


@dataclass
class RunState:
    """Counters and results a resumed run continues from (saved inside every checkpoint)."""

    epoch: int = 0
    """Current epoch (0-based); equals ``train.epochs`` once the run is complete."""
    step_in_epoch: int = 0
    """Optimizer steps already done in ``epoch``."""
    global_step: int = 0
    stage: int = 0
    """Index (0-based) of the recipe stage whose freeze and optimizer are in effect: the checkpoint's
    optimizer state belongs to it. The next stage is entered at the start of its first epoch."""
    best_epoch: int = 0
    """1-based epoch of the best ``train.select_by`` value so far (0: none yet). Its value, and whether
    ``train.patience`` stopped the run, follow from ``history``, so checkpoints need nothing more."""
    best_accuracy: float = -1.0
    """ID-validation accuracy at ``best_epoch``."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per finished epoch (what metrics.jsonl holds)."""
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0

    def next_epoch(self) -> None:
        """Move to the start of the next epoch, its running sums cleared."""
        self.train_seconds += self.epoch_seconds
        self.epoch += 1
        self.step_in_epoch = self.epoch_correct = self.epoch_seen = 0
        self.epoch_loss_sum = self.epoch_seconds = 0.0


def checkpoint_payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: RunState,
    ema: Any,
    *,
    sharded: bool,
    distributed: bool,
    amp: str,
) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds, in the one-process format whatever the number of processes.

    ``amp`` is the precision the run computes in (``none``/``bf16``/``fp16``), recorded so that ``--resume``
    continues in it whatever ``train.amp = "auto"`` means by then (:mod:`ftsgd.train.precision`).

    Every process of a job takes part (FSDP gathers the whole model and optimizer state on rank 0).
    Each process draws its own dropout masks, so ``rng_ranks`` keeps every process's RNG states:
    resumed with as many processes, each continues its own stream (bit-exact); ``rng`` is rank 0's.
    """
    payload = {
        "model": full_model_state(model, sharded),
        "optimizer": full_optimizer_state(model, optimizer, sharded),
        "scaler": scaler.state_dict(),
        "state": asdict(state),
        "rng": get_rng_state(),
        CHECKPOINT_KEY: amp,
    }
    if distributed:
        payload["rng_ranks"] = gather_objects(payload["rng"])
    if ema is not None:
        payload["ema"] = ema.module.state_dict()
    return payload


def restore_weights(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Any,
    path: Path,
    *,
    sharded: bool,
) -> None:
    """Load the model, optimizer and EMA states of ``ckpt`` (read from ``path``), popping each as it goes.

    The weights and momentum buffers are copied off the memory-mapped file, so no page of it stays
    mapped during training and a second copy of the weights never lives for the whole run.

    Raises:
        UsageError: the run has an EMA of the weights but the checkpoint none.
    """
    if sharded:
        load_model_state(model, ckpt.pop("model"))
        load_optimizer_state(model, optimizer, copy_off_file(ckpt.pop("optimizer"), path))
    else:
        load_checkpoint_state(model, ckpt.pop("model"), path)
        optimizer.load_state_dict(copy_off_file(ckpt.pop("optimizer"), path))
    if ema is not None:
        if "ema" not in ckpt:
            raise UsageError(f"cannot resume: {path} has no EMA weights; was train.ema_decay changed?")
        load_checkpoint_state(ema.module, ckpt.pop("ema"), path)


def restore_rng(ckpt: dict[str, Any], rank: int, seed: int) -> None:
    """This process's RNG states: its own when the checkpoint has them, else a fresh per-rank stream.

    A job resumed with more processes than wrote the checkpoint seeds the new ranks' streams from
    ``(seed, rank)``; their dropout masks then differ from the interrupted run's (nothing else does).
    """
    saved = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if rank < len(saved):
        set_rng_state(saved[rank])
    else:
        seed_rank(seed, rank)


def versions() -> dict[str, str]:
    """Versions of what produced a run (ftsgd, torch, timm, Python), for ``summary.json``."""
    import timm

    return {
        "ftsgd": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
