"""Shared fixtures: a synthetic dataset for the whole session and a factory for custom layouts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftsgd.data.synthetic import make_image_folder

MakeFolder = Callable[..., Path]


@pytest.fixture(scope="session", autouse=True)
def _cores_shared_by_the_workers() -> Iterator[None]:
    """Under pytest-xdist, each worker's torch gets its share of the cores (the runs here are tiny).

    Two workers with torch's default of one intra-op thread per core would each run two threads on a
    2-core machine: four busy threads on two cores, every training step slower for it.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _no_user_scan_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the whole session off the user's ``~/.cache/ftsgd``, module-scoped fixtures that train included.

    Those are set up before any function-scoped fixture, so :func:`_private_scan_cache` alone is too late.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTSGD_CACHE_DIR", str(tmp_path_factory.mktemp("ftsgd-cache-session")))
        mp.delenv("FTSGD_SCAN_CACHE", raising=False)
        yield


@pytest.fixture(autouse=True)
def _private_scan_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Give every test its own empty scan cache, never the user's ``~/.cache/ftsgd``.

    Set in the environment, so ``ftsgd`` processes a test starts use it too. The cache stays on, so
    reruns and resumes within a test go through it as they do for users.
    """
    folder = tmp_path_factory.mktemp("ftsgd-cache")
    monkeypatch.setenv("FTSGD_CACHE_DIR", str(folder))
    monkeypatch.delenv("FTSGD_SCAN_CACHE", raising=False)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a whole test module, as its subprocesses get with ``OMP_NUM_THREADS=1``.

    Bitwise comparisons with those processes need the same thread count (float sums depend on it), and
    on a busy two-core machine two OpenMP threads only make tiny training steps slower. Modules take it
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``, which sets it up before their own
    module-scoped runs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class synthetic dataset (train/val/ood, 32x32 PNGs), written once per test session.

    Treat it as read-only; tests that change files use ``make_folder`` or copy it.
    """
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, size=32)


@pytest.fixture
def make_folder(tmp_path: Path) -> MakeFolder:
    """Factory for small custom image-folder layouts.

    ``make_folder({"train": {"cat": 2, "dog": 1}, "val": {"cat": 1, "dog": 0}})`` writes random
    ``size`` x ``size`` images (a count of 0 makes an empty class folder) and returns the root.
    """
    counter = iter(range(1_000_000))

    def make(
        layout: dict[str, dict[str, int]], *, size: int = 16, fmt: str = "png", root: Path | None = None
    ) -> Path:
        root = root if root is not None else tmp_path / f"ds{next(counter)}"
        rng = np.random.default_rng(0)
        for split, classes in layout.items():
            for cls, n in classes.items():
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.{fmt}")
        return root

    return make


@pytest.fixture(scope="session")
def trained_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a tiny ViT fine-tuned for 2 epochs on ``image_folder`` by the real Trainer.

    Shared by the inference tests (predict, eval's confusion matrix, ONNX export); treat it as read-only.
    """
    from ftsgd.run.checks import load_checked_recipe
    from ftsgd.train.trainer import Trainer

    recipe = load_checked_recipe(
        "sgd-freeze-embed",
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            f'data.root="{image_folder}"',
            "data.num_workers=0",
            'data.augment="flip"',
            "train.batch_size=16",
            "train.epochs=2",
            "optim.lr=0.02",
        ],
    )
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(recipe, out, quiet=True).fit()
    return out
