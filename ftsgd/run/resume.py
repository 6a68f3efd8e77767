"""Whether a run directory may be written and how: a new run, a resume, a finished run, a job's other ranks."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

from ftsgd.errors import RecipeError, UsageError
from ftsgd.recipe.dump import recipe_differences
from ftsgd.recipe.grid import SWEEP_KEYS
from ftsgd.recipe.schema import DEFAULT_RECIPE, Recipe, stage_recipes
from ftsgd.run.checks import load_checked_recipe
from ftsgd.run.rundir import RunDir, locked
from ftsgd.utils.distributed import World, init, launched_world_size


def join_run_job(run: RunDir, wanted: Recipe | None, data: Path) -> None:
    """Under torchrun, join the job before anything touches the run directory (a no-op otherwise).

    Joining waits for every process, so the directory is read by all of them before rank 0 changes it.
    """
    if launched_world_size() < 2:
        return
    own = run.read_recipe(data, for_resume=False) if wanted is None and run.recipe_file.is_file() else None
    join_job_with(wanted or own or Recipe())


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
        return None, False
    return run.read_recipe(data), True


def _refuse_other_recipe(run: RunDir, own: Recipe, wanted: Recipe) -> None:
    changed = recipe_differences(own, wanted, ignore=("data.root", *SWEEP_KEYS))
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise UsageError(
            f"--resume: the flags resolve to another recipe than the run {run.path} was started with:\n{lines}\n"
            "Run the same command as before, drop the recipe flags to continue with the run's own recipe, "
            "or start a new --out to change the recipe."
        )


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


def join_job_with(recipe: Recipe) -> World:
    """Join the torchrun job (if any) for ``recipe``, refusing first what a job cannot do with it."""
    if launched_world_size() > 1 and any(s.optim.step_in_backward for s in stage_recipes(recipe)):
        raise RecipeError(
            [
                "optim.step_in_backward: not under torchrun: DDP keeps every gradient in its "
                "communication buckets until they are all-reduced, so updating inside backward would save "
                "no memory; set optim.step_in_backward = false (train.shard = true divides the gradients "
                "and optimizer state by the number of processes instead)"
            ]
        )
    return init(recipe.train.device)
