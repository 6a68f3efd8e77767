"""Training with bf16 weights (train.weight_dtype): what a run holds, what it exports, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.synthetic import make_image_folder
from ftsgd.infer.export import load_exported_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "_fault_driver.py"
SETS = [
    "model.kwargs={img_size=32}",
    "data.img_size=32",
    "data.num_workers=0",
    'data.augment="rrc_flip"',
    "train.batch_size=4",
    "train.epochs=2",
    "train.checkpoint_every=2",
    "optim.lr=0.02",
    "optim.momentum=0.9",  # a momentum buffer, to be resumed too
    'train.weight_dtype="bf16"',
]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out), "--model", "test_vit", "--quiet"]
    return args + [a for s in [*SETS, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bf16") / "data"
    return make_image_folder(root, classes=3, size=32, per_class={"train": 4, "val": 2, "ood": 2})


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    """One uninterrupted bf16 run (2 epochs of 3 steps), in this process."""
    out = data.parent / "reference"
    result = CliRunner().invoke(app, _args(data, out))
    assert result.exit_code == 0, result.output
    return out


def test_bf16_run_holds_bf16_weights_and_exports_float32(reference: Path) -> None:
    ckpt = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.bfloat16}  # 2 bytes/parameter all run
    momentum = [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
    assert momentum and {m.dtype for m in momentum} == {torch.bfloat16}  # MOMENTUM_DTYPE
    exported = load_file(reference / "model.safetensors")
    assert {v.dtype for v in exported.values()} == {torch.float32}
    for key, value in exported.items():  # bf16 values, written exactly in float32
        assert torch.equal(value, value.bfloat16().float()), key
    config = json.loads((reference / "config.json").read_text())
    assert config["training_weight_dtype"] == "bf16"
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["weight_dtype"] == "bf16" and summary["update_rounding"] == "stochastic"
    assert summary["amp"] == "bf16"  # bf16 weights compute in bf16 on any CPU
    model, meta = load_exported_model(reference)  # timm rebuilds it in float32, as any export
    assert meta["training_weight_dtype"] == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kill_9_then_resume_with_bf16_weights_is_bitwise_identical(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """SIGKILL half-way through the second checkpoint (step 4): resuming from step 2 redraws the very
    rounding bits of steps 3 and 4, so weights, momentum, export and metrics end bit for bit the same."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env["FTSGD_FAULT"] = "kill_in_write=checkpoint.pt:2:partial"
    killed = subprocess.run([sys.executable, str(DRIVER), *_args(data, out)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"] == 2
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    a = torch.load(reference / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["state"]["global_step"] == b["state"]["global_step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), i
    ea, eb = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
