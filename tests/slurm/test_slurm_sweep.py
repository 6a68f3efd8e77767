"""``ftsgd sweep --slurm`` against a real single-node Slurm (``tests/slurm/cluster.sh up``).

The tasks are real Slurm array tasks: slurmd runs the job script ftsgd wrote, which runs ``python -m ftsgd
train ... --resume``; that ``python`` is :mod:`_zygote`'s stand-in (sbatch passes the test's environment
on), so each run is a real process without 6 s of importing torch. Slurm delays the start of a requeued
task by about two minutes; the preemption test moves it forward with ``scontrol update ... StartTime=now``.
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
from typing import Any

import _zygote as zygote
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.synthetic import make_image_folder
from ftsgd.run.rundir import locked
from ftsgd.sweep.conclude import conclude
from ftsgd.sweep.inprocess import execute_in_process
from ftsgd.sweep.plan import SweepOptions, plan_sweep
from ftsgd.sweep.record import open_sweep
from ftsgd.sweep.slurm_script import job_name

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
runner = CliRunner()
SETS = ["model.kwargs={img_size=32}", "train.batch_size=6", "data.num_workers=0"]


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and any(s in done.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def cluster() -> None:
    """Skip unless a Slurm controller answers (asked when a test needs it, never while collecting: without a
    controller sinfo waits for its timeout)."""
    if not _cluster_answers():
        pytest.skip(f"no Slurm cluster answers: start one with `{CLUSTER} up` (as root)")


needs_cluster = pytest.mark.usefixtures("cluster")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def flags(epochs: int) -> list[str]:
    out = ["--model", "test_vit", "--set", f"train.epochs={epochs}"]
    for text in SETS:
        out += ["--set", text]
    return out


@pytest.fixture(scope="module")
def env() -> Any:
    """Every task runs this checkout's ftsgd through the zygote's stand-in ``python``, one thread each."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "executable", zygote.launcher())
        mp.setenv("FTSGD_TEST_EXECUTABLE", sys.executable)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("FTSGD_SLURM_POLL_S", "0.5")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.delenv("FTSGD_FORCE_TTY", raising=False)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("data"), classes=3, size=32, per_class={"train": 12, "val": 6, "ood": 6}
    )


def sweep(data: Path, out: Path, epochs: int, *args: str) -> Any:
    """``ftsgd sweep`` in this process; with --slurm its runs are Slurm tasks."""
    return runner.invoke(app, ["sweep", "--data", str(data), "--out", str(out), *flags(epochs), *args])


def local_sweep(data: Path, out: Path, epochs: int, grids: list[str]) -> dict[str, Any]:
    """The same sweep trained here, uninterrupted (the in-process executor: bitwise what processes write)."""
    opts = SweepOptions(
        data=data, out=out, grids=grids, sets=[f"train.epochs={epochs}", *SETS], model="test_vit"
    )
    with locked(out, "sweep directory"):
        sweep = open_sweep(plan_sweep(opts), opts)
        return conclude(sweep, execute_in_process(sweep), show=False)


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert (sa["best_epoch"], sa["best"]) == (sb["best_epoch"], sb["best"])


def tasks(out: Path) -> list[tuple[str, str]]:
    """(task, state) of every Slurm task of the sweep in ``out``, as squeue shows them."""
    done = subprocess.run(
        ["squeue", "-h", "-r", "-t", "all", f"--name={job_name(out)}", "-o", "%i %T"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(tuple(line.split()) for line in done.stdout.splitlines())  # type: ignore[misc]


def wait_until(condition: Any, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def points(out: Path) -> list[Path]:
    return sorted(p for p in (out / "sgd-freeze-embed").iterdir() if p.is_dir())


# --------------------------------------------------------------------------- no cluster needed


def test_print_commands_shows_the_job_script_and_submits_nothing(
    env: Any, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "printed"
    result = sweep(
        data,
        out,
        2,
        "--grid",
        "optim.lr=1e-4,0.01",
        "--slurm",
        "--print-commands",
        "--slurm-opt",
        "partition=gpu",
        "--slurm-opt",
        "time=01:00:00",
        "--set",
        "slurm.qos=high",
        "--set",
        "slurm.signal_before_s=120",
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("#!/bin/bash\n") and not out.exists()
    for line in (
        f"#SBATCH --job-name={job_name(out)}",
        "#SBATCH --array=1-6",  # 2 learning rates x the recipe's 3 seeds
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --qos=high",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
    ):
        assert f"\n{line}\n" in text, line
    assert text.count(" -m ftsgd train --data ") == 6 and text.count("--resume --quiet\n") == 6
    # the script is valid bash
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slurm", "--jobs", "2"], "--slurm hands every run to Slurm"),
        (["--wait"], "--wait only work with --slurm"),
        (["--slurm-opt", "partition=gpu"], "--slurm-opt only work with --slurm"),
        (["--slurm", "--slurm-opt", "array=1-3"], "--slurm-opt array: ftsgd sets it itself"),
        (["--slurm", "--slurm-opt", "bad key=1"], "expected KEY=VALUE"),
        (["--slurm", "--set", "slurm.cpus_per_task=-1"], "slurm.cpus_per_task: must be between 0"),
        (["--slurm", "--grid", "slurm.partition=a,b"], "unknown recipe key"),
        (["--slurm", "--recipe", "sgd", "--recipe", "adamw", "--set", "stage.1.x=1"], "stage"),
    ],
)
def test_bad_slurm_usage_is_exit_2_before_anything_is_submitted(
    env: Any, data: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "bad"
    result = sweep(data, out, 2, "--grid", "train.seed=0", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_recipes_with_different_slurm_tables_are_refused(env: Any, data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "sgd"\n[slurm]\npartition = "big"\n')
    result = sweep(
        data,
        tmp_path / "o",
        2,
        "--grid",
        "train.seed=0",
        "--recipe",
        str(mine),
        "--recipe",
        "adamw",
        "--slurm",
    )
    assert result.exit_code == 2, result.output
    assert "different [slurm] tables" in result.output and not (tmp_path / "o").exists()


def test_no_sbatch_on_path_is_exit_2(
    env: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = sweep(data, tmp_path / "o", 2, "--grid", "train.seed=0", "--slurm")
    assert result.exit_code == 2, result.output
    assert "`sbatch` not found on PATH" in result.output and "drop --slurm" in result.output


# --------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def slurm_swept(
    cluster: None, env: Any, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any]:
    """A 2 x 2 sweep (two learning rates, two seeds) run as Slurm tasks with --wait."""
    out = tmp_path_factory.mktemp("slurm") / "grid"
    result = sweep(
        data, out, 2, "--grid", "optim.lr=1e-4,0.01", "--grid", "train.seed=0,1", "--slurm", "--wait"
    )
    assert result.exit_code == 0, result.output
    return out, result


@needs_cluster
def test_a_2x2_sweep_on_slurm_selects_what_the_local_sweep_selects_bit_for_bit(
    slurm_swept: tuple[Path, Any], data: Path, tmp_path: Path
) -> None:
    out, result = slurm_swept
    assert "submitted 4 point(s) as Slurm job array" in result.output
    assert "Selection: per recipe" in result.output and "4 runs: 4 finished" in result.output
    local = local_sweep(data, tmp_path / "local", 2, ["optim.lr=1e-4,0.01", "train.seed=0,1"])
    record = json.loads((out / "sweep.json").read_text())
    assert record["state"] == "finished" and record["counts"]["finished"] == 4
    strip = ("path", "paths", "run_dir", "runs", "train_time_s", "peak_memory_bytes")

    def selection(doc: dict[str, Any]) -> Any:
        chosen = doc["selection"]["selections"][0]["selected"]
        return {k: v for k, v in chosen.items() if k not in strip}

    assert selection(record) == selection(local)
    for a, b in zip(points(out), points(tmp_path / "local"), strict=True):
        assert a.name == b.name
        same_weights(a, b)
    script = out / "slurm" / "job.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert sorted(p.name for p in (out / "slurm" / "exit").iterdir()) == ["1", "2", "3", "4"]
    log = (out / "logs" / "sgd-freeze-embed" / "optim.lr=0.0001,train.seed=0.log").read_text()
    assert log.startswith("=== ") and "Slurm task " in log


@needs_cluster
def test_rerunning_a_finished_slurm_sweep_submits_nothing_and_reports(
    slurm_swept: tuple[Path, Any], data: Path
) -> None:
    out, _ = slurm_swept
    before = tasks(out)
    result = sweep(data, out, 2, "--grid", "optim.lr=1e-4,0.01", "--grid", "train.seed=0,1", "--slurm")
    assert result.exit_code == 0, result.output
    assert "nothing to submit" in result.output and "Selection: per recipe" in result.output
    assert tasks(out) == before


@needs_cluster
def test_cancelled_and_preempted_tasks_finish_bit_equal_after_a_rerun(
    env: Any, data: Path, tmp_path: Path
) -> None:
    """Task 1 gets Slurm's early-warning SIGUSR1 (saves, requeues itself); task 2 is scancel-ed (saves on
    SIGTERM, ends cancelled). The rerun resubmits task 2 only; both end equal to uninterrupted runs."""
    out, epochs, grid = tmp_path / "pre", 60, ["--grid", "optim.lr=0.01", "--grid", "train.seed=0,1"]
    result = sweep(data, out, epochs, *grid, "--slurm")
    assert result.exit_code == 0, result.output
    wait_until(lambda: len(list(out.glob("sgd-freeze-embed/*/checkpoint.pt"))) == 2, "both checkpoints")
    (first, _), (second, _) = tasks(out)
    subprocess.run(["scancel", "--batch", "--signal=USR1", first], check=True)
    subprocess.run(["scancel", second], check=True)
    wait_until(lambda: [s for _, s in tasks(out)] == ["PENDING", "CANCELLED"], "requeue and cancel", 120)
    logs = sorted((out / "logs" / "sgd-freeze-embed").glob("*.log"))
    assert f"Slurm task {first} requeued" in logs[0].read_text()
    assert "interrupted by SIGTERM; checkpoint saved" in logs[1].read_text()

    result = sweep(data, out, epochs, *grid, "--slurm")
    assert result.exit_code == 0, result.output
    assert f"[1/2] queued sgd-freeze-embed optim.lr=0.01,train.seed=0: Slurm task {first}" in result.output
    assert "[2/2] interrupted sgd-freeze-embed optim.lr=0.01,train.seed=1" in result.output
    assert "submitted 1 point(s)" in result.output
    subprocess.run(["scontrol", "update", f"JobId={first}", "StartTime=now"], check=True)
    result = sweep(data, out, epochs, *grid, "--slurm", "--wait")
    assert result.exit_code == 0, result.output
    local_sweep(data, tmp_path / "local", epochs, ["optim.lr=0.01", "train.seed=0,1"])
    for a, b in zip(points(out), points(tmp_path / "local"), strict=True):
        same_weights(a, b)
    assert "restart 1" in logs[0].read_text()


@needs_cluster
def test_a_rerun_while_tasks_are_queued_submits_nothing_and_ctrl_c_on_wait_leaves_them(
    env: Any, data: Path, tmp_path: Path
) -> None:
    out, grid = tmp_path / "queued", ["--grid", "optim.lr=0.01", "--grid", "train.seed=0,1"]
    hold = ["--slurm", "--slurm-opt", "begin=now+3600"]
    try:
        result = sweep(data, out, 2, *grid, *hold)
        assert result.exit_code == 0, result.output
        assert "2 queued, 0 running" in result.output
        queued = tasks(out)
        assert [s for _, s in queued] == ["PENDING", "PENDING"]
        result = sweep(data, out, 2, *grid, *hold)
        assert result.exit_code == 0, result.output
        assert "nothing to submit" in result.output and tasks(out) == queued
        record = json.loads((out / "sweep.json").read_text())
        assert record["counts"]["queued"] == 2 and record["state"] == "running"
        assert [run["slurm_task"] for run in record["runs"]] == [task for task, _ in queued]
        assert (
            f"queued sgd-freeze-embed optim.lr=0.01,train.seed=0: Slurm task {queued[0][0]}" in result.output
        )

        command = [sys.executable, "-m", "ftsgd", "sweep", "--data", str(data), "--out", str(out)]
        proc = zygote.Popen(
            [*command, *flags(2), *grid, *hold, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr.decode()
        assert "keep running" in stderr.decode() and f"scancel --name={job_name(out)}" in stderr.decode()
        assert tasks(out) == queued
    finally:
        subprocess.run(["scancel", f"--name={job_name(out)}"], check=False)


@needs_cluster
def test_a_failed_point_is_resubmitted_only_with_retry_failed(env: Any, data: Path, tmp_path: Path) -> None:
    out, grid = tmp_path / "failing", ["--grid", "optim.lr=1e30", "--grid", "train.seed=0"]
    result = sweep(data, out, 2, *grid, "--slurm", "--wait")
    assert result.exit_code == 1, result.output
    assert "1 of 1 runs failed" in result.output and "training loss became nan" in result.output
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["status"] == "failed" and run["exit_code"] == 1
    submitted = tasks(out)
    result = sweep(data, out, 2, *grid, "--slurm", "--wait")
    assert result.exit_code == 1 and "nothing to submit" in result.output
    assert tasks(out) == submitted
    result = sweep(data, out, 2, *grid, "--slurm", "--wait", "--retry-failed")
    assert result.exit_code == 1 and "submitted 1 point(s)" in result.output
    assert len(tasks(out)) == len(submitted) + 1


@needs_cluster
def test_an_option_sbatch_rejects_is_exit_2_with_its_message(env: Any, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = sweep(data, out, 2, "--grid", "train.seed=0", "--slurm", "--slurm-opt", "partition=nosuch")
    assert result.exit_code == 2, result.output
    assert "sbatch refused the sweep's job array" in result.output
    assert "invalid partition" in result.output.lower() and "Nothing was submitted" in result.output
    assert tasks(out) == []


@needs_cluster
def test_gpus_per_run_trains_each_point_under_torchrun(env: Any, data: Path, tmp_path: Path) -> None:
    """Two processes per point inside one allocation (gloo on this CPU cluster: gres= drops the GPU ask)."""
    out = tmp_path / "multi"
    args = ["--grid", "optim.lr=0.01", "--grid", "train.seed=0", "--set", "data.drop_last=true"]
    result = sweep(data, out, 2, *args, "--slurm", "--gpus-per-run", "2", "--slurm-opt", "gres=", "--wait")
    assert result.exit_code == 0, result.output
    script = (out / "slurm" / "job.sh").read_text()
    assert "-m torch.distributed.run --standalone --nproc-per-node=2 -m ftsgd train" in script
    summary = json.loads((points(out)[0] / "summary.json").read_text())
    assert summary["processes"] == 2
