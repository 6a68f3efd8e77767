"""Fault injection with real processes and real files: kill -9, SIGINT/SIGTERM, NaN, OOM, disk full.

Every interrupted run is resumed with ``ftsgd train --resume`` until it finishes, and its final
``checkpoint.pt`` (model and optimizer tensors), ``model.safetensors`` and ``metrics.jsonl`` (minus
timing fields) are compared bit for bit with one uninterrupted run of the same recipe. Subprocesses
run the real CLI through ``tests/_fault_driver.py``, which can also make a process SIGKILL itself at
an exact moment (half-way through a checkpoint write, before the rename of an export, during
evaluation) without changing any ftsgd code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _zygote as zygote
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.synthetic import make_image_folder

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.usefixtures("one_torch_thread"),
]

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "_fault_driver.py"
EVERY = 2  # train.checkpoint_every
STEPS_PER_EPOCH = 6  # 3 classes x 8 images / batch 4
EPOCHS = 3
TIMING = ("images_per_s", "epoch_time_s", "peak_memory_bytes")


def _sets(workers: int = 0) -> list[str]:
    return [
        "model.kwargs={img_size=32}",
        "data.img_size=32",
        f"data.num_workers={workers}",
        'data.augment="rrc_flip"',
        "train.batch_size=4",
        f"train.epochs={EPOCHS}",
        f"train.checkpoint_every={EVERY}",
        "optim.lr=0.02",
    ]


def _train_args(data: Path, out: Path, workers: int = 0) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out), "--model", "test_vit", "--quiet"]
    for s in _sets(workers):
        args += ["--set", s]
    return args


def _resume_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--resume", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    return make_image_folder(root, classes=3, size=32, per_class={"train": 8, "val": 2, "ood": 2})


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    """One uninterrupted run (in-process, num_workers = 0) every interrupted run must reproduce."""
    out = data.parent / "reference"
    result = CliRunner().invoke(app, _train_args(data, out))
    assert result.exit_code == 0, result.output
    return out


class Proc:
    """A real ``ftsgd`` subprocess run through the fault driver, its output in files."""

    def __init__(self, args: list[str], workdir: Path, tag: str, fault: str = "") -> None:
        self.log = workdir / f"{tag}.steps"
        self.stderr_path = workdir / f"{tag}.stderr"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "FTSGD_FAULT": ",".join(filter(None, [f"log={self.log}", fault])),
            "OMP_NUM_THREADS": "1",
        }
        env.pop("FTSGD_DEBUG", None)
        # Files, not pipes: DataLoader workers inherit them and may outlive a SIGKILLed parent.
        with open(workdir / f"{tag}.stdout", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = zygote.Popen(
                [sys.executable, str(DRIVER), *args], stdout=out, stderr=err, env=env, start_new_session=True
            )

    def signal_group(self, sig: int) -> None:
        """Signal the process and its DataLoader workers, as Ctrl-C in a terminal does."""
        os.killpg(self.proc.pid, sig)

    def steps(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    def wait_for_steps(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.steps() < n:
            if self.proc.poll() is not None:
                pytest.fail(f"process ended (rc {self.proc.returncode}) before step {n}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no step {n} within {timeout}s: {self.stderr()}")
            time.sleep(0.02)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _checkpoint_step(out: Path) -> int:
    return int(torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"])


def _assert_nothing_broken(out: Path) -> None:
    """Whatever moment a process died at, every file it writes is complete and parseable."""
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == 1 and ckpt["model"]
    if (out / "model.safetensors").exists():
        assert load_file(out / "model.safetensors")
        json.loads((out / "config.json").read_text())
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    assert not (out / "summary.json").exists()  # only a finished run has one


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    a = torch.load(reference / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["state"]["global_step"] == b["state"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():  # SGD momentum buffers
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    ref_export, export = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref_export.keys() == export.keys()
    for key in ref_export:
        assert torch.equal(ref_export[key], export[key]), key
    assert _metrics(out) == _metrics(reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == json.loads((reference / "summary.json").read_text())["best_epoch"]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def _killed_then_check(proc: Proc, out: Path, start_step: int, rc: int = -signal.SIGKILL) -> int:
    """Wait for a process that must have died with ``rc``; check its files and the work it loses.

    Returns the checkpoint's global step (where the next ``--resume`` starts).
    """
    assert proc.wait() == rc, proc.stderr()
    _assert_nothing_broken(out)
    progress = start_step + proc.steps()
    saved = _checkpoint_step(out)
    assert 0 <= progress - saved <= EVERY, (progress, saved)
    return saved


@pytest.mark.slow
def test_kill_9_at_any_point_then_resume_is_bitwise_identical(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """num_workers = 2: SIGKILL from outside mid-epoch, then SIGKILL half-way through a checkpoint
    write, before an export's rename and during evaluation, then Ctrl-C (SIGINT to the whole process
    group); --resume after each; same bits at the end."""
    out = tmp_path / "run"

    p = Proc(_train_args(data, out, workers=2), tmp_path, "p1", "delay=0.15")
    p.wait_for_steps(3)  # checkpoint of step 2 written, epoch 1 under way
    p.proc.send_signal(signal.SIGKILL)
    step = _killed_then_check(p, out, 0)

    # Each fault below hits the first time its moment comes after resuming.
    for tag, fault in [
        ("p2", "kill_in_write=model.safetensors:1:before_rename"),  # epoch 1 is always the best so far
        ("p3", "kill_in_write=checkpoint.pt:2:partial"),
        ("p4", "kill_in_eval=1"),
    ]:
        p = Proc(_resume_args(data, out), tmp_path, tag, fault)
        step = _killed_then_check(p, out, step)
        assert any(out.glob(".*.tmp")) == (tag != "p4")  # a killed writer leaves only its temporary

    # Ctrl-C in a terminal: SIGINT reaches the workers too, which die first; still exit 130, no step lost.
    p = Proc(_resume_args(data, out), tmp_path, "p5", "delay=0.15")
    p.wait_for_steps(1)
    p.signal_group(signal.SIGINT)
    assert p.wait() == 130, p.stderr()
    assert "interrupted by SIGINT; checkpoint saved. Resume with:" in p.stderr()
    assert "Traceback" not in p.stderr()
    step += p.steps()
    assert _checkpoint_step(out) == step

    p = Proc(_resume_args(data, out), tmp_path, "p6")
    assert p.wait() == 0, p.stderr()
    assert p.steps() == EPOCHS * STEPS_PER_EPOCH - step
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_sigterm_sigint_and_kill_9_then_resume_is_bitwise_identical(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """num_workers = 0: SIGTERM -> 143, SIGINT -> 130 and SIGUSR1 -> 138 lose no step; a SIGKILL loses
    < checkpoint_every."""
    out = tmp_path / "run"
    step = 0
    for tag, args, sig, rc in [
        ("term", _train_args(data, out), signal.SIGTERM, 143),
        ("int", _resume_args(data, out), signal.SIGINT, 130),
        ("usr1", _resume_args(data, out), signal.SIGUSR1, 138),  # Slurm's notice before a time limit
    ]:
        p = Proc(args, tmp_path, tag, "delay=0.15")
        p.wait_for_steps(3)
        p.proc.send_signal(sig)
        assert p.wait() == rc, p.stderr()
        err = p.stderr()
        assert f"interrupted by {signal.Signals(sig).name}; checkpoint saved. Resume with:" in err
        assert f"--out {out} --resume" in err and "Traceback" not in err
        _assert_nothing_broken(out)
        step += p.steps()
        assert _checkpoint_step(out) == step  # the step in flight finished and was saved

    p = Proc(_resume_args(data, out), tmp_path, "kill", "delay=0.15")
    p.wait_for_steps(3)
    p.proc.send_signal(signal.SIGKILL)
    step = _killed_then_check(p, out, step)

    p = Proc(_resume_args(data, out), tmp_path, "done")
    assert p.wait() == 0, p.stderr()
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_writers_killed_at_random_moments_never_leave_a_broken_file(tmp_path: Path) -> None:
    """A process rewriting a checkpoint, an export, metrics.jsonl and summary.json in a loop is
    SIGKILLed at arbitrary moments; every file is always a complete old or new version."""
    script = f"""
import json, sys, torch
from ftsgd.utils.fileio import atomic_save_safetensors, atomic_torch_save, atomic_write_text
d = {str(tmp_path)!r}
print("ready", flush=True)
i = 0
while True:
    w = torch.full((256, 256), float(i))
    atomic_torch_save({{"i": i, "w": w, "m": w.clone()}}, d + "/checkpoint.pt")
    atomic_save_safetensors({{"w": w}}, d + "/model.safetensors", metadata={{"i": str(i)}})
    atomic_write_text(d + "/metrics.jsonl", "".join(json.dumps({{"epoch": e}}) + "\\n" for e in range(i + 1)))
    atomic_write_text(d + "/summary.json", json.dumps({{"i": i, "pad": "x" * 100000}}))
    i += 1
"""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    seen = set()
    for delay in (0.3, 0.47, 0.61):
        proc = zygote.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if (tmp_path / "checkpoint.pt").exists():
            ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
            assert torch.equal(ck["w"], torch.full((256, 256), float(ck["i"]))) and torch.equal(
                ck["w"], ck["m"]
            )
            seen.add(ck["i"])
        if (tmp_path / "model.safetensors").exists():
            w = load_file(tmp_path / "model.safetensors")["w"]
            assert torch.equal(w, torch.full((256, 256), w[0, 0].item()))
        if (tmp_path / "metrics.jsonl").exists():
            lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(x)["epoch"] for x in lines] == list(range(len(lines)))
        if (tmp_path / "summary.json").exists():
            assert len(json.loads((tmp_path / "summary.json").read_text())["pad"]) == 100000
    assert seen  # the loop did get to write checkpoints


# --------------------------------------------------------------------------- NaN, OOM, disk full


@pytest.mark.slow
def test_diverging_run_exits_1_naming_the_step_and_keeps_a_finite_checkpoint(
    data: Path, tmp_path: Path
) -> None:
    """A real process: lr = 1e10 makes the loss NaN at step 2; the step-1 checkpoint stays usable."""
    out = tmp_path / "run"
    args = [*_train_args(data, out), "--set", "optim.lr=1e10", "--set", "train.checkpoint_every=1"]
    p = Proc(args, tmp_path, "nan")
    assert p.wait() == 1
    err = p.stderr()
    assert "training loss became nan at epoch 1, step 2 (global step 2)" in err
    assert "last good checkpoint (global step 1)" in err and "Traceback" not in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_weights_turning_nan_are_never_saved(data: Path, tmp_path: Path) -> None:
    """lr = 1e6: the loss is still finite when the update makes the weights NaN; that step's
    checkpoint must not be written over the good one."""
    out = tmp_path / "run"
    args = [*_train_args(data, out), "--set", "optim.lr=1e6", "--set", "train.checkpoint_every=1"]
    args += ["--set", 'train.amp="none"']  # in bf16 the loss itself overflows first
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "the weights became NaN or inf at epoch 1, global step 2" in result.output
    assert "last good checkpoint (global step 1)" in result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


OOM = torch.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity; 6.10 GiB already "
    "allocated)\nmore details"
)


def _assert_oom_advice(text: str) -> None:
    assert "out of GPU memory while training test_vit" in text and "Traceback" not in text
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in text and "more details" not in text
    for option in (
        "train.micro_batch_size",
        "train.grad_checkpointing=true",
        "optim.step_in_backward=true",
        "sgd-freeze-embed-lowmem",
    ):
        assert option in text, option


def _trainer(data: Path, out: Path, *extra: str):
    from ftsgd.recipe.load import load_recipe
    from ftsgd.train.trainer import Trainer

    recipe = load_recipe(None, ['model.name="test_vit"', f'data.root="{data}"', *_sets(), *extra])
    return Trainer(recipe, out, quiet=True)


def test_cuda_out_of_memory_in_a_step_exits_1_with_advice(data: Path, tmp_path: Path) -> None:
    """CPU-only machines cannot run out of GPU memory, so the model raises the real exception type."""
    from ftsgd.errors import RunError

    out = tmp_path / "run"
    trainer = _trainer(data, out, "train.checkpoint_every=1")
    trainer.setup()
    calls = []

    def hook(module, _inputs):
        calls.append(1)
        if len(calls) == 2:  # second step: a checkpoint of step 1 exists
            raise OOM

    trainer.model.register_forward_pre_hook(hook)
    with pytest.raises(RunError) as exc:
        trainer.fit()
    assert exc.value.exit_code == 1
    _assert_oom_advice(str(exc.value))
    assert _checkpoint_step(out) == 1


def test_cuda_out_of_memory_placing_the_model_is_clear(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftsgd.errors import RunError

    trainer = _trainer(data, tmp_path / "run")
    trainer.setup()

    def to(*_a, **_k):
        raise OOM

    monkeypatch.setattr(trainer.model, "to", to)  # this model instance only
    with pytest.raises(RunError) as exc:
        trainer.place_model()
    _assert_oom_advice(str(exc.value))


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    )
    return result.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs")
def test_disk_full_keeps_previous_checkpoint_and_resume_finishes(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """A real full file system (a small tmpfs): the second checkpoint cannot be written."""
    size = (reference / "checkpoint.pt").stat().st_size
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, size * 3 // 2 + 64 * 1024):  # room for one checkpoint, not two
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        out = mnt / "run"
        result = CliRunner().invoke(app, _train_args(data, out))
        assert result.exit_code == 1, result.output
        assert f"could not write {out / 'checkpoint.pt'}: No space left on device" in result.output
        assert "the previous file is intact" in result.output and "Traceback" not in result.output
        assert _checkpoint_step(out) == EVERY  # the step-2 checkpoint survived the failed step-4 write
        assert not any(out.glob(".*.tmp"))

        subprocess.run(["mount", "-o", f"remount,size={64 * 2**20}", str(mnt)], check=True)
        result = CliRunner().invoke(app, _resume_args(data, out))
        assert result.exit_code == 0, result.output
        _assert_same_as_reference(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------ rerun safety


def _resume_full_args(data: Path, out: Path) -> list[str]:
    """The whole command line plus --resume: what a cron job runs again and again."""
    return [*_train_args(data, out), "--resume"]


@pytest.mark.slow
def test_the_identical_command_with_resume_survives_kill_9_at_random_moments(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """Five runs of one command line, each but the last SIGKILLed at a random moment (the first before
    any checkpoint exists), end with exactly the uninterrupted run's weights; a sixth run is a no-op."""
    import random

    rng = random.Random(12)
    out = tmp_path / "run"
    for attempt in range(4):
        p = Proc(_resume_full_args(data, out), tmp_path, f"p{attempt}", "delay=0.05")
        if attempt == 0:  # while scanning or building the model: no checkpoint yet
            deadline = time.monotonic() + 90
            while not (out / ".ftsgd.lock").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))
        else:
            p.wait_for_steps(rng.randint(1, 6))
            time.sleep(rng.uniform(0, 0.3))
        p.signal_group(signal.SIGKILL)
        p.wait()
        if attempt == 0:
            assert not (out / "checkpoint.pt").exists()
    p = Proc(_resume_full_args(data, out), tmp_path, "p4")
    assert p.wait() == 0, p.stderr()
    _assert_same_as_reference(out, reference)
    before = (out / "summary.json").read_bytes()
    p = Proc(_resume_full_args(data, out), tmp_path, "p5")
    assert p.wait() == 0, p.stderr()
    assert p.steps() == 0 and (out / "summary.json").read_bytes() == before


@pytest.mark.slow
def test_two_trains_on_one_out_at_once_one_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runs = {
        lr: Proc([*_train_args(data, out), "--set", f"optim.lr={lr}"], tmp_path, f"lr{lr}", "delay=0.05")
        for lr in ("0.01", "0.0001")
    }
    codes = {lr: p.wait() for lr, p in runs.items()}
    assert sorted(codes.values()) == [0, 2], {lr: (c, runs[lr].stderr()) for lr, c in codes.items()}
    winner = next(lr for lr, c in codes.items() if c == 0)
    loser = next(lr for lr, c in codes.items() if c == 2)
    refusal = runs[loser].stderr()
    assert "is in use by PID" in refusal or "already exists and is not empty" in refusal, refusal
    assert runs[loser].steps() == 0
    assert f"lr = {float(winner)!r}" in (out / "recipe.toml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == float(winner) and summary["steps"] == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.slow
def test_a_lock_left_by_kill_9_does_not_block_the_next_run(data: Path, tmp_path: Path) -> None:
    from ftsgd.run.rundir import locked

    out = tmp_path / "run"
    p = Proc(_train_args(data, out), tmp_path, "held", "delay=0.2")
    p.wait_for_steps(1)
    with pytest.raises(Exception, match="is in use by PID"), locked(out):
        pass
    p.signal_group(signal.SIGKILL)
    p.wait()
    assert (out / ".ftsgd.lock").exists()
    with locked(out):  # the kernel released the dead process's lock
        pass
