"""A corpus of malformed inputs, each run through the real CLI: exit code, message, no traceback.

* ``tests/corpus/recipes/*.toml``: malformed recipes. Each file starts with ``# expect-exit: N`` and
  one or more ``# expect: FRAGMENT`` lines, every fragment must appear in the message (they name the
  offending key).
* Malformed images and weights files are generated here, byte for byte, by the functions in
  ``BAD_IMAGES`` and ``BAD_WEIGHTS``.

Every case also checks that nothing was started: a bad input is caught before a run directory exists.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import _zygote as zygote
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ftsgd.cli.app import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = Path(__file__).parents[1] / "corpus" / "recipes"
RECIPES = sorted(CORPUS.glob("*.toml"))


def _expectations(path: Path) -> tuple[int, list[str]]:
    code, fragments = None, []
    for line in path.read_text().splitlines():
        if line.startswith("# expect-exit:"):
            code = int(line.split(":", 1)[1])
        elif line.startswith("# expect:"):
            fragments.append(line.split(":", 1)[1].strip())
    assert code is not None and fragments, f"{path.name}: needs '# expect-exit:' and '# expect:' lines"
    return code, fragments


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit | None), result.exception  # handled, not a crash
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _train(data: Path, out: Path, *extra: str) -> tuple[int, str]:
    return _run(["train", "--data", str(data), "--out", str(out), "--quiet", *extra])


TINY = ("--set", "model.kwargs={img_size=32}", "--set", "data.num_workers=0", "--set", "train.batch_size=4")


def test_corpus_is_big_enough() -> None:
    assert len(RECIPES) >= 20


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_malformed_recipe(path: Path, image_folder: Path, tmp_path: Path) -> None:
    code, fragments = _expectations(path)
    out = tmp_path / "run"
    exit_code, output = _train(image_folder, out, "--recipe", str(path))
    assert exit_code == code, output
    assert output.startswith("error: ")
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert not out.exists()


def test_missing_data_folder_names_the_option(tmp_path: Path) -> None:
    exit_code, output = _train(tmp_path / "nope", tmp_path / "run", "--model", "test_vit")
    assert exit_code == 2
    assert f"data.root: dataset folder {tmp_path / 'nope'} does not exist (--data)" in output


def test_bad_set_override(image_folder: Path, tmp_path: Path) -> None:
    exit_code, output = _train(image_folder, tmp_path / "run", "--model", "test_vit", "--set", "optim.lr")
    assert exit_code == 2 and "expected KEY.PATH=VALUE" in output


# --------------------------------------------------------------------------- images


def _encode(fmt: str, size: int = 32, **kwargs: object) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bad_crc_png() -> bytes:
    data = bytearray(_encode("PNG"))
    data[data.index(b"IDAT") + 10] ^= 0xFF
    return bytes(data)


def _bomb_png() -> bytes:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # claims 10^10 pixels
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


# name -> (bytes, or None for a dangling symlink; the kind the scan reports)
BAD_IMAGES: dict[str, tuple[Callable[[], bytes | None], str]] = {
    "truncated.png": (lambda: _encode("PNG")[: len(_encode("PNG")) // 2], "truncated"),
    "truncated.jpg": (lambda: _encode("JPEG", quality=90)[:-300], "truncated"),
    "truncated.bmp": (lambda: _encode("BMP")[:-1000], "truncated"),
    "truncated.tif": (lambda: _encode("TIFF")[:-1000], "truncated"),
    "truncated.webp": (lambda: _encode("WEBP", lossless=True)[:200], "corrupt"),
    "zero_bytes.jpg": (lambda: b"", "empty file"),
    "text_file.jpg": (lambda: b"label,path\ncat,img1.jpg\n", "not an image"),
    "error_page.png": (lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not an image"),
    "wrong_magic.png": (lambda: b"\x89PNX\r\n\x1a\n" + _encode("PNG")[8:], "not an image"),
    "bad_crc.png": (_bad_crc_png, "corrupt"),
    "bomb.png": (_bomb_png, "too large"),
    "dangling_link.jpg": (lambda: None, "unreadable"),
}


def _write_bad(folder: Path, name: str) -> Path:
    path = folder / name
    content = BAD_IMAGES[name][0]()
    if content is None:
        path.symlink_to(folder / "deleted-target.jpg")
    else:
        path.write_bytes(content)
    return path


def _odd_but_valid(folder: Path) -> list[Path]:
    """Images in modes training must convert, not reject."""
    grad = np.linspace(0, 255, 32 * 32).reshape(32, 32)
    images = {
        "grey.png": Image.fromarray(grad.astype(np.uint8)),
        "grey_alpha.png": Image.fromarray(grad.astype(np.uint8)).convert("LA"),
        "rgba.png": Image.fromarray(grad.astype(np.uint8)).convert("RGBA"),
        "palette_transparent.png": Image.fromarray(grad.astype(np.uint8)).convert("P"),
        "grey16.png": Image.fromarray((grad * 257).astype(np.uint16)),
        "cmyk.jpg": Image.fromarray(grad.astype(np.uint8)).convert("CMYK"),
        "one_bit.bmp": Image.fromarray(grad.astype(np.uint8)).convert("1"),
        "float.tif": Image.fromarray((grad / 255).astype(np.float32)),
    }
    paths = []
    for name, img in images.items():
        kwargs = {"transparency": 0} if name == "palette_transparent.png" else {}
        img.save(folder / name, **kwargs)
        paths.append(folder / name)
    return paths


def test_corpus_has_ten_bad_images_and_weights() -> None:
    assert len(BAD_IMAGES) >= 10 and len(BAD_WEIGHTS) >= 10


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_malformed_image_fails_before_training(name: str, make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    _write_bad(root / "train" / "a", name)
    out = tmp_path / "run"
    exit_code, output = _train(root, out, "--model", "test_vit", *TINY)
    assert exit_code == 2, output
    kind = BAD_IMAGES[name][1]
    assert f"1 of 7 image files under {root} cannot be read (pre-flight scan):" in output
    assert f"  {kind} (1):\n    {Path('train', 'a', name)}: " in output
    assert 'data.on_bad_image = "skip"' in output
    assert not out.exists()  # failed before the model was built or anything was written


def test_all_problems_reported_together_then_skipped(make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}, "ood": {"a": 2, "b": 2}})
    bad = [_write_bad(root / "train" / "a", name) for name in BAD_IMAGES]
    for i in range(7):  # more truncated files than a message lists
        path = root / ("val" if i % 2 else "ood") / "b" / f"cut{i}.png"
        path.write_bytes(_encode("PNG")[:100])
        bad.append(path)
    good = _odd_but_valid(root / "train" / "b")
    n_files = 4 + 4 + 2 + 2 + 2 + 2 + len(bad) + len(good)

    exit_code, output = _train(root, tmp_path / "run1", "--model", "test_vit", *TINY)
    assert exit_code == 2
    assert f"{len(bad)} of {n_files} image files under {root} cannot be read" in output
    assert "  truncated (11):" in output and "    ... and 6 more" in output
    for kind in ("not an image (3)", "corrupt (2)", "empty file (1)", "too large (1)", "unreadable (1)"):
        assert f"  {kind}:" in output, kind
    assert not any(p.name in output for p in good)  # odd modes are converted, not rejected

    out = tmp_path / "run2"
    exit_code, output = _train(
        root, out, "--model", "test_vit", *TINY, "--set", "data.on_bad_image=skip", "--set", "train.epochs=1"
    )
    assert exit_code == 0, output
    assert f"skipped {len(bad)} unreadable image(s)" in output and str(out / "skipped.txt") in output
    lines = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(str(p) for p in bad)
    assert {line.split("\t")[1] for line in lines} == {"train", "val", "ood"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == len(bad)
    assert summary["split_sizes"] == {"train": 8 + len(good), "val": 4, "ood": 4}  # the bad ones left out


def test_skipping_every_image_of_a_class_is_an_error(make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"a": 2, "b": 0}, "val": {"a": 1, "b": 1}})
    (root / "train" / "b" / "only.jpg").write_bytes(b"")
    out = tmp_path / "run"
    exit_code, output = _train(root, out, "--model", "test_vit", *TINY, "--set", "data.on_bad_image=skip")
    assert exit_code == 2
    assert "no readable image left in class folder(s) b" in output
    assert not out.exists()


def test_structural_problems_of_all_splits_reported_together(make_folder, tmp_path: Path) -> None:
    root = make_folder(
        {"train": {"a": 1, "b": 0}, "val": {"a": 1, "c": 1}, "ood": {"a": 1, "d": 1}}  # b empty; c, d unknown
    )
    exit_code, output = _train(root, tmp_path / "run", "--model", "test_vit")
    assert exit_code == 2
    assert f"3 problems with the dataset {root}:" in output
    assert "class folder(s) without images: b" in output
    assert "lacks: 'c'" in output and "lacks: 'd'" in output


# --------------------------------------------------------------------------- data that means something else


def _tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "test_vit", *TINY, *extra]


def test_single_class_dataset_refused_before_anything_runs(make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"cat": 4}, "val": {"cat": 2}})
    out = tmp_path / "run"
    exit_code, output = _train(root, out, "--model", "test_vit", *TINY)
    assert exit_code == 2, output
    assert output == (
        f"error: train split {root / 'train'} has a single class folder ('cat'); a classifier needs at "
        "least two classes, one sub-folder of train/ each\n"
    )
    assert not out.exists()


def test_link_loop_in_a_class_folder_does_not_multiply_images(make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"a": 12, "b": 12}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "loop").symlink_to("..")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        _tiny_train_args(
            root,
            out,
            "--json",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=12",
            "--set",
            "data.augment=flip",  # 16-px images: rrc_flip would add its small-crop warning
        ),
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split_sizes"] == {"train": 24, "val": 2}
    assert result.stderr == (
        "warning: did not follow 1 folder link(s) to a folder already read (a link loop, or a second way "
        f"to the same folder; each folder is read once): train/a/loop -> {(root / 'train').resolve()}\n"
    )


def _add_unread_files(folder: Path) -> None:
    """A GIF (read) and files that are not images by their name (ignored, and said so)."""
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "web.gif")
    Image.new("RGB", (32, 32)).save(folder / "IMG_0001", format="JPEG")
    (folder / "notes.txt").write_text("x")


def test_train_and_eval_say_which_files_they_ignored(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    _add_unread_files(data / "train" / "circle")
    _add_unread_files(data / "ood" / "square")
    ignored = (
        "warning: ignored {n} file(s) that are not images in a class folder:\n"
        "  .txt files ({k}): not an image type; e.g. {txt}\n"
        "  files without extension ({k}): ftsgd recognises images by their extension (.jpg, .png, .gif, "
        "...); rename those that are images; e.g. {raw}\n"
    )
    out = tmp_path / "run"
    one_epoch = ("--set", "train.epochs=1", "--set", "train.batch_size=25", "--set", "data.augment=none")
    result = CliRunner().invoke(app, _tiny_train_args(data, out, "--json", *one_epoch))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split_sizes"] == {"train": 73, "val": 24, "ood": 25}  # + the GIFs
    assert result.stderr == ignored.format(
        n=4,
        k=2,
        txt="train/circle/notes.txt, ood/square/notes.txt",
        raw="train/circle/IMG_0001 (a JPEG image), ood/square/IMG_0001 (a JPEG image)",
    )

    _export_tiny_vit(tmp_path / "exp")
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "exp"), "--data", str(data), "--split", "ood", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ood"]["n"] == 25
    assert result.stderr == ignored.format(
        n=2, k=1, txt="ood/square/notes.txt", raw="ood/square/IMG_0001 (a JPEG image)"
    )


@pytest.mark.slow
def test_image_over_pil_pixel_limit_is_reported_by_ftsgd_not_pil(make_folder, tmp_path: Path) -> None:
    """A real process with PIL's real limit (89,478,485 pixels) and nothing between it and stderr."""
    import sys

    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    Image.new("1", (9500, 9500)).save(root / "train" / "a" / "pano.png")  # 90.25 M pixels, 11 kB
    out = tmp_path / "run"
    proc = zygote.run(
        [sys.executable, "-m", "ftsgd", *_tiny_train_args(root, out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        f"error: 1 of 7 image files under {root} cannot be read (pre-flight scan):\n"
        "  too large (1):\n"
        f"    {Path('train', 'a', 'pano.png')}: 9500x9500 = 90,250,000 pixels, over PIL's decompression-bomb "
        "limit of 89,478,485; downscale it\n"
        "Fix or remove these files, or leave them out with --set data.on_bad_image=skip "
        '(data.on_bad_image = "skip" in the recipe); skipped files are listed in the run directory.\n'
    )
    assert not out.exists()


# --------------------------------------------------------------------------- weights


class _RunsCode:
    """Unpickling this would call os.system: a stand-in for a malicious weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _vit_state(name: str = "test_vit", **kwargs: object) -> dict[str, torch.Tensor]:
    model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))


def _w_pickle_exec(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}))


def _w_torch_zip_exec(path: Path, marker: Path) -> None:
    torch.save({"model": _vit_state(img_size=32), "hook": _RunsCode(marker)}, path)


def _w_numpy_objects(path: Path, _marker: Path) -> None:
    torch.save({"w": np.ones(3), "arr": np.arange(4)}, path)


def _w_truncated_safetensors(path: Path, _marker: Path) -> None:
    _safetensors(path, _vit_state(img_size=32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _w_truncated_pth(path: Path, _marker: Path) -> None:
    torch.save(_vit_state(img_size=32), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _w_bad_header(path: Path, _marker: Path) -> None:
    path.write_bytes(struct.pack("<Q", 10**9) + b'{"w": ')  # header length beyond the file


def _w_garbage_bin(path: Path, _marker: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _w_empty(path: Path, _marker: Path) -> None:
    path.write_bytes(b"")


def _w_no_tensors(path: Path, _marker: Path) -> None:
    torch.save({"epoch": 3, "best_acc": 0.9}, path)


def _w_other_arch(path: Path, _marker: Path) -> None:
    _safetensors(path, _vit_state("test_vit3", img_size=32))  # same key names, other widths


def _w_unrelated(path: Path, _marker: Path) -> None:
    _safetensors(path, _vit_state("test_resnet"))


def _w_unknown_type(path: Path, _marker: Path) -> None:
    path.write_bytes(b"\x08\x07onnx")


# file name -> (writer, fragments of the message)
BAD_WEIGHTS: dict[str, tuple[Callable[[Path, Path], None], list[str]]] = {
    "pickle_exec.pth": (_w_pickle_exec, ["refusing to load", "posix.system", "can run arbitrary code"]),
    "torch_zip_exec.pt": (_w_torch_zip_exec, ["refusing to load", "system", "can run arbitrary code"]),
    "numpy_objects.pth": (_w_numpy_objects, ["refusing to load", "numpy"]),
    "truncated.safetensors": (_w_truncated_safetensors, ["it is truncated or not a valid weights file"]),
    "truncated.pth": (_w_truncated_pth, ["it is truncated or not a valid weights file"]),
    "bad_header.safetensors": (_w_bad_header, ["it is truncated or not a valid weights file"]),
    "garbage.bin": (_w_garbage_bin, ["it is truncated or not a valid weights file"]),
    "empty.safetensors": (_w_empty, ["it is truncated or not a valid weights file"]),
    "no_tensors.pth": (_w_no_tensors, ["contains no tensors", "top-level keys: epoch, best_acc"]),
    "other_arch.safetensors": (
        _w_other_arch,
        [
            "have a different shape than in test_vit",
            "patch_embed.proj.weight: file (96, 3, 16, 16) vs model (64, 3, 16, 16)",
        ],
    ),
    "unrelated_model.safetensors": (_w_unrelated, ["match test_vit", "is it for another architecture?"]),
    "weights.onnx": (_w_unknown_type, ["unknown weights file type 'weights.onnx'"]),
}


@pytest.mark.parametrize("name", list(BAD_WEIGHTS))
def test_malformed_weights_file(name: str, image_folder: Path, tmp_path: Path) -> None:
    writer, fragments = BAD_WEIGHTS[name]
    path, marker = tmp_path / name, tmp_path / "code-was-run"
    writer(path, marker)
    out = tmp_path / "run"
    exit_code, output = _train(image_folder, out, "--model", "test_vit", "--weights", str(path), *TINY)
    assert exit_code == 2, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    assert path.name in output
    assert not marker.exists(), "loading the weights ran code from the file"
    assert not out.exists()


def _export_tiny_vit(folder: Path) -> None:
    """A 3-class test_vit export (the synthetic dataset's classes) written by ftsgd's own exporter."""
    from ftsgd.infer.export import export_model

    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    export_model(
        model,
        folder,
        architecture="test_vit",
        class_names=["circle", "square", "triangle"],
        data_config={},
        recipe_name="x",
        model_kwargs={"img_size": 32},
    )


def test_export_for_another_class_count_names_keys_and_shapes(image_folder: Path, tmp_path: Path) -> None:
    """``ftsgd eval`` of an export whose tensors do not fit the model its metadata describes."""
    from safetensors import safe_open

    _export_tiny_vit(tmp_path / "exp")
    path = tmp_path / "exp" / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta.update(num_classes="5", class_names=json.dumps(["circle", "square", "triangle", "x", "y"]))
    save_file(tensors, str(path), metadata=meta)
    exit_code, output = _run(["eval", str(path), "--data", str(image_folder)])
    assert exit_code == 2, output
    assert "do not fit 'test_vit'" in output
    assert "head.weight" in output and "[3, 64]" in output and "[5, 64]" in output


def test_image_broken_after_the_scan_is_one_line_even_from_a_worker(make_folder, tmp_path: Path) -> None:
    """A file that passes the scan and then breaks (a sync job rewriting it) fails the run in a
    DataLoader worker process; the message is still one line, not the worker's traceback."""
    from ftsgd.errors import DataError
    from ftsgd.recipe.load import load_recipe
    from ftsgd.train.trainer import Trainer

    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    victim = root / "train" / "a" / "0.png"
    recipe = load_recipe(
        None,
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            "data.img_size=32",
            f'data.root="{root}"',
            "data.num_workers=2",
            "train.epochs=1",
        ],
    )
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    trainer.setup()  # the pre-flight scan passes
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(DataError) as exc:
        trainer.fit()
    message = str(exc.value)
    assert message.startswith(f"cannot read image {victim}: image file is truncated")
    assert "worker" not in message and len(message.splitlines()) == 1


@pytest.mark.slow
def test_eval_scans_the_splits_it_evaluates(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    _export_tiny_vit(tmp_path / "exp")
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    _write_bad(data / "ood" / "square", "truncated.jpg")
    _write_bad(data / "ood" / "square", "zero_bytes.jpg")
    exit_code, output = _run(["eval", str(tmp_path / "exp"), "--data", str(data)])
    assert exit_code == 2
    assert f"2 of 50 image files under {data} cannot be read (pre-flight scan)" in output
    exit_code, output = _run(
        ["eval", str(tmp_path / "exp"), "--data", str(data), "--on-bad-image", "skip", "--json"]
    )
    assert exit_code == 0, output
    assert "warning: skipped 2 unreadable image(s)" in output
    exit_code, output = _run(["eval", str(tmp_path / "exp"), "--data", str(data), "--on-bad-image", "drop"])
    assert exit_code == 2 and "--on-bad-image must be error or skip" in output
