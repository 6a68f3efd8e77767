"""What each ``ftsgd`` command does and prints, behind the Typer layer in :mod:`ftsgd.cli`.

Each ``*_command`` function takes the parsed arguments, does the work through the library modules and
prints in the three output styles of :mod:`ftsgd.console` (rich on a terminal, plain lines otherwise,
one JSON object with ``--json``). Errors are raised as :class:`~ftsgd.errors.FtsgdError`; the CLI turns
them into a message and an exit code.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import re
import shutil
import sys
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from ftsgd import console
from ftsgd.compare import FULL, QUICK, print_comparison, run_comparison
from ftsgd.data import (
    IgnoredTally,
    build_loader,
    discover_splits,
    ignored_warnings,
    preflight_scan,
    resolve_num_workers,
)
from ftsgd.device import resolve_device
from ftsgd.diagnose import GradientDiagnostic, diagnostic_to_dict, print_diagnostic
from ftsgd.distributed import decided_by_rank0, launched_world_size
from ftsgd.errors import DataError, RunError, UsageError
from ftsgd.evaluate import CONFUSION_MAX_CLASSES, evaluate
from ftsgd.export import inference_transform, load_exported_model
from ftsgd.inspection import inspect_model, run_diagnostic
from ftsgd.memory import format_bytes
from ftsgd.onnx_export import export_onnx, require_onnx_packages
from ftsgd.plots import CONFUSION, check_plot_dir, write_confusion_plots
from ftsgd.predict import Prediction, Predictor, check_sources, csv_header, iter_items
from ftsgd.recipe import (
    DEFAULT_RECIPE,
    SWEEP_KEYS,
    DataConfig,
    Recipe,
    describe_keys,
    list_recipes,
    recipe_differences,
    recipe_to_dict,
    recipe_to_toml,
)
from ftsgd.rundir import RunDir, locked
from ftsgd.synthetic import make_image_folder
from ftsgd.trainer import Trainer, join_job_with
from ftsgd.validate import load_checked_recipe

__all__ = [
    "demo_command",
    "eval_command",
    "export_command",
    "inspect_command",
    "predict_command",
    "recipes_keys_command",
    "recipes_list_command",
    "recipes_show_command",
    "train_command",
]

EVAL_SKIP_HINT = "--on-bad-image skip (ftsgd eval then evaluates without them and says how many it left out)."


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
        _join_job(run, wanted, data)
        plan = functools.partial(_locked_plan, held, run, wanted, data, resume)
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


def _join_job(run: RunDir, wanted: Recipe | None, data: Path) -> None:
    """Under torchrun, join the job before anything touches the run directory (a no-op otherwise).

    Joining waits for every process, so the directory is read by all of them before rank 0 changes it.
    """
    if launched_world_size() < 2:
        return
    own = run.read_recipe(data, for_resume=False) if wanted is None and run.recipe_file.is_file() else None
    join_job_with(wanted or own or Recipe())


def _locked_plan(
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


def _finished(run: RunDir, quiet: bool) -> dict[str, Any]:
    """A finished run rerun with ``--resume``: its results, and nothing rewritten."""
    summary = run.read_summary()
    if not quiet:
        console.info(f"{run.path} is finished (best epoch {summary['best_epoch']}); nothing to do")
        print_train_results(summary)
    return summary


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


def print_train_results(summary: dict[str, Any]) -> None:
    """The best epoch's accuracy and loss on every evaluated split, and where the weights are."""
    rows = []
    for name, m in summary["best"].items():
        role = "ID" if name == summary["val_split"] else "eval"
        rows.append([name, role, f"{100 * m['accuracy']:.2f}%", f"{m['loss']:.4f}", m["n"]])
    by = summary.get("select_by", f"{summary['val_split']}.accuracy")
    stopped = f", stopped early after epoch {summary['stop_epoch']}" if summary.get("stopped_early") else ""
    console.print_table(
        f"Best epoch {summary['best_epoch']}/{summary['epochs']} (by {by}{stopped})",
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
    png_dir: Path | None = None,
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
    found, wanted = _eval_splits(data.expanduser(), splits, class_names, on_bad_image)
    dev = resolve_device(device)
    model.to(dev)
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
        results[name] = evaluate(model, loader, device=dev, class_names=class_names)
    if png_dir is not None:
        write_confusion_plots(results, png_dir)
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
    print_confusion(results)


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


# ------------------------------------------------------------------------------------------ predict

PREDICT_OUTPUTS = ("text", "jsonl", "csv")


def predict_command(
    weights: Path,
    paths: list[str],
    *,
    top_k: int = 5,
    output: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    on_bad_image: str = "error",
    workers: int = -1,
    stdin: IO[bytes] | None = None,
) -> int:
    """``ftsgd predict``: classify images and write one result per image to stdout as it is known.

    Args:
        weights: ``model.safetensors`` written by ftsgd, or the run directory holding it.
        paths: Image files, folders (walked recursively) and at most one ``-`` (paths from ``stdin``).
        top_k: Classes listed per image.
        output: ``text``, ``jsonl`` or ``csv``; None: text on a terminal, JSON Lines otherwise.
        batch_size: Images per forward pass (fewer when the input pauses).
        device: ``auto``, ``cpu`` or ``cuda``.
        on_bad_image: ``error``: an input that cannot be classified gets an error record and the
            command fails at the end; ``skip``: no record, only the count on stderr at the end.
        workers: Threads decoding images (-1 = automatic, 0 = in the main thread).
        stdin: Where ``-`` reads paths from (default: the process's standard input, as bytes).

    Returns:
        The number of inputs read.

    Raises:
        UsageError: Bad options, missing PATHs or folders without images, no such export (exit 2),
            before the model is loaded.
        RunError: Some inputs could not be classified with ``on_bad_image = "error"`` (exit 1), raised
            after every other input was classified.
    """
    if on_bad_image not in ("error", "skip"):
        raise UsageError(f"--on-bad-image must be error or skip, got {on_bad_image!r}")
    output = output or ("text" if console.stdout_is_tty() else "jsonl")
    if output not in PREDICT_OUTPUTS:
        raise UsageError(f"unknown output {output!r}; use {', '.join(PREDICT_OUTPUTS)}")
    check_sources(paths)
    predictor = Predictor(weights, device=device, top_k=top_k)
    ignored = IgnoredTally()
    items = iter_items(paths, stdin if stdin is not None else sys.stdin.buffer, ignored)
    stream = predictor.predict(items, batch_size=batch_size, workers=resolve_num_workers(workers))
    writer = PredictionWriter(output, predictor.top_k)
    tally = BadInputs()
    with closing(stream):
        for prediction in stream:
            tally.count(prediction)
            if prediction.error is None or on_bad_image == "error":
                writer.write(prediction)
    for message in ignored.messages(where="in the folders given"):
        console.warn(message)
    return tally.finish(on_bad_image)


class PredictionWriter:
    """Writes each result to stdout at once: JSON Lines, CSV (header first) or readable text lines."""

    def __init__(self, output: str, top_k: int) -> None:
        self.output, self.top_k = output, top_k
        self.csv = csv.writer(sys.stdout, lineterminator="\n") if output == "csv" else None
        if self.csv is not None:
            self.csv.writerow(csv_header(top_k))
            sys.stdout.flush()

    def write(self, p: Prediction) -> None:
        """One line per result, flushed, so a pipeline sees it before the next batch is done."""
        try:
            self._write(p)
        except UnicodeEncodeError:  # a file name that is not UTF-8, on a stdout that refuses its bytes
            self._write(replace(p, path=_displayable(p.path), error=p.error and _displayable(p.error)))
        sys.stdout.flush()

    def _write(self, p: Prediction) -> None:
        if self.csv is not None:
            self.csv.writerow(p.csv_row(self.top_k))
        elif self.output == "jsonl":
            line = json.dumps(p.record(), ensure_ascii=False)
            if _UNDECODED.search(line):  # a file name that is not UTF-8: keep the JSON valid UTF-8 with
                line = json.dumps(p.record())  # \udcXX escapes (os.fsencode(record["path"]) gives the bytes)
            sys.stdout.write(line + "\n")
        elif p.error is not None:
            sys.stdout.write(f"{p.path}  error: {p.error}\n")
        else:
            rest = ", ".join(
                f"{c} {100 * q:.1f}%" for c, q in zip(p.classes[1:], p.probabilities[1:], strict=True)
            )
            sys.stdout.write(
                f"{p.path}  {p.classes[0]} {100 * p.probabilities[0]:.1f}%{f'  ({rest})' if rest else ''}\n"
            )


_UNDECODED = re.compile("[\udc80-\udcff]")
"""How Python's file-system decoding keeps the bytes of a name that is not valid UTF-8 (surrogateescape)."""


def _displayable(text: str) -> str:
    """``text`` with the surrogate escapes of undecodable file-name bytes replaced by U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class BadInputs:
    """Counts inputs and failures (keeping only the first few paths: memory stays constant)."""

    SHOWN = 5

    def __init__(self) -> None:
        self.total = 0
        self.failed = 0
        self.first: list[str] = []

    def count(self, p: Prediction) -> None:
        self.total += 1
        if p.error is not None:
            self.failed += 1
            if len(self.first) < self.SHOWN:
                self.first.append(f"{p.path} ({p.error})")

    def finish(self, on_bad_image: str) -> int:
        """Report the failures on stderr (skip) or as the command's error (error); returns the total."""
        if self.total == 0:
            console.warn("no images to classify: stdin gave no paths")
        if not self.failed:
            return self.total
        more = f", ... and {self.failed - len(self.first)} more" if self.failed > len(self.first) else ""
        listed = "; ".join(self.first) + more
        if on_bad_image == "skip":
            console.warn(
                f"skipped {self.failed} of {self.total} input(s) that could not be classified: {listed}"
            )
            return self.total
        raise RunError(
            f"{self.failed} of {self.total} input(s) could not be classified (each has an error record in "
            f"the output; --on-bad-image skip leaves them out): {listed}"
        )


# ------------------------------------------------------------------------------------------ export


def export_command(weights: Path, *, onnx: Path, data: Path | None = None) -> dict[str, Any]:
    """``ftsgd export --onnx``: the export as an ONNX file, checked with onnxruntime against PyTorch."""
    require_onnx_packages()  # before anything is loaded
    if data is not None and not data.expanduser().is_dir():
        raise UsageError(f"--data {data} is not a folder")
    model, meta = load_exported_model(weights)
    return export_onnx(model, meta, onnx.expanduser(), data=data.expanduser() if data else None)


def print_export(r: dict[str, Any]) -> None:
    """What ``ftsgd export --onnx`` wrote and how it was checked."""
    console.print_kv(
        [
            ("onnx", f"{r['onnx']} ({format_bytes(r['bytes'])}, opset {r['opset']})"),
            (
                "input",
                f"{'x'.join(str(v) for v in r['input'])} (dynamic batch) -> logits for {r['classes']} classes",
            ),
            (
                "checked",
                f"{r['checked_on']} at batch sizes {', '.join(map(str, r['batch_sizes']))}: max |onnx - torch| = "
                f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']['atol']:g} + {r['tolerance']['rtol']:g} x |torch|)",
            ),
        ]
    )


# ------------------------------------------------------------------------------------------ inspect


def inspect_command(
    recipe: str,
    overrides: list[str],
    *,
    num_classes: int | None,
    batch_size: int | None,
    data: Path | None = None,
    batches: int | None = None,
    png: Path | None = None,
    nproc: int | None = None,
) -> tuple[dict[str, Any], GradientDiagnostic | None]:
    """``ftsgd inspect``: the embedding found, what the recipe freezes and the memory it saves.

    With ``data``, also the gradient diagnostic on its train split (its classifier sized by the data).
    """
    if data is None and (batches is not None or png is not None):
        raise UsageError("--batches and --png belong to the gradient diagnostic: add --data DIR")
    loaded = load_checked_recipe(recipe, overrides)
    diagnostic = None
    if data is not None:
        diagnostic = run_diagnostic(loaded, data, batches, png, num_classes)
        num_classes = diagnostic.num_classes
    report = inspect_model(loaded, num_classes, batch_size=batch_size, nproc=nproc)
    for message in report["warnings"]:
        console.warn(message)
    if diagnostic is not None:
        report["gradient_diagnostic"] = diagnostic_to_dict(diagnostic)
    return report, diagnostic


def print_inspect(r: dict[str, Any], diagnostic: GradientDiagnostic | None = None) -> None:
    """``ftsgd inspect``'s report as key-value lines and tables, then the diagnostic's bars."""
    console.print_kv(
        [
            ("model", r["model"]),
            ("recipe", f"{r['recipe']} (freeze.policy = {r['policy']}, optim.name = {r['optimizer']})"),
            ("embedding", ", ".join(r["embedding"]) or "-"),
            ("found by", r["embedding_method"]),
            *[("check", c) for c in r["embedding_checks"]],
            *([("head", r["head"])] if r.get("head") else []),
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
    if r.get("stages"):
        _print_stages(r["stages"])
    _print_learning_rates(r)
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
    if diagnostic is not None:
        print_diagnostic(diagnostic)


def _print_stages(stages: list[dict[str, Any]]) -> None:
    """What each [[stage]] trains; the tables above and below describe the last stage."""
    rows = [
        [
            f"{s['stage']} {s['name']}",
            s["epochs"],
            s["policy"],
            f"{s['frozen_tensors']} tensors, {s['frozen_params']:,}",
            f"{s['trainable_params']:,}",
            f"{s['optimizer']} {s['lr']:g}",
        ]
        for s in stages
    ]
    console.print_table(
        "Stages, in order (the other tables describe the last one)",
        ["stage", "epochs", "freeze.policy", "frozen", "trainable", "optimizer, lr"],
        rows,
    )


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


def _print_learning_rates(r: dict[str, Any]) -> None:
    """One line when every trained layer gets optim.lr, else the learning rate per layer group."""
    rows = r.get("learning_rates", [])
    if {s for row in rows for s in row["lr_scales"]} <= {1.0}:
        console.info("learning rate: optim.lr for every trainable layer")
        return
    table = [
        [row["name"], row["kind"], _span(row["lr_scales"]), _span(row["lrs"])]
        if row["lrs"]
        else [row["name"], row["kind"], "frozen", "-"]
        for row in rows
    ]
    console.print_table("Learning rate per layer group", ["group", "kind", "x optim.lr", "lr"], table)


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"


def _memory_rows(m: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["weights", format_bytes(m["weights"])],
        ["gradients", format_bytes(m["gradients"])],
        ["optimizer state", format_bytes(m["optimizer_state"])],
    ]
    if m.get("batch_size"):
        size = "x".join(str(v) for v in m["input_size"])
        rows.append([f"activations (batch {m['batch_size']}, {size})", format_bytes(m["activations"])])
    if m.get("ema"):
        rows.append(["EMA weights (train.ema_decay)", format_bytes(m["ema"])])
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


def demo_command(
    *,
    out: Path | None,
    epochs: int | None,
    force: bool,
    argv: list[str],
    compare: bool = False,
    quick: bool = False,
) -> dict[str, Any] | None:
    """Generate a small shifted dataset and fine-tune a tiny ViT on it with ``sgd-freeze-embed``.

    With ``compare``, :func:`ftsgd.compare.run_comparison` instead (``quick``: its tiny configuration).
    """
    if compare and epochs is not None:
        raise UsageError(
            "--epochs is for the plain demo; --compare has its own settings (--quick for a tiny one)"
        )
    if compare:
        return compare_command(out=out or Path("runs/demo-compare"), force=force, quick=quick)
    if quick:
        raise UsageError("--quick belongs to --compare: ftsgd demo --compare --quick")
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


def compare_command(*, out: Path, force: bool, quick: bool) -> dict[str, Any]:
    """``ftsgd demo --compare``: run the comparison and print it; returns ``comparison.json``'s data."""
    result = run_comparison(out, QUICK if quick else FULL, force=force)
    print_comparison(result)
    return result.to_dict()


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
