"""Peak memory of real ``ftsgd train`` runs, one per recipe, side by side.

For each recipe this runs a fresh ``python -m ftsgd train`` process for a few optimizer steps (one
epoch of a generated dataset, so the per-epoch evaluation, the export and the checkpoint are part of
the measurement) and reports:

* ``peak``: the whole process's maximum resident set size, from ``wait4``'s rusage -- exactly what
  ``/usr/bin/time -v`` reports as "Maximum resident set size": the largest single process of the
  tree (the trainer; DataLoader workers are forked copies and smaller);
* ``tree PSS``: the proportional set size of the trainer and all its children (DataLoader workers),
  sampled from ``/proc/*/smaps_rollup`` every ``--poll`` seconds: shared pages are split between
  the processes sharing them, so this is the honest machine-wide total including workers;
* ``B/param``: ``(peak - baseline) / parameters``, where the baseline is a process that imports the
  same modules and builds the same model, then exits: the memory training adds above the weights;
* ``vs adamw``: ``peak / peak(adamw)``;
* ``estimate``: ``ftsgd inspect``'s training-memory estimate (weights + gradients + optimizer state
  + measured activations) beside ``measured``, which is ``peak - baseline + weights``: the same
  quantity net of the interpreter and libraries;
* on CUDA also ``cuda max``: ``torch.cuda.max_memory_allocated`` as recorded in summary.json.

Usage::

    python benchmarks/memory.py --model vit_large_patch16_224 --batch-size 1 --steps 3
    python benchmarks/memory.py --model vit_base_patch16_224 --batch-size 1 8 --json > vitb.json

Runs one process at a time (peaks add up otherwise). Models are built with random weights
(``pretrained = false``); memory does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECIPES = ["adamw", "sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomomentum", "sgd-freeze-embed-lowmem"]
GIB = 2**30

BASELINE_CODE = r"""
import json, resource, sys
import torch
import ftsgd.cli.app, ftsgd.train.trainer  # the same imports as `ftsgd train`
from ftsgd.model.build import build_model
from ftsgd.recipe.schema import ModelConfig
name, kwargs, num_classes, device = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, _ = build_model(ModelConfig(name=name, kwargs=kwargs), num_classes=num_classes)
out = {
    "params": sum(p.numel() for p in model.parameters()),
    "weights": sum(p.numel() * p.element_size() for p in model.parameters())
    + sum(b.numel() * b.element_size() for b in model.buffers()),
}
if device == "cuda":
    model.to("cuda")
    torch.cuda.synchronize()
    out["cuda_allocated"] = torch.cuda.memory_allocated()
print(json.dumps(out))
"""


@dataclass
class Measured:
    """One child process: its exit status, peak RSS (largest process), sampled tree PSS, wall time."""

    returncode: int
    max_rss: int
    tree_pss: int
    wall_s: float
    stdout: str
    stderr: str


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_pss(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _pss(p)
        stack.extend(_children(p))
    return total


def run_measured(cmd: list[str], *, poll: float, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd``; return its peak RSS (wait4 rusage, like /usr/bin/time -v) and sampled tree PSS."""
    start = time.perf_counter()
    with (
        tempfile.TemporaryFile(mode="w+") as out,
        tempfile.TemporaryFile(mode="w+") as err,
    ):
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        peak_pss = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_pss
            while not done.is_set():
                peak_pss = max(peak_pss, _tree_pss(proc.pid))
                done.wait(poll)

        sampler = threading.Thread(target=sample, daemon=True)
        if poll > 0:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        if poll > 0:
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(
            returncode=proc.returncode,
            max_rss=usage.ru_maxrss * 1024,  # kilobytes on Linux
            tree_pss=peak_pss,
            wall_s=time.perf_counter() - start,
            stdout=out.read(),
            stderr=err.read(),
        )


@dataclass
class Row:
    recipe: str
    peak: int
    tree_pss: int
    bytes_per_param: float
    ratio: float = 0.0
    estimate: int | None = None
    estimate_activations: int | None = None
    measured: int = 0
    cuda_max: int | None = None
    wall_s: float = 0.0
    summary_peak: int = 0


@dataclass
class Result:
    model: str
    batch_size: int
    img_size: int
    steps: int
    device: str
    params: int
    weights: int
    baseline: int
    baseline_cuda: int | None
    rows: list[Row] = field(default_factory=list)


def _fail(what: str, m: Measured) -> None:
    sys.stderr.write(f"{what} failed (exit {m.returncode}):\n{m.stderr[-4000:]}\n{m.stdout[-2000:]}\n")
    raise SystemExit(1)


def bench(
    model: str,
    batch_size: int,
    img_size: int,
    *,
    steps: int,
    recipes: list[str],
    device: str,
    workers: int | None,
    estimate: bool,
    poll: float,
    workdir: Path,
    log=print,
) -> Result:
    from ftsgd.data.synthetic import make_image_folder

    classes = 2
    kwargs = {"img_size": img_size} if "vit" in model or "deit" in model else {}
    data = workdir / f"data-{img_size}-{batch_size}-{steps}"
    if not data.exists():
        per_train = math.ceil(steps * batch_size / classes)
        make_image_folder(
            data,
            classes=classes,
            size=img_size,
            per_class={"train": per_train, "val": max(1, math.ceil(batch_size / classes))},
        )
    py = sys.executable
    base = run_measured([py, "-c", BASELINE_CODE, model, json.dumps(kwargs), str(classes), device], poll=poll)
    if base.returncode:
        _fail("baseline", base)
    info = json.loads(base.stdout.strip().splitlines()[-1])
    result = Result(
        model=model,
        batch_size=batch_size,
        img_size=img_size,
        steps=steps,
        device=device,
        params=info["params"],
        weights=info["weights"],
        baseline=base.max_rss,
        baseline_cuda=info.get("cuda_allocated"),
    )
    log(f"# {model} batch {batch_size} {img_size}px: baseline (imports + model) {base.max_rss / GIB:.2f} GiB")
    sets = [
        f"model.name={json.dumps(model)}",
        f"model.kwargs={{{', '.join(f'{k} = {v}' for k, v in kwargs.items())}}}",
        "train.epochs=1",
        f"train.batch_size={batch_size}",
        "train.micro_batch_size=0",
        f"data.img_size={img_size}",
        f"train.device={json.dumps(device)}",
    ]
    if workers is not None:
        sets.append(f"data.num_workers={workers}")
    set_args = [a for s in sets for a in ("--set", s)]
    for recipe in recipes:
        est = None
        if estimate:
            m = run_measured(
                [
                    py, "-m", "ftsgd", "inspect", "--recipe", recipe, "--num-classes", str(classes),
                    "--batch-size", str(batch_size), "--img-size", str(img_size), *set_args, "--json",
                ],
                poll=0,
            )  # fmt: skip
            if m.returncode:
                _fail(f"ftsgd inspect --recipe {recipe}", m)
            est = json.loads(m.stdout)["memory"]
        out = workdir / f"run-{model}-{batch_size}-{img_size}-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        m = run_measured(
            [py, "-m", "ftsgd", "train", "--data", str(data), "--out", str(out), "--recipe", recipe,
             *set_args, "--quiet", "--json"],
            poll=poll,
        )  # fmt: skip
        if m.returncode:
            _fail(f"ftsgd train --recipe {recipe}", m)
        summary = json.loads(m.stdout)
        shutil.rmtree(out, ignore_errors=True)
        # ftsgd resets the kernel's high-water mark after every epoch (per-epoch peaks), which also
        # resets what wait4 reports; summary.json keeps each epoch's peak taken before that reset.
        peak = m.max_rss if device == "cuda" else max(m.max_rss, summary["peak_memory_bytes"])
        row = Row(
            recipe=recipe,
            peak=peak,
            tree_pss=m.tree_pss,
            bytes_per_param=(peak - result.baseline) / result.params,
            estimate=est["total"] if est else None,
            estimate_activations=est["activations"] if est else None,
            measured=peak - result.baseline + result.weights,
            cuda_max=summary["peak_memory_bytes"] if device == "cuda" else None,
            wall_s=m.wall_s,
            summary_peak=summary["peak_memory_bytes"],
        )
        result.rows.append(row)
        log(
            f"  {recipe:<28} peak {row.peak / GIB:6.2f} GiB  tree PSS {row.tree_pss / GIB:6.2f} GiB  "
            f"{row.bytes_per_param:5.2f} B/param  ({m.wall_s:.0f} s)"
        )
    adamw = next((r for r in result.rows if r.recipe == "adamw"), None)
    for r in result.rows:
        r.ratio = r.peak / adamw.peak if adamw else float("nan")
    return result


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def table(result: Result) -> str:
    cuda = result.device == "cuda"
    head = (
        f"**{result.model}**, batch {result.batch_size}, {result.img_size}px, {result.steps} steps, "
        f"{result.device}: {result.params / 1e6:.1f}M parameters, weights {_gib(result.weights)}; "
        f"baseline process (imports + model) {_gib(result.baseline)}"
        + (f", model on GPU {_gib(result.baseline_cuda)}" if cuda else "")
    )
    cols = ["recipe", "peak RSS", "tree PSS", "B/param above model", "vs adamw", "estimate", "measured"]
    if cuda:
        cols.append("CUDA max allocated")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result.rows:
        cells = [
            r.recipe,
            _gib(r.peak),
            _gib(r.tree_pss),
            f"{r.bytes_per_param:.2f}",
            f"{r.ratio:.2f}x",
            _gib(r.estimate),
            _gib(r.measured),
        ]
        if cuda:
            cells.append(_gib(r.cuda_max))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["vit_base_patch16_224"], help="timm model name(s)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (one epoch)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: each recipe's)")
    parser.add_argument("--no-estimate", action="store_true", help="skip the `ftsgd inspect` estimates")
    parser.add_argument("--poll", type=float, default=0.2, help="tree PSS sampling interval (0: off)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the dataset here (default: temp)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown tables")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ftsgd-bench-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for model in args.model:
            for batch in args.batch_size:
                res = bench(
                    model,
                    batch,
                    args.img_size,
                    steps=args.steps,
                    recipes=args.recipes,
                    device=device,
                    workers=args.workers,
                    estimate=not args.no_estimate,
                    poll=args.poll,
                    workdir=workdir,
                    log=log,
                )
                results.append(res)
                if not args.json:
                    print()
                    print(table(res))
                    print(flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    payload = json.dumps([asdict(r) for r in results], indent=2)
    if args.json_out is not None:
        args.json_out.write_text(payload + "\n")
    if args.json:
        print(payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
