"""``ftsgd inspect``: what a recipe freezes and what that saves, printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftsgd.errors import UsageError
from ftsgd.inspect.diagnose import GradientDiagnostic, diagnostic_to_dict, print_diagnostic
from ftsgd.inspect.inspection import inspect_model, run_diagnostic
from ftsgd.inspect.memory import format_bytes
from ftsgd.run.checks import load_checked_recipe
from ftsgd.utils import console


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
        for line in diagnostic.data_splits:  # the layout, and a drawn split as ftsgd train would draw it
            console.info(f"data: {line}")
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
    compared = m.get("state_compared")
    if compared:  # LoRA: weights + gradients + optimizer state beside the two full fine-tunings
        rows.append(["state without activations: this recipe", format_bytes(compared["this_recipe"])])
        rows.append(["  sgd-freeze-embed (no adapters)", format_bytes(compared["sgd_freeze_embed"])])
        rows.append(["  adamw (no adapters)", format_bytes(compared["adamw"])])
    return rows
