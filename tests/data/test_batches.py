"""The one batch planner behind every loader: batches, resume points, drop_last and a process's share."""

from __future__ import annotations

import pytest

from ftsgd.data.dataset import plan_batches

TEN = list(range(10))


@pytest.mark.parametrize(
    ("batch_size", "start_batch", "drop_last", "want"),
    [
        (4, 0, False, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
        (4, 0, True, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (4, 1, False, [[4, 5, 6, 7], [8, 9]]),  # a run resumed at step 1 of the epoch
        (4, 2, True, []),  # the dropped batch is not there to resume at
        (4, 5, False, []),  # past the end
        (5, 1, True, [[5, 6, 7, 8, 9]]),  # nothing to drop: 10 = 2 * 5
        (12, 0, False, [TEN]),
        (12, 0, True, []),
    ],
)
def test_whole_batches_are_consecutive_slices_of_the_order(
    batch_size: int, start_batch: int, drop_last: bool, want: list[list[int]]
) -> None:
    assert plan_batches(TEN, batch_size, start_batch=start_batch, drop_last=drop_last) == want


def test_batches_follow_the_order_given() -> None:
    assert plan_batches([3, 1, 4, 0, 2], 2) == [[3, 1], [4, 0], [2]]
    assert plan_batches([3, 1, 4, 0, 2], 2, start_batch=1, drop_last=True) == [[4, 0]]


@pytest.mark.parametrize(
    ("batch_size", "start_batch", "drop_last", "shard", "want"),
    [
        # two micro-batches of 2 per global batch of 4; the last batch (2 images) is one micro-batch,
        # which goes to rank 1 while rank 0 gets an empty part and still takes the step
        (4, 0, False, (2, 0, 2), [[0, 1], [4, 5], []]),
        (4, 0, False, (2, 1, 2), [[2, 3], [6, 7], [8, 9]]),
        # three micro-batches of 2 (the last of 1) per batch of 5, one to each of three processes
        (5, 0, False, (2, 0, 3), [[0, 1], [5, 6]]),
        (5, 0, False, (2, 1, 3), [[2, 3], [7, 8]]),
        (5, 0, False, (2, 2, 3), [[4], [9]]),
        # resumed at step 1 with drop_last: [4..7] in micro-batches [4, 5, 6] and [7]
        (4, 1, True, (3, 0, 3), [[]]),
        (4, 1, True, (3, 1, 3), [[4, 5, 6]]),
        (4, 1, True, (3, 2, 3), [[7]]),
        (4, 0, False, (4, 0, 1), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),  # one process: whole batches
    ],
)
def test_a_shard_is_one_process_part_of_each_global_batch(
    batch_size: int,
    start_batch: int,
    drop_last: bool,
    shard: tuple[int, int, int],
    want: list[list[int]],
) -> None:
    got = plan_batches(TEN, batch_size, start_batch=start_batch, drop_last=drop_last, shard=shard)
    assert got == want


def test_bad_batch_size_or_start_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        plan_batches(TEN, 0)
    with pytest.raises(ValueError, match="start_batch must be >= 0, got -1"):
        plan_batches(TEN, 4, start_batch=-1)
