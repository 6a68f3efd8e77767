"""Evaluation splits that share images with the training split.

``--set data.val=train`` (or a validation folder that links into the training folder) selects the best
epoch on images the model was trained on: the selection, the exported model and every reported number
are then measured on training data, and nothing looks wrong. Files are compared by their real path, so a
symlink or a hard-linked copy counts as the same image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ftsgd.data.folders import Split
from ftsgd.errors import DataError
from ftsgd.utils.console import warn

__all__ = ["check_split_overlap", "split_overlaps"]


def _identity(path: os.PathLike | str) -> tuple[int, int] | str:
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def split_overlaps(splits: Mapping[str, Split], train: str = "train") -> dict[str, int]:
    """How many files each evaluation split shares with the training split (only splits that share any)."""
    if train not in splits:
        return {}
    seen = {_identity(path) for path, _ in splits[train].samples}
    shared = {
        name: sum(_identity(path) in seen for path, _ in split.samples)
        for name, split in splits.items()
        if name != train
    }
    return {name: n for name, n in shared.items() if n}


def check_split_overlap(splits: Mapping[str, Split], *, allowed: bool) -> None:
    """Refuse evaluation splits that share files with the training split, or warn when ``allowed``.

    Raises:
        DataError: some split shares files with ``train`` and ``data.allow_split_overlap`` is false.
    """
    shared = split_overlaps(splits)
    if not shared:
        return
    listed = "; ".join(
        f"{name} shares {n} of its {len(splits[name])} file(s) with train" for name, n in shared.items()
    )
    if allowed:
        warn(
            f"{listed}: its numbers are measured partly on training images (data.allow_split_overlap = true)"
        )
        return
    raise DataError(
        f"{listed}: selecting or evaluating on training images measures nothing. Point data.val "
        "(and the other splits) at images the model does not train on, or set data.allow_split_overlap = true "
        "to train like this anyway."
    )
