"""The command line end to end: exit codes, output styles, help, and the train -> eval pipeline."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import _zygote as zygote
import pytest
from typer.testing import CliRunner

from ftsgd import __version__
from ftsgd.cli.app import app

runner = CliRunner()
TINY = ["--model", "test_vit", "--set", "model.kwargs={img_size=32}"]
FAST = [
    "--set",
    "train.epochs=2",
    "--set",
    "train.batch_size=16",
    "--set",
    "data.num_workers=0",
    "--set",
    "optim.lr=0.02",
    "--set",
    'data.augment="flip"',
]


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def test_version_and_help() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"ftsgd {__version__}"
    for command in (
        ["-h"],
        ["train", "-h"],
        ["eval", "-h"],
        ["inspect", "-h"],
        ["recipes", "-h"],
        ["demo", "-h"],
    ):
        result = run(*command)
        assert result.exit_code == 0, command
        assert "Usage" in result.stdout
        assert "Examples" in result.stdout, command


def test_python_dash_m_works() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ftsgd", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"ftsgd {__version__}"


def test_recipes_list_and_show() -> None:
    result = run("recipes")
    assert result.exit_code == 0
    for name in ("sgd-freeze-embed", "sgd-freeze-embed-nomomentum", "sgd", "adamw"):
        assert name in result.stdout
    listed = json.loads(run("recipes", "--json").stdout)
    assert {"name": "adamw", "description": "Baseline: AdamW, weight decay 0, nothing frozen"} in listed

    shown = run("recipes", "show", "sgd-freeze-embed", "--set", "optim.lr=3e-4")
    assert shown.exit_code == 0
    assert 'policy = "embed"' in shown.stdout and "lr = 0.0003" in shown.stdout
    keys = run("recipes", "keys")
    assert keys.exit_code == 0 and "optim.step_in_backward" in keys.stdout


def test_bad_recipe_exits_2_listing_every_key_without_traceback() -> None:
    result = run(
        "recipes",
        "show",
        "sgd",
        "--set",
        "optim.lr=-1",
        "--set",
        "optim.momentum=1.5",
        "--set",
        "freeze.policy=bogus",
        "--set",
        "train.nope=1",
    )
    assert result.exit_code == 2
    err = result.stderr
    for key in ("optim.lr", "optim.momentum", "freeze.policy", "train.nope"):
        assert key in err
    assert "4 problem(s)" in err
    assert "Traceback" not in err


def test_debug_env_shows_the_traceback() -> None:
    result = run("recipes", "show", "sgd", "--set", "optim.lr=-1", env={"FTSGD_DEBUG": "1"})
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "RecipeError"


def test_unknown_recipe_name_suggests() -> None:
    result = run("recipes", "show", "sgd-freeze-emb")
    assert result.exit_code == 2
    assert "did you mean sgd-freeze-embed" in result.stderr


def test_inspect_plain_and_json() -> None:
    result = run("inspect", "test_convnext", "--num-classes", "5")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "embedding: stem" in out
    assert "Top-level blocks" in out and "frozen" in out
    assert "ratio to adamw" in out
    assert "\x1b[" not in out  # no colour codes when not a terminal

    data = json.loads(run("inspect", "test_convnext", "--json", "--set", "freeze.policy=embed+stage1").stdout)
    for key in (
        "model",
        "policy",
        "embedding",
        "frozen",
        "trainable_params",
        "frozen_params",
        "total_params",
        "memory",
    ):
        assert key in data
    assert data["policy"] == "embed+stage1"
    assert data["embedding"] == ["stem"]
    assert all(n.startswith(("stem.", "stages.0.")) for n in data["frozen"])
    assert any(n.startswith("stages.0.") for n in data["frozen"])
    assert data["frozen_params"] + data["trainable_params"] == data["total_params"]
    mem = data["memory"]
    assert mem["total"] < mem["adamw_total"] and 0 < mem["ratio"] < 1


def test_inspect_adamw_recipe_ratio_is_one() -> None:
    data = json.loads(run("inspect", "test_resnet", "--recipe", "adamw", "--json").stdout)
    assert data["frozen"] == [] and data["memory"]["ratio"] == pytest.approx(1.0)


def test_inspect_model_flag_and_conflict() -> None:
    assert run("inspect", "--model", "test_resnet", "--json").exit_code == 0
    result = run("inspect", "test_vit", "--model", "test_resnet")
    assert result.exit_code == 2 and "two model names" in result.stderr


def test_inspect_unknown_model_exit_2() -> None:
    result = run("inspect", "vit_base_patch16_244")
    assert result.exit_code == 2
    assert "vit_base_patch16_224" in result.stderr


def test_train_then_eval_agree(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] in (1, 2)

    evaluated = run("eval", str(out), "--data", str(image_folder), "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    results = json.loads(evaluated.stdout)
    assert set(results) == {"val", "ood"}
    for split in ("val", "ood"):
        assert results[split]["accuracy"] == summary["best"][split]["accuracy"]
        assert results[split]["n"] == summary["best"][split]["n"]
        assert results[split]["loss"] == pytest.approx(summary["best"][split]["loss"], rel=1e-5)
        assert sum(c["n"] for c in results[split]["per_class"].values()) == results[split]["n"]

    only = json.loads(
        run(
            "eval", str(out / "model.safetensors"), "--data", str(image_folder), "--split", "ood", "--json"
        ).stdout
    )
    assert list(only) == ["ood"]
    table = run("eval", str(out), "--data", str(image_folder))
    assert table.exit_code == 0 and "Per-class accuracy" in table.stdout and "circle" in table.stdout
    missing = run("eval", str(out), "--data", str(image_folder), "--split", "test")
    assert missing.exit_code == 2 and "test" in missing.stderr


def test_eval_matches_classes_by_name_not_folder_order(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST, "--quiet").exit_code == 0
    )
    # a copy of val/ where one class folder is missing: indices would shift if matched by position
    shifted = tmp_path / "shifted" / "val"
    for cls in ("square", "triangle"):
        (shifted / cls).mkdir(parents=True)
        for f in (image_folder / "val" / cls).iterdir():
            (shifted / cls / f.name).write_bytes(f.read_bytes())
    full = json.loads(run("eval", str(out), "--data", str(image_folder), "--split", "val", "--json").stdout)[
        "val"
    ]
    part = json.loads(
        run("eval", str(out), "--data", str(tmp_path / "shifted"), "--split", "val", "--json").stdout
    )
    for cls in ("square", "triangle"):
        assert part["val"]["per_class"][cls] == full["per_class"][cls]
    circle = part["val"]["per_class"]["circle"]  # a class with no image in this split
    assert (circle["accuracy"], circle["n"], circle["support"], circle["recall"]) == (None, 0, 0, None)


def test_train_plain_output_when_not_a_tty(image_folder: Path, tmp_path: Path) -> None:
    result = run("train", "--data", str(image_folder), "--out", str(tmp_path / "run"), *TINY, *FAST)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    stamped = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch 1/2  train loss"  # cron logs carry the time
    assert any(re.match(stamped, line) for line in lines), lines
    assert any(line.startswith("Best epoch") for line in lines)
    assert "\x1b[" not in result.stdout


def test_train_rich_output_on_a_terminal(image_folder: Path, tmp_path: Path) -> None:
    result = run(
        "train",
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path / "run"),
        *TINY,
        *FAST,
        env={"FTSGD_FORCE_TTY": "1"},
    )
    assert result.exit_code == 0, result.stderr
    assert "\x1b[" in result.stdout  # rich styling
    assert "Best epoch" in result.stdout


def test_train_quiet_prints_nothing(image_folder: Path, tmp_path: Path) -> None:
    result = run(
        "train", "--data", str(image_folder), "--out", str(tmp_path / "run"), *TINY, *FAST, "--quiet"
    )
    assert result.exit_code == 0 and result.stdout == ""


def test_train_usage_errors_exit_2(image_folder: Path, tmp_path: Path) -> None:
    missing = run("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), *TINY)
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    no_model = run("train", "--data", str(image_folder), "--out", str(tmp_path / "run2"))
    assert no_model.exit_code == 2 and "--model" in no_model.stderr
    no_data = run("train", "--out", str(tmp_path / "run3"), *TINY)
    assert no_data.exit_code == 2
    bad_set = run(
        "train", "--data", str(image_folder), "--out", str(tmp_path / "run4"), *TINY, "--set", "optim.lr=0"
    )
    assert bad_set.exit_code == 2 and "optim.lr" in bad_set.stderr
    assert not (tmp_path / "run4").exists()


def test_train_refuses_existing_run_dir_and_resume_rejects_other_overrides(
    image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert (
        run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST, "--quiet").exit_code == 0
    )
    again = run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST)
    assert again.exit_code == 2 and "--resume" in again.stderr
    resumed = run(
        "train",
        "--data",
        str(image_folder),
        "--out",
        str(out),
        *TINY,
        *FAST,
        "--resume",
        "--set",
        "optim.lr=1",
    )
    assert resumed.exit_code == 2 and "the flags resolve to another recipe than the run" in resumed.stderr
    assert "  - optim.lr: 0.02 -> 1.0" in resumed.stderr
    done = run("train", "--data", str(image_folder), "--out", str(out), "--resume", "--json")
    assert done.exit_code == 0
    assert json.loads(done.stdout)["best"] == json.loads((out / "summary.json").read_text())["best"]


def test_corrupt_run_dir_resume_exits_2(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST, "--quiet").exit_code == 0
    )
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    (out / "summary.json").unlink()  # an unfinished run: --resume must read the checkpoint
    result = run("train", "--data", str(image_folder), "--out", str(out), "--resume")
    assert result.exit_code == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_console_script_subprocess(image_folder: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("ftsgd")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "ftsgd"])]
    proc = subprocess.run(
        [*cmd, "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *TINY],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FTSGD_DEBUG": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run("demo", "--out", str(out), "--epochs", "1")
    assert result.exit_code == 0, result.stderr
    assert "Best epoch 1/1" in result.stdout and "ood" in result.stdout
    for split in ("train", "val", "ood"):
        assert (out / "data" / split).is_dir()
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["model"] == "test_vit" and summary["recipe"] == "sgd-freeze-embed"
    assert (out / "run" / "model.safetensors").is_file()
    again = run("demo", "--out", str(out), "--epochs", "1")
    assert again.exit_code == 2 and "--force" in again.stderr
    assert (out / ".ftsgd-demo").is_file()
    assert run("demo", "--out", str(out), "--epochs", "1", "--force").exit_code == 0


def test_demo_force_never_deletes_a_foreign_directory(tmp_path: Path) -> None:
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep")
    result = run("demo", "--out", str(precious), "--force")
    assert result.exit_code == 2 and "was not written by `ftsgd demo`" in result.stderr
    assert (precious / "thesis.tex").read_text() == "keep"


def test_demo_force_needs_the_demo_s_marker_not_just_its_folder_names(tmp_path: Path) -> None:
    """A user's project with a data/ and a run/ of its own is not an old demo."""
    project = tmp_path / "proj"
    (project / "data" / "train" / "cat").mkdir(parents=True)
    (project / "data" / "train" / "cat" / "1.png").write_bytes(b"mine")
    (project / "run").mkdir()
    (project / "run" / "checkpoint.pt").write_bytes(b"weeks of training")
    result = run("demo", "--out", str(project), "--force")
    assert result.exit_code == 2 and ".ftsgd-demo marker" in result.stderr
    assert (project / "run" / "checkpoint.pt").read_bytes() == b"weeks of training"
    assert (project / "data" / "train" / "cat" / "1.png").read_bytes() == b"mine"
    assert sorted(p.name for p in project.iterdir()) == ["data", "run"]


def test_unknown_device_is_a_usage_error(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST, "--quiet").exit_code == 0
    )
    result = run("eval", str(out), "--data", str(image_folder), "--device", "gpu")
    assert result.exit_code == 2 and "unknown device 'gpu'" in result.stderr


def test_custom_val_folder_is_the_id_split(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder / "train", data / "train")
    shutil.copytree(image_folder / "val", data / "valid")
    out = tmp_path / "run"
    result = run(
        "train", "--data", str(data), "--out", str(out), *TINY, *FAST, "--set", "data.val=valid", "--json"
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["val_accuracy"] == summary["best"]["val"]["accuracy"] is not None


def test_resume_does_not_need_the_starting_weights_file(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    first = tmp_path / "first"
    assert (
        run("train", "--data", str(image_folder), "--out", str(first), *TINY, *FAST, "--quiet").exit_code == 0
    )
    weights = tmp_path / "start.safetensors"
    shutil.copy(first / "model.safetensors", weights)
    out = tmp_path / "second"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # a relative --weights path is recorded absolute
        result = run(
            "train",
            "--data",
            str(image_folder),
            "--out",
            str(out),
            *TINY,
            *FAST,
            "--weights",
            "start.safetensors",
            "--set",
            "train.epochs=1",
            "--quiet",
        )
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.stderr
    assert f'weights = "{weights}"' in (out / "recipe.toml").read_text()
    weights.unlink()  # moved or deleted since: the checkpoint holds every weight
    resumed = run("train", "--data", str(image_folder), "--out", str(out), "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr


def test_eval_named_splits_ignore_other_folders(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    assert (
        run("train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST, "--quiet").exit_code == 0
    )
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "notes" / "zebra").mkdir(parents=True)
    shutil.copy(next((data / "val" / "circle").iterdir()), data / "notes" / "zebra" / "x.png")
    only_val = run("eval", str(out), "--data", str(data), "--split", "val", "--json")
    assert only_val.exit_code == 0, only_val.stderr
    assert list(json.loads(only_val.stdout)) == ["val"]
    by_path = run("eval", str(out), "--data", str(data), "--split", str(data / "ood"), "--json")
    assert by_path.exit_code == 0 and list(json.loads(by_path.stdout)) == ["ood"]
    everything = run("eval", str(out), "--data", str(data))
    assert everything.exit_code == 2 and "zebra" in everything.stderr and "--split" in everything.stderr


def test_max_steps_stops_with_a_checkpoint_and_resume_finishes(image_folder: Path, tmp_path: Path) -> None:
    import torch

    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--out", str(out), *TINY, *FAST]
    result = run(*args, "--max-steps", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"finished": False}
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"] == 3
    assert not (out / "summary.json").exists()
    result = run("train", "--data", str(image_folder), "--out", str(out), "--resume", "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert "stopped after 4 steps (--max-steps 4); continue with:" in result.stdout
    assert f"ftsgd train --data {image_folder.resolve()} --out {out} --resume" in result.stdout
    result = run("train", "--data", str(image_folder), "--out", str(out), "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 10  # 2 epochs x ceil(72 / 16)


def test_help_lists_exit_codes_and_shows_no_type_for_flags() -> None:
    commands = [["-h"], ["train", "-h"], ["eval", "-h"], ["inspect", "-h"], ["recipes", "show", "-h"]]
    for command in [*commands, ["report", "-h"], ["sweep", "-h"], ["predict", "-h"], ["demo", "-h"]]:
        result = run(*command, env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        text = " ".join(result.stdout.split())
        assert "Exit codes: 0 done; 1 the run failed; 2 bad usage" in text, command
        assert "<bool>" not in result.stdout, command
    text = " ".join(run("train", "-h", env={"COLUMNS": "200"}).stdout.split())
    assert "[default: sgd-freeze-embed]" in text
    assert "--quiet -q Print nothing but warnings and errors." in text


@pytest.mark.slow
def test_a_closed_pipe_stops_quietly_with_141() -> None:
    proc = zygote.Popen(
        [sys.executable, "-m", "ftsgd", "recipes", "keys"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "80"},
    )
    proc.stdout.close()  # the reader is gone before anything was written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert err == b""


def test_train_shorthands_set_their_recipe_keys_and_clash_with_a_set_of_the_same_key(
    image_folder: Path, tmp_path: Path
) -> None:
    import tomllib

    out = tmp_path / "run"
    base = ["train", "--data", str(image_folder), "--out", str(out), "--model", "test_vit", "--quiet"]
    base += ["--set", "model.kwargs={img_size=32}"]
    flags = ["--epochs", "1", "--batch-size", "8", "--lr", "0.02", "--seed", "3", "--device", "cpu"]
    result = run(*base, *flags)
    assert result.exit_code == 0, result.stderr
    recipe = tomllib.loads((out / "recipe.toml").read_text())
    assert (recipe["train"]["epochs"], recipe["train"]["batch_size"], recipe["train"]["seed"]) == (1, 8, 3)
    assert (recipe["optim"]["lr"], recipe["train"]["device"]) == (0.02, "cpu")
    clash = run(
        *[a.replace(str(out), str(tmp_path / "other")) for a in base],
        "--epochs",
        "2",
        "--set",
        "train.epochs=3",
    )
    assert (
        clash.exit_code == 2 and "--epochs and --set train.epochs=... both set train.epochs" in clash.stderr
    )
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["recipes"], ["--version"], ["report", "--help"]])
def test_a_full_stdout_ends_quietly_with_exit_1(command: list[str]) -> None:
    with open("/dev/full", "w") as full:
        proc = zygote.run(
            [sys.executable, "-m", "ftsgd", *command], stdout=full, stderr=subprocess.PIPE, timeout=120
        )
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip() == "error: cannot write to standard output: No space left on device"


def test_a_closed_stdout_ends_quietly_with_exit_1() -> None:
    """A fresh interpreter started with descriptor 1 closed (`ftsgd --version >&-`): no sys.stdout at all."""
    proc = subprocess.run(
        ["bash", "-c", f"{shlex.quote(sys.executable)} -m ftsgd --version >&-"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.strip() == "error: standard output is closed", proc.stderr
