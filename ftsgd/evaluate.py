"""Accuracy, top-5, loss and per-class accuracy of a model on one split.

Per-class numbers are reported for every class of the model, including classes a split lacks
(``n = 0``, accuracy ``None``), so results from different splits line up class by class -- under
distribution shift the average often hides that a few classes collapse.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    class_names: list[str],
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on every batch of ``loader``.

    Counts are accumulated on ``device`` and read back once at the end, so evaluation does not
    synchronise with the GPU after every batch.

    Args:
        model: Classifier returning logits of shape ``(batch, len(class_names))``. It is put in eval
            mode for the call and returned to its previous mode afterwards, because the caller is
            usually in the middle of training.
        loader: Yields ``(images, labels)`` with labels indexing ``class_names``.
        device: Where the model lives; batches are moved there.
        class_names: The model's classes, in label order.
        amp_dtype: Autocast dtype (bf16/fp16) on CUDA; ignored on other devices. Loss and accuracy
            are computed from float32 logits either way.
        channels_last: Feed images in channels-last memory format (match the model's format).

    Returns:
        ``{"accuracy", "loss", "n", "per_class"}`` plus ``"top5"`` when there are more than five
        classes. ``accuracy``/``top5`` are fractions in [0, 1], ``loss`` the mean cross-entropy,
        ``per_class`` maps every class name to ``{"accuracy": float | None, "n": int}``.

    Raises:
        ValueError: An empty loader, or logits whose width does not match ``class_names``.
    """
    num_classes = len(class_names)
    if num_classes == 0:
        raise ValueError("class_names is empty")
    want_top5 = num_classes > 5
    was_training = model.training
    model.eval()

    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    top5_correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    use_amp = amp_dtype is not None and device.type == "cuda"
    non_blocking = device.type == "cuda"
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=non_blocking)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=non_blocking)
            autocast = (
                torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
            )
            with autocast:
                out = model(images)
            logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ValueError(
                    f"model returned logits of shape {tuple(logits.shape)}, expected (batch, {num_classes}) "
                    "for the given class_names"
                )
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            hit = logits.argmax(dim=1) == labels
            total += torch.bincount(labels, minlength=num_classes)
            correct += torch.bincount(labels[hit], minlength=num_classes)
            if want_top5:
                top5 = logits.topk(5, dim=1).indices
                top5_correct += (top5 == labels[:, None]).any(dim=1).sum()
    finally:
        model.train(was_training)

    total_l, correct_l = total.tolist(), correct.tolist()
    n = sum(total_l)
    if n == 0:
        raise ValueError("cannot evaluate on an empty loader")
    results: dict[str, Any] = {"accuracy": sum(correct_l) / n}
    if want_top5:
        results["top5"] = int(top5_correct.item()) / n
    results["loss"] = float(loss_sum.item()) / n
    results["n"] = n
    results["per_class"] = {
        name: {"accuracy": (c / t if t else None), "n": t}
        for name, c, t in zip(class_names, correct_l, total_l, strict=True)
    }
    return results


def run_eval(
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
    from ftsgd.console import warn
    from ftsgd.data import (
        build_loader,
        build_transform,
        discover_splits,
        ignored_warnings,
        preflight_scan,
        resolve_num_workers,
    )
    from ftsgd.errors import DataError
    from ftsgd.export import load_exported_model
    from ftsgd.recipe import DataConfig
    from ftsgd.train import resolve_device

    model, meta = load_exported_model(weights)
    class_names = list(meta["class_names"])
    root = data.expanduser()
    # Named splits are looked up directly (no auto-discovery of other folders); a path is keyed by its name.
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
        warn(message)
    checked, skipped = preflight_scan(
        {name: found[name] for name in wanted}, on_bad_image=on_bad_image, root=root, train_split=None
    )
    found.update(checked)
    if skipped:
        shown = ", ".join(str(b.path) for b in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warn(f"skipped {len(skipped)} unreadable image(s): {shown}")
    dev = resolve_device(device)
    model.to(dev)
    data_config = {
        k: meta[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    }
    transform = build_transform(data_config, "none", training=False)
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


def print_eval_results(results: dict[str, dict[str, Any]]) -> None:
    """A table of each split's top-1/top-5/loss, then a per-class table (table or plain lines)."""
    from ftsgd.console import print_table

    has_top5 = any("top5" in r for r in results.values())
    columns = ["split", "accuracy", *(["top-5"] if has_top5 else []), "loss", "images"]
    rows = []
    for name, r in results.items():
        top5 = [f"{100 * r['top5']:.2f}%" if "top5" in r else "-"] if has_top5 else []
        rows.append([name, f"{100 * r['accuracy']:.2f}%", *top5, f"{r['loss']:.4f}", r["n"]])
    print_table("Evaluation", columns, rows)
    names = list(results)
    classes = list(next(iter(results.values()))["per_class"]) if results else []
    per_class = []
    for cls in classes:
        row = [cls]
        for name in names:
            pc = results[name]["per_class"][cls]
            row.append("-" if pc["accuracy"] is None else f"{100 * pc['accuracy']:.1f}% ({pc['n']})")
        per_class.append(row)
    print_table("Per-class accuracy (images)", ["class", *names], per_class)
