"""Training speed of ``ftsgd train`` against timm's ``train.py``, same model, data, batch and epochs.

Each *pair* runs both tools once as fresh processes on the same generated image folder, one after the
other; the order alternates from pair to pair (ftsgd first, then timm first, ...) so that a machine
slowly warming up or getting busier does not favour one side. Reported per run:

* ``wall``: the whole process, from launch to exit (imports, data scan, model build, training, the
  per-epoch validation, checkpoints, export) -- what a user waits for;
* ``img/s``: training images per second of the training loop alone, computed the same way on both
  sides: ``train images x epochs / loop time``, where the loop time runs from asking the epoch's
  DataLoader for its first batch to the last optimizer step, summed over epochs (ftsgd:
  ``train_time_s`` of its summary; timm: the sum of the per-update ``Time:`` of its log, printed
  for every update with ``--log-interval 1``; both include the wait for the first batch).

and per pair the ratios ``timm wall / ftsgd wall`` and ``ftsgd img/s / timm img/s`` (above 1: ftsgd is
faster); the summary is the median over pairs.

The two sides are configured alike: the ``sgd-freeze-embed`` recipe (SGD, momentum 0.9, lr 1e-3, no
weight decay, cosine per epoch without warmup, no label smoothing, random-resized crop + flip,
embedding frozen) against ``train.py --opt momentum --momentum 0.9 --lr 1e-3 --weight-decay 0 --sched
cosine --warmup-epochs 0 --smoothing 0 --color-jitter 0`` with the model's own interpolation (timm's
default picks it at random), the same seed, the same number of DataLoader workers on both sides,
``--no-prefetcher`` off CUDA (its prefetcher needs CUDA streams), random init on both sides. Every
case's training set is a multiple of the batch size: timm drops a last partial batch, ftsgd trains on
it (with other sizes each side's images/s counts the images it trained on). Both
validate on the same ``val/`` split after every epoch and both write a checkpoint every epoch (timm:
``--checkpoint-hist 1``; ftsgd also exports the best weights as safetensors). ftsgd freezes the patch
embedding (that is its method), so it computes no gradient for that one layer; timm trains it.

timm's ``train.py`` is not part of the timm wheel: pass ``--timm-src`` a checkout of
https://github.com/huggingface/pytorch-image-models. Only its ``train.py`` is used, copied into the
work folder and run from there, so it imports the *installed* timm -- the same library ftsgd uses --
and not the checkout's own ``timm/`` package. Without ``--timm-src`` the timm column is skipped.

Usage::

    python benchmarks/throughput.py --timm-src ~/src/pytorch-image-models           # small case
    python benchmarks/throughput.py --timm-src ~/src/pytorch-image-models --cases large --models vit
    python benchmarks/throughput.py --cases small --pairs 1                              # ftsgd only

Cases: ``small`` is 3 classes x 32 training images (+ 8 validation images per class), batch 32, 2
epochs; ``large`` is 4 classes x 504 training images (+ 8 per class), batch 32, 5 epochs; ``gpu``
is 4 x 256 (+ 16 per class), batch 32, 3 epochs (for ``--device cuda``, where timm also gets
``--pin-mem``). Images are
224 px JPEGs (quality 95) written by :func:`ftsgd.synthetic.make_image_folder`. Models: ``vit`` is
``vit_tiny_patch16_224``, ``cnn`` is ``resnet18`` (the smallest ImageNet CNN people fine-tune; its
convolutions at 224 px cost about as much per image as the ViT-Ti's attention blocks, so the data
pipeline's share of the time is similar and realistic). The scan cache of ftsgd is pointed at an
empty folder for every run (``FTSGD_CACHE_DIR``), so each ftsgd run decodes its whole dataset once
in its pre-flight scan, as a first run would; ``--warm-scan-cache`` keeps one cache for all runs.

Precision: the two sides always compute in the same precision, and every setting is measured in each of
``--amp``'s precisions (default ``none bf16``: fp32 against fp32, then bf16 autocast against bf16 autocast,
timm ``--amp --amp-dtype bfloat16``), so a ratio never mixes a precision gain into the tools' speed. ftsgd gets
an explicit ``train.amp`` (its default, ``auto``, is fp32 since precision became a measured choice); under bf16
both sides also evaluate in bf16 (ftsgd evaluates in the run's precision).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {"vit": "vit_tiny_patch16_224", "cnn": "resnet18"}


@dataclass(frozen=True)
class Case:
    """One benchmark setting: dataset shape and training length."""

    name: str
    classes: int
    train_per_class: int
    val_per_class: int
    batch_size: int
    epochs: int

    @property
    def train_images(self) -> int:
        return self.classes * self.train_per_class


CASES = {
    "small": Case("small", classes=3, train_per_class=32, val_per_class=8, batch_size=32, epochs=2),
    "large": Case("large", classes=4, train_per_class=504, val_per_class=8, batch_size=32, epochs=5),
    "gpu": Case("gpu", classes=4, train_per_class=256, val_per_class=16, batch_size=32, epochs=3),
}


@dataclass
class Run:
    """One process: its tool, exit status, wall and CPU time, training-loop speed.

    ``load`` is the machine's 1-minute load average when it started (other users' work shows there).
    """

    tool: str
    returncode: int
    wall_s: float
    cpu_s: float
    load: float
    loop_s: float | None
    images_per_s: float | None
    log: str


@dataclass
class Pair:
    order: str
    ftsgd: Run
    timm: Run | None

    @property
    def wall_ratio(self) -> float | None:
        """timm's wall time / ftsgd's: above 1, ftsgd finished sooner."""
        if self.timm is None or not self.timm.wall_s or not self.ftsgd.wall_s:
            return None
        return self.timm.wall_s / self.ftsgd.wall_s

    @property
    def speed_ratio(self) -> float | None:
        """ftsgd's training-loop images/s / timm's."""
        if self.timm is None or not self.timm.images_per_s or not self.ftsgd.images_per_s:
            return None
        return self.ftsgd.images_per_s / self.timm.images_per_s


@dataclass
class Result:
    case: str
    model: str
    device: str
    workers: int
    train_images: int
    epochs: int
    batch_size: int
    pairs: list[Pair] = field(default_factory=list)
    amp: str = "none"
    """The precision of both sides: ``none`` (fp32), ``bf16`` or ``fp16`` autocast."""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> tuple[int, float, float, str]:
    """Run ``cmd`` to completion; return its exit code, wall and CPU seconds, and its output.

    The CPU seconds (user + system) include the DataLoader workers, which the process waits for.
    """
    cpu, start = _cpu_seconds(), time.perf_counter()
    with open(log, "w") as fh:
        # Its own session, so that stopping the benchmark also stops the tool and its DataLoader workers.
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return proc.returncode, wall, cpu, log.read_text(errors="replace")


def make_data(case: Case, workdir: Path) -> Path:
    """Generate (once) the case's 224-px JPEG image folder."""
    from ftsgd.data.synthetic import make_image_folder

    root = workdir / f"data-{case.name}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        per_class = {"train": case.train_per_class, "val": case.val_per_class}
        make_image_folder(root, classes=case.classes, per_class=per_class, size=224, fmt="jpg")
        done.write_text("")
    return root


def run_ftsgd(case: Case, model: str, data: Path, out: Path, opts: argparse.Namespace, tag: str) -> Run:
    """One ``python -m ftsgd train`` process with the ``sgd-freeze-embed`` recipe."""
    sets = [
        f"train.epochs={case.epochs}",
        f"train.batch_size={case.batch_size}",
        "train.seed=0",
        f"train.device={json.dumps(opts.device)}",
        f"data.num_workers={opts.workers}",
    ]
    sets.append(f"train.amp={json.dumps(opts.amp)}")  # the same precision as timm's side, never a default
    cmd = [opts.python, "-m", "ftsgd", "train", "--data", str(data), "--out", str(out)]
    cmd += ["--recipe", "sgd-freeze-embed", "--model", model, *[a for s in sets for a in ("--set", s)]]
    cmd += ["--quiet", "--json"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    if not opts.warm_scan_cache:
        env["FTSGD_CACHE_DIR"] = str(out) + "-cache"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    code, wall, cpu, text = _run(cmd, env=env, cwd=opts.workdir, log=opts.workdir / f"{tag}-ftsgd.log")
    loop = ips = None
    if code == 0:
        summary = json.loads(text[text.index("{") :])
        loop = float(summary["train_time_s"])
        ips = case.train_images * case.epochs / loop
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + "-cache", ignore_errors=True)
    return Run("ftsgd", code, wall, cpu, load, loop, ips, text[-3000:])


_TIMM_UPDATE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?Time: ([0-9.]+)s")


def timm_loop_seconds(log: str) -> tuple[float, int]:
    """Sum the per-update ``Time:`` of a timm ``train.py --log-interval 1`` log.

    Returns:
        ``(seconds, updates)``; each update is counted once even if a line was printed twice.
    """
    seen: dict[tuple[int, int], float] = {}
    for m in _TIMM_UPDATE.finditer(log):
        seen[(int(m.group(1)), int(m.group(2)))] = float(m.group(4))
    return sum(seen.values()), len(seen)


@functools.cache
def model_interpolation(model: str) -> str:
    """The model's own resize interpolation, which ftsgd uses (timm's train.py picks one at random)."""
    import timm
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=timm.create_model(model, pretrained=False))["interpolation"]


def timm_command(case: Case, model: str, data: Path, out: Path, opts: argparse.Namespace) -> list[str]:
    """The ``train.py`` command line configured like the ``sgd-freeze-embed`` recipe."""
    interp = model_interpolation(model)
    cmd = [opts.python, str(opts.workdir / "timm-train" / "train.py"), "--data-dir", str(data)]
    cmd += ["--train-split", "train", "--val-split", "val", "--model", model]
    cmd += ["--num-classes", str(case.classes), "-b", str(case.batch_size), "--epochs", str(case.epochs)]
    cmd += ["--opt", "momentum", "--momentum", "0.9", "--lr", "1e-3", "--weight-decay", "0"]
    cmd += ["--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0", "--color-jitter", "0"]
    cmd += ["--train-interpolation", interp, "--seed", "0", "-j", str(opts.workers)]
    cmd += ["--log-interval", "1", "--checkpoint-hist", "1", "--output", str(out), "--experiment", "run"]
    cmd += ["--device", opts.device]
    if opts.device != "cuda":
        cmd.append("--no-prefetcher")
    else:
        cmd.append("--pin-mem")  # ftsgd pins batches on CUDA (data.pin_memory = true)
    if opts.amp != "none":  # train.py's own default is fp32
        cmd += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[opts.amp]]
    return cmd


def run_timm(case: Case, model: str, data: Path, out: Path, opts: argparse.Namespace, tag: str) -> Run:
    """One timm ``train.py`` process."""
    cmd = timm_command(case, model, data, out, opts)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load = os.getloadavg()[0]
    code, wall, cpu, text = _run(cmd, env=dict(os.environ), cwd=out, log=opts.workdir / f"{tag}-timm.log")
    loop = ips = None
    if code == 0:
        loop, updates = timm_loop_seconds(text)
        expected = case.epochs * (case.train_images // case.batch_size)  # timm drops a last partial batch
        if updates != expected:
            raise SystemExit(
                f"timm log has {updates} updates, expected {expected}: {opts.workdir / tag}-timm.log"
            )
        ips = updates * case.batch_size / loop
    shutil.rmtree(out, ignore_errors=True)
    return Run("timm", code, wall, cpu, load, loop, ips, text[-3000:])


def bench(case: Case, model: str, opts: argparse.Namespace, log=print) -> Result:
    data = make_data(case, opts.workdir)
    result = Result(
        case.name,
        model,
        opts.device,
        opts.workers,
        case.train_images,
        case.epochs,
        case.batch_size,
        amp=opts.amp,
    )
    for i in range(opts.pairs):
        tag = f"{case.name}-{model}-{opts.amp}-{i}"
        ftsgd_first = i % 2 == 0
        runs: dict[str, Run] = {}
        for tool in ("ftsgd", "timm") if ftsgd_first else ("timm", "ftsgd"):
            if tool == "timm" and opts.timm_src is None:
                continue
            fn = run_ftsgd if tool == "ftsgd" else run_timm
            r = fn(case, model, data, opts.workdir / f"out-{tool}", opts, tag)
            if r.returncode:
                sys.stderr.write(f"{tool} failed (exit {r.returncode}):\n{r.log}\n")
                raise SystemExit(1)
            runs[tool] = r
            log(
                f"  {tag} {tool:5}: wall {r.wall_s:6.1f} s, CPU {r.cpu_s:6.1f} s, loop {r.loop_s:6.1f} s, "
                f"{r.images_per_s:6.1f} img/s (load {r.load:.1f})"
            )
        pair = Pair("ftsgd first" if ftsgd_first else "timm first", runs["ftsgd"], runs.get("timm"))
        result.pairs.append(pair)
        if pair.wall_ratio is not None:
            log(f"  {tag} ratios: wall {pair.wall_ratio:.2f}x, img/s {pair.speed_ratio:.2f}x")
    return result


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def table(res: Result) -> str:
    """Markdown table: one row per pair, then the medians."""
    head = (
        f"**{res.model}**, case `{res.case}`: {res.train_images} train images, batch {res.batch_size}, "
        f"{res.epochs} epochs, {res.workers} workers, {res.device}, "
        + ("fp32 on both sides" if res.amp == "none" else f"{res.amp} autocast on both sides")
    )
    cols = ["pair", "order", "ftsgd wall", "timm wall", "**wall ratio**", "ftsgd img/s", "timm img/s"]
    cols += ["**img/s ratio**", "ftsgd CPU", "timm CPU", "load"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cells(vals: list[float | None]) -> list[str]:
        specs = [(".1f", " s"), (".1f", " s"), (".2f", "x"), (".1f", ""), (".1f", ""), (".2f", "x")]
        specs += [(".1f", " s"), (".1f", " s")]
        return [_fmt(v, spec, suffix) for v, (spec, suffix) in zip(vals, specs, strict=True)]

    def row(p: Pair) -> list[float | None]:
        t = p.timm
        return [
            p.ftsgd.wall_s,
            t and t.wall_s,
            p.wall_ratio,
            p.ftsgd.images_per_s,
            t and t.images_per_s,
            p.speed_ratio,
            p.ftsgd.cpu_s,
            t and t.cpu_s,
        ]

    rows = [row(p) for p in res.pairs]
    for i, (p, vals) in enumerate(zip(res.pairs, rows, strict=True), 1):
        load = f"{p.ftsgd.load:.1f}" + (f" / {p.timm.load:.1f}" if p.timm else "")
        lines.append(f"| {i} | {p.order} | " + " | ".join(cells(vals)) + f" | {load} |")
    medians = cells([_median([r[k] for r in rows]) for k in range(len(rows[0]))]) if rows else []
    lines.append("| **median** | | " + " | ".join(medians) + " | |")
    return "\n".join(lines)


def _setup_timm(opts: argparse.Namespace) -> None:
    """Copy the checkout's ``train.py`` into the work folder (so the installed timm is imported)."""
    if opts.timm_src is None:
        print(
            "no --timm-src given: timm's train.py is not in the timm wheel, so the timm column is skipped. "
            "Pass a checkout of https://github.com/huggingface/pytorch-image-models to compare.",
            file=sys.stderr,
        )
        return
    script = opts.timm_src.expanduser() / "train.py"
    if not script.is_file():
        raise SystemExit(
            f"--timm-src {opts.timm_src}: no train.py there (expected a pytorch-image-models checkout)"
        )
    dest = opts.workdir / "timm-train"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(script, dest / "train.py")


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through _run, which stops the running tool


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--timm-src", type=Path, default=None, help="pytorch-image-models checkout (train.py)"
    )
    parser.add_argument("--cases", nargs="+", default=["small"], choices=list(CASES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="vit, cnn or timm model names")
    parser.add_argument("--pairs", type=int, default=3, help="alternated ftsgd/timm pairs per setting")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers on both sides")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--amp",
        nargs="+",
        default=["none", "bf16"],
        choices=["none", "bf16", "fp16"],
        help="precisions to measure, each on both sides alike (none: fp32; bf16/fp16: autocast, timm "
        "--amp --amp-dtype); default: none bf16, i.e. fp32 against fp32, then bf16 against bf16",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for both tools")
    parser.add_argument("--warm-scan-cache", action="store_true", help="share ftsgd's scan cache across runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and logs here (default: temp)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the raw results as JSON")
    opts = parser.parse_args(argv)
    amps = list(dict.fromkeys(opts.amp))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the ftsgd of this checkout, as the ftsgd runs get through PYTHONPATH

    tmp = None
    if opts.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ftsgd-throughput-")
        opts.workdir = Path(tmp.name)
    opts.workdir = opts.workdir.resolve()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        _setup_timm(opts)
        for case_name in opts.cases:
            for key in opts.models:
                for amp in amps:  # a comparison is only ever at equal precision
                    opts.amp = amp
                    model = MODELS.get(key, key)
                    print(f"# {case_name} / {model} / {amp}", flush=True)
                    res = bench(CASES[case_name], model, opts, log=lambda s: print(s, flush=True))
                    results.append(res)
                    print("\n" + table(res) + "\n", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if opts.json_out is not None:
        rows = [asdict(r) for r in results]
        for row in rows:
            for p in row["pairs"]:
                for side in ("ftsgd", "timm"):
                    if p[side]:
                        p[side].pop("log")
        opts.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
