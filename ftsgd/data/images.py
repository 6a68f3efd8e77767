"""Decoding image files into upright RGB images, whatever their mode, bit depth or orientation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ftsgd.errors import DataError


def _to_uint8(arr: np.ndarray, bits16: bool) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 0..255.

    16-bit data is mapped linearly from its full 0..65535 range (dividing by 257 maps 65535 to 255
    exactly), so relative brightness between images is preserved; clipping would turn almost every
    16-bit image white. Float data in 0..1 is scaled by 255; anything else falls back to a per-image
    min-max stretch, the only option without knowing the sensor's range.
    """
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = np.nan_to_num(arr.astype(np.float64))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if bits16 or (lo >= 0 and 255 < hi <= 65535):
        out = arr / 257.0
    elif is_float and lo >= 0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0 and hi <= 255:
        out = arr
    else:
        out = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB.

    ``Image.convert("RGB")`` handles the 8-bit modes (L, LA, P, RGBA, CMYK, ...) but clips 16-bit
    and 32-bit greyscale ("I;16", "I", "F") instead of scaling, which turns typical 16-bit scans
    white; those are scaled to 8 bits first. Alpha is dropped as timm and torchvision do, so
    images look the same as in the pipelines the pretrained weights came from.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        return Image.fromarray(_to_uint8(arr, bits16=img.mode.startswith("I;16"))).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
    return img.convert("RGB")


_PIL_FILTERS = [
    ("ignore", None, Image.DecompressionBombWarning, None, 0),
    ("ignore", None, UserWarning, re.compile(r"PIL\."), 0),
]
"""``warnings.filters`` entries that silence PIL's warnings about the files it decodes."""


def quiet_pil_warnings() -> None:
    """Keep PIL's warnings about decoded files off stderr; ftsgd words what matters itself.

    An image over PIL's decompression-bomb pixel limit is a ``too large`` bad image (see
    :func:`check_image`) instead of a raw ``DecompressionBombWarning`` line, and EXIF or palette
    quirks are handled (orientation applied, transparency converted) rather than printed. The filters
    go to the front of the process-wide list, once, and are put back there if something displaced
    them (a ``catch_warnings`` block that ended, ``-W error``): ``warnings.catch_warnings()``
    around each decode would swap the whole list, which is not thread-safe, and the pre-flight scan
    decodes in threads. Called by every function here that opens an image, so DataLoader workers
    are covered too.
    """
    if warnings.filters[: len(_PIL_FILTERS)] != _PIL_FILTERS:
        for _, _, category, module, _ in reversed(_PIL_FILTERS):
            warnings.filterwarnings("ignore", category=category, module=module.pattern if module else "")


def upright(img: Image.Image) -> Image.Image:
    """Turn a loaded image the way its EXIF orientation tag says, in place (the tag is then removed).

    Phone cameras store pixels as the sensor read them and record the rotation in EXIF; every viewer
    applies it, so an image that looks upright on screen must also be upright for the model (as in
    the datasets pretrained weights come from). Unparseable EXIF leaves the image as stored, as
    viewers do: the pixels are fine, only the metadata is damaged.
    """
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):
            ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # damaged metadata must not cost the image
        pass
    return img


def load_image(path: Path) -> Image.Image:
    """Open an image file as 8-bit RGB (first frame of multi-frame files), upright per its EXIF tag.

    Raises:
        DataError: The file cannot be decoded; the message names it.
    """
    quiet_pil_warnings()
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(upright(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc
