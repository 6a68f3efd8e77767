"""What the commands do around training: the rerun-safe `--resume`, data checks, the run-directory lock."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import _zygote as zygote
import pytest
import torch
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.synthetic import make_image_folder
from ftsgd.run.rundir import locked

SETS = [
    "--model",
    "test_vit",
    "--set",
    "model.kwargs={img_size=32}",
    "--set",
    "data.num_workers=0",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.epochs=2",
]


def train(data: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        app, ["train", "--data", str(data), "--out", str(out), "--quiet", *SETS, *extra]
    )


def step_of(out: Path) -> int:
    return int(torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", classes=3, size=32, per_class={"train": 8, "val": 2})


@pytest.fixture
def partial(data: Path, tmp_path: Path) -> Path:
    """A run stopped after 2 of its 6 steps."""
    out = tmp_path / "run"
    result = train(data, out, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert step_of(out) == 2 and not (out / "summary.json").exists()
    return out


# ------------------------------------------------------------------------------------------ rerun


def test_identical_command_with_resume_starts_continues_and_then_does_nothing(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert train(data, out, "--resume", "--max-steps", "2").exit_code == 0  # missing: starts
    assert step_of(out) == 2
    assert train(data, out, "--resume", "--max-steps", "5").exit_code == 0  # unfinished: continues
    assert step_of(out) == 5
    assert train(data, out, "--resume").exit_code == 0  # finishes
    summary = (out / "summary.json").read_bytes()
    mtime = (out / "summary.json").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), *SETS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"{out} is finished (best epoch" in result.stdout and "Best epoch" in result.stdout
    assert (out / "summary.json").read_bytes() == summary and (
        out / "summary.json"
    ).stat().st_mtime_ns == mtime
    # the summary keeps the command that trained the run, not the no-op's
    assert json.loads(summary)["steps"] == 6


def test_resume_with_other_flags_is_refused_listing_the_keys(partial: Path, data: Path) -> None:
    result = train(data, partial, "--resume", "--set", "optim.lr=0.5", "--set", "train.epochs=3")
    assert result.exit_code == 2
    assert "the flags resolve to another recipe than the run" in result.output
    assert "  - optim.lr: 0.001 -> 0.5" in result.output and "  - train.epochs: 2 -> 3" in result.output
    assert step_of(partial) == 2
    # flags written differently that resolve to the same recipe are accepted
    result = train(data, partial, "--resume", "--set", "optim.lr=1e-3", "--recipe", "sgd-freeze-embed")
    assert result.exit_code == 0, result.output
    assert json.loads((partial / "summary.json").read_text())["steps"] == 6


def test_a_run_killed_before_its_first_checkpoint_starts_over(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.toml").write_text("[optim]\nlr = 0.5\n")  # what a killed start left behind
    (out / "dataset.json").write_text("{}")
    (out / ".ftsgd.lock").write_text("PID 1 on elsewhere")  # a lock file nobody holds
    result = train(data, out, "--resume")
    assert result.exit_code == 0, result.output
    assert step_of(out) == 6 and (out / "summary.json").exists()
    assert json.loads((out / "summary.json").read_text())["lr"] == 0.001  # the flags' recipe, not the old one
    # without --resume the same folder is refused, as any non-empty one
    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.toml").write_text("x")
    result = train(data, other)
    assert result.exit_code == 2 and "it holds a run: add --resume to continue it" in result.output


def test_files_ftsgd_did_not_write_are_never_deleted(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.toml").write_text("x")
    (out / "notes.txt").write_text("mine")
    result = train(data, out, "--resume")
    assert result.exit_code == 2
    assert "never reached its first checkpoint, but it also holds notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "recipe.toml").read_text() == "x"


def test_resume_without_flags_of_a_missing_run_says_what_is_needed(data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--resume"])
    assert result.exit_code == 2
    assert "holds no run yet and no recipe flags were given to start one" in result.output
    assert not (tmp_path / "r").exists()  # nothing left behind


# ------------------------------------------------------------------------------------------ data


def _copy(data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "changed"
    shutil.copytree(data, copy)  # copy2 keeps modification times: the copy is the same dataset
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("class_added", "classes added: extra"),
        ("class_renamed", "classes added: round"),
        ("class_removed", "classes removed or renamed: triangle"),
        ("file_removed", "1 file(s) removed from train"),
        ("file_changed", "1 file(s) changed (size or modification time) in train"),
        ("file_touched", "have their old size and only a new modification time"),
        ("file_added", "1 file(s) added to train"),
    ],
)
def test_resume_on_other_data_is_refused_saying_what_changed(
    partial: Path, data: Path, tmp_path: Path, change: str, message: str
) -> None:
    copy = _copy(data, tmp_path)
    first = sorted((copy / "train" / "circle").iterdir())[0]
    if change == "class_added":
        shutil.copytree(copy / "train" / "circle", copy / "train" / "extra")
    elif change == "class_renamed":
        (copy / "train" / "circle").rename(copy / "train" / "round")
        (copy / "val" / "circle").rename(copy / "val" / "round")
    elif change == "class_removed":
        shutil.rmtree(copy / "train" / "triangle")
        shutil.rmtree(copy / "val" / "triangle")
    elif change == "file_removed":
        first.unlink()
    elif change == "file_changed":
        first.write_bytes(first.read_bytes() + b"\0")
    elif change == "file_touched":
        os.utime(first, ns=(0, 1))
    else:
        shutil.copy(first, first.with_name("new.png"))
    result = train(copy, partial, "--resume")
    assert result.exit_code == 2, result.output
    assert (
        f"cannot resume {partial}: the data under {copy} is not what the run was trained on" in result.output
    )
    assert message in result.output and "Traceback" not in result.output
    assert ("--allow-new-images" in result.output) == (change == "file_added")
    assert step_of(partial) == 2


@pytest.mark.parametrize("change", ["file_changed", "file_added"])
def test_resume_of_a_finished_run_on_other_data_is_refused_too(
    partial: Path, data: Path, tmp_path: Path, change: str
) -> None:
    """A cron job pointed at a refreshed snapshot must not hear "nothing to do" from a finished run."""
    assert train(data, partial, "--resume").exit_code == 0
    summary = (partial / "summary.json").read_bytes()
    copy = _copy(data, tmp_path)
    first = sorted((copy / "train" / "circle").iterdir())[0]
    if change == "file_changed":
        first.write_bytes(first.read_bytes() + b"\0")
    else:
        shutil.copy(first, first.with_name("new.png"))
    for extra in ([], ["--allow-new-images"]):
        result = train(copy, partial, "--resume", *extra)
        assert result.exit_code == 2, result.output
        assert f"cannot resume {partial}: the data under {copy} is not what the run was trained on" in (
            result.output
        )
        assert "start a new run with another --out" in result.output and "is finished" not in result.output
    assert (partial / "summary.json").read_bytes() == summary
    assert train(data, partial, "--resume").exit_code == 0  # its own data: nothing to do, as before


def test_a_grown_dataset_is_accepted_when_asked(partial: Path, data: Path, tmp_path: Path) -> None:
    copy = _copy(data, tmp_path)
    first = sorted((copy / "train" / "circle").iterdir())[0]
    shutil.copy(first, first.with_name("new.png"))
    result = train(copy, partial, "--resume", "--allow-new-images")
    assert result.exit_code == 0, result.output
    assert "continuing" in result.output and "grown dataset: 1 file(s) added to train" in result.output
    recorded = json.loads((partial / "dataset.json").read_text())
    assert "new.png" in {row[0].split("/")[-1] for row in recorded["splits"]["train"]["files"]}
    assert json.loads((partial / "summary.json").read_text())["split_sizes"]["train"] == 25


def test_a_moved_dataset_resumes(partial: Path, data: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    data.rename(moved)
    result = train(moved, partial, "--resume")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ the lock


@pytest.mark.slow
def test_a_held_lock_refuses_a_second_writer_naming_the_holder(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with locked(out):
        proc = zygote.run(
            [
                sys.executable,
                "-m",
                "ftsgd",
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                *SETS,
                "--resume",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"is in use by PID {os.getpid()} on {socket.gethostname()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name for p in out.iterdir()} == {".ftsgd.lock"}


# ------------------------------------------------------------------------------------------ --out


def _with_a_bad_image(data: Path) -> Path:
    (data / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return data


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_unusable_out_is_refused_before_the_scan(data: Path, tmp_path: Path, where: str) -> None:
    _with_a_bad_image(data)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if where == "under_a_file" else Path("/proc/ftsgd-run")
    result = train(data, out)
    assert result.exit_code == 2, result.output
    assert f"cannot create the run directory {out}" in result.output
    assert "broken.png" not in result.output and "Traceback" not in result.output


def test_a_read_only_out_is_refused_before_the_scan(data: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a read-only file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _with_a_bad_image(data)
        result = train(data, mnt / "run")
        assert result.exit_code == 2, result.output
        assert f"cannot create the run directory {mnt / 'run'}: Read-only file system" in result.output
        assert "broken.png" not in result.output
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_failed_start_leaves_no_run_directory_behind(data: Path, tmp_path: Path) -> None:
    _with_a_bad_image(data)
    out = tmp_path / "run"
    result = train(data, out)
    assert result.exit_code == 2 and "cannot be read (pre-flight scan)" in result.output
    assert not out.exists()
