"""Training and evaluation transforms (timm's ``create_transform``) and warnings about images too small for them."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from PIL import Image
from torchvision import transforms as T

from ftsgd.data.folders import Split
from ftsgd.data.images import quiet_pil_warnings
from ftsgd.recipe.schema import AUGMENTS, DataConfig


def _transform_kwargs(data_config: dict[str, Any]) -> dict[str, Any]:
    """Keep the data-config keys ``timm.data.create_transform`` accepts.

    A model's pretrained config can carry extra keys (``first_conv``, ``num_classes``, ...); passing
    them on would raise a TypeError deep inside timm.
    """
    from timm.data import create_transform

    accepted = set(inspect.signature(create_transform).parameters)
    return {k: v for k, v in data_config.items() if k in accepted and k != "is_training"}


TRIVIAL_AUGMENT = "rand-n1-m10-mstd101-inc1-p1"
"""timm's RandAugment configured as TrivialAugment: one operation per image (n1), always applied (p1), at a
magnitude drawn uniformly from 0 to the maximum (mstd > 100), with the operations that grow stronger with
the magnitude (inc1). ``data.auto_augment = "trivialaugment"`` stands for it."""


def timm_auto_augment(name: str) -> str | None:
    """``data.auto_augment`` as timm's ``auto_augment`` argument (None = off; "trivialaugment" expanded)."""
    if not name:
        return None
    return TRIVIAL_AUGMENT if name.lower() in ("trivialaugment", "trivial") else name


def train_transform_kwargs(data: DataConfig) -> dict[str, Any]:
    """The ``timm.data.create_transform`` training arguments that the ``data`` augmentation keys set.

    With every key at its default this is timm's random-resized crop (scale 0.08-1, ratio 3/4-4/3) and
    horizontal flip with colour jitter, auto-augment and random erasing off, as in the paper. Colour
    jitter 0 is passed as None: timm would otherwise add a no-op ColorJitter that still draws random
    numbers.
    """
    return {
        "scale": tuple(data.rrc_scale) or None,
        "ratio": tuple(data.rrc_ratio) or None,
        "hflip": data.hflip,
        "color_jitter": data.color_jitter or None,
        "auto_augment": timm_auto_augment(data.auto_augment),
        "re_prob": data.re_prob,
        "re_mode": data.re_mode,
        "re_count": data.re_count,
    }


def build_transform(
    data_config: dict[str, Any], augment: str, training: bool, data: DataConfig | None = None
) -> Callable[[Any], Any]:
    """Build the image -> normalised tensor transform for one split.

    Args:
        data_config: The model's timm data config (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``), e.g. from :func:`ftsgd.model.data_config.data_config_for`;
            normalising with the model's own statistics matters for fine-tuning pretrained weights.
        augment: The ``data.augment`` preset. ``rrc_flip``: timm's training transform (random-resized
            crop + horizontal flip; colour jitter, auto-augment and random erasing off, as in the
            paper, unless ``data`` turns them on). ``flip``: the eval transform (resize + centre crop)
            plus a random horizontal flip. ``none``: the eval transform.
        training: False gives the eval transform whatever ``augment`` says.
        data: The recipe's ``[data]`` section, whose augmentation keys refine the preset
            (:func:`train_transform_kwargs`); None keeps every key at its default.

    Returns:
        A callable turning a PIL RGB image into a CHW float tensor.
    """
    from timm.data import create_transform

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTS)}")
    data = data if data is not None else DataConfig()
    kwargs = _transform_kwargs(data_config)
    if training and augment == "rrc_flip":
        return create_transform(**kwargs, is_training=True, **train_transform_kwargs(data))
    eval_tf = create_transform(**kwargs, is_training=False)
    if training and augment == "flip":
        # Flipping the normalised tensor is the same as flipping the image before ToTensor.
        return T.Compose([eval_tf, T.RandomHorizontalFlip(p=data.hflip)])
    return eval_tf


MIN_CROP_SIDE = 16
"""A random crop whose side would be under this many pixels of the original image earns a warning."""


SIZE_SAMPLE = 64
"""How many training images :func:`small_image_warnings` reads the size of (header only)."""


def sample_image_sizes(split: Split, n: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """``(width, height)`` of up to ``n`` images spread evenly over a split, from their headers only.

    PIL reads the size without decoding the pixels, so this costs a file open per image. Files that
    cannot be opened are left out (the pre-flight scan reports them).
    """
    quiet_pil_warnings()
    step = max(1, len(split.samples) // max(n, 1))
    sizes = []
    for path, _ in split.samples[::step][:n]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return sizes


def small_image_warnings(split: Split, data_config: dict[str, Any], data: DataConfig) -> list[str]:
    """Warnings when the training images are too small for the input size or the random crop.

    The default augmentation was made for ImageNet-sized photos: on 24-pixel digits a random-resized
    crop keeps as little as 8% of the image (about 7x7 pixels) and a horizontal flip changes what a
    digit means (the issue's example: 43.7% accuracy with the defaults, 90.3% without augmentation).
    Both checks use the median size of a sample of the training images.
    """
    sizes = sample_image_sizes(split)
    if not sizes:
        return []
    width = sorted(w for w, _ in sizes)[len(sizes) // 2]
    height = sorted(h for _, h in sizes)[len(sizes) // 2]
    input_h, input_w = (int(v) for v in data_config["input_size"][1:])
    median = f"{width}x{height} px (median of {len(sizes)} training images)"
    out = []
    if min(width, height) < min(input_h, input_w) / 2:
        out.append(
            f"the training images are much smaller than the model's {input_w}x{input_h} input: {median}, so "
            f"each is upscaled {min(input_h, input_w) / min(width, height):.1f}x. If that is not intended, set "
            "data.img_size (and model.kwargs.img_size for a ViT built for one size); for small images also "
            "check data.rrc_scale and data.hflip (a mirrored digit or letter means something else)"
        )
    if data.augment == "rrc_flip":
        low = data.rrc_scale[0] if data.rrc_scale else 0.08
        side = (low * width * height) ** 0.5
        if side < MIN_CROP_SIDE:
            wanted = min(1.0, math.ceil(20 * MIN_CROP_SIDE**2 / (width * height)) / 20)
            out.append(
                f'data.augment = "rrc_flip" crops as little as {low:.0%} of an image (data.rrc_scale minimum '
                f"{low}), about {side:.0f}x{side:.0f} px of a {median}. Set data.rrc_scale = [{wanted}, 1.0] "
                f'(crops of at least {MIN_CROP_SIDE} px), or data.augment = "flip" or "none"; and '
                "data.hflip = 0 if a mirrored image means something else (digits, text)"
            )
    return out
