"""The preprocessing a model expects and a recipe trains with: input size, mean, std, crop, interpolation.

timm's ``resolve_data_config`` answers from the model's ``pretrained_cfg``, which keeps the size of
the pretrained weights even when the model was built for another (``img_size`` in ``model.kwargs``);
this module corrects that and lays the recipe's ``data`` keys over it. Training, evaluation, the
gradient diagnostic and the export all take the data config from here, so they preprocess alike and
the export records exactly what training used. Apart from :mod:`ftsgd.model.build`, which builds the
model and fits its weights, because none of this changes a model: it only reads one.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from ftsgd.model.build import unwrap_model
from ftsgd.recipe.schema import DataConfig

__all__ = ["data_config_for", "input_config", "model_data_config"]


def _native_img_size(model: nn.Module) -> tuple[int, int] | None:
    """The spatial size the model was built for, when it differs from its pretrained config's.

    A ViT built with ``img_size=64`` keeps ``pretrained_cfg['input_size'] == (3, 224, 224)``, and
    ``resolve_data_config`` returns that, which would feed it images it cannot take.
    """
    with contextlib.suppress(Exception):
        from timm.models._input import get_model_input_config

        size = tuple(get_model_input_config(model)["input_size"][1:])
        if len(size) == 2:
            return int(size[0]), int(size[1])
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, int):
        return img_size, img_size
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        return int(img_size[0]), int(img_size[1])
    return None


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``.

    From ``timm.data.resolve_data_config({}, model=model)``, with ``input_size`` corrected to the
    resolution the model was actually built for (``img_size`` in ``model.kwargs``).
    """
    from timm.data import resolve_data_config

    target = unwrap_model(model)
    config = dict(resolve_data_config({}, model=target))
    size = _native_img_size(target)
    if size is not None:
        config["input_size"] = (config["input_size"][0], *size)
    return config


def input_config(model: nn.Module, img_size: int = 0) -> dict[str, Any]:
    """The model's data config (mean, std, crop, interpolation), at ``img_size`` when it is set (``data.img_size``)."""
    cfg = dict(model_data_config(model))
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    return cfg


def data_config_for(model: nn.Module, data: DataConfig) -> dict[str, Any]:
    """The preprocessing a recipe trains and evaluates with: the model's own, with the ``data`` keys set.

    ``data.img_size``, ``data.mean``, ``data.std``, ``data.crop_pct`` and ``data.interpolation``
    replace the model's values (:func:`model_data_config`) when they are set (non-empty, non-zero);
    the export records the result, so evaluation and timm see exactly what training used.
    """
    cfg = input_config(model, data.img_size)
    overrides = {
        "mean": tuple(data.mean),
        "std": tuple(data.std),
        "crop_pct": data.crop_pct,
        "interpolation": data.interpolation,
    }
    cfg.update({k: v for k, v in overrides.items() if v})
    return cfg
