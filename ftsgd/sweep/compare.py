"""``ftsgd demo --compare``: the paper's comparison in miniature, on generated data, on a CPU, as a sweep.

What it does, in order:

1. **Pre-train** a tiny CLIP-style ViT (a pre-norm ``norm_pre`` after the patch embedding, as CLIP's
   ``ln_pre``) with AdamW and weight decay on a generated *source* task: six shapes, half of the images in
   the shifted style (:func:`ftsgd.data.synthetic.make_source_folder`). This is the slow part, so its data
   and run directory are cached (:func:`cache_root`) and every later comparison reuses them.
2. **Fine-tune** the pre-trained backbone on the *target* task (four other shapes; ``train``/``val`` in
   the plain style, ``ood`` in the shifted style the backbone saw in pre-training but the fine-tuning
   data does not show) with ``sgd``, ``sgd-freeze-embed``, ``adamw``, ``lora`` and
   ``lora-sgd-freeze-embed``, over a small learning-rate grid
   per method and several seeds. This is a sweep (:mod:`ftsgd.sweep`): the grid is planned as
   ``ftsgd sweep`` plans it (each method with its own learning rates), ``OUT`` is a sweep folder
   (``OUT/<method>/optim.lr=...,train.seed=.../`` run directories and ``OUT/sweep.json``) that
   ``ftsgd sweep`` and ``ftsgd report`` read, and the runs are trained in this process by
   :mod:`ftsgd.sweep.inprocess` (why not one subprocess per run as ``ftsgd sweep`` does: see there).
3. **Select** per method the learning rate with the best mean ID-validation accuracy over the seeds, as
   ``ftsgd sweep`` selects (:mod:`ftsgd.report.selection`, the paper's protocol), and report ID and OOD
   accuracy (mean ± std over seeds) with each method's training-state memory.
4. **Diagnose**: the gradient diagnostic (:mod:`ftsgd.inspect.diagnose`) of the pre-trained backbone on
   the target's training data: does its embedding get the large gradients the paper's argument starts from?

Every run uses one intra-op thread, so the numbers do not depend on the machine's core count (the sums of
floating-point reductions do) and match the README's on any machine with the same torch and timm; the
fine-tuning runs are ~4 s each, so parallel threads would gain little.

Rerunning is safe and cheap: the cached backbone is reused, finished fine-tuning runs in ``OUT`` are kept,
interrupted ones continue from their checkpoint, and ``OUT`` holding another configuration's runs is
refused. Printing is :mod:`ftsgd.cli.compare`'s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftsgd import __version__
from ftsgd.data.synthetic import TARGET_SHAPES, make_source_folder, make_target_folder
from ftsgd.errors import UsageError
from ftsgd.inspect.diagnose import (
    GradientDiagnostic,
    diagnose_from_recipe,
    diagnostic_to_dict,
)
from ftsgd.inspect.memory import estimate_memory
from ftsgd.model.prepare import prepare_model
from ftsgd.recipe.schema import Recipe
from ftsgd.report.selection import Report, Stat
from ftsgd.run.checks import load_checked_recipe
from ftsgd.run.rundir import RunDir, locked
from ftsgd.sweep.command import conclude
from ftsgd.sweep.inprocess import execute_in_process
from ftsgd.sweep.output import announce
from ftsgd.sweep.plan import SweepOptions, plan_sweep
from ftsgd.sweep.record import LOG_DIR, SWEEP_FILE, open_sweep
from ftsgd.train.trainer import Trainer
from ftsgd.utils import console
from ftsgd.utils.cachedir import user_cache_dir
from ftsgd.utils.device import amp_name, resolve_amp
from ftsgd.utils.fileio import atomic_write_text, jsonable

__all__ = [
    "FULL",
    "LORA_METHODS",
    "METHODS",
    "QUICK",
    "CompareConfig",
    "Comparison",
    "MethodRow",
    "cache_root",
    "check_compare_amp",
    "run_comparison",
]

METHODS = ("sgd", "sgd-freeze-embed", "adamw", "lora", "lora-sgd-freeze-embed")
"""The recipes compared, in table order: the paper's baseline, its method, the AdamW baseline, and LoRA
adapters trained with AdamW and with SGD freeze-embed (left out, with a warning, without ``peft``)."""
LORA_METHODS = ("lora", "lora-sgd-freeze-embed")
SETTINGS_FILE = "settings.json"
RESULT_FILE = "comparison.json"
DEMO_MARKER = ".ftsgd-demo"
"""Written first into every ``ftsgd demo`` output folder: ``--force`` deletes only a folder that holds it."""
OWN_ENTRIES = frozenset(
    {"data", SETTINGS_FILE, RESULT_FILE, SWEEP_FILE, LOG_DIR, *METHODS, "runs", DEMO_MARKER}
)
"""What a comparison writes into its ``--out`` (``runs``: where comparisons put their runs before they were
sweeps); ``--force`` deletes a folder holding only these."""


@dataclass(frozen=True)
class CompareConfig:
    """The sizes of one comparison (:data:`FULL` for the demo, :data:`QUICK` for a smoke test)."""

    model: str = "vit_tiny_patch16_224"
    """timm architecture; ``model_kwargs`` shrink it."""
    model_kwargs: dict[str, Any] = field(
        default_factory=lambda: {
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 64,
            "depth": 4,
            "num_heads": 4,
            "mlp_ratio": 2,
            "pre_norm": True,
        }
    )
    source_per_class: dict[str, int] = field(default_factory=lambda: {"train": 400, "val": 50})
    target_per_class: dict[str, int] = field(default_factory=lambda: {"train": 48, "val": 32, "ood": 32})
    pretrain: tuple[str, ...] = (
        "optim.lr=2e-3",
        "optim.weight_decay=1.0",
        "train.epochs=15",
        "schedule.warmup_epochs=2",
        'train.amp="none"',
    )
    """``--set`` values of the pre-training run (recipe ``adamw``, random init). The strong weight decay
    stands in for CLIP's long pre-training: the patch embedding feeds a LayerNorm (``norm_pre``), so the
    output barely depends on its scale, weight decay shrinks it, and the gradient of a scale-invariant
    weight grows as its norm shrinks (1/norm). How far it shrinks depends on lr x weight decay x steps:
    CLIP (weight decay 0.2) has hundreds of thousands of steps, these ~1,100 need a larger decay."""
    finetune_epochs: int = 6
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "sgd": (3e-3, 1e-2, 3e-2),
            "sgd-freeze-embed": (3e-3, 1e-2, 3e-2),
            "adamw": (3e-4, 1e-3, 3e-3),
            "lora": (1e-3, 3e-3, 1e-2),
            "lora-sgd-freeze-embed": (1e-2, 3e-2, 1e-1),
        }
    )
    seeds: int = 3
    diagnostic_batches: int = 8
    device: str = "cpu"
    """``train.device`` of every run: the demo's is the CPU; ``benchmarks/precision_parity.py`` measures on CUDA."""
    amp: str = "auto"
    """``train.amp`` of the fine-tuning runs (``ftsgd demo --compare --amp``); the backbone is pre-trained in
    fp32 whatever it is, so an fp32 and a bf16 comparison fine-tune the same weights."""

    def common(self) -> list[str]:
        """``--set`` values every run of the comparison shares (model, input, loading, batch)."""
        kwargs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.model_kwargs.items())
        return [
            f"model.name={json.dumps(self.model)}",
            f"model.kwargs={{ {kwargs} }}",
            f"data.img_size={self.model_kwargs['img_size']}",
            'data.augment="flip"',
            "data.num_workers=0",
            "train.batch_size=32",
            f"train.device={json.dumps(self.device)}",
        ]


FULL = CompareConfig()
QUICK = CompareConfig(
    source_per_class={"train": 16, "val": 4},
    target_per_class={"train": 8, "val": 4, "ood": 4},
    pretrain=("optim.lr=2e-3", "train.epochs=1", 'train.amp="none"'),
    finetune_epochs=1,
    lrs={
        "sgd": (1e-2,),
        "sgd-freeze-embed": (1e-2,),
        "adamw": (1e-3, 3e-3),
        "lora": (3e-3,),
        "lora-sgd-freeze-embed": (3e-2,),
    },
    seeds=1,
    diagnostic_batches=1,
)
"""A few seconds per run: for the test that checks the table's shape, not its numbers."""


@dataclass(frozen=True)
class MethodRow:
    """One method's line of the comparison: its selected learning rate and results over seeds.

    Attributes:
        method: The recipe (``sgd``, ``sgd-freeze-embed``, ``adamw``).
        lr: The learning rate selected by mean ID-validation accuracy (None: no finished run).
        seeds: Finished seeds at that learning rate.
        val: ID-validation accuracy at each run's best epoch, over the seeds.
        ood: OOD accuracy at the same epochs, over the seeds.
        state_bytes: Training-state memory: weights, gradients and optimizer state (no activations).
        bytes_per_param: ``state_bytes`` per parameter (the paper's 16 / 12 / 8 rule).
        vs_adamw: ``state_bytes`` relative to AdamW with nothing frozen.
        peak_memory_bytes: The measured peak of the selected point's runs (the largest over its seeds; on a
            CPU the process's resident set, mostly torch itself), None without a finished run.
    """

    method: str
    lr: float | None
    seeds: int
    val: Stat | None
    ood: Stat | None
    state_bytes: int
    bytes_per_param: float
    vs_adamw: float
    peak_memory_bytes: int | None = None


@dataclass
class Comparison:
    """What ``ftsgd demo --compare`` found (also written to ``OUT/comparison.json``)."""

    out: Path
    config: CompareConfig
    rows: list[MethodRow]
    report: Report
    diagnostic: GradientDiagnostic
    pretrain: dict[str, Any]
    """The backbone: ``path`` (its run directory), ``cached``, ``val_accuracy`` on the source task."""
    seconds: dict[str, float]
    """Wall-clock time of ``pretrain`` (0 when cached), ``finetune`` and ``total``."""
    precision: str = "none"
    """What the fine-tuning runs computed in, as ``train.amp`` spells it (``none``: fp32; ``bf16``: autocast)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "out": str(self.out),
            "config": asdict(self.config),
            "rows": [asdict(r) | {"val": _stat(r.val), "ood": _stat(r.ood)} for r in self.rows],
            "diagnostic": diagnostic_to_dict(self.diagnostic),
            "pretrain": self.pretrain,
            "seconds": self.seconds,
            "precision": self.precision,
            "report": self.report.to_dict(),
        }


def _stat(value: Stat | None) -> dict[str, Any] | None:
    return value.to_dict() if value is not None else None


# --------------------------------------------------------------------------- orchestration


def run_comparison(
    out: Path,
    config: CompareConfig = FULL,
    *,
    force: bool = False,
    cache: Path | None = None,
    argv: list[str] | None = None,
) -> Comparison:
    """Pre-train (or reuse) the backbone, fine-tune every method, select and diagnose; see the module docstring.

    Args:
        out: Folder for the target data, the sweep of fine-tuning runs and ``comparison.json``.
        config: The sizes (:data:`FULL` or :data:`QUICK`).
        force: Start over in an ``out`` holding an earlier comparison (of any configuration).
        cache: Where the pre-trained backbone is kept (default :func:`cache_root`).
        argv: The command line, recorded in ``sweep.json``.

    Raises:
        UsageError: ``out`` is a file, holds files a comparison did not write, or holds a comparison
            with other settings (without ``force``).
        RunError: Fine-tuning runs failed (the others were trained); exit 1.
        Interrupted: SIGINT/SIGTERM stopped it (the run being trained saved its checkpoint).
    """
    start = time.perf_counter()
    _foreign_entries(out)  # before the lock file is written into someone else's folder
    with locked(out, "comparison folder"), one_thread():
        _prepare_out(out, config, force)
        weights, pretrain = pretrained_backbone(cache or cache_root(), config)
        tuned = time.perf_counter()
        target = _generated(out / "data", "target", config)
        diagnostic = diagnose_from_recipe(
            load_checked_recipe("sgd", [*config.common(), f"model.weights={json.dumps(str(weights))}"]),
            target,
            config.diagnostic_batches,
        )
        report = fine_tune(out, target, weights, config, argv or [])
        rows = [_method_row(report, method, config) for method in compared_methods()]
        end = time.perf_counter()
        seconds = {"pretrain": pretrain.pop("seconds"), "finetune": end - tuned, "total": end - start}
        precision = amp_name(resolve_amp(config.amp, torch.device(config.device)))
        result = Comparison(out, config, rows, report, diagnostic, pretrain, seconds, precision)
        atomic_write_text(out / RESULT_FILE, json.dumps(jsonable(result.to_dict()), indent=2) + "\n")
    return result


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for the comparison (numbers independent of the core count), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


COMPARE_AMP = ("auto", "none", "bf16")
"""What ``demo --compare --amp`` takes: the CPU's precisions (``fp16`` autocast is for CUDA)."""


def check_compare_amp(amp: str) -> str:
    """``amp`` when the comparison can fine-tune in it (a usage error otherwise, before any work)."""
    if amp not in COMPARE_AMP:
        raise UsageError(
            f"--amp must be one of {', '.join(COMPARE_AMP)} (the comparison runs on a CPU), got {amp!r}"
        )
    return amp


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ftsgd`` (default ``~/.cache/ftsgd``): where the pre-trained backbone is kept.

    Without a home directory (never created), a temporary folder: the backbone is trained again next time.
    """
    return user_cache_dir(ftsgd_variable=False) or Path(tempfile.mkdtemp(prefix="ftsgd-cache-"))


def _foreign_entries(out: Path) -> set[str]:
    """What ``out`` holds (its lock aside); refused when that is more than a comparison writes."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    entries = {p.name for p in out.iterdir()} - {".ftsgd.lock"} if out.is_dir() else set()
    foreign = sorted(e for e in entries if e not in OWN_ENTRIES and not e.endswith(".tmp"))
    if foreign:
        raise UsageError(
            f"{out} is not a comparison folder (it holds {', '.join(foreign[:5])}); choose another --out"
        )
    return entries


def _prepare_out(out: Path, config: CompareConfig, force: bool) -> None:
    """Check what ``out`` holds (under its lock) and record this comparison's settings in it."""
    entries = _foreign_entries(out)
    settings = json.dumps(asdict(config), sort_keys=True)
    recorded = out / SETTINGS_FILE
    if entries and not force and (not recorded.is_file() or recorded.read_text() != settings):
        raise UsageError(
            f"{out} holds a comparison with other settings (e.g. --quick); pass --force to start over "
            "or choose another --out"
        )
    if force and entries and not (out / DEMO_MARKER).is_file():
        raise UsageError(not_written_by_demo(out))
    if force:
        for name in entries:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
    write_demo_marker(out)
    atomic_write_text(recorded, settings)


def write_demo_marker(out: Path) -> None:
    """Mark ``out`` as written by ``ftsgd demo``, before anything else is written into it."""
    if not (out / DEMO_MARKER).is_file():
        atomic_write_text(
            out / DEMO_MARKER, "written by `ftsgd demo`: `ftsgd demo --force` may delete this folder\n"
        )


def not_written_by_demo(out: Path) -> str:
    """Why ``--force`` refuses ``out``: only what ``ftsgd demo`` itself wrote is ever deleted."""
    return (
        f"{out} was not written by `ftsgd demo` (it has no {DEMO_MARKER} marker), so --force will not delete "
        "anything in it. Choose another --out (or delete the folder yourself if it really is an old demo)"
    )


def _generated(folder: Path, task: str, config: CompareConfig) -> Path:
    """The generated ``source`` or ``target`` task in ``folder``, written once (into a temporary, then renamed).

    Runs record their data's file times, so data that exists is never written again; a write killed
    half-way leaves only the temporary, which the next call replaces.
    """
    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    size = config.model_kwargs["img_size"]
    if task == "source":
        make_source_folder(tmp, per_class=config.source_per_class, size=size)
    else:
        make_target_folder(tmp, per_class=config.target_per_class, size=size)
    os.replace(tmp, folder)
    return folder


def cache_key(config: CompareConfig) -> str:
    """What the pre-trained backbone depends on, hashed: a changed setting or ftsgd version trains anew."""
    settings = {
        "model": config.model,
        "model_kwargs": config.model_kwargs,
        "source_per_class": config.source_per_class,
        "pretrain": config.pretrain,
        "common": config.common(),
        "ftsgd": __version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_backbone(cache: Path, config: CompareConfig) -> tuple[Path, dict[str, Any]]:
    """Pre-train the backbone on the source task, or reuse the cached run; ``(weights file, facts)``.

    The pre-training is an ordinary run directory under the cache (recipe ``adamw``, random init), locked
    while it trains and resumed if an earlier comparison was killed during it.
    """
    folder = cache / f"demo-compare-{cache_key(config)}"
    folder.mkdir(parents=True, exist_ok=True)
    data = _generated(folder / "data", "source", config)
    recipe = load_checked_recipe(
        "adamw", [*config.common(), *config.pretrain, f"data.root={json.dumps(str(data))}"]
    )
    run = RunDir(folder / "run")
    start = time.perf_counter()
    with locked(run.path, "cached pre-training run"):
        status = run.status()
        if status == "unstarted":
            run.clear_unstarted()
        if status != "finished":
            console.info(f"pre-training the backbone on the source task (once; cached in {folder})")
            Trainer(recipe, run.path, resume=status == "unfinished", quiet=True).fit()
    summary = run.read_summary()
    facts = {
        "path": str(run.path),
        "cached": status == "finished",
        "epochs": summary["epochs"],
        "val_accuracy": summary["val_accuracy"],
        "seconds": 0.0 if status == "finished" else time.perf_counter() - start,
    }
    return run.weights, facts


def fine_tune(out: Path, data: Path, weights: Path, config: CompareConfig, argv: list[str]) -> Report:
    """Fine-tune every method over its grid as a sweep into ``out`` (trained in this process); the selection.

    Finished runs are kept, interrupted ones continue, failed ones are trained again.

    Raises:
        RunError: Runs failed (the others were trained).
        Interrupted: SIGINT/SIGTERM stopped the sweep.
    """
    opts = sweep_options(out, data, weights, config, argv)
    sweep = open_sweep(plan_sweep(opts), opts)
    announce(sweep)
    conclude(sweep, execute_in_process(sweep), show=False)
    assert sweep.report is not None  # every run finished, or conclude raised
    return sweep.report


def sweep_options(
    out: Path, data: Path, weights: Path, config: CompareConfig, argv: list[str]
) -> SweepOptions:
    """The comparison as ``ftsgd sweep`` options: the three recipes, each with its learning rates, the seeds,
    and the ``--set`` values every run shares.

    The settings file guards ``out`` against another configuration (see :func:`_prepare_out`), so a changed
    path (another ``$XDG_CACHE_HOME``, a moved ``out``) is no reason to refuse the sweep; failed runs are
    retried, as a comparison has no ``--retry-failed``.
    """
    return SweepOptions(
        data=data,
        out=out,
        recipes=list(compared_methods()),
        grids=[f"train.seed={','.join(str(s) for s in range(config.seeds))}"],
        recipe_grids={
            m: [f"optim.lr={','.join(repr(lr) for lr in config.lrs[m])}"] for m in compared_methods()
        },
        sets=[
            *config.common(),
            f"train.epochs={config.finetune_epochs}",
            f"train.amp={json.dumps(config.amp)}",
        ],
        weights=weights,
        allow_changed_grid=True,
        retry_failed=True,
        argv=argv,
    )


def _method_row(report: Report, method: str, config: CompareConfig) -> MethodRow:
    """A method's selected grid point (``ftsgd.selection``) and its training-state memory."""
    selection = next((s for s in report.selections if s.recipe == method), None)
    point = selection.point if selection is not None else None
    recipe: Recipe = load_checked_recipe(method, config.common())
    prepared = prepare_model(recipe, len(TARGET_SHAPES))
    memory = estimate_memory(prepared.model, prepared.frozen, recipe.optim)
    return MethodRow(
        method=method,
        lr=point.values.get("optim.lr") if point is not None else None,
        seeds=len(point.runs) if point is not None else 0,
        val=point.val if point is not None else None,
        ood=point.splits.get("ood") if point is not None else None,
        state_bytes=memory.total,
        bytes_per_param=memory.bytes_per_param,
        vs_adamw=memory.ratio,
        peak_memory_bytes=point.peak_memory_bytes if point is not None else None,
    )


@functools.cache
def compared_methods() -> tuple[str, ...]:
    """:data:`METHODS`, without the LoRA recipes when ``peft`` (``ftsgd[lora]``) is not installed (said once)."""
    if importlib.util.find_spec("peft") is not None:
        return METHODS
    console.warn("LoRA left out of the comparison: it needs the peft package (pip install 'ftsgd[lora]')")
    return tuple(m for m in METHODS if m not in LORA_METHODS)
