"""Every refusal of a recipe, in one module, in the order a run meets them.

Each check runs as soon as what it needs exists, so a mistake costs seconds, not the minutes of
decoding images or building a model that would come after it. Each raises one
:class:`~ftsgd.errors.RecipeError` (exit 2, every problem at once, each naming its key) unless noted:

1. Loading the recipe, :func:`load_checked_recipe`: the recipe's own checks (:mod:`ftsgd.recipe.checks`:
   types, ranges, conflicting keys; no torch, no disk) with :func:`environment_problems` (the model and
   optimizer names in this timm, optional packages, the weights file and dataset folders on disk).
2. ``Trainer(...)``: :func:`check_model_named` (a :class:`~ftsgd.errors.ModelError`).
3. Before joining a torchrun job: :func:`check_job`, before any process group exists.
4. Once the device is known: :func:`check_device`, what its precision or FSDP cannot do.
5. Once the data's splits are found: :func:`check_evaluated`, the split ``train.select_by`` names.
6. Once the model is built: :func:`check_stages`, every ``[[stage]]``'s freeze and optimizer groups,
   and in a job :func:`check_parallel_model` (a :class:`~ftsgd.errors.ModelError`).

What a command may do with a run directory (start it, resume it, start it over, on which data) is the
run's policy, not the recipe's: :mod:`ftsgd.run.resume`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ftsgd.data.split import is_one_folder
from ftsgd.data.transforms import timm_auto_augment
from ftsgd.errors import DataError, ModelError, RecipeError, WeightsError
from ftsgd.model.build import classifier_modules, unknown_model_error
from ftsgd.model.optim import moment_arg_problems, optimizer_names, optimizer_package, param_groups
from ftsgd.model.prepare import PreparedModel, refreeze
from ftsgd.model.weights import resolve_weights_path
from ftsgd.recipe.checks import select_metric
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import AGGREGATE_SPLITS, STAGE_KEY, DataConfig, Recipe, stage_recipes

__all__ = [
    "check_device",
    "check_evaluated",
    "check_job",
    "check_model_named",
    "check_parallel_model",
    "check_stages",
    "environment_problems",
    "load_checked_recipe",
]


# ---------------------------------------------------------------------------------------- loading


def load_checked_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """:func:`ftsgd.recipe.load_recipe` plus :func:`environment_problems`, all reported at once.

    Raises:
        RecipeError: listing every problem found, each naming its key path.
    """
    return load_recipe(name_or_path, overrides, extra_checks=environment_problems)


def environment_problems(recipe: Recipe) -> list[str]:
    """Problems with the model name, the optimizer name, the weights file and the dataset folders."""
    problems: list[str] = []
    m = recipe.model
    if m.weights and not Path(m.weights).expanduser().exists():
        problems.append(f"model.weights: file not found: {m.weights}")
    elif m.weights:
        try:
            path = resolve_weights_path(m.weights)  # a folder must hold a weights file
        except WeightsError as exc:
            problems.append(f"model.weights: {exc}")
        else:
            if not os.access(path, os.R_OK):
                problems.append(f"model.weights: {path} is not readable (permission denied)")
    name = m.name.strip()
    if name and not name.startswith(("hf-hub:", "local-dir:")):
        import timm

        if not timm.is_model(name):
            problems.append(f"model.name: {unknown_model_error(name)}")
        else:
            problems.extend(_input_size_problems(recipe))
    problems.extend(_optimizer_problems(recipe))
    problems.extend(_data_path_problems(recipe.data))
    problems.extend(_missing_packages(recipe))
    problems.extend(_auto_augment_problems(recipe.data))
    return problems


def _input_size_problems(recipe: Recipe) -> list[str]:
    """``data.img_size`` the model cannot take (a ViT built for 224 px fed 40 px), found before the data scan.

    The model is built on the ``meta`` device (no memory, no weights) and run on a ``meta`` input of the
    recipe's size, so only the shape checks of its forward pass run. Errors that do not speak of sizes or
    shapes are left to the real run, where they say more.
    """
    size = recipe.data.img_size
    if not size:
        return []
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(recipe.model.name, pretrained=False, **recipe.model.kwargs)
            model.eval()(torch.empty(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as exc:
        text = str(exc)
        if any(word in text.lower() for word in ("size", "shape", "divisible", "match")):
            return [
                f"data.img_size: {recipe.model.name} cannot take {size}x{size} px input ({text.strip()}); "
                "pick a size the model takes (0 = the model's own; a ViT needs a multiple of its patch size "
                "and is built for one size: set model.kwargs = {img_size = N} to the same N)"
            ]
    except Exception:  # anything else is for the real run to report
        return []
    return []


def _optimizer_problems(recipe: Recipe) -> list[str]:
    """``optim.name`` values (the recipe's and each stage's) that neither torch nor timm knows, and
    ``optim.betas``/``optim.eps`` that the named optimizer would ignore."""
    known = optimizer_names()
    named = [("optim", recipe.optim)]
    named += [(f"{STAGE_KEY}.{n}.optim", s.optim) for n, s in enumerate(recipe.stages, 1)]
    out = []
    for key, cfg in named:
        if key != "optim" and cfg == recipe.optim:
            continue  # the recipe's own optimizer, reported once as optim.*
        if cfg.name.lower() in known:
            prefix = key.removesuffix("optim")
            out += [prefix + problem for problem in moment_arg_problems(cfg)]
            continue
        close = difflib.get_close_matches(cfg.name.lower(), known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        out.append(
            f"{key}.name: unknown optimizer {cfg.name!r}; {hint}(sgd, adamw, or a timm optimizer name)"
        )
    return out


_PACKAGE_HINTS = {
    "bitsandbytes": "pip install bitsandbytes",
    "apex": "NVIDIA apex, built from source (https://github.com/NVIDIA/apex)",
}
"""How to install the optional packages timm's optimizer registry names."""


_TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
"""Each ``train.tracking`` name: the module it imports, and the smallest package that provides it."""


def _missing_packages(recipe: Recipe) -> list[str]:
    """Optional packages the recipe needs that are not installed (found before any work is done)."""
    problems = []
    for name in recipe.train.tracking:
        module, package = _TRACKER_PACKAGES.get(name, ("", ""))  # an unknown name is check_values' problem
        if module and not _importable(module):
            problems.append(
                f"train.tracking: {name!r} needs the {package} package, which is not installed: "
                f"pip install 'ftsgd[{name}]' (or pip install {package}), or remove {name!r} from train.tracking"
            )
    # find_spec, not an import: peft pulls in transformers (seconds of start-up)
    if recipe.lora.enabled and importlib.util.find_spec("peft") is None:
        problems.append(
            "lora.enabled: LoRA adapters need the peft package, which is not installed: pip install "
            "'ftsgd[lora]' (or pip install peft), or set lora.enabled = false"
        )
    package = optimizer_package(recipe.optim.name)
    if package is not None and not _importable(package):
        hint = _PACKAGE_HINTS.get(package, f"pip install {package}")
        problems.append(
            f"optim.name: {recipe.optim.name!r} is an optimizer of the {package} package, which is not "
            f"installed: {hint} (timm also needs a CUDA GPU for it); or choose another optim.name"
        )
    elif package is not None and recipe.train.device == "cpu":
        problems.append(
            f'optim.name: {recipe.optim.name!r} ({package}) needs a CUDA GPU, but train.device = "cpu"'
        )
    return problems


def _auto_augment_problems(d: DataConfig) -> list[str]:
    """``data.auto_augment`` must be a policy timm can parse (checked by building it on a tiny input)."""
    policy = timm_auto_augment(d.auto_augment)
    if policy is None:
        return []
    from timm.data import create_transform

    try:
        create_transform(input_size=(3, 32, 32), is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        return [
            f"data.auto_augment: timm cannot read {d.auto_augment!r} ({exc or type(exc).__name__}); use e.g. "
            '"rand-m9-mstd0.5" (RandAugment), "trivialaugment", "augmix-m5-w4-d2" (AugMix) or "original" '
            "(AutoAugment)"
        ]
    return []


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _data_path_problems(d: DataConfig) -> list[str]:
    """Dataset folders named in the recipe that do not exist, each under its own key."""
    if not d.root:
        return []
    root = Path(d.root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        return [f"data.root: dataset folder {root} {what} (--data)"]
    try:
        one_folder = is_one_folder(d)  # one folder of class folders: train and val are drawn, not folders
    except DataError as exc:
        return [f"data.root: {exc}"]
    out = []
    entries = [] if one_folder else [("data.train", d.train), ("data.val", d.val)]
    entries += [(f"data.eval_splits[{i}]", entry) for i, entry in enumerate(d.eval_splits)]
    for key, entry in entries:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else root / path
        if entry and not path.is_dir():
            out.append(f"{key}: split folder {path} does not exist")
    return out


# ---------------------------------------------------------------------------------------- running


def check_model_named(recipe: Recipe) -> None:
    """A run needs a model: a recipe may leave ``model.name`` to ``--model``.

    Raises:
        ModelError: ``model.name`` is empty.
    """
    if not recipe.model.name:
        raise ModelError(
            "no model given: pass --model NAME (a timm model name) or set model.name in the recipe"
        )


def check_job(recipe: Recipe, world_size: int) -> None:
    """What a job of ``world_size`` processes cannot do with ``recipe``, refused before it is joined."""
    if world_size > 1 and any(s.optim.step_in_backward for s in stage_recipes(recipe)):
        raise RecipeError(
            [
                "optim.step_in_backward: not under torchrun: DDP keeps every gradient in its "
                "communication buckets until they are all-reduced, so updating inside backward would save "
                "no memory; set optim.step_in_backward = false (train.shard = true divides the gradients "
                "and optimizer state by the number of processes instead)"
            ]
        )


def check_device(recipe: Recipe, amp_dtype: torch.dtype | None, sharded: bool) -> None:
    """What the autocast dtype ``train.amp`` resolved to on this device, or FSDP, cannot do with ``recipe``.

    The recipe's own checks already refuse an explicit ``"fp16"`` with these options; fp16 can still come
    from a resumed run that an older ftsgd started with ``"auto"`` on a GPU without bf16
    (:mod:`ftsgd.train.precision`), which only the checkpoint tells.
    """
    problems = []
    fp16 = amp_dtype == torch.float16
    if fp16 and any(s.optim.step_in_backward for s in stage_recipes(recipe)):
        problems.append(
            'train.amp: the run computes in fp16 autocast (what an older ftsgd\'s "auto" chose on a GPU '
            "without bf16), which optim.step_in_backward cannot use: an overflow is only known after some "
            'parameters were updated; set train.amp = "none"'
        )
    if sharded and recipe.train.ema_decay > 0:
        problems.append(
            "train.ema_decay: the weights' EMA is not supported with train.shard = true (FSDP2): it "
            "would keep an unsharded copy of the model on every process; set train.ema_decay = 0 or "
            "train with DDP (train.shard = false)"
        )
    if recipe.train.weight_dtype == "bf16" and amp_dtype == torch.bfloat16 and not _bf16_device_ok(recipe):
        problems.append(
            'train.weight_dtype: "bf16" weights need a GPU that computes in bf16 (this one does not); set '
            'train.weight_dtype = "fp32"'
        )
    if sharded and fp16:
        problems.append(
            'train.amp: the run computes in fp16 autocast (what an older ftsgd\'s "auto" chose on a GPU '
            "without bf16), which train.shard cannot use (the gradient scaler does not see the other "
            'processes\' slices); set train.amp = "none"'
        )
    if problems:
        raise RecipeError(problems)


def _bf16_device_ok(recipe: Recipe) -> bool:
    """Whether the training device computes in bf16 (any CPU does, emulated where not in hardware)."""
    from ftsgd.utils.device import resolve_device

    device = resolve_device(recipe.train.device)
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def check_evaluated(recipe: Recipe, evaluated: Iterable[str], classes: list[str] | None = None) -> None:
    """What needs the dataset's splits and classes (known once the data is found).

    ``train.select_by`` must name a split evaluated every epoch, or an aggregate (``worst``, ``mean``) over
    at least one evaluation split besides val; a ``train.class_weights`` list needs one weight per class.
    """
    problems = []
    split, _ = select_metric(recipe.train.select_by)
    evaluated = list(evaluated)
    others = [name for name in evaluated if name != "val"]
    if split in AGGREGATE_SPLITS and not others:
        problems.append(
            f"train.select_by: {split!r} aggregates the evaluation splits other than val, and this dataset has "
            "none (add split folders such as ood/, data.eval_splits, or data.test_fraction)"
        )
    elif split not in evaluated and split not in AGGREGATE_SPLITS:
        problems.append(
            f"train.select_by: split {split!r} is not evaluated in this dataset; evaluated splits: "
            f"{', '.join(evaluated)} (data.val, data.eval_splits), or {' or '.join(AGGREGATE_SPLITS)} over "
            "all but val"
        )
    weights = recipe.train.class_weights
    if classes is not None and isinstance(weights, list) and len(weights) != len(classes):
        problems.append(
            f"train.class_weights: {len(weights)} weight(s) for {len(classes)} classes; give one per class, in "
            f"this order: {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}"
        )
    if problems:
        raise RecipeError(problems)


def check_stages(prepared: PreparedModel, recipe: Recipe, current: int = 0) -> None:
    """Try every ``[[stage]]``'s freeze and optimizer groups on the model, then restore stage ``current``'s.

    A stage's freeze patterns or learning-rate scales can only be checked on the model, and a mistake in
    the last stage must not surface hours into the run, when it starts.

    Raises:
        RecipeError: The problems of the first stage that does not work, named ``stage.N.key``.
    """
    stages = stage_recipes(recipe) if recipe.stages else []
    classifier = classifier_modules(prepared.model, prepared.embedding.execution_order)
    for index, stage in enumerate(stages):
        now = prepared
        try:
            now = refreeze(now, stage.freeze)
            param_groups(now.model, stage.optim, embedding=now.embedding.modules, classifier=classifier)
        except RecipeError as exc:
            raise RecipeError([f"{STAGE_KEY}.{index + 1}.{p}" for p in exc.problems]) from None
        finally:
            refreeze(now, stages[current].freeze)


def check_parallel_model(model: nn.Module, name: str) -> None:
    """A model several processes cannot train as one does.

    BatchNorm layers with ``momentum=None`` keep a cumulative average, whose update depends on how many
    batches one process has seen: :func:`ftsgd.train.parallel.merge_running_stats` cannot recombine it.

    Raises:
        ModelError: naming the first such layers.
    """
    cumulative = [
        layer
        for layer, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None
    ]
    if cumulative:
        raise ModelError(
            f"{name}: BatchNorm layer(s) {', '.join(cumulative[:5])} use momentum=None (a "
            "cumulative average), which training on several processes cannot reproduce; train on one process"
        )
