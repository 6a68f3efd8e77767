"""``ftsgd eval``: a fine-tuned model on named splits, with per-class numbers and confusion matrices."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from ftsgd.cli.train import EVAL_SKIP_HINT
from ftsgd.data.ignored import ignored_warnings
from ftsgd.data.loader import build_loader, resolve_num_workers
from ftsgd.data.scan import preflight_scan
from ftsgd.data.split import find_splits, is_one_folder
from ftsgd.errors import DataError, UsageError
from ftsgd.infer.evaluate import CONFUSION_MAX_CLASSES, evaluate
from ftsgd.infer.export import export_precision, inference_transform, load_exported_model
from ftsgd.recipe.schema import DataConfig
from ftsgd.report.plots import CONFUSION, check_plot_dir, write_confusion_plots
from ftsgd.run.rundir import RunDir
from ftsgd.utils import console
from ftsgd.utils.device import resolve_device


def eval_command(
    weights: Path,
    data: Path,
    *,
    splits: list[str],
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = -1,
    on_bad_image: str = "error",
    png_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """``ftsgd eval``: evaluate an export (or a run directory's) on image-folder splits.

    Classes are matched by folder **name** against the class list stored in the export, so a split
    whose folders are ordered differently, or that lacks some classes, is still scored correctly. The model
    computes in the precision its run trained and evaluated in (the export's ``amp``, see
    :func:`ftsgd.infer.export.export_precision`), so the selected epoch's numbers repeat exactly.

    Args:
        weights: ``model.safetensors`` written by ftsgd, or the run directory holding it.
        data: Dataset folder holding the splits.
        splits: Split names to evaluate; empty = every split except ``train``.
        batch_size: Evaluation batch size.
        device: ``auto``, ``cpu`` or ``cuda``.
        num_workers: DataLoader workers (-1 = automatic).
        on_bad_image: ``error``: an unreadable image in an evaluated split fails before the model
            runs, listing the files; ``skip``: they are left out (a warning says how many).
        png_dir: Write a confusion-matrix heatmap per split there (``confusion-SPLIT.png``).

    Returns:
        ``{split: {"accuracy", "top5"?, "loss", "n", "per_class", "confusion"}}``.
    """
    if on_bad_image not in ("error", "skip"):
        raise UsageError(f"--on-bad-image must be error or skip, got {on_bad_image!r}")
    if png_dir is not None:
        check_plot_dir(png_dir)  # before minutes of evaluation
    model, meta = load_exported_model(weights)
    class_names = list(meta["class_names"])
    recorded = _split_record_of(weights)
    found, wanted = _eval_splits(data.expanduser(), splits, class_names, on_bad_image, recorded)
    dev = resolve_device(device)
    model.to(dev)
    amp = export_precision(meta, dev)
    transform = inference_transform(meta)
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
        results[name] = evaluate(model, loader, device=dev, class_names=class_names, amp_dtype=amp)
    if png_dir is not None:
        write_confusion_plots(results, png_dir)
    return results


def _split_record_of(weights: Path) -> dict[str, Any] | None:
    """The split record of the run the weights come from (a run directory, or a file in one), if any."""
    folder = weights.expanduser()
    folder = folder if folder.is_dir() else folder.parent
    return RunDir(folder).read_split()


def _eval_splits(
    root: Path,
    splits: list[str],
    class_names: list[str],
    on_bad_image: str,
    recorded: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The splits to evaluate (named ones looked up directly, else every split but train), scanned.

    On one folder of class folders the splits are the run's recorded ones: exactly the files it held out.
    """
    named = [str(Path(s).expanduser()) if os.sep in s else s for s in splits if s not in ("train", "val")]
    config = DataConfig(root=str(root), eval_splits=named or (["val"] if splits else []))
    if is_one_folder(config, strict=False):
        if recorded is None:
            raise DataError(
                f"{root} is one folder of class folders (no train/): which of its images a run held out is "
                "recorded in the run directory's split.json; pass the run directory (or its model.safetensors)"
            )
        config = DataConfig(root=str(root), eval_splits=[n for n in named if os.sep in n])
    try:
        _, found = find_splits(config, class_names=class_names, recorded=recorded)
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
    for message in ignored_warnings({name: found[name] for name in wanted}, root):
        console.warn(message)
    checked, skipped = preflight_scan(
        {name: found[name] for name in wanted},
        on_bad_image=on_bad_image,
        root=root,
        train_split=None,
        skip_hint=EVAL_SKIP_HINT,
    )
    found.update(checked)
    if skipped:
        shown = ", ".join(str(b.path) for b in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        console.warn(f"skipped {len(skipped)} unreadable image(s): {shown}")
    return found, wanted


def print_eval_results(results: dict[str, dict[str, Any]]) -> None:
    """A table of each split's top-1/top-5/loss/macro-F1/balanced accuracy, the per-class tables, the confusion."""
    has_top5 = any("top5" in r for r in results.values())
    columns = [
        "split",
        "accuracy",
        *(["top-5"] if has_top5 else []),
        "macro-F1",
        "bal. acc.",
        "loss",
        "images",
    ]
    rows = []
    for name, r in results.items():
        top5 = [_pct(r.get("top5"))] if has_top5 else []
        rows.append(
            [
                name,
                _pct(r["accuracy"]),
                *top5,
                _pct(r.get("macro_f1")),
                _pct(r.get("balanced_accuracy")),
                f"{r['loss']:.4f}",
                r["n"],
            ]
        )
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
    for name in names:
        table = [
            [cls, _pct(pc.get("precision")), _pct(pc.get("recall")), _pct(pc.get("f1")), pc["n"]]
            for cls, pc in results[name]["per_class"].items()
        ]
        console.print_table(
            f"Per-class precision, recall, F1: {name}",
            ["class", "precision", "recall", "F1", "images"],
            table,
        )
    print_confusion(results)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


CSV_COLUMNS = (
    "split",
    "class",
    "support",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "macro_f1",
    "balanced_accuracy",
    "loss",
)
"""``ftsgd eval --csv``: one row per split (``class`` empty), then one per class of it."""


def eval_csv(results: dict[str, dict[str, Any]]) -> str:
    """``ftsgd eval --csv``: each split's row (class empty) and its classes' rows; fractions, not percents."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    blank = None
    for name, r in results.items():
        writer.writerow(
            [
                name,
                "",
                r["n"],
                r["accuracy"],
                blank,
                blank,
                blank,
                r.get("macro_f1"),
                r.get("balanced_accuracy"),
                r["loss"],
            ]
        )
    for name, r in results.items():
        for cls, pc in r["per_class"].items():
            writer.writerow(
                [
                    name,
                    cls,
                    pc["n"],
                    pc["accuracy"],
                    pc.get("precision"),
                    pc.get("recall"),
                    pc.get("f1"),
                    blank,
                    blank,
                    blank,
                ]
            )
    return buffer.getvalue()


CONFUSION_TABLE_LIMIT = 20
"""Classes up to which ``ftsgd eval`` prints the confusion matrix as a table."""


def print_confusion(results: dict[str, dict[str, Any]]) -> None:
    """Each split's confusion matrix as a table (rows: true class, columns: predicted class)."""
    for name, r in results.items():
        classes = list(r["per_class"])
        if "confusion" not in r:
            console.info(
                f"Confusion matrix ({name}): not counted for more than {CONFUSION_MAX_CLASSES} classes"
            )
            continue
        if len(classes) > CONFUSION_TABLE_LIMIT:
            console.info(
                f"Confusion matrix ({name}): {len(classes)} classes are too many for a table; it is "
                '"confusion" in --json, and --png DIR draws it'
            )
            continue
        rows = [[cls, *row] for cls, row in zip(classes, r["confusion"], strict=True)]
        console.print_table(
            f"Confusion matrix: {name} (rows: true class, columns: predicted class)",
            ["true \\ predicted", *classes],
            rows,
        )


def confusion_png_path(directory: Path, split: str) -> Path:
    """Where ``--png DIR`` puts a split's heatmap."""
    return directory / CONFUSION.format(split=split)
