"""Every command's options and arguments, declared as ``Annotated`` aliases, and the recipe shorthands.

``ftsgd train``, ``sweep`` and ``inspect`` take the same recipe flags (``--recipe``, ``--set``, ``--model``,
``--weights``); ``eval``, ``predict`` and ``export`` the same run argument. Declared once each, they keep
their spelling and help text the same everywhere, and each command's signature in :mod:`ftsgd.cli.app`
stays one line per option. Nothing here imports more than Typer and the recipe schema (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ftsgd.errors import UsageError
from ftsgd.recipe.schema import DEFAULT_RECIPE

# --------------------------------------------------------------------------- the recipe flags

RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a TOML recipe.")
]
TrainRecipeOpt = Annotated[
    str | None,
    typer.Option("--recipe", "-r", help=f"Built-in recipe name or TOML path \\[default: {DEFAULT_RECIPE}]."),
]
SweepRecipesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--recipe",
        "-r",
        metavar="NAME_OR_PATH",
        help=f"Built-in recipe name or TOML path (repeatable) \\[default: {DEFAULT_RECIPE}].",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY.PATH=VALUE", help="Override a recipe key (repeatable)."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="timm model name (sets model.name).")]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights", "-w", help="Local weights file: .safetensors, .pth, .pt, .bin (sets model.weights)."
    ),
]

# --------------------------------------------------------------------------- training and sweeps

TrainDataOpt = Annotated[
    Path, typer.Option("--data", "-d", help="Dataset folder with train/ and val/ (and more splits).")
]
RunOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (or --resume).")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        metavar="",
        help="Continue the run in --out, or start it if it is missing or never reached a checkpoint; a "
        "finished run only prints its results. Safe to repeat with the same command line.",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", metavar="", help="Print nothing but warnings and errors.")
]
AllowNewImagesOpt = Annotated[
    bool,
    typer.Option(
        "--allow-new-images",
        metavar="",
        help="With --resume: accept a dataset that only gained images since the run started.",
    ),
]
EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", min=1, help="Epochs to train (sets train.epochs).")
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", min=1, help="Images per optimizer step (sets train.batch_size)."),
]
LrOpt = Annotated[float | None, typer.Option("--lr", min=0.0, help="Learning rate (sets optim.lr).")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (sets train.device).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (sets train.seed).")]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-steps",
        min=1,
        help="Stop after this many optimizer steps in total, with a checkpoint; continue later with --resume.",
    ),
]
SweepOutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Sweep folder: runs go to OUT/<recipe>/<key=value,...>/.")
]
GridOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--grid",
        "-g",
        metavar="KEY.PATH=V1,V2,...",
        help="Values to try for a recipe key (repeatable); replaces that key in each recipe's \\[sweep] grid.",
    ),
]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Runs trained at once.")]
DevicesOpt = Annotated[
    str | None,
    typer.Option(
        "--devices", help="GPUs for the jobs, round-robin (CUDA_VISIBLE_DEVICES values), e.g. 0,1,2,3."
    ),
]
PrintCommandsOpt = Annotated[
    bool,
    typer.Option(
        "--print-commands",
        metavar="",
        help="Print one `ftsgd train` line per run not finished yet, and train nothing.",
    ),
]
AllowChangedGridOpt = Annotated[
    bool,
    typer.Option(
        "--allow-changed-grid",
        metavar="",
        help="Accept a grid, --set, --recipe or --data other than the sweep.json in --out records.",
    ),
]
RetryFailedOpt = Annotated[
    bool, typer.Option("--retry-failed", metavar="", help="Train runs that failed in an earlier sweep again.")
]
SlurmOpt = Annotated[
    bool,
    typer.Option(
        "--slurm",
        metavar="",
        help="Submit the points not finished, queued or running as one Slurm job array (rerun: their states).",
    ),
]
SlurmOptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--slurm-opt",
        metavar="KEY=VALUE",
        help="An sbatch option for every task, e.g. partition=gpu, time=04:00:00 (repeatable).",
    ),
]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", metavar="", help="With --slurm: wait until no point is queued or running, then report."
    ),
]
GpusPerRunOpt = Annotated[
    int,
    typer.Option(
        "--gpus-per-run", min=1, help="With --slurm: run each point under torchrun with N processes."
    ),
]
SweepJsonOpt = Annotated[
    bool, typer.Option("--json", metavar="", help="Print sweep.json's content instead of tables.")
]
SweepPngOpt = Annotated[
    Path | None,
    typer.Option("--png", help="Write the report's learning-curve and ID-vs-OOD plots into this folder."),
]

# --------------------------------------------------------------------------- inspect

NumClassesOpt = Annotated[
    int | None, typer.Option("--num-classes", "-n", min=1, help="Classifier size of your task.")
]
InspectBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Images per forward/backward pass for the activation memory \\[default: the recipe's micro-batch].",
    ),
]
ImgSizeOpt = Annotated[
    int | None,
    typer.Option("--img-size", min=8, help="Input resolution (sets data.img_size) \\[default: the model's]."),
]
DiagnosticDataOpt = Annotated[
    Path | None,
    typer.Option("--data", "-d", help="Dataset folder: also run the gradient diagnostic on its train split."),
]
BatchesOpt = Annotated[
    int | None,
    typer.Option(
        "--batches", min=1, max=100_000, help="Training batches the diagnostic averages over (default 8)."
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        min=1,
        help="Also estimate the memory per GPU of a torchrun job of N processes, with DDP and with FSDP "
        "(train.shard).",
    ),
]
PngOpt = Annotated[
    Path | None,
    typer.Option("--png", metavar="DIR", help="Also plot the diagnostic's gradient norms into this folder."),
]

# --------------------------------------------------------------------------- eval, predict, export (shared)

RunWeightsArg = Annotated[Path, typer.Argument(help="A run directory or an exported model.safetensors.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object instead of tables.")]

# --------------------------------------------------------------------------- recipes

RecipeNameArg = Annotated[str, typer.Argument(help="Built-in recipe name or path to a TOML file.")]

# --------------------------------------------------------------------------- inspect

ModelArg = Annotated[str | None, typer.Argument(help="timm model name (or set model.name in the recipe).")]

# --------------------------------------------------------------------------- eval

EvalDataOpt = Annotated[
    Path, typer.Option("--data", "-d", help="Dataset folder holding the splits to evaluate.")
]
SplitOpt = Annotated[
    list[str] | None,
    typer.Option("--split", help="Split to evaluate (repeatable); default: every split."),
]
EvalBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Evaluation batch size.")]
EvalBadImageOpt = Annotated[
    str,
    typer.Option("--on-bad-image", help="error | skip: what to do with images that cannot be decoded."),
]
ConfusionPngOpt = Annotated[
    Path | None,
    typer.Option("--png", metavar="DIR", help="Write a confusion-matrix heatmap per split to DIR."),
]

# --------------------------------------------------------------------------- predict

PathsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="PATH...",
        help="Image files, folders (searched recursively) or - to read paths from stdin, one per line.",
    ),
]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes listed per image.")]
JsonLinesOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        metavar="",
        help="JSON Lines, one object per image (the default when stdout is not a terminal).",
    ),
]
CsvOpt = Annotated[bool, typer.Option("--csv", metavar="", help="CSV with a header row.")]
PredictBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
PredictBadImageOpt = Annotated[
    str,
    typer.Option(
        "--on-bad-image",
        help="error: an error record per unusable input and exit code 1 at the end | skip: leave them out, "
        "count them on stderr.",
    ),
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=-1, help="Threads decoding images (-1 = automatic, 0 = none).")
]

# --------------------------------------------------------------------------- export

OnnxOpt = Annotated[Path, typer.Option("--onnx", metavar="FILE", help="The ONNX file to write.")]
ExportDataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", "-d", metavar="DIR", help="Images to check the ONNX model on [default: random inputs]."
    ),
]

# --------------------------------------------------------------------------- demo

DemoOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Folder for the demo [default: runs/demo, with --compare runs/demo-compare]."
    ),
]
EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", min=1, help="Training epochs [default: 8] (not with --compare).")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", metavar="", help="Replace an existing demo run directory.")
]
CompareOpt = Annotated[
    bool,
    typer.Option(
        "--compare",
        metavar="",
        help="The paper's comparison in miniature: pre-train a tiny ViT (cached), fine-tune it with sgd, "
        "sgd-freeze-embed, adamw, lora and lora-sgd-freeze-embed over a small LR grid and 3 seeds, print the ID/OOD/memory table and "
        "the gradient diagnostic (a few minutes on a CPU).",
    ),
]
QuickOpt = Annotated[
    bool,
    typer.Option("--quick", metavar="", help="With --compare: a tiny configuration (seconds; shape only)."),
]
DemoAmpOpt = Annotated[
    str | None,
    typer.Option(
        "--amp",
        metavar="auto|none|bf16",
        help='With --compare: train.amp of the fine-tuning runs (default: the recipes\' own, "auto", i.e. fp32 '
        "on a CPU); bf16 measures autocast against fp32 on the same backbone.",
        show_default=False,
    ),
]

# --------------------------------------------------------------------------- report

ReportPathsArg = Annotated[
    list[Path], typer.Argument(help="Run directories, or folders holding them (searched recursively).")
]
ReportMetricOpt = Annotated[
    str,
    typer.Option(
        "--metric",
        metavar="METRIC",
        help="What the split columns show: accuracy, top5, macro_f1 or balanced_accuracy.",
    ),
]
ReportSelectByOpt = Annotated[
    str,
    typer.Option(
        "--select-by",
        metavar="SPLIT.METRIC",
        help="What picks each run's best epoch and each recipe's grid point, as train.select_by "
        "(default val.accuracy, the paper's; e.g. worst.accuracy, val.macro_f1).",
    ),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing",
        metavar="",
        help="Let grid points with fewer finished seeds than the others compete.",
    ),
]
ReportCsvOpt = Annotated[
    bool, typer.Option("--csv", metavar="", help="Print one table as CSV (see --table).")
]
MarkdownOpt = Annotated[bool, typer.Option("--markdown", metavar="", help="Print the tables as Markdown.")]
TableOpt = Annotated[
    str | None,
    typer.Option(
        "--table", help="selection | points | runs: only this table [default: all; CSV: selection]."
    ),
]
ReportPngOpt = Annotated[
    Path | None,
    typer.Option("--png", help="Write learning-curve and ID-vs-OOD plots (PNG) into this folder."),
]


def typed_shorthands(sets: list[str] | None, **values: Any) -> list[str]:
    """``--set`` values plus the typed shorthands everyone types (``--epochs 3`` is ``--set train.epochs=3``).

    Raises:
        UsageError: a shorthand and a ``--set`` give the same key (which one was meant is unclear).
    """
    out = list(sets or [])
    given = {s.partition("=")[0].strip() for s in out}
    flags = {"train.epochs": "--epochs", "train.batch_size": "--batch-size", "optim.lr": "--lr"}
    flags |= {"train.device": "--device", "train.seed": "--seed"}
    for key, value in values.items():
        if value is None:
            continue
        if key in given:
            raise UsageError(f"{flags[key]} and --set {key}=... both set {key}: give it once")
        out.append(f"{key}={json.dumps(value)}")
    return out


def recipe_overrides(sets: list[str] | None, **shorthands: Any) -> list[str]:
    """``--set`` values plus the shorthand flags, as ``key.path=value`` strings (shorthands win)."""
    out = list(sets or [])
    for key, value in shorthands.items():
        if value is not None:
            out.append(f"{key}={json.dumps(str(value))}")
    return out


def shorthands(epochs: Any, batch_size: Any, lr: Any, device: Any, seed: Any) -> dict[str, Any]:
    """``ftsgd train``'s shorthand flags by the recipe key each sets."""
    return {
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "optim.lr": lr,
        "train.device": device,
        "train.seed": seed,
    }
