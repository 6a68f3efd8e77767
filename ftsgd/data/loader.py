"""DataLoaders over the datasets: the batches of a training epoch or an evaluation pass, in one or many processes.

Every pass is planned by :func:`ftsgd.data.dataset.plan_batches` and loaded by a DataLoader from
:func:`_data_loader`, whether it is one of a training run's (:class:`RunLoader`, whose workers serve the
whole run) or a single pass (:func:`build_loader`: ``ftsgd eval``, the gradient diagnostic): so their
batches, per-sample augmentation and resume points are the same by construction.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ftsgd.data.dataset import EpochSampler, ImageDataset, balanced_order, plan_batches
from ftsgd.data.folders import Split
from ftsgd.errors import DataError


@dataclass(frozen=True)
class BlankFill:
    """Collate a process's part of a batch; an empty part becomes two blank images with no labels.

    A process without images in a small last batch still runs its forward and backward pass: DDP's
    gradient all-reduce and FSDP's parameter all-gathers need every process. The blank images carry
    no label, so the trainer gives them zero loss weight and evaluation counts nothing for them.
    Two rather than one, so that BatchNorm in training mode has more than one value per channel.
    """

    input_size: tuple[int, ...]

    def __call__(self, batch: list[tuple[Any, int]]) -> Any:
        if batch:
            return default_collate(batch)
        return torch.zeros((2, *self.input_size)), torch.zeros(0, dtype=torch.long)


SampleKey = tuple[int, int, int]
"""``(dataset, epoch, index)``: one sample of one of :class:`RunLoader`'s datasets, as one epoch loads it."""


class _KeyedDatasets(Dataset):
    """Several :class:`ImageDataset` behind one DataLoader: a key names the dataset, the epoch and the sample.

    The epoch travels with every key rather than being set on the dataset, because persistent worker
    processes hold their own copy of the dataset, which a later ``set_epoch`` in the trainer never reaches.
    """

    def __init__(self, datasets: list[ImageDataset]) -> None:
        self.datasets = datasets

    def __getitem__(self, key: SampleKey) -> tuple[Any, int]:  # type: ignore[override]
        dataset, epoch, index = key
        return self.datasets[dataset].item(index, epoch)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)


class _BatchPlan(Sampler[list[Any]]):
    """The batches of a DataLoader's next pass; :class:`RunLoader` replaces them before each pass."""

    def __init__(self, batches: list[list[Any]] | None = None) -> None:
        self.batches: list[list[Any]] = batches or []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _data_loader(
    dataset: Dataset,
    plan: _BatchPlan,
    *,
    generator_seed: int,
    input_size: tuple[int, ...],
    num_workers: int,
    pin_memory: bool,
    persistent: bool,
) -> DataLoader:
    """The DataLoader of every pass: ``plan``'s batches, collated by :class:`BlankFill`.

    ``generator_seed`` seeds the generator the workers' seeds come from (:func:`_worker_init`); a
    generator of its own also keeps the DataLoader from drawing from torch's global RNG.
    """
    return DataLoader(
        dataset,
        batch_sampler=plan,
        collate_fn=BlankFill(tuple(input_size)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(generator_seed),
    )


class RunLoader:
    """One DataLoader, with persistent workers, for every pass of a training run over its data.

    Training epochs and every evaluation split go through the same worker processes, started once,
    instead of a new DataLoader (and new workers) per epoch and per split. Each pass is planned in the
    main process by :func:`plan_batches`, as :func:`build_loader`'s are, and turned into lists of sample
    keys (:data:`SampleKey`): the batches, their order, the skipped batches of a resumed epoch and each
    process's share in a job are those of a new loader per pass, and per-sample augmentation is seeded
    by ``(seed, epoch, index)`` as before, so the images, and a resumed run's bits, are unchanged.

    Args:
        train: The training split and its transform (augmented per sample).
        evaluation: ``{name: split}`` of the splits evaluated after each epoch.
        eval_transform: Their transform (no augmentation).
        seed: The run's seed.
        num_workers: Worker processes (resolved), kept alive for the whole run; 0 loads in this process.
        pin_memory: Pin batches for faster host-to-GPU copies.
        input_size: ``(C, H, W)``, for the blank batches of :class:`BlankFill`.
        balanced: Class-balanced epoch orders (``data.sampler = "balanced"``, :func:`balanced_order`).
    """

    def __init__(
        self,
        train: tuple[Split, Callable[[Any], Any]],
        evaluation: dict[str, Split],
        eval_transform: Callable[[Any], Any],
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        input_size: tuple[int, ...] = (3, 224, 224),
        balanced: bool = False,
    ) -> None:
        self.balanced = balanced
        datasets = [ImageDataset(train[0], train[1], training=True, seed=seed)]
        datasets += [ImageDataset(split, eval_transform, seed=seed) for split in evaluation.values()]
        self.datasets = datasets
        self.eval_index = {name: i + 1 for i, name in enumerate(evaluation)}
        self.seed = seed
        self.plan = _BatchPlan()
        self.loader = _data_loader(
            _KeyedDatasets(datasets),
            self.plan,
            generator_seed=seed * 100003,
            input_size=input_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent=True,
        )

    def train_epoch(
        self,
        epoch: int,
        *,
        batch_size: int,
        start_batch: int = 0,
        drop_last: bool = False,
        shard: tuple[int, int, int] | None = None,
    ) -> DataLoader:
        """The loader, planned for ``epoch``'s training batches from ``start_batch`` on (see :func:`build_loader`)."""
        order = train_order(self.datasets[0].split, seed=self.seed, epoch=epoch, balanced=self.balanced)
        self._plan(0, epoch, order, batch_size, start_batch, drop_last, shard)
        return self.loader

    def evaluation(
        self, name: str, *, batch_size: int, shard: tuple[int, int, int] | None = None
    ) -> DataLoader:
        """The loader, planned for split ``name`` in file order, without augmentation."""
        dataset = self.eval_index[name]
        order = EpochSampler(len(self.datasets[dataset]), shuffle=False, seed=self.seed).order()
        self._plan(dataset, 0, order, batch_size, 0, False, shard)
        return self.loader

    def _plan(
        self,
        dataset: int,
        epoch: int,
        order: list[int],
        batch_size: int,
        start_batch: int,
        drop_last: bool,
        shard: tuple[int, int, int] | None,
    ) -> None:
        """Replace the plan's batches with this pass's, as keys of ``dataset`` at ``epoch``."""
        batches = plan_batches(order, batch_size, start_batch=start_batch, drop_last=drop_last, shard=shard)
        self.plan.batches = [[(dataset, epoch, i) for i in batch] for batch in batches]


def train_order(split: Split, *, seed: int, epoch: int, balanced: bool = False) -> list[int]:
    """A training epoch's sample order: the ``(seed, epoch)`` permutation, or class-balanced draws."""
    if balanced:
        return balanced_order([label for _, label in split.samples], seed=seed, epoch=epoch)
    return EpochSampler(len(split), seed=seed, epoch=epoch).order()


def _worker_init(worker_id: int) -> None:
    """Seed a worker's global RNGs from its torch seed (itself from the loader's seeded generator).

    Per-sample seeding in :class:`ImageDataset` already makes augmentation deterministic; this only
    keeps any other randomness in a worker reproducible instead of inherited from the parent.
    """
    s = torch.initial_seed()
    random.seed(s)
    np.random.seed(s % 2**32)


def resolve_num_workers(n: int) -> int:
    """Turn ``data.num_workers`` into a worker count.

    Args:
        n: ``-1`` for automatic, otherwise the count itself (0 = load in the main process).

    Returns:
        ``min(8, usable CPUs - 1)`` for ``-1`` (one CPU stays with the training loop), else ``n``.
        Usable CPUs respect the process's CPU affinity (containers, Slurm) where the OS reports it.
    """
    if n >= 0:
        return n
    if n != -1:
        raise ValueError(f"num_workers must be -1 (auto) or >= 0, got {n}")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def epoch_steps(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in one epoch: every batch, or (``data.drop_last``) only the full ones.

    Raises:
        DataError: ``drop_last`` with fewer images than one batch: an epoch would train on nothing.
    """
    if not drop_last:
        return math.ceil(num_samples / batch_size)
    if num_samples < batch_size:
        raise DataError(
            f"data.drop_last = true leaves no training batch: the training split has {num_samples} images, "
            f"fewer than train.batch_size = {batch_size}; set data.drop_last = false or a smaller batch size"
        )
    return num_samples // batch_size


def build_loader(
    split: Split,
    transform: Callable[[Any], Any] | None,
    *,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    shard: tuple[int, int, int] | None = None,
    input_size: tuple[int, ...] = (3, 224, 224),
    drop_last: bool = False,
    balanced: bool = False,
) -> DataLoader:
    """A deterministic DataLoader for one epoch of a split.

    Args:
        split: The split to load.
        transform: From :func:`build_transform`.
        batch_size: Images per batch; the last batch may be smaller unless ``drop_last``.
        training: Shuffle with the ``(seed, epoch)`` permutation and draw augmentations per sample;
            False loads in file order.
        seed: The run's seed.
        epoch: Epoch whose order and augmentations to use; another epoch takes a new loader (or a
            :class:`RunLoader`, whose workers serve every epoch).
        start_batch: Skip this many batches of the epoch (resume mid-epoch).
        num_workers: Worker processes (already resolved, see :func:`resolve_num_workers`).
        pin_memory: Pin batches for faster host-to-GPU copies.
        shard: ``(chunk, rank, world)`` in a multi-process job: ``batch_size`` is the global batch and
            this loader yields process ``rank``'s part of each one (:func:`plan_batches`,
            :class:`BlankFill`); None loads whole batches.
        input_size: ``(C, H, W)`` of the transformed images, for :class:`BlankFill`.
        drop_last: Leave out the epoch's last batch when it is smaller than ``batch_size``
            (``data.drop_last``); skipping ``start_batch`` whole batches keeps the same batches.
        balanced: With ``training``, class-balanced draws (``data.sampler = "balanced"``).

    Returns:
        The DataLoader; ``len(loader)`` counts only the batches left after ``start_batch``.
    """
    dataset = ImageDataset(split, transform, training=training, seed=seed, epoch=epoch)
    if training:
        order = train_order(split, seed=seed, epoch=epoch, balanced=balanced)
    else:
        order = EpochSampler(len(dataset), shuffle=False, seed=seed, epoch=epoch).order()
    plan = plan_batches(order, batch_size, start_batch=start_batch, drop_last=drop_last, shard=shard)
    return _data_loader(
        dataset,
        _BatchPlan(plan),
        generator_seed=seed * 100003 + epoch,
        input_size=input_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent=False,
    )
