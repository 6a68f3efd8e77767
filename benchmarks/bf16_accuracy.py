"""Accuracy of SGD freeze-embed with bf16 weights against float32, on ``ftsgd demo --compare``'s task.

The task and backbone are exactly the comparison's (:mod:`ftsgd.sweep.compare`, ``FULL``): the tiny
CLIP-style ViT pre-trained on the generated source task (cached, trained once), fine-tuned on the target
task (``val`` ID, ``ood`` in the shifted style) for 6 epochs at batch 32 over the comparison's SGD grid
(3e-3, 1e-2, 3e-2) and 3 seeds. Each variant is ``sgd-freeze-embed`` (momentum 0.9) with:

* ``fp32``: float32 weights (the reference);
* ``bf16-stochastic``: ``train.weight_dtype = "bf16"``, stochastic rounding (the default), the momentum
  buffer in bf16, stochastically rounded too (``ftsgd.model.rounding.MOMENTUM_DTYPE``);
* ``bf16-nearest``: bf16 weights and momentum, round-to-nearest (what pure bf16 training does);
* ``bf16-kahan``: bf16 weights, Kahan-compensated, float32 momentum;
* ``fp32-bf16-autocast``: float32 weights, forward and backward in bf16 autocast (what bf16 weights
  compute with): separates the compute's precision from the weights';
* ``bf16-stochastic-fp32mom``: stochastic rounding with the momentum buffer in float32 instead of bf16:
  the measurement behind ``ftsgd.model.rounding.MOMENTUM_DTYPE``.

Per variant the learning rate with the best mean ID-validation accuracy is selected (the paper's protocol,
as ``ftsgd demo --compare`` does) and ID/OOD accuracy at each run's best epoch is reported as mean ± std
over the seeds; the table also shows every variant at the float32-selected learning rate.

Usage::

    python benchmarks/bf16_accuracy.py --out /tmp/bf16-acc --json-out benchmarks/results/bf16-accuracy-cpu.json

Finished runs in ``--out`` are reused (rerunning is cheap). One intra-op thread, like the comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ftsgd.data.synthetic import make_target_folder
from ftsgd.model import rounding
from ftsgd.run.checks import load_checked_recipe
from ftsgd.run.rundir import RunDir
from ftsgd.sweep.compare import FULL, cache_root, pretrained_backbone
from ftsgd.train.trainer import Trainer

VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "bf16-stochastic": ['train.weight_dtype="bf16"'],
    "bf16-nearest": ['train.weight_dtype="bf16"', 'optim.update_rounding="nearest"'],
    "bf16-kahan": ['train.weight_dtype="bf16"', 'optim.update_rounding="kahan"'],
    "bf16-stochastic-fp32mom": ['train.weight_dtype="bf16"'],
    "fp32-bf16-autocast": ['train.amp="bf16"'],
}
LRS = FULL.lrs["sgd-freeze-embed"]


def run_one(out: Path, data: Path, weights: Path, variant: str, lr: float, seed: int) -> dict:
    """One fine-tuning run (reused when ``out`` holds a finished one); its summary."""
    run = RunDir(out)
    if run.status() == "finished":
        return run.read_summary()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sets = [
        *FULL.common(),
        f"model.weights={json.dumps(str(weights))}",
        f"data.root={json.dumps(str(data))}",
        f"train.epochs={FULL.finetune_epochs}",
        f"optim.lr={lr!r}",
        f"train.seed={seed}",
        *VARIANTS[variant],
    ]
    chosen = rounding.MOMENTUM_DTYPE["stochastic"]
    if variant.endswith("fp32mom"):
        rounding.MOMENTUM_DTYPE["stochastic"] = torch.float32
    try:
        summary = Trainer(load_checked_recipe("sgd-freeze-embed", sets), out, quiet=True).fit()
    finally:
        rounding.MOMENTUM_DTYPE["stochastic"] = chosen
    assert summary is not None
    return summary


def _stat(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=FULL.seeds)
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=LRS, help="the grid (default: the comparison's)"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    weights, _ = pretrained_backbone(cache_root(), FULL)
    data = args.out / "data"
    if not data.is_dir():
        make_target_folder(data, per_class=FULL.target_per_class, size=FULL.model_kwargs["img_size"])
    results: dict[str, dict] = {}
    for variant in args.variants:
        per_lr = {}
        for lr in args.lrs:
            runs = [
                run_one(args.out / variant / f"lr={lr!r},seed={s}", data, weights, variant, lr, s)
                for s in range(args.seeds)
            ]
            per_lr[repr(lr)] = {
                "val": _stat([r["best"]["val"]["accuracy"] for r in runs]),
                "ood": _stat([r["best"]["ood"]["accuracy"] for r in runs]),
            }
            print(f"{variant:<26} lr {lr:<6g} val {per_lr[repr(lr)]['val']['mean']:.4f} "
                  f"ood {per_lr[repr(lr)]['ood']['mean']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
        best = max(per_lr, key=lambda k: per_lr[k]["val"]["mean"])
        results[variant] = {"selected_lr": float(best), "per_lr": per_lr}
    payload = {
        "task": "ftsgd demo --compare (FULL)",
        "seeds": args.seeds,
        "lrs": args.lrs,
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    print(table(results))
    if args.json_out is not None:
        partial = args.json_out.with_name(args.json_out.name + ".partial")
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        partial.replace(args.json_out)
    return 0


def table(results: dict[str, dict]) -> str:
    ref = results.get("fp32")
    ref_lr = repr(ref["selected_lr"]) if ref else None
    lines = [
        "| variant | selected lr | ID val (mean ± std) | OOD (mean ± std) | Δ ID vs fp32 | Δ OOD vs fp32 "
        f"| ID / OOD at fp32's lr ({ref_lr}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        point = r["per_lr"][repr(r["selected_lr"])]
        val, ood = point["val"], point["ood"]
        d_val = d_ood = "-"
        if ref:
            rp = ref["per_lr"][ref_lr]
            d_val = f"{100 * (val['mean'] - rp['val']['mean']):+.2f}"
            d_ood = f"{100 * (ood['mean'] - rp['ood']['mean']):+.2f}"
        at = r["per_lr"].get(ref_lr) if ref_lr else None
        at_ref = f"{100 * at['val']['mean']:.1f} / {100 * at['ood']['mean']:.1f}" if at else "-"
        lines.append(
            f"| {name} | {r['selected_lr']:g} | {100 * val['mean']:.1f} ± {100 * val['std']:.1f} | "
            f"{100 * ood['mean']:.1f} ± {100 * ood['std']:.1f} | {d_val} | {d_ood} | {at_ref} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
