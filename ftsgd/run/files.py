"""The names of the files in a run directory, in one place that imports nothing.

A run directory is recognised by its files and read by commands that never load torch (``ftsgd
report`` through :mod:`ftsgd.run.collect`), and written by :mod:`ftsgd.run.rundir`; both take the names
from here, so a file is never renamed in one and not the other. The exported model's two files
(``model.safetensors`` and ``config.json``) are the export format's own names, used outside run
directories too: they stay in :mod:`ftsgd.infer.export`, and :data:`ftsgd.run.rundir.RUN_FILES` lists
them with these.

Layout::

    recipe.toml        the resolved recipe (written first)
    checkpoint.pt      last resumable state (model, optimizer, scaler, RNG, counters, history)
    metrics.jsonl      one JSON object per finished epoch
    model.safetensors  best weights by train.select_by, with metadata, + config.json (ftsgd.infer.export)
    summary.json       best epoch, each split's metrics at it, frozen parameters, command, versions
    skipped.txt        images left out by data.on_bad_image = "skip" (only when there were any)
    dataset.json       the data's fingerprint: classes, and every file with its size and mtime
    split.json         the split ftsgd drew from one folder of class folders (ftsgd.data.split): the split
                       keys, and each split's files with size and mtime; never rewritten
    .ftsgd.lock        held (flock) by the one process writing the run; the OS releases it when that dies
    tracking.json      the MLflow/W&B run ids of this run (train.tracking), so a resumed run continues them
    events.out.tfevents.*  TensorBoard's event files (train.tracking has "tensorboard"), named by TensorBoard
"""

from __future__ import annotations

__all__ = [
    "BEFORE_FIRST_CHECKPOINT",
    "CHECKPOINT",
    "DATASET",
    "LOCK",
    "METRICS",
    "RECIPE_FILE",
    "RUN_MARKERS",
    "SKIPPED_FILE",
    "SPLIT",
    "SUMMARY",
    "TRACKING",
]

RECIPE_FILE = "recipe.toml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SKIPPED_FILE = "skipped.txt"
"""The images ``data.on_bad_image = "skip"`` left out, one ``path<TAB>split<TAB>reason`` line each."""
DATASET = "dataset.json"
SPLIT = "split.json"
"""The split drawn from one folder of class folders: the single truth on which images are val/test."""
LOCK = ".ftsgd.lock"
TRACKING = "tracking.json"
"""The run's ids in its experiment trackers (MLflow, W&B), so that a resumed run continues the same ones."""

RUN_MARKERS = (SUMMARY, RECIPE_FILE, METRICS, CHECKPOINT)
"""Any of these files makes a folder a run directory (a run killed early may hold only recipe.toml)."""
BEFORE_FIRST_CHECKPOINT = (RECIPE_FILE, DATASET, SPLIT, METRICS, SKIPPED_FILE, TRACKING)
"""What a run may have written before its first checkpoint: nothing of value, so it may start over."""
