"""What a command may do with a run directory: start it, continue it, start it over, or only report it.

``ftsgd train --resume`` is always safe to run again (from cron, a Slurm requeue, ``ftsgd sweep``), so
what it does follows from what the directory holds (:meth:`~ftsgd.run.rundir.RunDir.status`), decided
by one process holding the directory's lock (:func:`locked_plan`):

==============  ============================================================================
status          what ``--resume`` does
==============  ============================================================================
``new``         starts the run with the recipe flags (without them there is nothing to start)
``unstarted``   starts over: nothing of value was written before the first checkpoint
``unfinished``  continues from ``checkpoint.pt`` with the run's own recipe, on the run's own data
                (:func:`check_same_data`)
``finished``    nothing: the command prints the results
==============  ============================================================================

Without ``--resume`` only a new (missing or empty) directory is accepted. Recipe flags given with
``--resume`` must resolve to the run's own recipe. Under torchrun every process joins the job first
(:func:`join_run_job`), and rank 0 alone locks the directory and decides for all of them.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ftsgd.data.fingerprint import compare_fingerprints, fingerprint
from ftsgd.data.split import find_splits
from ftsgd.errors import DataError, UsageError
from ftsgd.recipe.dump import recipe_differences
from ftsgd.recipe.grid import SWEEP_KEYS
from ftsgd.recipe.schema import DEFAULT_RECIPE, Recipe
from ftsgd.run.checks import check_job, load_checked_recipe
from ftsgd.run.rundir import RunDir, locked
from ftsgd.utils.console import warn
from ftsgd.utils.distributed import World, init, launched_world_size

__all__ = [
    "check_same_data",
    "join_job_with",
    "join_run_job",
    "locked_plan",
    "resolve_train_recipe",
]


def resolve_train_recipe(recipe: str | None, overrides: list[str], data: Path) -> Recipe:
    """The recipe a new run trains with: ``--recipe`` + ``--set``, ``data.root`` and weights as absolute paths.

    Absolute paths keep ``recipe.toml`` usable from any working directory (``--resume`` from cron).
    """
    root = f"data.root={json.dumps(str(data.expanduser().resolve()))}"
    resolved = load_checked_recipe(recipe or DEFAULT_RECIPE, [*overrides, root])
    if resolved.model.weights:
        weights = str(Path(resolved.model.weights).expanduser().resolve())
        resolved = replace(resolved, model=replace(resolved.model, weights=weights))
    return resolved


def join_run_job(run: RunDir, wanted: Recipe | None, data: Path) -> None:
    """Under torchrun, join the job before anything touches the run directory (a no-op otherwise).

    Joining waits for every process, so the directory is read by all of them before rank 0 changes it.
    """
    if launched_world_size() < 2:
        return
    own = run.read_recipe(data, for_resume=False) if wanted is None and run.recipe_file.is_file() else None
    join_job_with(wanted or own or Recipe())


def join_job_with(recipe: Recipe) -> World:
    """Join the torchrun job (if any) for ``recipe``, refusing first what a job cannot do with it."""
    check_job(recipe, launched_world_size())
    return init(recipe.train.device)


def locked_plan(
    held: contextlib.ExitStack, run: RunDir, wanted: Recipe | None, data: Path, resume: bool
) -> tuple[Recipe | None, bool]:
    """Lock the run directory (for as long as ``held`` lasts) and decide what to train: ``(recipe, resume)``.

    ``(None, False)``: the run is finished. Only one process of a job calls this (rank 0).
    """
    held.enter_context(locked(run.path))
    if resume:
        return _resume_plan(run, wanted, data)
    return _new_run(run, wanted), False


def _new_run(run: RunDir, wanted: Recipe | None) -> Recipe | None:
    run.check_new()
    return wanted


def _resume_plan(run: RunDir, wanted: Recipe | None, data: Path) -> tuple[Recipe | None, bool]:
    """What ``--resume`` does with ``run``: ``(recipe, resume)``, or ``(None, False)`` when it is finished.

    Raises:
        UsageError: the recipe flags differ from the run's recipe (the differing keys are listed), or a
            run that has to start needs them and none were given.
    """
    status = run.status()
    if status == "unstarted":  # nothing of value was written: start over, with the flags if given
        own = run.read_recipe(data) if wanted is None else None
        run.clear_unstarted()
        return wanted or own, False
    if status == "new":
        if wanted is None:
            raise UsageError(
                f"--resume: {run.path} holds no run yet and no recipe flags were given to start one "
                "(--model, --weights, --recipe, --set)"
            )
        return wanted, False
    if wanted is not None:
        _refuse_other_recipe(run, run.read_recipe(data, for_resume=False), wanted)
    if status == "finished":
        _check_finished_data(run, data)
        return None, False
    return run.read_recipe(data), True


def _check_finished_data(run: RunDir, data: Path) -> None:
    """A finished run is "nothing to do" only on the data it was trained on.

    A cron job that points ``--resume`` at a refreshed snapshot must hear that the run did not see it,
    exactly as an interrupted run would (a stat per file, nothing decoded).
    """
    recipe = run.read_recipe(data, for_resume=False)
    classes, splits = find_splits(recipe.data, recorded=run.read_split())
    check_same_data(run, fingerprint(classes, splits), str(data), allow_new_images=False, finished=True)


def _refuse_other_recipe(run: RunDir, own: Recipe, wanted: Recipe) -> None:
    """Recipe flags given with ``--resume`` must resolve to the run's recipe (data.root, sweep.grid aside)."""
    changed = recipe_differences(own, wanted, ignore=("data.root", *SWEEP_KEYS))
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise UsageError(
            f"--resume: the flags resolve to another recipe than the run {run.path} was started with:\n{lines}\n"
            "Run the same command as before, drop the recipe flags to continue with the run's own recipe, "
            "or start a new --out to change the recipe."
        )


def check_same_data(
    run: RunDir, found: dict[str, Any], root: str, *, allow_new_images: bool, finished: bool = False
) -> bool:
    """Refuse to resume ``run`` on data other than its own (before anything is decoded or built).

    Args:
        run: The run being resumed.
        found: The data found under ``root`` now (:func:`ftsgd.data.fingerprint.fingerprint`).
        root: ``data.root``, for the message.
        allow_new_images: ``--allow-new-images``: data that only gained images is accepted.
        finished: The run is finished: nothing would be trained, so the hint is a new ``--out``.

    Returns:
        Whether the run's record of its data must be written anew (it grew, or none was recorded).

    Raises:
        DataError: the data changed otherwise, listing the changes and how to continue.
    """
    recorded = run.read_dataset()
    if recorded is None:
        warn(f"{run.path} records no data fingerprint (made by an older ftsgd): the data is not checked")
        return True
    changes = compare_fingerprints(recorded, found)
    if not changes.any or (allow_new_images and changes.only_grew):
        if changes.any:
            warn(f"continuing {run.path} on a grown dataset: {'; '.join(changes.lines())}")
        return changes.any
    lines = "\n".join(f"  - {line}" for line in changes.lines())
    hint = (
        "start a new run with another --out to train on this data (the finished run keeps its results)"
        if finished
        else "pass --allow-new-images to continue on the grown dataset (the rest of the run then sees a "
        "different sample order than an uninterrupted run would)"
        if changes.only_grew
        else "point --data at the dataset the run started with, or start a new run with another --out"
    )
    raise DataError(
        f"cannot resume {run.path}: the data under {root} is not what the run "
        f"was trained on:\n{lines}\nTo continue, {hint}."
    )
