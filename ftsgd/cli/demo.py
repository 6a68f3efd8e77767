"""``ftsgd demo``: a generated dataset, a fine-tuning run and, with ``--compare``, the paper's comparison."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ftsgd.cli.compare import print_comparison
from ftsgd.cli.train import print_train_results
from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import UsageError
from ftsgd.recipe.schema import DEFAULT_RECIPE
from ftsgd.run.checks import load_checked_recipe
from ftsgd.sweep.compare import (
    DEMO_MARKER,
    FULL,
    QUICK,
    CompareConfig,
    check_compare_amp,
    not_written_by_demo,
    run_comparison,
    write_demo_marker,
)
from ftsgd.train.trainer import Trainer
from ftsgd.utils import console


def demo_command(
    *,
    out: Path | None,
    epochs: int | None,
    force: bool,
    argv: list[str],
    compare: bool = False,
    quick: bool = False,
    amp: str | None = None,
) -> dict[str, Any] | None:
    """Generate a small shifted dataset and fine-tune a tiny ViT on it with ``sgd-freeze-embed``.

    With ``compare``, :func:`ftsgd.sweep.compare.run_comparison` instead (``quick``: its tiny configuration;
    ``amp``: the fine-tuning runs' ``train.amp``, so fp32 and bf16 can be compared on one backbone).
    """
    if compare and epochs is not None:
        raise UsageError(
            "--epochs is for the plain demo; --compare has its own settings (--quick for a tiny one)"
        )
    if compare:
        config = replace(QUICK if quick else FULL, amp=check_compare_amp(amp or "auto"))
        return compare_command(out=out or Path("runs/demo-compare"), force=force, config=config, argv=argv)
    if quick or amp is not None:
        flag = "--quick" if quick else "--amp"
        raise UsageError(f"{flag} belongs to --compare: ftsgd demo --compare {flag} ...")
    out, epochs = out or Path("runs/demo"), epochs or 8
    _clear_demo_dir(out, force)
    data = make_image_folder(
        out / "data", classes=4, size=32, seed=0, per_class={"train": 48, "val": 16, "ood": 16}
    )
    recipe = load_checked_recipe(
        DEFAULT_RECIPE,
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            f"train.epochs={epochs}",
            "train.batch_size=16",
            "optim.lr=0.01",
            'data.augment="flip"',
            "data.num_workers=0",
            f"data.root={json.dumps(str(data.resolve()))}",
        ],
    )
    summary = Trainer(recipe, out / "run", argv=argv).fit()
    if summary is not None:
        print_train_results(summary)
    console.info("try next:")
    console.info(f"  ftsgd eval {out / 'run'} --data {data}")
    console.info(
        f"  ftsgd train --data {data} --out {out / 'run-adamw'} --recipe adamw --model test_vit "
        "--set 'model.kwargs={img_size=32}' --set optim.lr=1e-3"
    )
    return summary


def compare_command(*, out: Path, force: bool, config: CompareConfig, argv: list[str]) -> dict[str, Any]:
    """``ftsgd demo --compare``: run the comparison and print it; returns ``comparison.json``'s data."""
    result = run_comparison(out, config, force=force, argv=argv)
    print_comparison(result)
    return result.to_dict()


def _clear_demo_dir(out: Path, force: bool) -> None:
    """Make ``out`` empty for a new demo and mark it as the demo's.

    ``--force`` deletes a folder only when an earlier demo marked it (:data:`DEMO_MARKER`): folder names
    alone (``data``, ``run``) prove nothing, and a user's folder of those names must survive a typo'd --out.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
        if not (out / DEMO_MARKER).is_file():
            raise UsageError(not_written_by_demo(out))
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_demo_marker(out)
