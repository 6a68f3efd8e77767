"""``ftsgd train``: resolve the recipe, take the run directory, train, print the results."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from ftsgd.run.resume import join_run_job, locked_plan, resolve_train_recipe
from ftsgd.run.rundir import RunDir
from ftsgd.train.trainer import Trainer
from ftsgd.utils import console
from ftsgd.utils.distributed import decided_by_rank0

EVAL_SKIP_HINT = "--on-bad-image skip (ftsgd eval then evaluates without them and says how many it left out)."


def train_command(
    *,
    data: Path,
    out: Path,
    recipe: str | None,
    overrides: list[str],
    resume: bool,
    quiet: bool,
    argv: list[str],
    max_steps: int = 0,
    allow_new_images: bool = False,
) -> dict[str, Any] | None:
    """``ftsgd train``: resolve the recipe, lock the run directory, train, print the results.

    With ``--resume`` the same command line is always safe to run again: a missing run starts, a run
    that never reached its first checkpoint starts over, an unfinished run continues and a finished one
    only prints its results. Recipe flags given with ``--resume`` must resolve to the run's own recipe.

    Returns:
        The summary, or None when ``max_steps`` stopped the run early.
    """
    run = RunDir(out)
    wanted = resolve_train_recipe(recipe, overrides, data) if (recipe or overrides or not resume) else None
    with contextlib.ExitStack() as held:
        join_run_job(run, wanted, data)
        plan = functools.partial(locked_plan, held, run, wanted, data, resume)
        resolved, resume = decided_by_rank0(plan)  # under torchrun: rank 0 locks and decides for the job
        if resolved is None:
            return _finished(run, quiet)
        trainer = Trainer(
            resolved,
            out,
            resume=resume,
            quiet=quiet,
            argv=argv,
            max_steps=max_steps,
            allow_new_images=allow_new_images,
        )
        summary = trainer.fit()
    if quiet:
        return summary
    if summary is None:
        console.info(
            f"stopped after {trainer.state.global_step} steps (--max-steps {max_steps}); continue with:\n"
            f"  {trainer.resume_command()}"
        )
    else:
        print_train_results(summary)
    return summary


def print_train_results(summary: dict[str, Any]) -> None:
    """The best epoch's accuracy and loss on every evaluated split, and where the weights are."""
    rows = []
    for name, m in summary["best"].items():
        role = "ID" if name == summary["val_split"] else "eval" if "n" in m else "aggregate"
        f1 = "-" if m.get("macro_f1") is None else f"{100 * m['macro_f1']:.2f}%"
        rows.append([name, role, f"{100 * m['accuracy']:.2f}%", f1, f"{m['loss']:.4f}", m.get("n", "")])
    by = summary.get("select_by", f"{summary['val_split']}.accuracy")
    stopped = f", stopped early after epoch {summary['stop_epoch']}" if summary.get("stopped_early") else ""
    console.print_table(
        f"Best epoch {summary['best_epoch']}/{summary['epochs']} (by {by}{stopped})",
        ["split", "", "accuracy", "macro-F1", "loss", "images"],
        rows,
    )
    console.info(f"weights: {Path(summary['run_dir']) / summary['model_file']}")


def _finished(run: RunDir, quiet: bool) -> dict[str, Any]:
    """A finished run rerun with ``--resume``: its results, and nothing rewritten."""
    summary = run.read_summary()
    if not quiet:
        console.info(f"{run.path} is finished (best epoch {summary['best_epoch']}); nothing to do")
        print_train_results(summary)
    return summary
