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

from ftsgd import __version__, console
from ftsgd.errors import FtsgdError, Interrupted, UsageError
from ftsgd.recipe import DEFAULT_RECIPE

app = typer.Typer(
    name="ftsgd",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
recipes_app = typer.Typer(
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


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
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
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
    from ftsgd.commands import recipes_list_command

    with _user_errors():
        recipes_list_command(as_json)


@recipes_app.command("show")
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
    from ftsgd.commands import recipes_show_command

    with _user_errors():
        recipes_show_command(name, _overrides(sets), as_json)


@recipes_app.command("keys")
def recipes_keys(as_json: JsonOpt = False) -> None:
    """Document every recipe key: type, default and meaning.

    Examples:

        ftsgd recipes keys
    """
    from ftsgd.commands import recipes_keys_command

    with _user_errors():
        recipes_keys_command(as_json)


# --------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    model: Annotated[
        str | None, typer.Argument(help="timm model name (or set model.name in the recipe).")
    ] = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    model_opt: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", "-n", min=1, help="Classifier size of your task.")
    ] = None,
    sets: SetOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Images per forward/backward pass for the activation memory [default: the recipe's "
            "micro-batch].",
        ),
    ] = None,
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size", min=8, help="Input resolution (sets data.img_size) [default: the model's]."
        ),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="Also estimate the memory per GPU of a torchrun job of N processes, with DDP and with FSDP "
            "(train.shard).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show how the embedding layer was found, what the recipe freezes and the memory it saves.

    The memory estimate includes activations, measured on real training-mode forward passes
    (batches up to 2 directly, larger ones from batch 1 and 2 extrapolated linearly).

    Examples:

        ftsgd inspect vit_base_patch16_clip_224

        ftsgd inspect convnext_base --recipe sgd-freeze-embed --set freeze.policy=embed+stage1

        ftsgd inspect resnet50 --weights resnet50.safetensors --num-classes 10 --json

        ftsgd inspect vit_large_patch16_224 --recipe sgd-freeze-embed-lowmem --batch-size 8

        ftsgd inspect vit_giant_patch14_clip_224 --nproc 8
    """
    from ftsgd.commands import inspect_command, print_inspect

    with _user_errors():
        if model and model_opt and model != model_opt:
            raise UsageError(f"two model names given ({model!r} and --model {model_opt!r}); pass one")
        shorthands = {"model.name": model or model_opt, "model.weights": weights}
        size = [f"data.img_size={img_size}"] if img_size is not None else []
        overrides = [*_overrides(sets, **shorthands), *size]
        report = inspect_command(
            recipe, overrides, num_classes=num_classes, batch_size=batch_size, nproc=nproc
        )
    if as_json:
        console.print_json(report)
    else:
        print_inspect(report)


# --------------------------------------------------------------------------- train / eval / demo


@app.command()
def train(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Dataset folder with train/ and val/ (and more splits).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (or --resume).")],
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe", "-r", help=f"Built-in recipe name or TOML path [default: {DEFAULT_RECIPE}]."
        ),
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    sets: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final results.")] = False,
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
    from ftsgd.commands import train_command

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
        )
    if as_json:
        console.print_json(summary if summary is not None else {"finished": False})


@app.command("eval")
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
) -> None:
    """Evaluate exported weights on image-folder splits: top-1/top-5, loss and per-class accuracy.

    Examples:

        ftsgd eval runs/birds --data ~/data/birds

        ftsgd eval runs/birds/model.safetensors --data ~/data/birds --split val --split ood --json
    """
    from ftsgd.commands import eval_command, print_eval_results

    with _user_errors():
        results = eval_command(
            weights,
            data,
            splits=list(split or []),
            batch_size=batch_size,
            device=device,
            on_bad_image=on_bad_image,
        )
    if as_json:
        console.print_json(results)
    else:
        print_eval_results(results)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory for the demo.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 8,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing demo run directory.")] = False,
) -> None:
    """Fine-tune a tiny ViT on a generated dataset with train/, val/ and a shifted ood/ split.

    Everything runs offline on the CPU in a few minutes: it shows the whole pipeline (embedding
    detection, freezing, training, ID/OOD evaluation, safetensors export) on real files.

    Examples:

        ftsgd demo

        ftsgd demo --out /tmp/demo --epochs 2 --force
    """
    from ftsgd.commands import demo_command

    with _user_errors():
        demo_command(out=out, epochs=epochs, force=force, argv=sys.argv)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
