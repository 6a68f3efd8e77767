"""Datasets, sample orders and batches: pure functions of ``(seed, epoch, index)``.

:class:`ImageDataset` seeds each sample's augmentation, :class:`EpochSampler` gives an epoch's order,
and :func:`plan_batches` cuts an order into the batches (or one process's part of them) that every
loader of :mod:`ftsgd.data.loader` yields, so a resumed epoch, a job of many processes and an
evaluation pass all see the batches one uninterrupted process would.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ftsgd.data.folders import Split
from ftsgd.data.images import load_image


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, epoch, index)``.

    A cryptographic hash rather than arithmetic mixing, so neighbouring samples and epochs get
    unrelated random streams.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ImageDataset(Dataset):
    """A :class:`Split` as a map-style dataset of ``(image tensor, label)`` pairs.

    When ``training``, the transform's randomness for sample ``i`` comes from Python's ``random``,
    numpy's and torch's CPU RNGs seeded by ``(seed, epoch, i)`` just before the transform runs, and
    the previous RNG states are restored afterwards. The augmentation is thereby independent of the
    worker process, of the number of workers and of where an epoch was resumed; restoring matters in
    the main process (``num_workers=0``), where the training loop's own RNG stream (dropout, ...)
    must not depend on how many images were loaded. Only the CPU generator is touched, never CUDA's.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable[[Any], Any] | None,
        *,
        training: bool = False,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.split = split
        self.samples = split.samples
        self.transform = transform
        self.training = training
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> tuple[Any, int]:
        """Sample ``index`` as epoch ``epoch`` augments it (the same whatever epoch the dataset is set to)."""
        path, label = self.samples[index]
        img = load_image(path)
        if self.transform is None:
            return img, label
        if not self.training:
            return self.transform(img), label
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed would reseed CUDA too
            return self.transform(img), label
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


class EpochSampler(Sampler[int]):
    """Sample order for one epoch: a ``(seed, epoch)`` permutation, or sequential for evaluation.

    ``start`` skips the first items of the epoch's order, so a run resumed at batch ``k`` passes
    ``start = k * batch_size`` and continues exactly where the interrupted run was.
    """

    def __init__(
        self, num_samples: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, start: int = 0
    ) -> None:
        if num_samples < 0 or start < 0:
            raise ValueError(f"num_samples and start must be >= 0, got {num_samples} and {start}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.start = start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Move to ``epoch``, skipping its first ``start`` items."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The full order of the current epoch, before skipping ``start`` items."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def balanced_order(labels: Sequence[int], *, seed: int, epoch: int) -> list[int]:
    """A class-balanced epoch order (``data.sampler = "balanced"``): a pure function of labels, seed and epoch.

    As many draws as there are images, shared equally among the classes (to within one) at random
    places in the epoch; each class's draws walk through its images in a fresh random order, starting a
    new one when they run out: a small class's
    images are repeated evenly, a large class's are subsampled without repetition. Like
    :meth:`EpochSampler.order`, every process of a job and a resumed run compute the same order, and
    :func:`plan_batches` cuts it as it cuts a shuffled one.

    Args:
        labels: Each training sample's class index.
        seed: The run's seed.
        epoch: The epoch (a new order each epoch).
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    classes = sorted(by_class)
    if not classes:
        return []
    g = torch.Generator().manual_seed(seed * 100003 + epoch + 7919)  # not the shuffle's permutation stream
    slots_of: list[list[int]] = [[] for _ in classes]
    # classes drawn equally often (to within one), at random places in the epoch
    for j, slot in enumerate(torch.randperm(len(labels), generator=g).tolist()):
        slots_of[j % len(classes)].append(slot)
    order = [0] * len(labels)
    for cls, slots in zip(classes, slots_of, strict=True):
        members = by_class[cls]
        walk: list[int] = []
        while len(walk) < len(slots):
            walk += [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        for slot, index in zip(slots, walk, strict=False):
            order[slot] = index
    return order


@dataclass(frozen=True)
class BatchShard:
    """The part of one global batch that one process of a ``torchrun`` job trains on.

    The global batch (``train.batch_size`` images in the ``(seed, epoch)`` order, fewer at an epoch's
    end) is cut into micro-batches of ``chunk`` consecutive images, exactly as one process cuts it,
    and the micro-batches are dealt to the processes in contiguous, balanced groups. So every
    micro-batch is one that a one-process run with ``train.micro_batch_size = chunk`` computes too.

    Attributes:
        lo: First position (in the global batch) of this process's images.
        hi: One past its last position; ``lo == hi`` when this process gets no image of a small
            last batch (it still takes part in the step's collectives).
        first: Index of its first micro-batch among the global batch's micro-batches.
        count: Number of its micro-batches.
        total: Number of micro-batches of the whole global batch.
    """

    lo: int
    hi: int
    first: int
    count: int
    total: int


def batch_shard(n: int, chunk: int, rank: int, world: int) -> BatchShard:
    """Which images of a global batch of ``n`` go to process ``rank`` of ``world`` (see :class:`BatchShard`)."""
    if chunk < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need chunk >= 1 and 0 <= rank < world, got {chunk}, {rank}, {world}")
    total = -(-n // chunk)
    first, end = rank * total // world, (rank + 1) * total // world
    return BatchShard(min(first * chunk, n), min(end * chunk, n), first, end - first, total)


def plan_batches(
    order: Sequence[int],
    batch_size: int,
    *,
    start_batch: int = 0,
    drop_last: bool = False,
    shard: tuple[int, int, int] | None = None,
) -> list[list[int]]:
    """The batches of one pass over ``order``: every loader of training, evaluation and the diagnostic.

    Consecutive ``batch_size`` slices of ``order`` (the last one smaller, or left out with
    ``drop_last``), from batch ``start_batch`` on, so a resumed epoch gets exactly the batches the
    interrupted one had left. With ``shard = (chunk, rank, world)``, ``batch_size`` is the global
    batch and each slice is process ``rank``'s part of it (:func:`batch_shard`): every process walks
    the same global order, so the global batches, and each sample's ``(seed, epoch, index)``
    augmentation, are those of a one-process run whatever the number of processes, and every process
    yields one (possibly empty) list per global batch, so all of them run the same number of steps.

    Args:
        order: The pass's sample indices (:meth:`EpochSampler.order`).
        batch_size: Images per (global) batch.
        start_batch: Batches of the pass to skip.
        drop_last: Leave out a last batch smaller than ``batch_size``.
        shard: ``(chunk, rank, world)`` in a multi-process job; None yields whole batches.

    Raises:
        ValueError: ``batch_size < 1`` or ``start_batch < 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    end = len(order) - len(order) % batch_size if drop_last else len(order)
    batches = [list(order[i : i + batch_size]) for i in range(start_batch * batch_size, end, batch_size)]
    if shard is None:
        return batches
    parts = (batch_shard(len(batch), *shard) for batch in batches)
    return [batch[part.lo : part.hi] for batch, part in zip(batches, parts, strict=True)]
