"""A generated, learnable image-folder dataset with a built-in distribution shift.

Tests, the demo and benchmarks need a dataset that exists offline, is small enough to write in a
fraction of a second, is learnable by a tiny model in a couple of epochs, and has an
out-of-distribution split on which accuracy drops -- the setting the paper is about. Each class is a
shape drawn in its own hue with random position, size, rotation and noise, so neither a single pixel
nor a fixed template solves it. The ``ood`` split shows the same classes on a bright, tinted
background with lower contrast and heavier noise: the shape is still visible, but a model that learned
"bright coloured blob on a dark background" is off its training distribution.

Only PIL and numpy are used, and every image is a pure function of ``(seed, split, class, index)``,
so the same call writes byte-identical files on any machine with the same Pillow version.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "stripes",
    "ring",
    "diamond",
    "dots",
    "checker",
    "star",
)
"""Readable class names, one per drawable shape; classes beyond these are named ``class_K``."""

DEFAULT_PER_CLASS: dict[str, int] = {"train": 24, "val": 8, "ood": 8}
"""Images per class in each split when ``per_class`` is not given."""

SHIFTED_SPLITS: frozenset[str] = frozenset({"ood"})
"""Split names drawn under the distribution shift; every other split is in-distribution."""

_FORMATS: dict[str, tuple[str, str, dict[str, object]]] = {
    # fmt -> (file extension, PIL format name, save options)
    "png": ("png", "PNG", {}),
    "jpg": ("jpg", "JPEG", {"quality": 95}),
    "jpeg": ("jpeg", "JPEG", {"quality": 95}),
    "bmp": ("bmp", "BMP", {}),
    "webp": ("webp", "WEBP", {"lossless": True}),
    "tiff": ("tiff", "TIFF", {}),
}

Point = tuple[float, float]


def class_names(classes: int) -> list[str]:
    """Return the folder names :func:`make_image_folder` uses for ``classes`` classes.

    Args:
        classes: Number of classes.

    Returns:
        The readable shape names first, then ``class_10``, ``class_11``, ... for the rest.
    """
    return [SHAPES[k] if k < len(SHAPES) else f"class_{k}" for k in range(classes)]


def make_image_folder(
    root: Path | str,
    *,
    classes: int = 3,
    per_class: dict[str, int] | None = None,
    size: int = 32,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Write a synthetic dataset in the image-folder layout ``root/<split>/<class>/<image>``.

    Args:
        root: Folder to write into; created if missing. Existing files with the same names are
            overwritten, other files are left alone.
        classes: Number of classes (>= 2). The first ten get shape names (``circle``, ``square``, ...);
            further classes reuse the shapes in other hues and are named ``class_K``.
        per_class: Images per class for each split, e.g. ``{"train": 24, "val": 8, "ood": 8}`` (the
            default). Exactly these splits are written; a count of 0 skips the split. The split named
            ``ood`` is drawn under the distribution shift, all others in-distribution.
        size: Image side length in pixels (>= 8).
        seed: Non-negative seed; the same arguments always produce byte-identical files.
        fmt: File format: png, jpg, jpeg, bmp, webp (lossless) or tiff.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: For impossible arguments (these are programming errors, not user data errors).
    """
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    fmt_key = fmt.lower().lstrip(".")
    if fmt_key not in _FORMATS:
        raise ValueError(f"unsupported fmt {fmt!r}; choose one of {', '.join(_FORMATS)}")
    counts = dict(DEFAULT_PER_CLASS if per_class is None else per_class)
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"per_class[{split!r}] must be >= 0, got {n}")

    ext, pil_format, save_kwargs = _FORMATS[fmt_key]
    root = Path(root)
    names = class_names(classes)
    for split, n in counts.items():
        if n == 0:
            continue
        # crc32 rather than hash(): str hashes are salted per process, and files must not be.
        split_code = zlib.crc32(split.encode("utf-8"))
        shifted = split in SHIFTED_SPLITS
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_code, k, i])
                image = render(k, rng, size=size, shifted=shifted, num_classes=classes)
                image.save(folder / f"{name}_{i:04d}.{ext}", format=pil_format, **save_kwargs)
    return root


SOURCE_SHAPES: tuple[str, ...] = SHAPES[:6]
"""The classes of :func:`make_source_folder`'s pre-training task."""
TARGET_SHAPES: tuple[str, ...] = SHAPES[6:]
"""The classes of :func:`make_target_folder`'s fine-tuning task: shapes the source task never shows."""


def make_source_folder(
    root: Path | str, *, per_class: dict[str, int] | None = None, size: int = 32, seed: int = 0
) -> Path:
    """Write a pre-training (source) task: the six :data:`SOURCE_SHAPES` in both styles.

    With :func:`make_target_folder`, the setting the paper is about in miniature: a backbone pre-trained on
    broad data (here: half of the images in the shifted style) is fine-tuned on narrow data (the plain
    style only) and tested on the style it saw in pre-training but not in fine-tuning. Every image has a
    random hue, so only the shape tells the classes apart (no colour shortcut).

    Args:
        root: Folder to write into (created if missing).
        per_class: Images per class and split (default train 400, val 50); each image is drawn in the
            shifted style with probability 1/2 (``ood`` always).
        size: Image side length in pixels.
        seed: Non-negative seed; the same arguments always write byte-identical files.
    """
    return _write_shapes(
        Path(root), "source", SOURCE_SHAPES, per_class or {"train": 400, "val": 50}, size, seed
    )


def make_target_folder(
    root: Path | str, *, per_class: dict[str, int] | None = None, size: int = 32, seed: int = 0
) -> Path:
    """Write a fine-tuning (target) task: the four :data:`TARGET_SHAPES`, new to a source-trained backbone.

    ``train`` and ``val`` are in the plain style, ``ood`` in the shifted style (bright tinted background,
    low contrast, heavy noise); random hues as in :func:`make_source_folder`.

    Args:
        root: Folder to write into (created if missing).
        per_class: Images per class and split (default train 48, val 32, ood 32).
        size: Image side length in pixels.
        seed: Non-negative seed; the same arguments always write byte-identical files.
    """
    counts = per_class or {"train": 48, "val": 32, "ood": 32}
    return _write_shapes(Path(root), "target", TARGET_SHAPES, counts, size, seed)


def _write_shapes(
    root: Path, task: str, shapes: tuple[str, ...], per_class: dict[str, int], size: int, seed: int
) -> Path:
    """Images of ``shapes`` in random hues; ``ood`` shifted, the source task's other splits half shifted."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    shifted_share = 0.5 if task == "source" else 0.0
    for split, n in per_class.items():
        split_code = zlib.crc32(f"{task}/{split}".encode())
        for name in shapes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_code, SHAPES.index(name), i])
                shifted = split in SHIFTED_SPLITS or bool(rng.uniform() < shifted_share)
                image = render(SHAPES.index(name), rng, size=size, shifted=shifted, hue=rng.uniform())
                image.save(folder / f"{name}_{i:04d}.png", format="PNG")
    return root


def render(
    class_index: int,
    rng: np.random.Generator,
    *,
    size: int,
    shifted: bool,
    num_classes: int = len(SHAPES),
    hue: float | None = None,
) -> Image.Image:
    """Draw one image of class ``class_index``.

    Shapes are drawn on a supersampled canvas and downsampled, so small images still have smooth
    edges instead of aliasing patterns a model could latch onto.

    Args:
        class_index: Class to draw; selects the shape (``class_index % 10``) and the hue.
        rng: Source of all randomness for this image.
        size: Output side length in pixels.
        shifted: Draw under the OOD shift (bright tinted background, low contrast, heavy noise).
        num_classes: Number of classes in the dataset; hues are spread over the first
            ``min(num_classes, 10)`` so that few classes get clearly different colours.
        hue: Draw in this hue (0..1) instead of the class's own, so the colour says nothing about the class.

    Returns:
        An RGB image of ``size`` x ``size`` pixels.
    """
    scale = max(1, min(4, 512 // size))
    canvas = size * scale

    # Class hue: evenly spaced over the (at most ten) shapes, rotated for each further block of ten.
    if hue is None:
        n_hues = max(1, min(num_classes, len(SHAPES)))
        hue = ((class_index % len(SHAPES)) / n_hues + (class_index // len(SHAPES)) * 0.37) % 1.0
    hue = (hue + rng.uniform(-0.02, 0.02)) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))) * 255.0

    if shifted:
        bg = rng.uniform(170, 230) + rng.uniform(-30, 30, size=3)
        contrast, noise_sigma = 0.45, 28.0
    else:
        bg = rng.uniform(15, 60) + rng.uniform(-8, 8, size=3)
        contrast, noise_sigma = 1.0, 8.0
    fg = bg + contrast * (fg - bg)

    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.24, 0.34) * canvas
    cx = rng.uniform(radius + 0.04 * canvas, canvas - radius - 0.04 * canvas)
    cy = rng.uniform(radius + 0.04 * canvas, canvas - radius - 0.04 * canvas)
    angle = rng.uniform(-0.25, 0.25)  # radians; small, so orientation-defined shapes stay distinct
    _DRAWERS[class_index % len(SHAPES)](draw, (cx, cy), radius, angle)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255.0

    pixels = bg[None, None, :] * (1.0 - alpha) + fg[None, None, :] * alpha
    pixels = pixels + rng.normal(0.0, noise_sigma, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _rotated(points: list[Point], center: Point, angle: float) -> list[Point]:
    """Rotate ``points`` (offsets from ``center``) by ``angle`` radians and translate to ``center``."""
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = center
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _box(draw: ImageDraw.ImageDraw, center: Point, half_w: float, half_h: float, angle: float) -> None:
    """Fill a rectangle of half-extents ``half_w`` x ``half_h`` rotated about ``center``."""
    corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    draw.polygon(_rotated(corners, center, angle), fill=255)


def _circle(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    cx, cy = center
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _square(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    _box(draw, center, 0.85 * r, 0.85 * r, angle)


def _triangle(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    draw.polygon(_rotated(points, center, angle), fill=255)


def _cross(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    _box(draw, center, r, 0.28 * r, angle)
    _box(draw, center, 0.28 * r, r, angle)


def _stripes(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    for offset in (-0.7, 0.0, 0.7):
        x, y = _rotated([(0.0, offset * r)], (0.0, 0.0), angle)[0]
        _box(draw, (center[0] + x, center[1] + y), r, 0.18 * r, angle)


def _ring(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    cx, cy = center
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    inner = 0.55 * r
    draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)


def _diamond(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    points = [(0.0, -r), (0.7 * r, 0.0), (0.0, r), (-0.7 * r, 0.0)]
    draw.polygon(_rotated(points, center, angle), fill=255)


def _dots(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    dot = 0.3 * r
    for gx in (-0.6, 0.6):
        for gy in (-0.6, 0.6):
            x, y = _rotated([(gx * r, gy * r)], center, angle)[0]
            draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=255)


def _checker(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    cell = 0.5 * r
    for row in range(4):
        for col in range(4):
            if (row + col) % 2 == 0:
                offset = _rotated([((col - 1.5) * cell, (row - 1.5) * cell)], (0.0, 0.0), angle)[0]
                _box(draw, (center[0] + offset[0], center[1] + offset[1]), cell / 2, cell / 2, angle)


def _star(draw: ImageDraw.ImageDraw, center: Point, r: float, angle: float) -> None:
    points = []
    for j in range(10):
        rad = r if j % 2 == 0 else 0.42 * r
        a = -math.pi / 2 + j * math.pi / 5
        points.append((rad * math.cos(a), rad * math.sin(a)))
    draw.polygon(_rotated(points, center, angle), fill=255)


_DRAWERS: tuple[Callable[[ImageDraw.ImageDraw, Point, float, float], None], ...] = (
    _circle,
    _square,
    _triangle,
    _cross,
    _stripes,
    _ring,
    _diamond,
    _dots,
    _checker,
    _star,
)
