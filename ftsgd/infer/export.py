"""Exporting a fine-tuned model as ``model.safetensors`` + ``config.json`` that timm can load directly.

The export is meant to outlive ftsgd: the tensors are keyed exactly like the timm model's own
``state_dict()`` and ``config.json`` follows timm's Hugging Face hub layout (see
``timm.models._hub.save_config_for_hf``), so either of these rebuilds the model without ftsgd, with
exactly the preprocessing it was trained with (``timm.data.resolve_data_config(model=model)``)::

    timm.create_model("local-dir:OUT", pretrained=True)
    cfg = json.load(open("OUT/config.json"))
    timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="OUT/model.safetensors"))

``model_args`` holds ``num_classes`` and the recipe's ``model.kwargs`` (``img_size``...), and
``pretrained_cfg`` the input size, mean, std, interpolation and crop the run used (``data.img_size``,
``data.mean``...), so both forms are exact for every run; a shorter overlay without them builds the
architecture's default input size and preprocessing.

Everything needed for inference (class names in order, preprocessing, the ``create_model`` keyword
arguments) is also stored as string metadata inside the safetensors header, so the weights file alone
is self-describing; :func:`read_export` decodes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ftsgd import __version__
from ftsgd.data.transforms import build_transform
from ftsgd.errors import ModelError, WeightsError, first_line
from ftsgd.model.build import classifier_modules, unwrap_model
from ftsgd.model.data_config import model_data_config
from ftsgd.model.lora import adapter_config, adapter_state_dict, has_adapters, plain_state_dict
from ftsgd.recipe.schema import INTERPOLATIONS
from ftsgd.utils.console import warn
from ftsgd.utils.device import AMP_DTYPES, amp_dtype
from ftsgd.utils.fileio import atomic_save_safetensors, atomic_write_text, jsonable, remove_stale_temps

__all__ = [
    "CONFIG_NAME",
    "PREPROCESSING_KEYS",
    "WEIGHTS_NAME",
    "export_data_config",
    "export_model",
    "export_precision",
    "inference_transform",
    "load_exported_model",
    "read_export",
]

PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
"""The data-config entries an export records: what evaluation and timm need to preprocess as training did."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ADAPTER_DIR = "lora"
"""With LoRA: the folder beside ``model.safetensors`` that holds the adapters in PEFT's own format
(``adapter_config.json``, ``adapter_model.safetensors``), for ``PeftModel.from_pretrained``."""

_RESERVED = (
    "format",
    "architecture",
    "num_classes",
    "class_names",
    "input_size",
    "mean",
    "std",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "model_kwargs",
    "recipe",
    "ftsgd_version",
    "amp",
    "training_weight_dtype",
    "lora",
)
_JSON_KEYS = ("class_names", "input_size", "mean", "std", "model_kwargs", "num_classes", "crop_pct")

_CREATE_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
"""``timm.create_model`` arguments that are not model arguments: kept out of ``config.json``'s ``model_args``
(timm passes those on next to its own) and merged rather than repeated when an export is rebuilt."""

_SOURCE_CFG_KEYS = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "tag"}
"""pretrained_cfg keys that locate or name the *source* weights; an export must not point back at them."""
_SOURCE_LABEL_KEYS = {"label_names", "label_descriptions", "label_offset"}
_TEST_TIME_KEYS = {"test_input_size", "test_crop_pct", "test_pool_size"}


def _weights_path(path: Path | str) -> Path:
    """``path`` itself if it names a ``.safetensors`` file, else ``path/model.safetensors``."""
    path = Path(path).expanduser()
    return path if path.suffix == ".safetensors" else path / WEIGHTS_NAME


def _export_tensors(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict as CPU, contiguous tensors that share no storage, copying only what must be.

    safetensors refuses tensors that share storage (tied weights, views) or are non-contiguous
    (``channels_last``); those are copied, and so is everything off the GPU. Every other tensor is
    the model's own: safetensors writes straight from its memory, so exporting a CPU model costs no
    second copy of the weights (a full copy would be the largest allocation of a memory-light run).
    """
    state = model.state_dict() if state is None else state
    owners: dict[tuple[str, int], int] = {}
    for value in state.values():
        key = (str(value.device), value.untyped_storage().data_ptr())
        owners[key] = owners.get(key, 0) + 1
    seen: set[tuple[str, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        value = value.detach()
        key = (str(value.device), value.untyped_storage().data_ptr())
        shared = owners[key] > 1 and key in seen  # the first user keeps the storage, the others copy
        seen.add(key)
        if shared:
            value = value.to(device="cpu", copy=True, memory_format=torch.contiguous_format)
        else:
            value = value.to(device="cpu").contiguous()
        tensors[name] = value
    return tensors


def _timm_config(
    model: nn.Module,
    architecture: str,
    class_names: list[str],
    data_config: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """``config.json`` in timm's hub format: root fields plus a ``pretrained_cfg`` describing the export."""
    source = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg = {
        k: v
        for k, v in source.items()
        if k not in _SOURCE_CFG_KEYS | _SOURCE_LABEL_KEYS
        and (v is not None or k in {"pool_size", "first_conv", "classifier"})
    }
    pretrained_cfg.pop("architecture", None)
    input_size = list(data_config["input_size"])
    if tuple(input_size[1:]) != tuple((source.get("input_size") or input_size)[1:]):
        pretrained_cfg["pool_size"] = None  # the source's pooled feature size no longer applies
    for key in _TEST_TIME_KEYS:  # test-time recommendations described the source weights
        pretrained_cfg.pop(key, None)
    classifiers = classifier_modules(model)
    pretrained_cfg.update(
        input_size=input_size,
        mean=list(data_config["mean"]),
        std=list(data_config["std"]),
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config["crop_mode"],
        num_classes=len(class_names),
        classifier=source.get("classifier") or (classifiers[0] if classifiers else None),
        first_conv=source.get("first_conv"),
        custom_load=False,
    )
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": len(class_names),
        "num_features": int(getattr(model, "num_features", 0)) or None,
    }
    global_pool = getattr(model, "global_pool", None)
    if isinstance(global_pool, str) and global_pool:
        config["global_pool"] = global_pool
    config["label_names"] = list(class_names)
    # Like timm's exporter, leave out training-only drop rates; num_classes makes the config self-contained.
    model_args = {
        k: v
        for k, v in model_kwargs.items()
        if not (k.endswith("drop_rate") or k == "drop_block_rate" or k in _CREATE_ARGS)
    }
    model_args["num_classes"] = len(class_names)
    built = model_args.get("img_size")
    if built is not None and list(input_size[1:]) != (
        [built, built] if isinstance(built, int) else list(built)
    ):
        # built for one size and fed another (data.img_size on a ViT that takes any size): timm's local-dir
        # loader would otherwise take img_size for the input size, or input_size for img_size
        pretrained_cfg["fixed_input_size"] = False
    config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    return jsonable(config)


def _with_built_size(model: nn.Module, kwargs: dict[str, Any], input_size: tuple[int, ...]) -> dict[str, Any]:
    """``model_kwargs`` plus the ``img_size`` the model was built for, when its input differs from it.

    timm builds a ViT for its pretrained config's ``input_size`` unless ``img_size`` is given. A run with
    ``data.img_size`` on a ViT that takes other sizes (``dynamic_img_size``) records that input size in
    the config, so without ``img_size`` a rebuild would get position embeddings for another grid and
    its weights would not load.
    """
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if "img_size" in kwargs or not isinstance(built, (int, tuple, list)):
        return kwargs
    size = [int(built), int(built)] if isinstance(built, int) else [int(v) for v in built]
    if size == [int(v) for v in input_size[1:]]:
        return kwargs
    return {**kwargs, "img_size": size[0] if size[0] == size[1] else size}


def _checked_kwargs_json(kwargs: dict[str, Any], extra: Mapping[str, str] | None) -> str:
    """``model_kwargs`` as the metadata holds it; refuses what cannot be exported (programming errors)."""
    try:
        kwargs_json = json.dumps(jsonable(kwargs), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model_kwargs must be JSON-serialisable to export: {exc}") from exc
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra metadata may not override standard keys: {', '.join(clash)}")
    return kwargs_json


def export_model(
    model: nn.Module,
    path: Path | str,
    *,
    architecture: str,
    class_names: list[str],
    data_config: dict,
    recipe_name: str,
    model_kwargs: dict | None = None,
    extra: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    amp: str = "none",
    training_weight_dtype: str = "fp32",
) -> None:
    """Write ``model.safetensors`` (weights + metadata) and ``config.json`` atomically.

    Args:
        model: The fine-tuned timm model; ``torch.compile`` and DDP wrappers are removed.
        path: A ``.safetensors`` file name, or a directory that receives ``model.safetensors``
            (created if missing). ``config.json`` goes next to the weights.
        architecture: timm model name to rebuild with (``cfg.model.name``).
        class_names: Label of each output index, in order; must match the classifier size.
        data_config: Preprocessing used in training (``input_size``, ``mean``, ``std``, ...); missing
            entries come from :func:`ftsgd.model.data_config.model_data_config`.
        recipe_name: Recipe the model was trained with, for provenance.
        model_kwargs: ``timm.create_model`` keyword arguments (``cfg.model.kwargs``), JSON-serialisable.
        extra: More string metadata (e.g. run id, best epoch); may not override the standard keys.
        state_dict: The tensors to write instead of ``model.state_dict()``: the whole state of a model
            sharded by FSDP, gathered on this process (its own ``state_dict`` holds only slices).
        amp: The precision the run computed and evaluated in (``none``: fp32, ``bf16``, ``fp16``), so that
            ``ftsgd eval`` evaluates in it and repeats the run's numbers (the weights are float32 either way).
        training_weight_dtype: What training held the weights in (``train.weight_dtype``). Anything but
            ``"fp32"`` is written in float32 all the same (one tensor cast at a time), so every tool
            loads the export as before, and recorded as ``training_weight_dtype`` in the metadata and
            ``config.json``.

    Raises:
        ValueError: ``class_names`` does not match the classifier, ``model_kwargs`` is not JSON
            serialisable, or ``extra`` reuses a standard key (programming errors, not user input).
        RunError: A file could not be written; any previous export is intact.
    """
    target = unwrap_model(model)
    if architecture.startswith(("hf-hub:", "local-dir:")):  # record what timm built, not where it came from
        architecture = str(getattr(target, "pretrained_cfg", {}).get("architecture") or architecture)
    num_classes = int(getattr(target, "num_classes", len(class_names)))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a model with {num_classes} outputs")
    data = {**model_data_config(target), **dict(data_config)}
    kwargs = dict(model_kwargs or {})
    kwargs.pop("num_classes", None)
    kwargs = _with_built_size(target, kwargs, tuple(data["input_size"]))
    kwargs_json = _checked_kwargs_json(kwargs, extra)

    metadata = {
        "format": "pt",
        "architecture": architecture,
        "num_classes": str(num_classes),
        "class_names": json.dumps(list(class_names), ensure_ascii=False),
        "input_size": json.dumps([int(v) for v in data["input_size"]]),
        "mean": json.dumps([float(v) for v in data["mean"]]),
        "std": json.dumps([float(v) for v in data["std"]]),
        "interpolation": str(data["interpolation"]),
        "crop_pct": json.dumps(float(data["crop_pct"])),
        "crop_mode": str(data.get("crop_mode", "center")),
        "model_kwargs": kwargs_json,
        "recipe": recipe_name,
        "ftsgd_version": __version__,
        "amp": amp,
    }
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    low_precision = training_weight_dtype != "fp32"
    if low_precision:
        metadata["training_weight_dtype"] = training_weight_dtype

    config = _timm_config(target, architecture, list(class_names), data, kwargs)
    if low_precision:
        config["training_weight_dtype"] = training_weight_dtype  # timm ignores keys it does not know
    _write_export(target, _weights_path(path), metadata, config, state_dict, low_precision)


def _write_export(
    target: nn.Module,
    weights_path: Path,
    metadata: dict[str, str],
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None,
    low_precision: bool,
) -> None:
    """The files of an export, each written atomically; with LoRA adapters merged, and kept in PEFT format."""
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(weights_path.parent, [weights_path.name, CONFIG_NAME])  # left by a killed export
    adapted = has_adapters(target)
    merges = None
    if adapted:  # a plain timm model: the adapters merged into the weights as written, under the timm names
        state_dict, merges = plain_state_dict(target, state_dict)
        metadata["lora"] = ADAPTER_DIR
    tensors = _export_tensors(target, state_dict)
    float32 = torch.float32 if low_precision else None
    atomic_save_safetensors(tensors, weights_path, metadata=metadata, float_dtype=float32, replace=merges)
    atomic_write_text(
        weights_path.parent / CONFIG_NAME, json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )
    if adapted:
        _write_adapters(target, weights_path.parent / ADAPTER_DIR)


def _write_adapters(model: nn.Module, folder: Path) -> None:
    """The adapters and the classifier in PEFT's format, for those who load them onto the starting weights."""
    classifier = list(classifier_modules(model))
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder, ["adapter_model.safetensors", "adapter_config.json"])
    tensors = _export_tensors(model, adapter_state_dict(model, classifier))
    atomic_save_safetensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = adapter_config(model, classifier)
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2, default=str) + "\n")


def _decode(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    decoded: dict[str, Any] = dict(metadata)
    for key in _JSON_KEYS:
        if key in metadata:
            try:
                decoded[key] = json.loads(metadata[key])
            except json.JSONDecodeError as exc:
                raise WeightsError(
                    f"export {path} has unreadable {key!r} metadata ({exc}); re-export the model"
                ) from None
    for key in ("input_size", "mean", "std"):
        if isinstance(decoded.get(key), list):
            decoded[key] = tuple(decoded[key])
    problems = _metadata_problems(decoded)
    if problems:
        raise WeightsError(f"export {path} has unusable metadata: {'; '.join(problems)}; re-export the model")
    return decoded


def _metadata_problems(meta: Mapping[str, Any]) -> list[str]:
    """Values a hand-edited or foreign export holds that would fail deep in timm, each named by key.

    An architecture from a hub (``hf-hub:...``) is refused too: an export is rebuilt locally from its own
    metadata and weights, and timm would otherwise fetch that model's configuration from the network.
    """
    problems = []
    arch = str(meta.get("architecture", ""))
    if ":" in arch:
        problems.append(
            f"architecture {arch!r} names a source, not a timm architecture (an export never "
            "reaches the network)"
        )
    if "interpolation" in meta and meta["interpolation"] not in INTERPOLATIONS:
        problems.append(f"interpolation {meta['interpolation']!r} is not one of {', '.join(INTERPOLATIONS)}")
    size = meta.get("input_size")
    if size is not None and not (
        isinstance(size, tuple) and len(size) == 3 and all(isinstance(v, int) and 0 < v <= 8192 for v in size)
    ):
        problems.append(f"input_size {size!r} is not [channels, height, width] of positive integers")
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)):
            problems.append(f"{key} {v!r} is not a list of numbers")
    crop = meta.get("crop_pct")
    if crop is not None and not (isinstance(crop, (int, float)) and 0 < crop <= 1):
        problems.append(f"crop_pct {crop!r} is not a number in (0, 1]")
    return problems


def read_export(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export's tensors and its decoded metadata.

    Args:
        path: The ``.safetensors`` file or the run/export directory holding ``model.safetensors``.

    Returns:
        ``(tensors, metadata)``; metadata has ``architecture`` (str), ``num_classes`` (int),
        ``class_names`` (list), ``input_size``/``mean``/``std`` (tuples), ``interpolation``,
        ``crop_pct`` (float), ``crop_mode``, ``model_kwargs`` (dict), ``recipe``, ``ftsgd_version``,
        ``format``, ``amp`` (absent in exports that predate it: those were evaluated in fp32) and any extra
        keys as strings.

    Raises:
        WeightsError: Missing, truncated or corrupt file, or a safetensors file that is not an ftsgd
            export (no ``architecture``/``class_names`` metadata).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = _weights_path(path)
    if not weights.is_file():
        raise WeightsError(
            f"no exported model at {weights}; pass the model.safetensors written by ftsgd (or its run directory)"
        )
    try:
        with safe_open(str(weights), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:
        raise WeightsError(
            f"could not read {weights}: it is truncated or not a valid safetensors file ({first_line(exc)}); re-export it"
        ) from None
    if "architecture" not in metadata or "class_names" not in metadata:
        raise WeightsError(
            f"{weights} is not an ftsgd export (its metadata has no architecture/class names); "
            "to start training from plain weights pass them with --weights PATH"
        )
    return tensors, _decode(metadata, weights)


def load_exported_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model with timm and load its weights, ready for inference.

    The model's ``pretrained_cfg`` is overlaid with the exported preprocessing, so
    :func:`ftsgd.model.data_config.model_data_config` on the result returns what the model was trained with.

    Args:
        path: The ``.safetensors`` file or the directory holding ``model.safetensors``.

    Returns:
        ``(model, metadata)`` with the model in eval mode on the CPU; metadata as in :func:`read_export`.

    Raises:
        WeightsError: The export cannot be read or its tensors do not fit the rebuilt model.
        ModelError: This timm version cannot build the exported architecture with its kwargs.
    """
    tensors, meta = read_export(path)
    arch = meta["architecture"]
    num_classes = int(meta.get("num_classes", len(meta["class_names"])))
    kwargs, overlay = _rebuild_args(meta)
    overlay["num_classes"] = num_classes
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs
        )
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelError(
            f"timm {timm.__version__} cannot rebuild exported model {arch!r} with kwargs {kwargs!r}: {exc}"
        ) from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise WeightsError(
            f"the tensors in {_weights_path(path)} do not fit {arch!r} as built by timm "
            f"{timm.__version__} ({' '.join(detail[:3])[:600]}); was it exported with another timm version?"
        ) from None
    model.eval()
    return model, meta


def _rebuild_args(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``create_model`` keyword arguments and ``pretrained_cfg_overlay`` that rebuild an export.

    A recipe may itself pass ``pretrained_cfg_overlay`` (or ``pretrained``...) in ``model.kwargs``;
    those are merged with, or left to, the rebuild's own arguments instead of being passed twice. The
    exported preprocessing goes on top: it is what the model was trained with.
    """
    kwargs = {k: v for k, v in dict(meta.get("model_kwargs") or {}).items() if k not in _CREATE_ARGS}
    kwargs.pop("num_classes", None)
    own = (meta.get("model_kwargs") or {}).get("pretrained_cfg_overlay")
    overlay = dict(own) if isinstance(own, Mapping) else {}
    overlay.pop("file", None)  # the export's own weights are loaded below, never the source's
    overlay.update({key: meta[key] for key in PREPROCESSING_KEYS if key in meta})
    return kwargs, overlay


def export_precision(meta: Mapping[str, Any], device: torch.device) -> torch.dtype | None:
    """The autocast dtype an export's run evaluated in (None: fp32), as ``ftsgd eval`` uses it on ``device``.

    Exports that predate the record were evaluated in fp32 by ``ftsgd eval`` and stay so. A run trained in
    fp16 autocast (CUDA only) is evaluated in fp32 elsewhere, with a note that the numbers may then differ.
    """
    name = str(meta.get("amp") or "none")
    if name not in AMP_DTYPES:
        warn(f"the export records an unknown precision {name!r}; evaluating in fp32")
        return None
    dtype = amp_dtype(name)
    if dtype == torch.float16 and device.type != "cuda":
        warn("the run trained in fp16 autocast, which needs CUDA: evaluating in fp32 (numbers may differ)")
        return None
    return dtype


def export_data_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing an export was trained with (from :func:`read_export`'s metadata), for its eval transform."""
    return {key: meta[key] for key in PREPROCESSING_KEYS if key in meta}


def inference_transform(meta: Mapping[str, Any]) -> Any:
    """The eval transform an export was trained with, from its metadata (resize, centre crop, normalise).

    ``ftsgd eval``, ``ftsgd predict`` and the ONNX check all preprocess through this one function, so an
    image becomes the same tensor in each of them.
    """
    return build_transform(export_data_config(meta), "none", training=False)
