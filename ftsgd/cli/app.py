"""The ``ftsgd`` command line. It only parses arguments and delegates to :mod:`ftsgd.commands`.

Commands import their implementation when they run, so ``ftsgd --help`` and ``--version`` start without
importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from ftsgd import __version__
from ftsgd.errors import FtsgdError, Interrupted, UsageError
from ftsgd.recipe.schema import DEFAULT_RECIPE
from ftsgd.utils import console

EXIT_CODES = (
    "Exit codes: 0 done; 1 the run failed; 2 bad usage, recipe, data or weights (nothing was started); "
    "130/143 interrupted by SIGINT/SIGTERM (checkpoint saved); 141 the reader of the output went away."
)


class _ValuelessHelp:
    """Lists the ``-h`` flag without a value type, like every other flag (mixed into commands and groups)."""

    def get_help_option(self, ctx: typer.Context) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_ValuelessHelp, typer.core.TyperCommand):
    """A command whose ``-h`` flag is listed without a value type."""


class _Group(_ValuelessHelp, typer.core.TyperGroup):
    """A command group whose ``-h`` flag is listed without a value type."""


app = typer.Typer(
    name="ftsgd",
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog=EXIT_CODES,
)
recipes_app = typer.Typer(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
    epilog=EXIT_CODES,
)
app.add_typer(recipes_app, name="recipes")


RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a TOML recipe.")
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
    typer.Option("--batches", min=1, help="Training batches the diagnostic averages over (default 8)."),
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
    Path | None, typer.Option("--png", help="Also plot the diagnostic's gradient norms to this PNG file.")
]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object instead of tables.")]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn :class:`FtsgdError` into a one-paragraph message and its exit code (no traceback).

    ``FTSGD_DEBUG=1`` lets the exception through so the traceback is shown.
    """
    try:
        yield
    except FtsgdError as exc:
        if os.environ.get("FTSGD_DEBUG") == "1":
            raise
        if not (isinstance(exc, Interrupted) and console.secondary_rank()):  # rank 0 says how to resume
            console.error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except BrokenPipeError:
        # `ftsgd ... | head`: the reader is gone. Stop quietly with the status a process killed by SIGPIPE
        # has (as `cat` would), and keep Python from complaining about the unflushed stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None


def _overrides(sets: list[str] | None, **shorthands: Any) -> list[str]:
    """``--set`` values plus the shorthand flags, as ``key.path=value`` strings (shorthands win)."""
    out = list(sets or [])
    for key, value in shorthands.items():
        if value is not None:
            out.append(f"{key}={json.dumps(str(value))}")
    return out


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ftsgd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            metavar="",
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """Fine-tune pretrained vision models with SGD and a frozen embedding layer (Kumar et al., ICLR 2024).

    AdamW-level accuracy, in and out of distribution, at SGD's memory cost.

    Examples:

        ftsgd inspect vit_base_patch16_clip_224 --recipe sgd-freeze-embed

        ftsgd train --data ~/data/birds --out runs/birds --model convnext_tiny --weights convnext_tiny.safetensors

        ftsgd eval runs/birds --data ~/data/birds --split ood
    """


# --------------------------------------------------------------------------- recipes


@recipes_app.callback()
def recipes_list(
    ctx: typer.Context,
    as_json: JsonOpt = False,
) -> None:
    """List, show and document recipes; alone, list the built-in ones (usable by name with --recipe).

    Examples:

        ftsgd recipes

        ftsgd recipes show sgd-freeze-embed

        ftsgd recipes keys
    """
    if ctx.invoked_subcommand is not None:
        return
    from ftsgd.cli.recipes import recipes_list_command

    with _user_errors():
        recipes_list_command(as_json)


@recipes_app.command("show", cls=_Command, epilog=EXIT_CODES)
def recipes_show(
    name: Annotated[str, typer.Argument(help="Built-in recipe name or path to a TOML file.")],
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a recipe fully resolved (defaults, base recipe and --set overrides applied).

    Examples:

        ftsgd recipes show sgd-freeze-embed

        ftsgd recipes show my-recipe.toml --set optim.lr=3e-4 > resolved.toml
    """
    from ftsgd.cli.recipes import recipes_show_command

    with _user_errors():
        recipes_show_command(name, _overrides(sets), as_json)


@recipes_app.command("keys", cls=_Command, epilog=EXIT_CODES)
def recipes_keys(as_json: JsonOpt = False) -> None:
    """Document every recipe key: type, default and meaning.

    Examples:

        ftsgd recipes keys
    """
    from ftsgd.cli.recipes import recipes_keys_command

    with _user_errors():
        recipes_keys_command(as_json)


# --------------------------------------------------------------------------- inspect


@app.command(cls=_Command, epilog=EXIT_CODES)
def inspect(
    model: Annotated[
        str | None, typer.Argument(help="timm model name (or set model.name in the recipe).")
    ] = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    model_opt: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    sets: SetOpt = None,
    batch_size: InspectBatchOpt = None,
    img_size: ImgSizeOpt = None,
    data: DiagnosticDataOpt = None,
    batches: BatchesOpt = None,
    png: PngOpt = None,
    nproc: NprocOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show how the embedding layer was found, what the recipe freezes and the memory it saves.

    With --data, also the paper's gradient diagnostic: per-layer gradient norms at the given weights
    on the first training batches, and whether to freeze the embedding.

    The memory estimate includes activations, measured on real training-mode forward passes
    (batches up to 2 directly, larger ones from batch 1 and 2 extrapolated linearly).

    Examples:

        ftsgd inspect vit_base_patch16_clip_224

        ftsgd inspect convnext_base --recipe sgd-freeze-embed --set freeze.policy=embed+stage1

        ftsgd inspect resnet50 --weights resnet50.safetensors --num-classes 10 --json

        ftsgd inspect vit_large_patch16_224 --recipe sgd-freeze-embed-lowmem --batch-size 8

        ftsgd inspect convnext_tiny --weights convnext_tiny.safetensors --data ~/data/birds --png grads.png

        ftsgd inspect vit_giant_patch14_clip_224 --nproc 8
    """
    from ftsgd.cli.inspect import inspect_command, print_inspect

    with _user_errors():
        if model and model_opt and model != model_opt:
            raise UsageError(f"two model names given ({model!r} and --model {model_opt!r}); pass one")
        shorthands = {"model.name": model or model_opt, "model.weights": weights}
        size = [f"data.img_size={img_size}"] if img_size is not None else []
        overrides = [*_overrides(sets, **shorthands), *size]
        report, diagnostic = inspect_command(
            recipe,
            overrides,
            num_classes=num_classes,
            batch_size=batch_size,
            data=data,
            batches=batches,
            png=png,
            nproc=nproc,
        )
    if as_json:
        console.print_json(report)
    else:
        print_inspect(report, diagnostic)


# --------------------------------------------------------------------------- train / eval / demo


@app.command(cls=_Command, epilog=EXIT_CODES)
def train(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder with train/ and val/ (and more splits).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (or --resume).")],
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe", "-r", help=f"Built-in recipe name or TOML path \\[default: {DEFAULT_RECIPE}]."
        ),
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    sets: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            metavar="",
            help="Continue the run in --out, or start it if it is missing or never reached a checkpoint; a "
            "finished run only prints its results. Safe to repeat with the same command line.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", metavar="", help="Print nothing but warnings and errors.")
    ] = False,
    allow_new_images: Annotated[
        bool,
        typer.Option(
            "--allow-new-images",
            metavar="",
            help="With --resume: accept a dataset that only gained images since the run started.",
        ),
    ] = False,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps",
            min=1,
            help="Stop after this many optimizer steps in total, with a checkpoint; continue later with --resume.",
        ),
    ] = None,
) -> None:
    """Fine-tune a model on an image-folder dataset and export the best weights.

    Examples:

        ftsgd train --data ~/data/birds --out runs/birds --model vit_base_patch16_clip_224 --weights clip_b16.safetensors

        ftsgd train --data ~/data/birds --out runs/birds-adamw --recipe adamw --model convnext_tiny --set optim.lr=3e-5

        ftsgd train --data ~/data/birds --out runs/birds --resume
    """
    from ftsgd.cli.train import train_command

    with _user_errors():
        summary = train_command(
            data=data,
            out=out,
            recipe=recipe,
            overrides=_overrides(sets, **{"model.name": model, "model.weights": weights}),
            resume=resume,
            quiet=quiet or as_json,
            argv=sys.argv,
            max_steps=max_steps or 0,
            allow_new_images=allow_new_images,
        )
    if as_json:
        console.print_json(summary if summary is not None else {"finished": False})


@app.command("eval", cls=_Command, epilog=EXIT_CODES)
def eval_(
    weights: Annotated[Path, typer.Argument(help="A run directory or an exported model.safetensors.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder holding the splits to evaluate.")
    ],
    split: Annotated[
        list[str] | None,
        typer.Option("--split", help="Split to evaluate (repeatable); default: every split."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Evaluation batch size.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    on_bad_image: Annotated[
        str,
        typer.Option("--on-bad-image", help="error | skip: what to do with images that cannot be decoded."),
    ] = "error",
    as_json: JsonOpt = False,
    png: Annotated[
        Path | None,
        typer.Option("--png", metavar="DIR", help="Write a confusion-matrix heatmap per split to DIR."),
    ] = None,
) -> None:
    """Evaluate exported weights on image-folder splits: top-1/top-5, loss, per-class accuracy, confusion matrix.

    Examples:

        ftsgd eval runs/birds --data ~/data/birds

        ftsgd eval runs/birds/model.safetensors --data ~/data/birds --split val --split ood --json

        ftsgd eval runs/birds --data ~/data/birds --png runs/birds/plots
    """
    from ftsgd.cli.evaluate import confusion_png_path, eval_command, print_eval_results

    with _user_errors():
        results = eval_command(
            weights,
            data,
            splits=list(split or []),
            batch_size=batch_size,
            device=device,
            on_bad_image=on_bad_image,
            png_dir=png,
        )
    if as_json:
        console.print_json(results)
        return
    print_eval_results(results)
    for name, r in results.items() if png is not None else []:
        if "confusion" in r:
            console.info(f"heatmap: {confusion_png_path(png, name)}")


@app.command(cls=_Command, epilog=EXIT_CODES)
def predict(
    weights: Annotated[Path, typer.Argument(help="A run directory or an exported model.safetensors.")],
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH...",
            help="Image files, folders (searched recursively) or - to read paths from stdin, one per line.",
        ),
    ],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes listed per image.")] = 5,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            metavar="",
            help="JSON Lines, one object per image (the default when stdout is not a terminal).",
        ),
    ] = False,
    as_csv: Annotated[bool, typer.Option("--csv", metavar="", help="CSV with a header row.")] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
    ] = 64,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    on_bad_image: Annotated[
        str,
        typer.Option(
            "--on-bad-image",
            help="error: an error record per unusable input and exit code 1 at the end | skip: leave them out, "
            "count them on stderr.",
        ),
    ] = "error",
    workers: Annotated[
        int, typer.Option("--workers", min=-1, help="Threads decoding images (-1 = automatic, 0 = none).")
    ] = -1,
) -> None:
    """Classify image files, folders or paths from stdin, writing one result per image as it is known.

    Each result has the path, the predicted class, its probability and the top-k classes; an input that
    cannot be read gets an error record. Preprocessing and predictions are those of ftsgd eval.

    Examples:

        ftsgd predict runs/birds new_photos/ > predictions.jsonl

        find incoming/ -name '*.jpg' -newer last_run | ftsgd predict runs/birds - --top-k 3

        ftsgd predict runs/birds photo1.jpg photo2.png --csv
    """
    from ftsgd.cli.predict import predict_command

    with _user_errors():  # also: `| head` closing stdout ends it quietly with 141
        if as_json and as_csv:
            raise UsageError("--json and --csv exclude each other; pick one")
        predict_command(
            weights,
            paths,
            top_k=top_k,
            output="jsonl" if as_json else "csv" if as_csv else None,
            batch_size=batch_size,
            device=device,
            on_bad_image=on_bad_image,
            workers=workers,
        )


@app.command(cls=_Command, epilog=EXIT_CODES)
def export(
    weights: Annotated[Path, typer.Argument(help="A run directory or an exported model.safetensors.")],
    onnx: Annotated[Path, typer.Option("--onnx", metavar="FILE", help="The ONNX file to write.")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", "-d", metavar="DIR", help="Images to check the ONNX model on [default: random inputs]."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a fine-tuned model to ONNX (dynamic batch), checked with onnxruntime against PyTorch.

    Needs the optional packages: pip install 'ftsgd[onnx]'.

    Examples:

        ftsgd export runs/birds --onnx runs/birds/model.onnx

        ftsgd export runs/birds --onnx birds.onnx --data ~/data/birds/val --json
    """
    from ftsgd.cli.export import export_command, print_export

    with _user_errors():
        report = export_command(weights, onnx=onnx, data=data)
    if as_json:
        console.print_json(report)
    else:
        print_export(report)


@app.command(cls=_Command, epilog=EXIT_CODES)
def demo(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for the demo [default: runs/demo, with --compare runs/demo-compare]."
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Training epochs [default: 8] (not with --compare).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="Replace an existing demo run directory.")
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            metavar="",
            help="The paper's comparison in miniature: pre-train a tiny ViT (cached), fine-tune it with sgd, "
            "sgd-freeze-embed and adamw over a small LR grid and 3 seeds, print the ID/OOD/memory table and "
            "the gradient diagnostic (a few minutes on a CPU).",
        ),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", metavar="", help="With --compare: a tiny configuration (seconds; shape only)."
        ),
    ] = False,
) -> None:
    """Fine-tune a tiny ViT on a generated dataset with train/, val/ and a shifted ood/ split.

    Everything runs offline on the CPU: it shows the whole pipeline (embedding detection, freezing,
    training, ID/OOD evaluation, safetensors export) on real files in well under a minute. With
    --compare it runs the paper's comparison of sgd, sgd-freeze-embed and adamw instead (the pre-trained
    backbone is cached in $XDG_CACHE_HOME/ftsgd, default ~/.cache/ftsgd).

    Examples:

        ftsgd demo

        ftsgd demo --out /tmp/demo --epochs 2 --force

        ftsgd demo --compare
    """
    from ftsgd.cli.demo import demo_command

    with _user_errors():
        demo_command(out=out, epochs=epochs, force=force, argv=sys.argv, compare=compare, quick=quick)


@app.command(cls=_Command, epilog=EXIT_CODES)
def report(
    paths: Annotated[
        list[Path], typer.Argument(help="Run directories, or folders holding them (searched recursively).")
    ],
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            metavar="",
            help="Let grid points with fewer finished seeds than the others compete.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", metavar="", help="Print one table as CSV (see --table).")
    ] = False,
    as_markdown: Annotated[
        bool, typer.Option("--markdown", metavar="", help="Print the tables as Markdown.")
    ] = False,
    table: Annotated[
        str | None,
        typer.Option(
            "--table", help="selection | points | runs: only this table [default: all; CSV: selection]."
        ),
    ] = None,
    png: Annotated[
        Path | None,
        typer.Option("--png", help="Write learning-curve and ID-vs-OOD plots (PNG) into this folder."),
    ] = None,
) -> None:
    """Compare runs: per recipe, the grid point with the best mean ID-val accuracy over seeds (the paper's protocol).

    Runs that differ only in train.seed are averaged; every other recipe key that differs between runs
    of a recipe is a grid key. Unfinished and unreadable runs are listed, never dropped silently.

    Examples:

        ftsgd report runs/

        ftsgd report runs/sgd-* runs/adamw-* --markdown --png plots/

        ftsgd report runs/ --csv --table runs > runs.csv
    """
    from ftsgd.report.tables import output_format, run_report

    with _user_errors():
        fmt = output_format(as_json=as_json, as_csv=as_csv, as_markdown=as_markdown)
        run_report(paths, allow_missing=allow_missing, fmt=fmt, table=table, png=png)


SweepRecipesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--recipe",
        "-r",
        metavar="NAME_OR_PATH",
        help=f"Built-in recipe name or TOML path (repeatable) \\[default: {DEFAULT_RECIPE}].",
    ),
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
SweepJsonOpt = Annotated[
    bool, typer.Option("--json", metavar="", help="Print sweep.json's content instead of tables.")
]
SweepPngOpt = Annotated[
    Path | None,
    typer.Option("--png", help="Write the report's learning-curve and ID-vs-OOD plots into this folder."),
]


@app.command(cls=_Command, epilog=EXIT_CODES)
def sweep(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder with train/ and val/ (and more splits).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Sweep folder: runs go to OUT/<recipe>/<key=value,...>/.")
    ],
    recipes: SweepRecipesOpt = None,
    grids: GridOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    sets: SetOpt = None,
    jobs: JobsOpt = 1,
    devices: DevicesOpt = None,
    print_commands: PrintCommandsOpt = False,
    allow_changed_grid: AllowChangedGridOpt = False,
    retry_failed: RetryFailedOpt = False,
    as_json: SweepJsonOpt = False,
    png: SweepPngOpt = None,
) -> None:
    """Train a grid of runs per recipe and select per the paper: best mean ID-val accuracy over seeds.

    Each grid point is an ordinary run directory trained by `ftsgd train ... --resume`; rerunning the same
    command skips finished runs and continues interrupted ones. Built-in recipes carry the paper's
    learning-rate grid for their optimizer and seeds 0, 1, 2.

    Examples:

        ftsgd sweep --data ~/data/birds --out sweeps/birds --recipe sgd-freeze-embed --recipe adamw --model vit_base_patch16_clip_224 --weights clip_b16.safetensors

        ftsgd sweep --data ~/data/birds --out sweeps/quick --model convnext_tiny --grid optim.lr=1e-3,3e-3 --grid train.seed=0,1 --jobs 2

        ftsgd sweep --data ~/data/birds --out sweeps/birds --model resnet50 --print-commands > runs.txt
    """
    from ftsgd.sweep.command import sweep_command
    from ftsgd.sweep.plan import SweepOptions

    with _user_errors():
        sweep_command(
            SweepOptions(
                data=data,
                out=out,
                recipes=list(recipes or []),
                grids=list(grids or []),
                sets=list(sets or []),
                model=model,
                weights=weights,
                jobs=jobs,
                devices=devices,
                print_commands=print_commands,
                allow_changed_grid=allow_changed_grid,
                retry_failed=retry_failed,
                as_json=as_json,
                png=png,
                argv=sys.argv,
            )
        )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
