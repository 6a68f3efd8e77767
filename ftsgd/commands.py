"""What each ``ftsgd`` command does and prints, behind the Typer layer in :mod:`ftsgd.cli`.

Each ``*_command`` function takes the parsed arguments, does the work through the library modules and
prints in the three output styles of :mod:`ftsgd.console` (rich on a terminal, plain lines otherwise,
one JSON object with ``--json``). Errors are raised as :class:`~ftsgd.errors.FtsgdError`; the CLI turns
them into a message and an exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ftsgd import console
from ftsgd.data import build_loader, build_transform, discover_splits, preflight_scan, resolve_num_workers
from ftsgd.device import resolve_device
from ftsgd.errors import DataError, UsageError
from ftsgd.evaluate import evaluate
from ftsgd.export import load_exported_model
from ftsgd.inspection import inspect_model
from ftsgd.memory import format_bytes
from ftsgd.recipe import (
    DEFAULT_RECIPE,
    DataConfig,
    Recipe,
    describe_keys,
    list_recipes,
    recipe_to_dict,
    recipe_to_toml,
)
from ftsgd.rundir import RunDir
from ftsgd.synthetic import make_image_folder
from ftsgd.trainer import Trainer
from ftsgd.validate import load_checked_recipe

__all__ = [
    "demo_command",
    "eval_command",
    "inspect_command",
    "recipes_keys_command",
    "recipes_list_command",
    "recipes_show_command",
    "train_command",
]

_EXPORT_PREPROCESSING = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


# ------------------------------------------------------------------------------------------ train


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
) -> dict[str, Any] | None:
    """``ftsgd train``: resolve the recipe (or the run's own, with ``--resume``), train, print the results.

    Returns:
        The summary, or None when ``max_steps`` stopped the run early.
    """
    run = RunDir(out)
    if resume:
        if recipe is not None or overrides:
            raise UsageError(
                "--resume continues with the run's own recipe.toml; drop --recipe, --set, --model and "
                "--weights (start a new --out to change the recipe)"
            )
        resolved = run.read_recipe(data)
    else:
        run.check_new()
        resolved = resolve_train_recipe(recipe, overrides, data)
    trainer = Trainer(resolved, out, resume=resume, quiet=quiet, argv=argv, max_steps=max_steps)
    summary = trainer.fit()
    if summary is None:
        if not quiet:
            console.info(
                f"stopped after {trainer.state.global_step} steps (--max-steps {max_steps}); continue with:\n"
                f"  {trainer.resume_command()}"
            )
    elif not quiet:
        print_train_results(summary)
    return summary


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


def print_train_results(summary: dict[str, Any]) -> None:
    """The best epoch's accuracy and loss on every evaluated split, and where the weights are."""
    rows = []
    for name, m in summary["best"].items():
        role = "ID" if name == summary["val_split"] else "eval"
        rows.append([name, role, f"{100 * m['accuracy']:.2f}%", f"{m['loss']:.4f}", m["n"]])
    console.print_table(
        f"Best epoch {summary['best_epoch']}/{summary['epochs']} (by {summary['val_split']} accuracy)",
        ["split", "", "accuracy", "loss", "images"],
        rows,
    )
    console.info(f"weights: {Path(summary['run_dir']) / summary['model_file']}")


# ------------------------------------------------------------------------------------------ eval


def eval_command(
    weights: Path,
    data: Path,
    *,
    splits: list[str],
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = -1,
    on_bad_image: str = "error",
) -> dict[str, dict[str, Any]]:
    """``ftsgd eval``: evaluate an export (or a run directory's) on image-folder splits.

    Classes are matched by folder **name** against the class list stored in the export, so a split
    whose folders are ordered differently, or that lacks some classes, is still scored correctly.

    Args:
        weights: ``model.safetensors`` written by ftsgd, or the run directory holding it.
        data: Dataset folder holding the splits.
        splits: Split names to evaluate; empty = every split except ``train``.
        batch_size: Evaluation batch size.
        device: ``auto``, ``cpu`` or ``cuda``.
        num_workers: DataLoader workers (-1 = automatic).
        on_bad_image: ``error``: an unreadable image in an evaluated split fails before the model
            runs, listing the files; ``skip``: they are left out (a warning says how many).

    Returns:
        ``{split: {"accuracy", "top5"?, "loss", "n", "per_class"}}``.
    """
    if on_bad_image not in ("error", "skip"):
        raise UsageError(f"--on-bad-image must be error or skip, got {on_bad_image!r}")
    model, meta = load_exported_model(weights)
    class_names = list(meta["class_names"])
    found, wanted = _eval_splits(data.expanduser(), splits, class_names, on_bad_image)
    dev = resolve_device(device)
    model.to(dev)
    transform = build_transform({k: meta[k] for k in _EXPORT_PREPROCESSING}, "none", training=False)
    workers = resolve_num_workers(num_workers)
    results = {}
    for name in wanted:
        loader = build_loader(
            found[name],
            transform,
            batch_size=batch_size,
            training=False,
            seed=0,
            num_workers=workers,
            pin_memory=dev.type == "cuda",
        )
        results[name] = evaluate(model, loader, device=dev, class_names=class_names)
    return results


def _eval_splits(
    root: Path, splits: list[str], class_names: list[str], on_bad_image: str
) -> tuple[dict[str, Any], list[str]]:
    """The splits to evaluate (named ones looked up directly, else every split but train), scanned."""
    named = [str(Path(s).expanduser()) if os.sep in s else s for s in splits if s not in ("train", "val")]
    config = DataConfig(root=str(root), eval_splits=named or (["val"] if splits else []))
    try:
        _, found = discover_splits(config, class_names=class_names)
    except DataError as exc:
        if splits:
            raise
        raise DataError(f"{exc} (ftsgd eval: name the splits to evaluate with --split NAME)") from None
    wanted = [Path(s).name for s in splits] or [name for name in found if name != "train"]
    missing = [s for s in wanted if s not in found]
    if missing:
        raise DataError(
            f"split(s) {', '.join(missing)} not found under {root}; available: {', '.join(found) or 'none'}"
        )
    checked, skipped = preflight_scan(
        {name: found[name] for name in wanted}, on_bad_image=on_bad_image, root=root, train_split=None
    )
    found.update(checked)
    if skipped:
        shown = ", ".join(str(b.path) for b in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        console.warn(f"skipped {len(skipped)} unreadable image(s): {shown}")
    return found, wanted


def print_eval_results(results: dict[str, dict[str, Any]]) -> None:
    """A table of each split's top-1/top-5/loss, then a per-class table (table or plain lines)."""
    has_top5 = any("top5" in r for r in results.values())
    columns = ["split", "accuracy", *(["top-5"] if has_top5 else []), "loss", "images"]
    rows = []
    for name, r in results.items():
        top5 = [f"{100 * r['top5']:.2f}%" if "top5" in r else "-"] if has_top5 else []
        rows.append([name, f"{100 * r['accuracy']:.2f}%", *top5, f"{r['loss']:.4f}", r["n"]])
    console.print_table("Evaluation", columns, rows)
    names = list(results)
    classes = list(next(iter(results.values()))["per_class"]) if results else []
    per_class = []
    for cls in classes:
        row = [cls]
        for name in names:
            pc = results[name]["per_class"][cls]
            row.append("-" if pc["accuracy"] is None else f"{100 * pc['accuracy']:.1f}% ({pc['n']})")
        per_class.append(row)
    console.print_table("Per-class accuracy (images)", ["class", *names], per_class)


# ------------------------------------------------------------------------------------------ inspect


def inspect_command(
    recipe: str,
    overrides: list[str],
    *,
    num_classes: int | None,
    batch_size: int | None,
    nproc: int | None = None,
) -> dict[str, Any]:
    """``ftsgd inspect``: the embedding found, what the recipe freezes and the memory it saves."""
    return inspect_model(
        load_checked_recipe(recipe, overrides), num_classes, batch_size=batch_size, nproc=nproc
    )


def print_inspect(r: dict[str, Any]) -> None:
    """``ftsgd inspect``'s report as key-value lines and tables."""
    console.print_kv(
        [
            ("model", r["model"]),
            ("recipe", f"{r['recipe']} (freeze.policy = {r['policy']}, optim.name = {r['optimizer']})"),
            ("embedding", ", ".join(r["embedding"]) or "-"),
            ("found by", r["embedding_method"]),
            *[("check", c) for c in r["embedding_checks"]],
        ]
    )
    if r.get("weights"):
        w = r["weights"]
        console.info(
            f"weights: {w['path']}: {w['loaded']} tensors loaded, {len(w['missing'])} missing, "
            f"{len(w['unexpected'])} unexpected, {len(w['reinitialised'])} re-initialised (head)"
        )
    rows = [
        [b["name"], b["type"], f"{b['params']:,}", f"{b['frozen_params']:,}", b["status"]]
        for b in r["blocks"]
    ]
    console.print_table("Top-level blocks", ["block", "type", "params", "frozen", "status"], rows)
    console.print_kv(
        [
            ("total params", f"{r['total_params']:,}"),
            ("frozen params", f"{r['frozen_params']:,} ({100 * r['frozen_fraction']:.2f}%)"),
            ("trainable params", f"{r['trainable_params']:,}"),
        ]
    )
    console.print_table("Training-state memory estimate", ["", "bytes"], _memory_rows(r["memory"]))
    if "memory_per_process" in r:
        _print_job_memory(r["memory_per_process"])


def _print_job_memory(m: dict[str, Any]) -> None:
    """``inspect --nproc N``: memory per GPU with DDP and with FSDP, side by side."""
    kinds = [
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer state", "optimizer_state"),
        (f"activations (batch {m['micro_batch']} per GPU)", "activations"),
        ("gathered blocks (FSDP)", "gathered"),
        ("total per GPU", "total"),
    ]
    rows = [[label, format_bytes(m["ddp"][key]), format_bytes(m["fsdp"][key])] for label, key in kinds]
    console.print_table(
        f"Memory per GPU with {m['nproc']} processes (torchrun)", ["", "DDP", "FSDP (train.shard)"], rows
    )


def _memory_rows(m: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["weights", format_bytes(m["weights"])],
        ["gradients", format_bytes(m["gradients"])],
        ["optimizer state", format_bytes(m["optimizer_state"])],
    ]
    if m.get("batch_size"):
        size = "x".join(str(v) for v in m["input_size"])
        rows.append([f"activations (batch {m['batch_size']}, {size})", format_bytes(m["activations"])])
    rows.append(["total (this recipe)", format_bytes(m["total"])])
    rows.append(["total (adamw, nothing frozen)", format_bytes(m["adamw_total"])])
    rows.append(["ratio to adamw", f"{m['ratio']:.2f}x"])
    rows.append(["bytes per parameter", f"{m['bytes_per_param']:.1f}"])
    return rows


# ------------------------------------------------------------------------------------------ recipes


def recipes_list_command(as_json: bool) -> None:
    """``ftsgd recipes``: the built-in recipes and their descriptions."""
    rows = list_recipes()
    if as_json:
        console.print_json([{"name": n, "description": d} for n, d in rows])
    else:
        console.print_table("Built-in recipes", ["recipe", "description"], rows)


def recipes_show_command(name: str, overrides: list[str], as_json: bool) -> None:
    """``ftsgd recipes show``: a recipe fully resolved, as TOML (or JSON)."""
    recipe = load_checked_recipe(name, overrides)
    if as_json:
        console.print_json(recipe_to_dict(recipe))
    else:
        sys.stdout.write(recipe_to_toml(recipe))


def recipes_keys_command(as_json: bool) -> None:
    """``ftsgd recipes keys``: every recipe key with its type, default and meaning."""
    rows = describe_keys()
    if as_json:
        console.print_json(
            [dict(zip(("key", "type", "default", "description"), r, strict=True)) for r in rows]
        )
    else:
        console.print_table("Recipe keys", ["key", "type", "default", "description"], rows)


# ------------------------------------------------------------------------------------------ demo


def demo_command(*, out: Path, epochs: int, force: bool, argv: list[str]) -> dict[str, Any] | None:
    """Generate a small shifted dataset and fine-tune a tiny ViT on it with ``sgd-freeze-embed``."""
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


def _clear_demo_dir(out: Path, force: bool) -> None:
    """Make ``out`` empty for a new demo; ``--force`` deletes only what an earlier demo wrote."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not force:
        raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
    entries = {p.name for p in out.iterdir()}
    if not entries <= {"data", "run", "run-adamw"} or not (out / "data" / "train").is_dir():
        raise UsageError(
            f"{out} is not a demo directory (it holds {', '.join(sorted(entries)[:5])}); --force only "
            "replaces an earlier `ftsgd demo` output. Choose another --out"
        )
    shutil.rmtree(out)
