"""The ``ftsgd`` command line: it declares the commands and their options, then delegates.

Each command imports its implementation (``ftsgd.cli.<command>``, ``ftsgd.sweep``, ``ftsgd.report``) when it
runs, so ``ftsgd --help``, ``--version`` and ``ftsgd report`` start without importing torch. The options
several commands share are in :mod:`ftsgd.cli.options`, the help layout in :mod:`ftsgd.cli.help`, and how
an error becomes an exit code in :mod:`ftsgd.cli.errors`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ftsgd import __version__
from ftsgd.cli.errors import user_errors
from ftsgd.cli.help import EXIT_CODES, HELP_OPTIONS, Command, Group
from ftsgd.cli.options import (
    AllowChangedGridOpt,
    AllowMissingOpt,
    AllowNewImagesOpt,
    BatchesOpt,
    BatchSizeOpt,
    CompareOpt,
    ConfusionPngOpt,
    CsvOpt,
    DemoAmpOpt,
    DemoOutOpt,
    DeviceOpt,
    DevicesOpt,
    DiagnosticDataOpt,
    EpochsOpt,
    EvalBadImageOpt,
    EvalBatchOpt,
    EvalDataOpt,
    ExportDataOpt,
    ForceOpt,
    GpusPerRunOpt,
    GridOpt,
    ImgSizeOpt,
    InspectBatchOpt,
    JobsOpt,
    JsonLinesOpt,
    JsonOpt,
    LrOpt,
    MarkdownOpt,
    MaxStepsOpt,
    ModelArg,
    ModelOpt,
    NprocOpt,
    NumClassesOpt,
    OnnxOpt,
    PathsArg,
    PngOpt,
    PredictBadImageOpt,
    PredictBatchOpt,
    PrintCommandsOpt,
    QuickOpt,
    QuietOpt,
    RecipeNameArg,
    RecipeOpt,
    ReportCsvOpt,
    ReportMetricOpt,
    ReportPathsArg,
    ReportPngOpt,
    ReportSelectByOpt,
    ResumeOpt,
    RetryFailedOpt,
    RunOutOpt,
    RunWeightsArg,
    SeedOpt,
    SetOpt,
    SlurmOpt,
    SlurmOptOpt,
    SplitOpt,
    SweepJsonOpt,
    SweepOutOpt,
    SweepPngOpt,
    SweepRecipesOpt,
    TableOpt,
    TopKOpt,
    TrainDataOpt,
    TrainRecipeOpt,
    WaitOpt,
    WeightsOpt,
    WorkersOpt,
    recipe_overrides,
    shorthands,
    typed_shorthands,
)
from ftsgd.errors import UsageError
from ftsgd.recipe.schema import DEFAULT_RECIPE
from ftsgd.utils import console

app = typer.Typer(
    name="ftsgd",
    cls=Group,
    context_settings=dict(HELP_OPTIONS),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog=EXIT_CODES,
)
recipes_app = typer.Typer(
    cls=Group, context_settings=dict(HELP_OPTIONS), invoke_without_command=True, epilog=EXIT_CODES
)
app.add_typer(recipes_app, name="recipes")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ftsgd {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[
    bool,
    typer.Option(
        "--version",
        callback=_version_callback,
        is_eager=True,
        metavar="",
        help="Show the version and exit.",
    ),
]


@app.callback()
def _root(version: VersionOpt = False) -> None:
    """Fine-tune pretrained vision models with SGD and a frozen embedding layer (Kumar et al., ICLR 2024).

    AdamW-level accuracy, in and out of distribution, at SGD's memory cost.

    Examples:

        ftsgd inspect vit_base_patch16_clip_224 --recipe sgd-freeze-embed

        ftsgd train --data ~/data/birds --out runs/birds --model convnext_tiny \\
            --weights convnext_tiny.safetensors

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

    with user_errors():
        recipes_list_command(as_json)


@recipes_app.command("show", cls=Command, epilog=EXIT_CODES)
def recipes_show(
    name: RecipeNameArg,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a recipe fully resolved (defaults, base recipe and --set overrides applied).

    Examples:

        ftsgd recipes show sgd-freeze-embed

        ftsgd recipes show my-recipe.toml --set optim.lr=3e-4 > resolved.toml
    """
    from ftsgd.cli.recipes import recipes_show_command

    with user_errors():
        recipes_show_command(name, recipe_overrides(sets), as_json)


@recipes_app.command("keys", cls=Command, epilog=EXIT_CODES)
def recipes_keys(as_json: JsonOpt = False) -> None:
    """Document every recipe key: type, default and meaning.

    Examples:

        ftsgd recipes keys
    """
    from ftsgd.cli.recipes import recipes_keys_command

    with user_errors():
        recipes_keys_command(as_json)


# --------------------------------------------------------------------------- inspect


@app.command(cls=Command, epilog=EXIT_CODES)
def inspect(
    model: ModelArg = None,
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

        ftsgd inspect convnext_base --recipe sgd-freeze-embed \\
            --set freeze.policy=embed+stage1

        ftsgd inspect resnet50 --weights resnet50.safetensors --num-classes 10 \\
            --json

        ftsgd inspect vit_large_patch16_224 --recipe sgd-freeze-embed-lowmem \\
            --batch-size 8

        ftsgd inspect convnext_tiny --weights convnext_tiny.safetensors \\
            --data ~/data/birds --png grads.png

        ftsgd inspect vit_giant_patch14_clip_224 --nproc 8
    """
    from ftsgd.cli.inspect import inspect_command, print_inspect

    with user_errors():
        if model and model_opt and model != model_opt:
            raise UsageError(f"two model names given ({model!r} and --model {model_opt!r}); pass one")
        shorthands = {"model.name": model or model_opt, "model.weights": weights}
        size = [f"data.img_size={img_size}"] if img_size is not None else []
        overrides = [*recipe_overrides(sets, **shorthands), *size]
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


@app.command(cls=Command, epilog=EXIT_CODES)
def train(
    data: TrainDataOpt,
    out: RunOutOpt,
    recipe: TrainRecipeOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    sets: SetOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_new_images: AllowNewImagesOpt = False,
    max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Fine-tune a model on an image-folder dataset and export the best weights.

    Examples:

        ftsgd train --data ~/data/birds --out runs/birds \\
            --model vit_base_patch16_clip_224 --weights clip_b16.safetensors

        ftsgd train --data ~/data/birds --out runs/birds-adamw --recipe adamw \\
            --model convnext_tiny --set optim.lr=3e-5

        ftsgd train --data ~/data/birds --out runs/birds --resume

        ftsgd train --data ~/data/birds --out runs/quick --model convnext_tiny \\
            --epochs 3 --lr 1e-3 --device cpu
    """
    from ftsgd.cli.train import train_command

    with user_errors():
        summary = train_command(
            data=data,
            out=out,
            recipe=recipe,
            overrides=recipe_overrides(
                typed_shorthands(sets, **shorthands(epochs, batch_size, lr, device, seed)),
                **{"model.name": model, "model.weights": weights},
            ),
            resume=resume,
            quiet=quiet or as_json,
            argv=sys.argv,
            max_steps=max_steps or 0,
            allow_new_images=allow_new_images,
        )
    if as_json:
        console.print_json(summary if summary is not None else {"finished": False})


@app.command("eval", cls=Command, epilog=EXIT_CODES)
def eval_(
    weights: RunWeightsArg,
    data: EvalDataOpt,
    split: SplitOpt = None,
    batch_size: EvalBatchOpt = 64,
    device: DeviceOpt = "auto",
    on_bad_image: EvalBadImageOpt = "error",
    as_json: JsonOpt = False,
    as_csv: CsvOpt = False,
    png: ConfusionPngOpt = None,
) -> None:
    """Evaluate exported weights on image-folder splits: top-1/top-5, loss, macro-F1, balanced accuracy,
    per-class precision/recall/F1, confusion matrix.

    Examples:

        ftsgd eval runs/birds --data ~/data/birds

        ftsgd eval runs/birds/model.safetensors --data ~/data/birds --split val \\
            --split ood --json

        ftsgd eval runs/birds --data ~/data/birds --png runs/birds/plots

        ftsgd eval runs/birds --data ~/data/birds --csv > per-class.csv
    """
    from ftsgd.cli.evaluate import confusion_png_path, eval_command, eval_csv, print_eval_results

    with user_errors():
        if as_json and as_csv:
            raise UsageError("--json and --csv exclude each other; pick one")
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
    if as_csv:
        sys.stdout.write(eval_csv(results))
        return
    print_eval_results(results)
    for name, r in results.items() if png is not None else []:
        if "confusion" in r:
            console.info(f"heatmap: {confusion_png_path(png, name)}")


@app.command(cls=Command, epilog=EXIT_CODES)
def predict(
    weights: RunWeightsArg,
    paths: PathsArg,
    top_k: TopKOpt = 5,
    as_json: JsonLinesOpt = False,
    as_csv: CsvOpt = False,
    batch_size: PredictBatchOpt = 64,
    device: DeviceOpt = "auto",
    on_bad_image: PredictBadImageOpt = "error",
    workers: WorkersOpt = -1,
) -> None:
    """Classify image files, folders or paths from stdin, writing one result per image as it is known.

    Each result has the path, the predicted class, its probability and the top-k classes; an input that
    cannot be read gets an error record. Preprocessing and predictions are those of ftsgd eval.

    Examples:

        ftsgd predict runs/birds new_photos/ > predictions.jsonl

        find incoming/ -name '*.jpg' -newer last_run \\

            | ftsgd predict runs/birds - --top-k 3

        ftsgd predict runs/birds photo1.jpg photo2.png --csv
    """
    from ftsgd.cli.predict import predict_command

    with user_errors():  # also: `| head` closing stdout ends it quietly with 141
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


@app.command(cls=Command, epilog=EXIT_CODES)
def export(
    weights: RunWeightsArg,
    onnx: OnnxOpt,
    data: ExportDataOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a fine-tuned model to ONNX (dynamic batch), checked with onnxruntime against PyTorch.

    Needs the optional packages: pip install 'ftsgd[onnx]'.

    Examples:

        ftsgd export runs/birds --onnx runs/birds/model.onnx

        ftsgd export runs/birds --onnx birds.onnx --data ~/data/birds/val --json
    """
    from ftsgd.cli.export import export_command, print_export

    with user_errors():
        report = export_command(weights, onnx=onnx, data=data)
    if as_json:
        console.print_json(report)
    else:
        print_export(report)


@app.command(cls=Command, epilog=EXIT_CODES)
def demo(
    out: DemoOutOpt = None,
    epochs: EpochsOpt = None,
    force: ForceOpt = False,
    compare: CompareOpt = False,
    quick: QuickOpt = False,
    amp: DemoAmpOpt = None,
) -> None:
    """Fine-tune a tiny ViT on a generated dataset with train/, val/ and a shifted ood/ split.

    Everything runs offline on the CPU: it shows the whole pipeline (embedding detection, freezing,
    training, ID/OOD evaluation, safetensors export) on real files in well under a minute. With
    --compare it runs the paper's comparison of sgd, sgd-freeze-embed and adamw, with LoRA (lora,
    lora-sgd-freeze-embed) beside them, instead (the pre-trained backbone is cached in $XDG_CACHE_HOME/ftsgd, default ~/.cache/ftsgd).

    Examples:

        ftsgd demo

        ftsgd demo --out /tmp/demo --epochs 2 --force

        ftsgd demo --compare

        ftsgd demo --compare --amp bf16 --out runs/demo-compare-bf16
    """
    from ftsgd.cli.demo import demo_command

    with user_errors():
        demo_command(
            out=out, epochs=epochs, force=force, argv=sys.argv, compare=compare, quick=quick, amp=amp
        )


@app.command(cls=Command, epilog=EXIT_CODES)
def report(
    paths: ReportPathsArg,
    allow_missing: AllowMissingOpt = False,
    as_json: JsonOpt = False,
    as_csv: ReportCsvOpt = False,
    as_markdown: MarkdownOpt = False,
    table: TableOpt = None,
    png: ReportPngOpt = None,
    metric: ReportMetricOpt = "accuracy",
    select_by: ReportSelectByOpt = "val.accuracy",
) -> None:
    """Compare runs: per recipe, the grid point with the best mean ID-val accuracy over seeds (the paper's protocol).

    Runs that differ only in train.seed are averaged; every other recipe key that differs between runs
    of a recipe is a grid key. Unfinished and unreadable runs are listed, never dropped silently.

    Examples:

        ftsgd report runs/

        ftsgd report runs/sgd-* runs/adamw-* --markdown --png plots/

        ftsgd report runs/ --csv --table runs > runs.csv

        ftsgd report runs/ --select-by worst.accuracy --metric macro_f1
    """
    from ftsgd.report.tables import output_format, run_report

    with user_errors():
        fmt = output_format(as_json=as_json, as_csv=as_csv, as_markdown=as_markdown)
        run_report(
            paths,
            allow_missing=allow_missing,
            fmt=fmt,
            table=table,
            png=png,
            metric=metric,
            select_by=select_by,
        )


@app.command(cls=Command, epilog=EXIT_CODES)
def sweep(
    data: TrainDataOpt,
    out: SweepOutOpt,
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
    metric: ReportMetricOpt = "accuracy",
    select_by: ReportSelectByOpt = "val.accuracy",
    slurm: SlurmOpt = False,
    slurm_opts: SlurmOptOpt = None,
    wait: WaitOpt = False,
    gpus_per_run: GpusPerRunOpt = 1,
) -> None:
    """Train a grid of runs per recipe and select per the paper: best mean ID-val accuracy over seeds.

    Each grid point is an ordinary run directory trained by `ftsgd train ... --resume`; rerunning the same
    command skips finished runs and continues interrupted ones. Built-in recipes carry the paper's
    learning-rate grid for their optimizer and seeds 0, 1, 2.

    Examples:

        ftsgd sweep --data ~/data/birds --out sweeps/birds \\
            --recipe sgd-freeze-embed --recipe adamw \\
            --model vit_base_patch16_clip_224 \\
            --weights clip_b16.safetensors

        ftsgd sweep --data ~/data/birds --out sweeps/quick --model convnext_tiny \\
            --grid optim.lr=1e-3,3e-3 --grid train.seed=0,1 --jobs 2

        ftsgd sweep --data ~/data/birds --out sweeps/birds --model resnet50 \\
            --print-commands > runs.txt

        ftsgd sweep --data ~/data/birds --out sweeps/birds --slurm \\
            --slurm-opt partition=gpu --slurm-opt gres=gpu:1 \\
            --slurm-opt time=04:00:00 --wait
    """
    args = dict(locals())  # every parameter above, by its SweepOptions name (before any import adds one)
    from ftsgd.cli.sweep import sweep_options
    from ftsgd.sweep.command import sweep_command

    with user_errors():
        sweep_command(sweep_options(args, sys.argv))
