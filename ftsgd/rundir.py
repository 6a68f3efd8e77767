"""The run directory: the files a fine-tuning run writes, and reading them back to resume.

Layout::

    recipe.toml        the resolved recipe (written first)
    checkpoint.pt      last resumable state (model, optimizer, scaler, RNG, counters, history)
    metrics.jsonl      one JSON object per finished epoch
    model.safetensors  best weights by ID-validation accuracy, with metadata, + config.json
    summary.json       best epoch, each split's metrics at it, frozen parameters, command, versions
    skipped.txt        images left out by data.on_bad_image = "skip" (only when there were any)

Every file is written atomically (:mod:`ftsgd.fileio`), so a kill at any moment leaves each one either
as it was or complete.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftsgd.data import SKIPPED_FILE, BadImage, skipped_lines
from ftsgd.errors import RecipeError, UsageError
from ftsgd.export import CONFIG_NAME, WEIGHTS_NAME
from ftsgd.fileio import atomic_torch_save, atomic_write_text, jsonable, remove_stale_temps
from ftsgd.recipe import Recipe, recipe_from_dict, recipe_to_toml
from ftsgd.validate import environment_problems

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "METRICS", "RECIPE_FILE", "SUMMARY", "RunDir"]

CHECKPOINT = "checkpoint.pt"
RECIPE_FILE = "recipe.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT_FORMAT = 1
_WRITTEN = (CHECKPOINT, WEIGHTS_NAME, METRICS, SUMMARY, SKIPPED_FILE, CONFIG_NAME)


@dataclass(frozen=True)
class RunDir:
    """One run directory and the files in it."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def skipped(self) -> Path:
        return self.path / SKIPPED_FILE

    def check_new(self) -> None:
        """Refuse an ``--out`` that is a file or a non-empty directory (a new run never mixes with old files)."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            hint = " (it holds a run: add --resume to continue it)" if self.recipe_file.exists() else ""
            raise UsageError(
                f"run directory {out} already exists and is not empty{hint}; choose another --out"
            )

    def start(self, recipe: Recipe) -> None:
        """Create the directory and write ``recipe.toml``, the first file of every run."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_file, recipe_to_toml(recipe))

    def read_recipe(self, data: Path) -> Recipe:
        """The run's own recipe, with ``data.root`` pointing at ``data`` (a dataset may move)."""
        if not self.recipe_file.is_file():
            raise UsageError(f"cannot resume: {self.path} is not an ftsgd run directory (no {RECIPE_FILE})")
        try:
            raw = tomllib.loads(self.recipe_file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot resume: {self.recipe_file} is corrupt ({exc})") from None
        raw.setdefault("data", {})["root"] = str(data.expanduser().resolve())
        model = raw.get("model")
        if (
            isinstance(model, dict)
            and model.get("weights")
            and not Path(model["weights"]).expanduser().exists()
        ):
            # The checkpoint holds every weight: a starting-weights file moved or deleted since doesn't matter.
            model["weights"] = ""
        try:
            return recipe_from_dict(raw, environment_problems)
        except RecipeError as exc:
            raise RecipeError(exc.problems, source=str(self.recipe_file)) from None

    def read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint to resume from, memory-mapped (weights are copied into the model page by page)."""
        path = self.checkpoint
        if not path.is_file():
            raise UsageError(
                f"cannot resume: {path} does not exist (the run wrote no checkpoint yet); start it again "
                f"without --resume into a new --out"
            )
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise UsageError(f"cannot resume: {path} is corrupt or not an ftsgd checkpoint ({exc})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"cannot resume: {path} is not an ftsgd checkpoint (format {CHECKPOINT_FORMAT})")
        return ckpt

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` (``payload`` plus the format number) atomically."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, **payload}, self.checkpoint)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """``metrics.jsonl``: one line per finished epoch, exactly the checkpoint's history."""
        text = "".join(json.dumps(jsonable(r)) + "\n" for r in history)
        atomic_write_text(self.path / METRICS, text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(jsonable(summary), indent=2) + "\n")

    def write_skipped(self, skipped: list[BadImage]) -> None:
        """List the images ``data.on_bad_image = "skip"`` left out; no file when none were (a fixed dataset)."""
        if skipped:
            atomic_write_text(self.skipped, skipped_lines(skipped))
        elif self.skipped.exists():
            self.skipped.unlink()

    def remove_stale_temps(self) -> None:
        """Delete temporaries of writes a kill -9 interrupted (a checkpoint-sized file each)."""
        remove_stale_temps(self.path, _WRITTEN)

    def resume_command(self, data: str) -> str:
        """The command line that continues this run."""
        return shlex.join(["ftsgd", "train", "--data", data, "--out", str(self.path), "--resume"])
