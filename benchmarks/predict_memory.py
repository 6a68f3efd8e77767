"""Memory of ``ftsgd predict`` as the number of inputs grows: it should not grow at all.

Writes ``--images`` tiny PNG files (100 per folder), exports a small model (``test_vit``, random init: memory
does not depend on the weights' values), then runs real ``python -m ftsgd predict RUN ...`` processes over
a tenth of the files and over all of them, in two modes:

* ``stdin``: the paths piped in (``cat paths.txt | ftsgd predict RUN -``);
* ``folder``: one folder walked (``ftsgd predict RUN DIR``).

For each run it reports the process's peak resident set size (``wait4``'s rusage, what ``/usr/bin/time -v``
calls "Maximum resident set size"), and the resident set size sampled from ``/proc/PID/status`` when 10% of
the output lines had arrived and at the end: constant memory means the same peak for 10x the inputs and no
growth between the two samples.

Usage::

    python benchmarks/predict_memory.py --images 20000
    python benchmarks/predict_memory.py --images 20000 --workers 2 --json > predict-memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PER_FOLDER = 100


def write_images(root: Path, n: int, size: int) -> list[Path]:
    """``n`` PNG files of ``size`` px in folders of :data:`PER_FOLDER` (8 distinct images, copied)."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    paths = []
    for i in range(n):
        folder = root / f"f{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        path = folder / f"{i:07d}.png"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(path)
    return paths


def export_tiny_model(out: Path) -> None:
    """A random-init ``test_vit`` (32 px, 3 classes) exported the way ftsgd exports a run."""
    import timm
    import torch

    from ftsgd.infer.export import export_model
    from ftsgd.model.data_config import model_data_config

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).eval()
    export_model(
        model,
        out,
        architecture="test_vit",
        class_names=["a", "b", "c"],
        data_config=model_data_config(model),
        recipe_name="benchmark",
        model_kwargs={"img_size": 32},
    )


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], stdin_file: Path | None, expected: int) -> dict[str, Any]:
    """Run one predict process, count its output lines and sample its memory as they arrive."""
    start = time.perf_counter()
    stdin = stdin_file.open("rb") if stdin_file else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines, at_tenth, samples = 0, 0, []
    assert proc.stdout is not None
    first = 0.0
    for _ in proc.stdout:
        lines += 1
        if lines == 1:
            first = time.perf_counter()
        if lines % 500 == 0:
            samples.append(_rss_bytes(proc.pid))
        if lines == max(1, expected // 10):
            at_tenth = _rss_bytes(proc.pid)
    at_end = samples[-1] if samples else 0
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if stdin_file:
        stdin.close()  # type: ignore[union-attr]
    end = time.perf_counter()
    seconds = end - start
    return {
        "images": expected,
        "lines": lines,
        "exit_code": proc.returncode,
        "seconds": seconds,
        "first_result_s": first - start,
        "images_per_s": (lines - 1) / max(end - first, 1e-9),  # after start-up: model loading, imports
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "rss_at_10pct_bytes": at_tenth,
        "rss_at_end_bytes": at_end,
        "rss_max_sampled_bytes": max(samples, default=0),
    }


def _folder_of(root: Path, n: int, total: int) -> Path:
    """A folder holding the first ``n`` images: all of them, or links to their first folders."""
    if n == total:
        return root / "images"
    part = root / f"first-{n}"
    part.mkdir()
    for i in range(n // PER_FOLDER):
        (part / f"f{i:05d}").symlink_to(root / "images" / f"f{i:05d}")
    return part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=16, help="Image side in pixels.")
    parser.add_argument("--workers", type=int, default=1, help="ftsgd predict --workers.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="Print the results as one JSON object.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftsgd-predict-bench-") as tmp:
        root = Path(tmp)
        paths = write_images(root / "images", args.images, args.size)
        export_tiny_model(root / "run")
        base = [sys.executable, "-m", "ftsgd", "predict", str(root / "run")]
        opts = ["--workers", str(args.workers), "--batch-size", str(args.batch_size), "--json"]
        rows = []
        for n in (args.images // 10, args.images):
            listing = root / f"paths-{n}.txt"
            listing.write_text("".join(f"{p}\n" for p in paths[:n]))
            rows.append({"mode": "stdin", **measure([*base, "-", *opts], listing, n)})
            rows.append(
                {"mode": "folder", **measure([*base, str(_folder_of(root, n, args.images)), *opts], None, n)}
            )
    if args.json:
        print(json.dumps({"args": vars(args), "runs": rows}, indent=2))
        return
    mib = 1024**2
    print("mode    images  lines   exit  first  img/s   peak RSS    RSS at 10%  RSS at end")
    for r in rows:
        print(
            f"{r['mode']:<7} {r['images']:>6}  {r['lines']:>6}  {r['exit_code']:>4}  {r['first_result_s']:>4.1f}s  "
            f"{r['images_per_s']:>6.0f}  "
            f"{r['peak_rss_bytes'] / mib:>7.1f} MiB  {r['rss_at_10pct_bytes'] / mib:>7.1f} MiB  "
            f"{r['rss_at_end_bytes'] / mib:>7.1f} MiB"
        )


if __name__ == "__main__":
    main()
