"""Is there a faster JPEG decoder than PIL for 224-px training on a CPU, with the same pixels?

For JPEGs of a few sizes (written by :func:`ftsgd.synthetic.make_image_folder`, quality 95, 4:2:0
chroma subsampling as PIL writes by default, plus the photos' usual sizes), this times, per image:

* ``pil``: what ftsgd does now, :func:`ftsgd.data.load_image` (``Image.open`` + ``load`` + RGB);
* ``tv``: ``torchvision.io.decode_jpeg(torchvision.io.read_file(path))`` -> a CHW uint8 tensor,
  then ``Image.fromarray`` of it, because timm's training transform works on PIL images (the
  conversion is a copy of the pixels, counted);
* ``tv (tensor only)``: the same without converting back to PIL, the lower bound of what a
  tensor pipeline could gain;
* ``pil draft``: ``Image.draft("RGB", (448, 448))``: libjpeg decodes at 1/2, 1/4 or 1/8 scale
  straight from the DCT coefficients, as far as both sides stay at least 448 px (twice the training
  size, so a random-resized crop of a quarter of the image still has 224 px of real detail). It
  changes the pixels by design (another downscaling), so it would be an opt-in; images with a side
  under 896 px are decoded at full size, i.e. it does nothing for them;

and ``train step``: the whole per-sample work of a training DataLoader worker, load + timm's
training transform (random-resized crop + flip + normalise, as ``data.augment = "rrc_flip"``).

Pixels: ``max |pil - tv|`` over all images and the share of differing values; ``identical`` only if
every value of every image matches.

Usage::

    python benchmarks/jpeg_decode.py                  # 224, 500x375 and 1024x768 JPEGs, 200 each
    python benchmarks/jpeg_decode.py --sizes 4032x3024 --count 20    # phone photos
    python benchmarks/jpeg_decode.py --sizes 224 --count 500 --threads 1

Each decoder is timed over all images, repeated ``--repeat`` times; the best repetition is reported
(decoding is CPU-bound and deterministic: the minimum is the least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN_SIZE = 224


def make_jpegs(folder: Path, width: int, height: int, count: int) -> list[Path]:
    """``count`` JPEGs of ``width`` x ``height``: synthetic shapes drawn square, then resized."""
    from PIL import Image

    from ftsgd.data.synthetic import render

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng([width, height, i])
        img = render(i % 10, rng, size=max(width, height), shifted=False)
        if img.size != (width, height):
            img = img.resize((width, height), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        img.save(path, format="JPEG", quality=95)
        paths.append(path)
    return paths


def load_pil(path: Path):
    from ftsgd.data.images import load_image

    return load_image(path)


def load_tv(path: Path):
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    t = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return Image.fromarray(t.permute(1, 2, 0).numpy())


def load_tv_tensor(path: Path):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def load_pil_draft(path: Path):
    from PIL import Image

    from ftsgd.data.images import to_rgb

    with Image.open(path) as img:
        # The crop is at least 224 px on its short side at full scale; keep 2x that so a random
        # crop of the whole image still has its pixels.
        img.draft("RGB", (2 * TRAIN_SIZE, 2 * TRAIN_SIZE))
        img.load()
        return to_rgb(img)


def time_it(fn: Callable[[Path], object], paths: list[Path], repeat: int) -> float:
    """Best-of-``repeat`` seconds per image for ``fn`` over ``paths``."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        runs.append((time.perf_counter() - start) / len(paths))
    return min(runs)


def compare_pixels(paths: list[Path]) -> tuple[int, float]:
    """``(max abs difference, share of differing values)`` between PIL's and torchvision's pixels."""
    worst, differing, total = 0, 0, 0
    for p in paths:
        a = np.asarray(load_pil(p), dtype=np.int16)
        b = load_tv_tensor(p).permute(1, 2, 0).numpy().astype(np.int16)
        d = np.abs(a - b)
        worst = max(worst, int(d.max()))
        differing += int((d > 0).sum())
        total += d.size
    return worst, differing / total


def train_step(loader: Callable[[Path], object]) -> Callable[[Path], object]:
    """Per-sample DataLoader work: ``loader`` + timm's training transform (``rrc_flip``)."""
    from ftsgd.data.transforms import build_transform

    cfg = {
        "input_size": (3, TRAIN_SIZE, TRAIN_SIZE),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    tf = build_transform(cfg, "rrc_flip", training=True)
    return functools.partial(_apply, tf, loader)


def _apply(tf: Callable[[object], object], loader: Callable[[Path], object], path: Path) -> object:
    return tf(loader(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["224", "500x375", "1024x768"], help="WxH or S")
    parser.add_argument("--count", type=int, default=200, help="images per size")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker has 1)")
    parser.add_argument("--workdir", type=Path, default=None)
    opts = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    torch.set_num_threads(opts.threads)
    import PIL
    import torchvision

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}")
    with tempfile.TemporaryDirectory(prefix="ftsgd-jpeg-") as tmp:
        work = opts.workdir or Path(tmp)
        cols = ["image", "pil", "tv", "tv (tensor only)", "pil draft"]
        cols += ["train step pil", "train step tv", "train step draft"]
        cols += ["max abs diff", "differing values"]
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for spec in opts.sizes:
            w, _, h = spec.partition("x")
            width, height = int(w), int(h or w)
            paths = make_jpegs(work / spec, width, height, opts.count)
            for fn in (load_pil, load_tv):  # warm up: imports, page cache, decoder tables
                fn(paths[0])
            ms = {
                name: 1000 * time_it(fn, paths, opts.repeat)
                for name, fn in {
                    "pil": load_pil,
                    "tv": load_tv,
                    "tv tensor": load_tv_tensor,
                    "pil draft": load_pil_draft,
                    "step pil": train_step(load_pil),
                    "step tv": train_step(load_tv),
                    "step draft": train_step(load_pil_draft),
                }.items()
            }
            worst, share = compare_pixels(paths)
            speedup = statistics.mean([ms["pil"] / ms["tv"]])
            print(
                f"| {width}x{height} | {ms['pil']:.2f} ms | {ms['tv']:.2f} ms ({speedup:.2f}x) | "
                f"{ms['tv tensor']:.2f} ms | {ms['pil draft']:.2f} ms | {ms['step pil']:.2f} ms | "
                f"{ms['step tv']:.2f} ms | {ms['step draft']:.2f} ms | {worst} | {100 * share:.2f}% |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
