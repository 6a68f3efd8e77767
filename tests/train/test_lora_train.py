"""LoRA runs survive what every run survives: kill -9 then --resume (bitwise), and torchrun with 2 processes.

Real processes of the real CLI (through ``tests/_fault_driver.py`` and the zygote), real PEFT adapters on a
tiny timm ViT, a tiny generated image folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import _zygote as zygote
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ftsgd.data.synthetic import make_image_folder

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("peft") is None, reason="needs peft: pip install 'ftsgd[lora]'"
    ),
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and torchrun with Gloo"),
    pytest.mark.usefixtures("one_torch_thread"),
]

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "_fault_driver.py"
SETS = [
    "model.kwargs={img_size=32}",
    "data.img_size=32",
    "data.num_workers=0",
    'data.augment="rrc_flip"',
    "train.batch_size=8",
    "train.epochs=2",
    "train.checkpoint_every=2",
    "optim.lr=0.05",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """27 training images: global batches of 8, 8, 8, 3 (the last one all on rank 1 of two)."""
    root = tmp_path_factory.mktemp("lora") / "data"
    return make_image_folder(root, classes=3, size=32, per_class={"train": 9, "val": 3, "ood": 2})


def _args(data: Path, out: Path, recipe: str, sets: list[str]) -> list[str]:
    args = ["train", "--data", str(data), "--model", "test_vit", "--recipe", recipe, "--out", str(out)]
    return [*args, "--quiet", *[a for s in sets for a in ("--set", s)]]


def _env(fault: str = "") -> dict[str, str]:
    env = {**os.environ, "FTSGD_FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("FTSGD_DEBUG", None)
    return env


def _driver(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (one thread, as the reference)."""
    cmd = [sys.executable, str(DRIVER), *args]
    return zygote.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=300)


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_kill_9_then_resume_is_bitwise_identical(data: Path, tmp_path: Path) -> None:
    """LoRA dropout on (its masks come from the restored RNG): killed while writing the second checkpoint,
    then once more in the second epoch; the resumed run equals the uninterrupted one bit for bit."""
    sets = [*SETS, "lora.dropout=0.1"]
    ref = tmp_path / "ref"
    done = _driver(_args(data, ref, "lora-sgd-freeze-embed", sets))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    killed = _driver(_args(data, out, "lora-sgd-freeze-embed", sets), "kill_in_write=checkpoint.pt:2:partial")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _checkpoint(out)["state"]["global_step"] == 2
    resume = ["train", "--data", str(data), "--out", str(out), "--resume", "--quiet"]
    killed = _driver(resume, "kill_in_write=checkpoint.pt:2:partial")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = _driver(resume)
    assert finished.returncode == 0, finished.stderr
    a, b = _checkpoint(ref), _checkpoint(out)
    assert a["state"]["global_step"] == b["state"]["global_step"] == 8
    assert any(".lora_B." in k for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    ea, eb = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert (out / "lora" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torchrun with Gloo")
def test_two_processes_train_the_same_adapters_as_one(data: Path, tmp_path: Path) -> None:
    """AdamW LoRA under DDP (2 processes, Gloo) against one process; dropout off, as each process draws its
    own masks (like drop-path)."""
    sets = [*SETS, "lora.dropout=0.0", "optim.lr=0.005", "train.micro_batch_size=4"]
    one = tmp_path / "one"
    done = _driver(_args(data, one, "lora", sets))
    assert done.returncode == 0, done.stderr
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, "--no-python", zygote.launcher(), str(DRIVER), *_args(data, two, "lora", sets)]
    job = zygote.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, start_new_session=True)
    assert job.returncode == 0, job.stderr
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    wa, wb = _checkpoint(one)["model"], _checkpoint(two)["model"]
    assert wa.keys() == wb.keys() and any(".lora_A." in k for k in wa)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-5, msg=key)
    ea, eb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert ea.keys() == eb.keys() and not any("lora" in k for k in ea)
