"""Pre-flight scan time of a first run against a rerun on an unchanged dataset (the scan cache).

Generates an image folder of ``--classes`` x (``--train`` + ``--val``) small images (default 10 x
(1000 + 100) = 11,000 JPEGs of 64 px) with :func:`ftsgd.synthetic.make_image_folder`, then, in fresh
processes (imports not timed), times what ``ftsgd train`` does before building the model:

* ``discover``: :func:`ftsgd.data.discover_splits` (walking the folders; no cache involved);
* ``scan``: :func:`ftsgd.data.preflight_scan` (decoding every image, or, with the cache, ``stat``-ing
  every file and decoding only new or changed ones).

``first`` runs with an empty cache folder (``FTSGD_CACHE_DIR``), ``rerun`` right after with the cache
the first run wrote, ``off`` with ``FTSGD_SCAN_CACHE=0`` (the behaviour before the cache). Each is
repeated ``--repeat`` times (first/rerun alternate, the cache emptied before each first run) and the
median is reported. The files are in the OS page cache for every run (they were just written), so
this measures decoding, not disk reads: on a cold disk or a network file system the first run is
slower still and the rerun's ``stat`` calls are its only I/O.

Usage::

    python benchmarks/scan_cache.py                          # 11,000 JPEGs, 64 px
    python benchmarks/scan_cache.py --fmt png --size 32 --train 2000 --classes 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from pathlib import Path
from ftsgd.data.folders import discover_splits
from ftsgd.data.scan import preflight_scan
from ftsgd.recipe.schema import DataConfig
root = Path(sys.argv[1])
t0 = time.perf_counter()
_, splits = discover_splits(DataConfig(root=str(root)))
t1 = time.perf_counter()
kept, bad = preflight_scan(splits, root=root)
t2 = time.perf_counter()
print(json.dumps({"discover_s": t1 - t0, "scan_s": t2 - t1, "files": sum(len(s) for s in kept.values()),
                  "bad": len(bad)}))
"""


def measure(root: Path, env: dict[str, str]) -> dict[str, float]:
    """One fresh process: discover + pre-flight scan of ``root``; returns its timings."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"scan failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=1000, help="training images per class")
    parser.add_argument("--val", type=int, default=100, help="validation images per class")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--fmt", default="jpg", choices=["jpg", "png", "webp", "bmp"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the dataset here (default: temp)")
    opts = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from ftsgd.data.synthetic import make_image_folder

    tmp = tempfile.TemporaryDirectory(prefix="ftsgd-scan-cache-")
    work = opts.workdir.resolve() if opts.workdir else Path(tmp.name)
    root = work / f"data-{opts.classes}x{opts.train}+{opts.val}-{opts.size}-{opts.fmt}"
    try:
        if not (root / ".complete").exists():
            start = time.perf_counter()
            per_class = {"train": opts.train, "val": opts.val}
            make_image_folder(root, classes=opts.classes, per_class=per_class, size=opts.size, fmt=opts.fmt)
            (root / ".complete").write_text("")
            print(f"generated {root} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        time.sleep(2.5)  # files younger than 2 s are never cached (coarse-timestamp guard)
        base = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        cache = work / "cache"
        runs: dict[str, list[dict[str, float]]] = {"off": [], "first": [], "rerun": []}
        for _ in range(opts.repeat):
            runs["off"].append(measure(root, dict(base, FTSGD_SCAN_CACHE="0")))
            shutil.rmtree(cache, ignore_errors=True)
            runs["first"].append(measure(root, dict(base, FTSGD_CACHE_DIR=str(cache))))
            runs["rerun"].append(measure(root, dict(base, FTSGD_CACHE_DIR=str(cache))))
        files = runs["first"][0]["files"]
        size = sum(p.stat().st_size for p in (cache / "scan").glob("*.json"))
    finally:
        tmp.cleanup()

    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("discover_s", "scan_s")} for k, v in runs.items()
    }
    print(
        f"\n{files} {opts.size}-px {opts.fmt} files, median of {opts.repeat}; cache files {size / 2**20:.2f} MiB\n"
    )
    print(
        "| run | discover | pre-flight scan | scan vs first | discover + scan | vs first |\n|---|---|---|---|---|---|"
    )
    first = med["first"]
    for name, m in med.items():
        total = m["discover_s"] + m["scan_s"]
        print(
            f"| {name} | {m['discover_s']:.3f} s | {m['scan_s']:.3f} s | {100 * m['scan_s'] / first['scan_s']:.1f}% | "
            f"{total:.3f} s | {100 * total / (first['discover_s'] + first['scan_s']):.1f}% |"
        )
    print("\nall runs:", json.dumps(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
