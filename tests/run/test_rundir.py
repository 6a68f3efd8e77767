"""The run directory: refusing to overwrite, reading a run back, and what a resume finds broken."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ftsgd.data.scan import BadImage
from ftsgd.errors import RecipeError, UsageError
from ftsgd.recipe.load import load_recipe
from ftsgd.run.rundir import CHECKPOINT_FORMAT, RunDir, lock_holder, locked


def test_existing_run_dir_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists and is not empty; choose another --out"):
        RunDir(out).check_new()
    assert (out / "keep.txt").read_text() == "x"
    (out / "recipe.toml").write_text("")
    with pytest.raises(UsageError, match="it holds a run: add --resume to continue it"):
        RunDir(out).check_new()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        RunDir(tmp_path / "file").check_new()
    RunDir(tmp_path / "new").check_new()  # a missing or empty folder is fine
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").check_new()


def test_resume_of_corrupt_run_dir_is_a_usage_error(tmp_path: Path, image_folder: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    with pytest.raises(UsageError, match="not an ftsgd run directory"):
        run.read_recipe(image_folder)
    with pytest.raises(UsageError, match=r"checkpoint\.pt does not exist"):
        run.read_checkpoint()
    run.checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="corrupt"):
        run.read_checkpoint()
    torch.save({"format": CHECKPOINT_FORMAT + 1}, run.checkpoint)
    with pytest.raises(UsageError, match="is not an ftsgd checkpoint"):
        run.read_checkpoint()
    run.recipe_file.write_text("[model\n")
    with pytest.raises(UsageError, match=r"recipe\.toml is corrupt"):
        run.read_recipe(image_folder)
    run.recipe_file.write_text("[train]\nepochs = 0\n")
    with pytest.raises(RecipeError, match=r"train\.epochs: must be >= 1") as exc:
        run.read_recipe(image_folder)
    assert exc.value.source == str(run.recipe_file)


def test_the_run_recipe_round_trips_and_follows_a_moved_dataset(tmp_path: Path, image_folder: Path) -> None:
    recipe = load_recipe("sgd-freeze-embed", ['model.name="test_vit"', f'data.root="{tmp_path / "old"}"'])
    run = RunDir(tmp_path / "run")
    run.start(recipe)
    back = run.read_recipe(image_folder)
    assert back.data.root == str(image_folder.resolve())
    assert back.optim == recipe.optim and back.model == recipe.model


def test_a_moved_starting_weights_file_is_not_needed_to_resume(tmp_path: Path, image_folder: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    recipe = load_recipe(None, ['model.name="test_vit"', f'model.weights="{weights}"'])
    run = RunDir(tmp_path / "run")
    run.start(recipe)
    weights.unlink()
    assert run.read_recipe(image_folder).model.weights == ""


def test_skipped_file_written_and_removed(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    bad = [BadImage(tmp_path / "a.png", "train", "truncated", "image file is truncated")]
    run.write_skipped(bad)
    assert run.skipped.read_text() == f"{tmp_path / 'a.png'}\ttrain\ttruncated: image file is truncated\n"
    run.write_skipped([])
    assert not run.skipped.exists()


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    stale = [tmp_path / ".checkpoint.pt.abc.tmp", tmp_path / ".model.safetensors.x1.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    other = tmp_path / ".notes.txt.tmp"
    other.write_text("keep")
    run.remove_stale_temps()
    assert not any(p.exists() for p in stale) and other.exists()


def test_metrics_are_exactly_the_history(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_metrics([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": float("nan")}])
    assert (
        tmp_path / "metrics.jsonl"
    ).read_text() == '{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": null}\n'


def _signal_then_wait(started: Any, release: Any) -> None:
    started.set()
    release.wait(30)


def test_forked_children_do_not_keep_the_run_locked(tmp_path: Path) -> None:
    """A DataLoader worker (a fork) that outlives its trainer must not hold the run's lock."""
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    with locked(tmp_path / "run"):
        child = ctx.Process(target=_signal_then_wait, args=(started, release))
        child.start()
        assert started.wait(30)  # the child runs: whatever happens at fork has happened
        with pytest.raises(UsageError, match="is in use by PID"), locked(tmp_path / "run"):
            pass
    try:
        assert lock_holder(tmp_path / "run") is None  # the child is alive, and holds nothing
        with locked(tmp_path / "run"):
            assert f"PID {os.getpid()} " in (tmp_path / "run" / ".ftsgd.lock").read_text()
    finally:
        release.set()
        child.join(30)
