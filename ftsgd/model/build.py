"""Building timm models, fitting weight files to them, and what a model says about itself.

A weights file either fits the model or is rejected with the reason. Checkpoints come wrapped
(``{"state_dict": ...}``, DDP's ``module.`` prefix, ``torch.compile``'s ``_orig_mod.``); those
wrappers are removed. The one expected mismatch, an ImageNet classifier on a model built for a new
number of classes, is re-initialised and reported. Any other shape mismatch means the file is for a
different architecture and fine-tuning from it would silently start from random weights, so it is an
error listing the offending tensors. Reading the files safely is :mod:`ftsgd.model.weights`'s job; timm's hub
download is :mod:`ftsgd.model.hub`'s.

This module also answers questions about a built model: its name, its classifier
(:func:`classifier_modules`) and whether it can checkpoint gradients (:func:`enable_grad_checkpointing`);
its input size and preprocessing are :mod:`ftsgd.model.data_config`'s.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ftsgd.errors import ModelError, RecipeError, WeightsError, first_line
from ftsgd.model.hub import looks_like_download_error, no_hub_error, pretrained_overlay
from ftsgd.model.init_dtype import default_dtype
from ftsgd.model.weights import LazyTensor, MappedFile, read_tensors, resolve_weights_path, stream_into
from ftsgd.recipe.schema import RESET_HEAD, ModelConfig

__all__ = [
    "WeightsReport",
    "build_model",
    "classifier_modules",
    "create_kwargs",
    "enable_grad_checkpointing",
    "head_note",
    "load_weights",
    "model_name",
    "unknown_model_error",
    "unwrap_model",
]

_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Prefixes added by DDP, ``torch.compile`` and Lightning-style wrappers."""

_MAX_LISTED = 10


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_weights` did, for the run log and the CLI summary."""

    path: str
    loaded: int
    """Number of tensors copied into the model."""
    missing: tuple[str, ...]
    """Model keys absent from the file (they keep their fresh initialisation)."""
    unexpected: tuple[str, ...]
    """File keys the model does not have (ignored)."""
    reinitialised: tuple[str, ...]
    """Classifier keys dropped because their shape differs (or ``model.reset_head = true``): the head is
    re-initialised for the task."""
    head: str = field(default="", compare=False)
    """What happened to the classifier, in words (the start of a run prints it); derived from the other
    fields and the recipe, so it takes no part in comparisons."""


# --------------------------------------------------------------------------------------------------
# What a model says about itself


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain timm model inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def model_name(model: nn.Module) -> str:
    """The timm architecture name, or the class name for models timm doesn't know (for messages)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def cfg_names(value: Any) -> tuple[str, ...]:
    """A ``pretrained_cfg`` entry that may be a string, a tuple/list of strings or missing, as a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if v)
    return ()


def classifier_modules(model: nn.Module, order: Sequence[str] | None = None) -> tuple[str, ...]:
    """Names of the classifier module(s) that hold parameters: the one place ftsgd finds the head.

    timm models say it themselves: ``get_classifier()`` and ``pretrained_cfg['classifier']`` (a tuple
    for models with two heads, like DeiT's distillation head). For models timm does not know (no
    ``get_classifier``), the last ``nn.Linear`` in execution order (``order``, see
    :func:`ftsgd.model.embedding.execution_order`) or, failing that, in registration order.
    """
    modules = dict(model.named_modules())
    ids = {id(m): n for n, m in modules.items()}
    names: list[str] = []
    has_timm_api = hasattr(model, "get_classifier")
    if has_timm_api:
        try:
            got = model.get_classifier()
        except Exception:
            got = None
        for m in got if isinstance(got, (tuple, list)) else [got]:
            if isinstance(m, nn.Module) and id(m) in ids and ids[id(m)]:
                names.append(ids[id(m)])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names += [n for n in cfg_names(cfg.get("classifier")) if n in modules]
    names = [n for n in dict.fromkeys(names) if any(True for _ in modules[n].parameters())]
    if names or has_timm_api:
        return tuple(names)
    candidates = list(order) if order else [n for n, _ in model.named_modules()]
    linears = [n for n in candidates if isinstance(modules.get(n), nn.Linear)]
    return (linears[-1],) if linears else ()


def _is_classifier_key(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def _score(state_dict: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(keys matching name and shape, keys matching name) — higher is a better fit."""
    by_name = [k for k in state_dict if k in model_sd]
    by_shape = sum(1 for k in by_name if tuple(state_dict[k].shape) == tuple(model_sd[k].shape))
    return by_shape, len(by_name)


def _strip_prefixes(
    state_dict: dict[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``) if that improves the fit.

    Prefixes stack (DDP around a compiled model gives ``module._orig_mod.``), and an intermediate
    step may match nothing, so every combination up to three deep is scored and the best kept (the
    fewest strips on a tie). Comparing against the model's own keys, rather than stripping blindly,
    keeps models whose real parameter names start with ``model.`` intact.
    """
    best, best_score = state_dict, _score(state_dict, model_sd)
    frontier = [state_dict]
    for _depth in range(3):
        next_frontier = []
        for current in frontier:
            for prefix in _STRIP_PREFIXES:
                if not any(k.startswith(prefix) for k in current):
                    continue
                candidate = {k.removeprefix(prefix): v for k, v in current.items()}
                if len(candidate) != len(current):
                    continue  # stripping would merge two keys: not a wrapper prefix
                next_frontier.append(candidate)
                score = _score(candidate, model_sd)
                if score > best_score:
                    best, best_score = candidate, score
        frontier = next_frontier
    return best


def _timm_filter_fn(model: nn.Module) -> Any:
    """timm's ``checkpoint_filter_fn`` for the model's family, if it has one."""
    arch = model_name(model)
    module_name = None
    with contextlib.suppress(Exception):
        from timm.models._registry import _model_to_module

        module_name = _model_to_module.get(arch)
        if module_name and not module_name.startswith("timm."):
            module_name = f"timm.models.{module_name}"
    module = sys.modules.get(module_name or "") or sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _apply_timm_filter(
    state_dict: dict[str, torch.Tensor], model: nn.Module, model_sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Try timm's converter for original (non-timm) checkpoints; keep it only if it fits better.

    The filters also resample position embeddings for a different ``img_size``. They are written for
    specific source layouts and may raise or mangle other inputs, so any failure falls back to the
    unfiltered weights.
    """
    fn = _timm_filter_fn(model)
    if fn is None:
        return state_dict
    # The filters need real tensors; when they do not help, the unread (lazy) originals are kept, so
    # the full copy made here lives only for the attempt.
    loaded = {k: v.load() if isinstance(v, LazyTensor) else v for k, v in state_dict.items()}
    try:
        try:
            filtered = fn(dict(loaded), model)
        except TypeError:
            filtered = fn(dict(loaded))
    except Exception:
        return state_dict
    if not isinstance(filtered, Mapping):
        return state_dict
    filtered = {k: v for k, v in filtered.items() if isinstance(v, torch.Tensor)}
    return filtered if _score(filtered, model_sd) > _score(state_dict, model_sd) else state_dict


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def load_weights(model: nn.Module, path: Path | str, reset_head: bool | str = RESET_HEAD) -> WeightsReport:
    """Load a local weights file into ``model`` and report what happened.

    A checkpoint trained for another label set is the normal starting point of fine-tuning, so a
    classifier whose shape differs is dropped and the model keeps its fresh head (listed in
    ``reinitialised``). Every other tensor must fit: a mismatch elsewhere means the file belongs to a
    different architecture (or a different ``img_size``/variant), and loading around it would leave
    the model partly random without anyone noticing.

    Args:
        model: A timm model (compiled or DDP-wrapped models are unwrapped).
        path: See :func:`read_state_dict`.
        reset_head: ``model.reset_head``: ``"auto"`` drops a classifier that does not fit, ``True``
            drops the file's classifier whatever its shape, ``False`` keeps it and refuses one that
            does not fit (or is missing).

    Returns:
        A :class:`WeightsReport`; ``missing`` excludes the re-initialised head.

    Raises:
        WeightsError: The file cannot be read (see :func:`read_state_dict`), shares no key with the
            model, has non-classifier tensors whose shapes differ from the model's, or (``reset_head``
            false) a classifier that does not fit.
    """
    target = unwrap_model(model)
    model_sd = target.state_dict()
    heads = classifier_modules(target)
    state_dict = _matched_state_dict(read_tensors(path), target, model_sd, heads)
    if _score(state_dict, model_sd)[1] == 0:
        sample = ", ".join(list(state_dict)[:5])
        name = model_name(target)
        raise WeightsError(
            f"none of the {len(state_dict)} tensors in {path} match {name} (file keys start with: "
            f"{sample}); is it for another architecture? Pass weights for {name}, or the matching --model"
        )
    reinitialised = _check_fit(state_dict, target, model_sd, heads, path)
    head = _head_decision(state_dict, model_sd, heads, reinitialised, reset_head, path)
    if reset_head is True:
        reinitialised = [k for k in model_sd if _is_classifier_key(k, heads) and k in state_dict]
    for key in reinitialised:
        del state_dict[key]
    unexpected = tuple(k for k in state_dict if k not in model_sd)
    missing = tuple(k for k in model_sd if k not in state_dict and k not in set(reinitialised))
    loaded = sum(1 for k in state_dict if k in model_sd)
    mapped = MappedFile(resolve_weights_path(path))  # a .pth file is memory-mapped (torch.load mmap)
    stream_into(target, {k: v for k, v in state_dict.items() if k in model_sd}, mapped)
    del state_dict
    return WeightsReport(
        path=str(path),
        loaded=loaded,
        missing=missing,
        unexpected=unexpected,
        reinitialised=tuple(reinitialised),
        head=head,
    )


def _head_decision(
    state_dict: Mapping[str, Any],
    model_sd: Mapping[str, torch.Tensor],
    heads: Iterable[str],
    misfit: list[str],
    reset_head: bool | str,
    path: Path | str,
) -> str:
    """What ``model.reset_head`` makes of the file's classifier, in words; refuses what ``false`` cannot keep."""
    keys = [k for k in model_sd if _is_classifier_key(k, heads)]
    if not keys:
        return ""
    weight = next((k for k in keys if k.endswith("weight")), keys[0])
    task = int(model_sd[weight].shape[0]) if model_sd[weight].ndim else 0
    if weight not in state_dict:
        found = "the weights have no classifier"
    elif misfit:
        found = f"the weights' classifier has {_shape(state_dict[weight])} where the task needs {_shape(model_sd[weight])}"
    else:
        found = ""
    if reset_head is False and found:
        raise WeightsError(
            f"model.reset_head = false keeps the classifier of {path}, but {found}; set model.reset_head = "
            '"auto" (re-initialise it when it does not fit) or true (always start a fresh one)'
        )
    if reset_head is True:
        return f"re-initialised for {task} classes (model.reset_head = true)"
    if found:
        return f"re-initialised for {task} classes ({found})"
    return f"kept from the weights ({task} classes; model.reset_head = true starts a fresh one)"


def _matched_state_dict(
    state_dict: dict[str, Any], target: nn.Module, model_sd: Mapping[str, torch.Tensor], heads: Iterable[str]
) -> dict[str, Any]:
    """The file's tensors with wrapper prefixes removed and, if needed, timm's converter applied.

    timm's converter reads every tensor: it is tried only when the file would otherwise be refused (a
    parameter missing or a tensor of another shape outside the head), not for missing buffers such as
    ``num_batches_tracked`` or for extra keys, which load as they are.
    """
    state_dict = _strip_prefixes(state_dict, model_sd)
    params = {n for n, _ in target.named_parameters()}
    misfit = any(
        (k in params and k not in state_dict)
        or (k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape))
        for k, v in model_sd.items()
        if not _is_classifier_key(k, heads)
    )
    return _apply_timm_filter(state_dict, target, model_sd) if misfit else state_dict


def _listed(items: list[str]) -> str:
    lines = "\n".join(f"  - {m}" for m in items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return lines + more


def _check_fit(
    state_dict: Mapping[str, Any],
    target: nn.Module,
    model_sd: Mapping[str, torch.Tensor],
    heads: Iterable[str],
    path: Path | str,
) -> list[str]:
    """The classifier keys to re-initialise; any other shape mismatch or missing parameter is an error."""
    name = model_name(target)
    reinitialised: list[str] = []
    mismatched: list[str] = []
    for key, expected in model_sd.items():  # model order reads naturally (stem first, head last)
        tensor = state_dict.get(key)
        if tensor is None or tuple(expected.shape) == tuple(tensor.shape):
            continue
        if _is_classifier_key(key, heads):
            reinitialised.append(key)
        else:
            mismatched.append(f"{key}: file {_shape(tensor)} vs model {_shape(expected)}")
    if mismatched:
        raise WeightsError(
            f"{len(mismatched)} tensor(s) in {path} have a different shape than in {name}:\n{_listed(mismatched)}\n"
            "The file is probably for another architecture or variant (or another img_size/model.kwargs); "
            "pass weights that match --model, or the --model the file was trained with."
        )
    missing = [
        n for n, _ in target.named_parameters() if n not in state_dict and not _is_classifier_key(n, heads)
    ]
    if missing:
        raise WeightsError(
            f"{len(missing)} parameter(s) of {name} are not in {path}:\n{_listed(missing)}\n"
            "Training would start them from random values. The file is probably for another architecture, "
            "depth or variant (or another model.kwargs); pass weights that match --model, or the --model "
            "the file was trained with."
        )
    return reinitialised


# --------------------------------------------------------------------------------------------------
# Building models


def _name_pattern(name: str) -> str:
    stem = re.split(r"[_.\-\d]", name.strip().lower(), maxsplit=1)[0]
    return f"*{stem}*" if stem else "*"


def unknown_model_error(name: str) -> ModelError:
    arch = name.split(".", 1)[0]
    candidates = timm.list_models()
    suggestions = difflib.get_close_matches(arch.lower(), candidates, n=5, cutoff=0.6)
    if not suggestions:
        suggestions = fnmatch.filter(candidates, _name_pattern(arch))[:5]
    hint = f"`timm.list_models('{_name_pattern(arch)}')` lists names"
    if suggestions:
        return ModelError(f"unknown model {name!r}; did you mean: {', '.join(suggestions)}? ({hint})")
    return ModelError(f"unknown model {name!r} (timm {timm.__version__} has no such architecture); {hint}")


def create_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of a recipe: ``model.kwargs`` plus the drop rates that are on.

    ``model.drop_path_rate``/``model.drop_rate`` are only passed when non-zero, so architectures that
    take neither still build with the defaults. They change training only (eval mode ignores them), so
    exports leave them out like timm's own exporter does.
    """
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    kwargs.update(
        {k: v for k, v in (("drop_path_rate", cfg.drop_path_rate), ("drop_rate", cfg.drop_rate)) if v}
    )
    return kwargs


def build_model(
    cfg: ModelConfig, num_classes: int | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, WeightsReport | None]:
    """Create the timm model a recipe asks for and load its starting weights.

    Args:
        cfg: ``name`` (a timm architecture, optionally with a ``.tag``, or ``local-dir:PATH``),
            ``pretrained`` (timm's hub download), ``weights`` (a local file; takes precedence over
            ``pretrained``, so an offline machine never tries the hub when a file is given) and
            ``kwargs`` for ``timm.create_model``.
        num_classes: Size of the new classifier; ``None`` keeps the architecture's default.
        dtype: Build the parameters and float buffers in this dtype from the start (bf16 weights,
            ``train.weight_dtype``): a float32 model converted afterwards would have held the float32
            weights first, and that peak is what bf16 weights are for. Loaded weights are cast as copied.

    Returns:
        The model (in train mode, on the CPU) and the :class:`WeightsReport` when ``cfg.weights``
        was loaded, else ``None``.

    Raises:
        ModelError: Unknown model name (with close matches), keyword arguments the architecture
            rejects, or pretrained weights that cannot be downloaded.
        WeightsError: ``cfg.weights`` cannot be read or does not fit the model.
    """
    name = cfg.name.strip()
    if not name:
        raise ModelError("no model given; pass --model NAME (model.name), e.g. --model vit_base_patch16_224")
    is_source = name.startswith(("hf-hub:", "local-dir:"))
    if not is_source and not timm.is_model(name):
        raise unknown_model_error(name)

    kwargs: dict[str, Any] = create_kwargs(cfg)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained = bool(cfg.pretrained) and not cfg.weights
    if pretrained:
        _check_registry_head(name, cfg, num_classes)  # before any download
        overlay = pretrained_overlay(name)
        if overlay:  # on top of one the recipe may give in model.kwargs (mean, std...)
            kwargs["pretrained_cfg_overlay"] = {**dict(kwargs.get("pretrained_cfg_overlay") or {}), **overlay}

    try:
        with default_dtype(dtype):
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(
            f"timm could not build {name!r} with model.kwargs {create_kwargs(cfg)!r}: {first_line(exc)}. "
            "Remove or correct the offending key in the recipe's [model] kwargs"
        ) from exc
    except (ValueError, AssertionError) as exc:
        if not create_kwargs(cfg):
            raise
        raise ModelError(
            f"timm could not build {name!r} with model.kwargs {create_kwargs(cfg)!r}: "
            f"{first_line(exc) if str(exc) else 'invalid value'}. Check the values in [model] kwargs"
        ) from exc
    except RuntimeError as exc:
        text = first_line(exc)
        if "Unknown model" in text or "Invalid pretrained tag" in text:
            raise ModelError(
                f"{text.rstrip('.')}; `timm.list_pretrained('{name.split('.')[0]}*')` lists the tags"
            ) from exc
        if pretrained and "No pretrained weights" in text:
            raise no_hub_error(name, text) from exc
        if pretrained and looks_like_download_error(exc):
            raise no_hub_error(name, text) from exc
        raise
    except Exception as exc:
        if pretrained and looks_like_download_error(exc):
            raise no_hub_error(name, first_line(exc)) from exc
        raise

    if dtype is not None:
        model.to(dtype)  # anything a module created in float32 explicitly
    report = load_weights(model, cfg.weights, cfg.reset_head) if cfg.weights else None
    if pretrained:
        _hub_head(model, cfg, num_classes)
    return model, report


def _source_classes(model: nn.Module) -> int | None:
    """The class count of the weights timm loaded itself (``model.pretrained``), from its pretrained config."""
    value = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    return int(value) if isinstance(value, int) else None


def _check_registry_head(name: str, cfg: ModelConfig, num_classes: int | None) -> None:
    """``model.reset_head = false`` with timm weights for another class count: refused from timm's registry."""
    if cfg.reset_head is not False or num_classes is None or name.startswith(("hf-hub:", "local-dir:")):
        return
    found = None
    with contextlib.suppress(Exception):
        found = timm.models.get_pretrained_cfg(name)
    source = getattr(found, "num_classes", None)
    if isinstance(source, int) and source != num_classes:
        raise ModelError(
            f"model.reset_head = false keeps the pretrained classifier of {name!r}, but it has {source} "
            f'classes and the task {num_classes}; set model.reset_head = "auto" or true'
        )


def _hub_head(model: nn.Module, cfg: ModelConfig, num_classes: int | None) -> None:
    """``model.reset_head`` for timm's own loading, which keeps a classifier exactly when the class counts match."""
    source = _source_classes(model)
    if num_classes is None or source is None or source == num_classes:
        if cfg.reset_head is True:
            for name in classifier_modules(model):
                for module in model.get_submodule(name).modules():
                    if callable(getattr(module, "reset_parameters", None)):
                        module.reset_parameters()
        return
    if cfg.reset_head is False:
        raise ModelError(
            f"model.reset_head = false keeps the pretrained classifier of {cfg.name!r}, but it has {source} "
            f'classes and the task {num_classes}; set model.reset_head = "auto" or true'
        )


def head_note(
    cfg: ModelConfig, report: WeightsReport | None, model: nn.Module, num_classes: int | None
) -> str:
    """What happened to the classifier, for the start of a run: re-initialised or kept, and why."""
    if report is not None:
        return report.head
    if not cfg.pretrained or num_classes is None:
        return "new (random initialisation)" if num_classes is not None and not cfg.pretrained else ""
    source = _source_classes(model)
    if cfg.reset_head is True:
        return f"re-initialised for {num_classes} classes (model.reset_head = true)"
    if source is not None and source != num_classes:
        return f"re-initialised for {num_classes} classes (the pretrained classifier has {source})"
    return f"kept from the pretrained weights ({num_classes} classes; model.reset_head = true starts a fresh one)"


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """timm's ``set_grad_checkpointing(True)``, or a RecipeError saying the architecture lacks it."""
    setter = getattr(model, "set_grad_checkpointing", None)
    try:
        if setter is None:
            raise NotImplementedError
        setter(True)
    except (AssertionError, NotImplementedError):
        raise RecipeError(
            [
                f"train.grad_checkpointing: {name} does not support gradient checkpointing (timm implements "
                "it per architecture); set train.grad_checkpointing = false, or lower memory another way "
                "(a smaller train.micro_batch_size, optim.step_in_backward = true)"
            ]
        ) from None
