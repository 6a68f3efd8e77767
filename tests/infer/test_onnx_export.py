"""ftsgd export --onnx: the ONNX model's logits match PyTorch's, any batch size, checked before it is kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.images import load_image
from ftsgd.infer import onnx_export
from ftsgd.infer.export import inference_transform, load_exported_model

runner = CliRunner()


def _require_onnx() -> None:
    for name in onnx_export.ONNX_PACKAGES:
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def exported(trained_run: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    _require_onnx()
    out = tmp_path_factory.mktemp("onnx") / "sub" / "model.onnx"  # the folder is created
    result = runner.invoke(
        app, ["export", str(trained_run), "--onnx", str(out), "--data", str(image_folder / "ood"), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.mark.slow
def test_onnx_logits_match_pytorch_at_any_batch_size(exported, trained_run: Path, image_folder: Path) -> None:
    import onnxruntime as ort

    out, report = exported
    assert report["passed"] is True and report["max_abs_diff"] <= onnx_export.ATOL
    assert report["checked_on"] == f"8 images from {image_folder / 'ood'}" and report["batch_sizes"] == [8, 1]
    assert report["input"] == ["batch", 3, 32, 32] and report["bytes"] == out.stat().st_size

    model, meta = load_exported_model(trained_run)
    transform = inference_transform(meta)
    files = sorted((image_folder / "val").rglob("*.png"))[:5]  # other images, a batch size not exported
    x = torch.stack([transform(load_image(f)) for f in files])
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 3, 32, 32]
    (got,) = session.run(["logits"], {"input": x.numpy()})
    assert got.shape == (5, 3)
    assert abs(got - want).max() <= onnx_export.ATOL + onnx_export.RTOL * abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()

    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == ["circle", "square", "triangle"]
    assert json.loads(props["input_size"]) == [3, 32, 32]
    assert json.loads(props["mean"]) == list(meta["mean"]) and props["architecture"] == "test_vit"


@pytest.mark.slow
def test_plain_output_and_random_inputs(exported, trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(trained_run), "--onnx", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "8 random inputs at batch sizes 8, 1: max |onnx - torch| = " in result.stdout
    assert out.stat().st_size == exported[0].stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


@pytest.mark.slow
def test_a_failed_check_writes_nothing(
    exported, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(onnx_export, "ATOL", -1.0)  # no model can pass: the failure path, for real
    result = runner.invoke(app, ["export", str(trained_run), "--onnx", str(out)])
    assert result.exit_code == 1
    assert "differ from PyTorch's by up to" in result.stderr and "nothing was written" in result.stderr
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_bad_paths_exit_2(trained_run: Path, tmp_path: Path) -> None:
    _require_onnx()
    result = runner.invoke(app, ["export", str(trained_run), "--onnx", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.stderr
    (tmp_path / "empty").mkdir()
    args = ["export", str(trained_run), "--onnx", str(tmp_path / "m.onnx")]
    result = runner.invoke(app, [*args, "--data", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no image files" in result.stderr
    result = runner.invoke(app, [*args, "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "is not a folder" in result.stderr
    result = runner.invoke(app, ["export", str(tmp_path / "no-run"), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "no exported model" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_missing_packages_exit_2_with_the_install_command(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # how Python marks a module as not importable
    result = runner.invoke(app, ["export", str(trained_run), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "onnxruntime" in result.stderr and "pip install 'ftsgd[onnx]'" in result.stderr
    assert not (tmp_path / "m.onnx").exists()
