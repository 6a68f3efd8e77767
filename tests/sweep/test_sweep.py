"""``ftsgd sweep`` on real runs: test_vit at 32 px, tiny generated data, 2 epochs, real subprocesses.

Every run of a sweep is its own ``python -m ftsgd train ... --resume --quiet`` process; on this shared
2-core machine each one spends most of its time importing torch, so the grids are 2 x 2 at most and one
sweep (``swept``) is shared by the tests that only read it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import _zygote as zygote
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import RecipeError, RunError
from ftsgd.recipe.build import recipe_from_dict
from ftsgd.recipe.dump import recipe_to_toml
from ftsgd.recipe.grid import grid_problems, parse_grid_option
from ftsgd.recipe.load import load_recipe, recipe_grid
from ftsgd.recipe.schema import SweepConfig
from ftsgd.report.selection import collect_report
from ftsgd.run.resume import resolve_train_recipe
from ftsgd.run.rundir import lock_holder, locked
from ftsgd.sweep.command import conclude
from ftsgd.sweep.inprocess import execute_in_process
from ftsgd.sweep.plan import SweepOptions, plan_sweep
from ftsgd.sweep.record import open_sweep

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
FLAGS = [
    "--model",
    "test_vit",
    "--set",
    "model.kwargs={img_size=32}",
    "--set",
    "train.epochs=2",
    "--set",
    "train.batch_size=6",
    "--set",
    "data.num_workers=0",
]
GRID = ["--grid", "optim.lr=1e-4,0.01", "--grid", "train.seed=0,1"]
POINTS = [(0.0001, 0), (0.0001, 1), (0.01, 0), (0.01, 1)]
SGD_GRID = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
ADAMW_GRID = [3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4]


def point_dir(out: Path, lr: float, seed: int, recipe: str = "sgd-freeze-embed") -> Path:
    return out / recipe / f"optim.lr={lr!r},train.seed={seed}"


@pytest.fixture(scope="module")
def env() -> Any:
    """One thread per run (the same arithmetic at any --jobs) and this checkout's ftsgd in every child.

    Each run's ``sys.executable -m ftsgd train ...`` is started by the stand-in of :mod:`_zygote`: a real
    process, without 6 s of importing torch and timm.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "executable", zygote.launcher())
        mp.setenv("FTSGD_TEST_EXECUTABLE", sys.executable)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.delenv("FTSGD_FORCE_TTY", raising=False)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("data"), classes=3, size=32, per_class={"train": 12, "val": 6, "ood": 6}
    )


def sweep(data: Path, out: Path, *args: str) -> Any:
    """``ftsgd sweep`` in this process (its runs are subprocesses)."""
    return runner.invoke(app, ["sweep", "--data", str(data), "--out", str(out), *FLAGS, *args])


def stats(paths: list[Path]) -> list[tuple[int, bytes]]:
    return [(p.stat().st_mtime_ns, p.read_bytes()) for p in paths]


def same_results(a: Path, b: Path) -> None:
    """Two run directories trained the same: equal weights, per-epoch metrics and best-epoch results."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)
    drop = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
    ma = [
        {k: v for k, v in json.loads(line).items() if k not in drop} for line in (a / "metrics.jsonl").open()
    ]
    mb = [
        {k: v for k, v in json.loads(line).items() if k not in drop} for line in (b / "metrics.jsonl").open()
    ]
    assert ma == mb
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert (sa["best_epoch"], sa["best"]) == (sb["best_epoch"], sb["best"])


@pytest.fixture(scope="module")
def swept(env: Any, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A 2 x 2 sweep (two learning rates, two seeds) with --jobs 1."""
    out = tmp_path_factory.mktemp("sweeps") / "a"
    result = sweep(data, out, *GRID)
    assert result.exit_code == 0, result.output
    return out, result


# --------------------------------------------------------------------------- the [sweep] table


def test_builtin_recipes_carry_the_papers_grids() -> None:
    for name in ("sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomomentum", "sgd-freeze-embed-lowmem"):
        assert recipe_grid(name) == {"optim.lr": SGD_GRID, "train.seed": [0, 1, 2]}, name
    assert recipe_grid("adamw") == {"optim.lr": ADAMW_GRID, "train.seed": [0, 1, 2]}


def test_sweep_table_round_trips_and_accepts_both_toml_spellings(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text(
        'base = "adamw"\n[sweep.grid]\noptim.lr = [1e-4, 1e-3]\n"data.augment" = ["flip", "none"]\n'
    )
    loaded = load_recipe(str(recipe))
    assert loaded.sweep == SweepConfig(
        {"optim.lr": [1e-4, 1e-3], "train.seed": [0, 1, 2], "data.augment": ["flip", "none"]}
    )
    text = recipe_to_toml(loaded)
    assert '[sweep]\ngrid = { "optim.lr" = [0.0001, 0.001], "train.seed" = [0, 1, 2], "data.augment"' in text
    assert recipe_from_dict(tomllib.loads(text)) == loaded


def test_grid_problems_name_their_key_paths() -> None:
    problems = grid_problems(
        {
            "optim.lrr": [1],
            "train.seed": [0, "a", 0],
            "data.root": ["x"],
            "optim.momentum": 0.9,
            "optim.lr": [],
        }
    )
    assert problems == [
        'sweep.grid."optim.lrr": unknown recipe key (did you mean optim.lr?)',
        "sweep.grid.\"train.seed\"[1]: expected an integer, got 'a' (str)",
        'sweep.grid."train.seed": 0 given more than once',
        'sweep.grid."data.root": cannot be a grid key: a sweep trains on one dataset (--data)',
        'sweep.grid."optim.momentum": expected a non-empty list of values, got 0.9',
        'sweep.grid."optim.lr": expected a non-empty list of values, got []',
    ]
    with pytest.raises(RecipeError, match=r'sweep\.grid\."optim\.lr"\[0\]: expected a number'):
        load_recipe("sgd", ['sweep.grid={"optim.lr"=["fast"]}'])


def test_stage_keys_are_grid_keys_by_number() -> None:
    problems = grid_problems(
        {
            "stage.1.optim.lr": [1e-3, 1e-2],
            "stage.2.train.epochs": [2, 3],
            "stage.2.freeze.policy": ["embed", "none"],
            "stage.probe.optim.lr": [1e-3],
            "stage.1.optim.lrr": [1e-3],
            "stage.1.train.seed": [0],
            "stage.1.data.augment": ["none"],
            "stage.1.optim.lr.x": [1],
            "stage.1.train.epochs": ["many"],
        }
    )
    assert problems == [
        'sweep.grid."stage.probe.optim.lr": a stage key is stage.N.SECTION.KEY with N the stage\'s number from 1, '
        "e.g. stage.2.optim.lr",
        'sweep.grid."stage.1.optim.lrr": unknown recipe key optim.lrr',
        'sweep.grid."stage.1.train.seed": of [stage.train] a stage sets only epochs',
        'sweep.grid."stage.1.data.augment": a stage overrides only freeze, optim, schedule and train.epochs',
        'sweep.grid."stage.1.optim.lr.x": a stage key is stage.N.SECTION.KEY with N the stage\'s number from 1, '
        "e.g. stage.2.optim.lr",
        "sweep.grid.\"stage.1.train.epochs\"[0]: expected an integer, got 'many' (str)",
    ]


def test_lp_ft_sweeps_the_fine_tuning_lr_and_the_probe_lr_by_stage_key(data: Path, tmp_path: Path) -> None:
    """The built-in grid (optim.lr) reaches the fine-tuning stage; stage.1.optim.lr the probe."""
    result = runner.invoke(
        app,
        ["sweep", "--data", str(data), "--out", str(tmp_path), "--model", "test_vit", "--recipe",
         "lp-ft-freeze-embed", "--grid", "stage.1.optim.lr=1e-3,1e-2", "--grid", "train.seed=0", "--print-commands"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 12  # the paper's 6 SGD learning rates x 2 probe learning rates
    args = shlex.split(lines[-1])
    out = Path(args[args.index("--out") + 1])
    assert out.name == "optim.lr=0.01,stage.1.optim.lr=0.01,train.seed=0"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    recipe = resolve_train_recipe("lp-ft-freeze-embed", sets, data)
    assert [(s.name, s.optim.lr) for s in recipe.stages] == [("probe", 1e-2), ("finetune", 1e-2)]
    first = resolve_train_recipe("lp-ft-freeze-embed", [], data)
    assert [s.optim.lr for s in first.stages] == [1e-3, 1e-4]


def test_grid_option_values_are_toml_or_strings() -> None:
    assert parse_grid_option("optim.lr=1e-4,3e-4") == ("optim.lr", [1e-4, 3e-4])
    assert parse_grid_option("data.augment=flip,none") == ("data.augment", ["flip", "none"])
    assert parse_grid_option("optim.betas=[0.9,0.999],[0.9,0.99]") == (
        "optim.betas",
        [[0.9, 0.999], [0.9, 0.99]],
    )
    assert parse_grid_option("model.kwargs={img_size=32},{img_size=64}")[1] == [
        {"img_size": 32},
        {"img_size": 64},
    ]
    with pytest.raises(RecipeError, match=r"expected KEY\.PATH=V1,V2"):
        parse_grid_option("optim.lr")


# --------------------------------------------------------------------------- usage errors, before any run


def test_every_problem_of_every_grid_point_is_reported_before_anything_starts(
    env: Any, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s"
    result = sweep(data, out, "--grid", "optim.lrr=1", "--grid", "train.seed=0,0", "--recipe", "nope")
    assert result.exit_code == 2, result.output
    for text in (
        "--grid optim.lrr: unknown recipe key (did you mean optim.lr?)",
        "--grid train.seed: 0 given",
        "--recipe nope:",
    ):
        assert text in result.stderr
    result = sweep(
        data,
        out,
        "--recipe",
        "adamw",
        "--recipe",
        "sgd",
        "--grid",
        "train.batch_size=6,0",
        "--set",
        "train.epochs=0",
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "no run was started" in text
    for recipe in ("adamw", "sgd"):
        assert f"--recipe {recipe}: train.epochs: must be >= 1, got 0 (every grid point)" in text
        assert (
            f"--recipe {recipe}: train.batch_size: must be >= 1, got 0 (every grid point with train.batch_size=0)"
            in text
        )
    result = sweep(data, out, "--set", "optim.lr=0.1")
    assert result.exit_code == 2 and "optim.lr is a grid key of this sweep" in result.stderr
    assert "--grid optim.lr=VALUE" in result.stderr
    plain = tmp_path / "plain.toml"
    plain.write_text('[optim]\nname = "sgd"\n')
    result = sweep(data, out, "--recipe", str(plain))
    assert result.exit_code == 2 and "recipe plain has no grid" in result.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_devices_need_a_gpu(env: Any, data: Path, tmp_path: Path) -> None:
    result = sweep(data, tmp_path / "s", *GRID, "--devices", "0,1", "--jobs", "2")
    assert result.exit_code == 2 and "no CUDA GPU is available" in result.stderr


# --------------------------------------------------------------------------- one sweep, read many ways


@pytest.mark.slow
def test_sweep_trains_every_point_and_selects_the_best_mean_val(swept: tuple[Path, Any]) -> None:
    out, result = swept
    summaries = {p: json.loads((point_dir(out, *p) / "summary.json").read_text()) for p in POINTS}
    means = {lr: statistics.fmean(summaries[(lr, s)]["val_accuracy"] for s in (0, 1)) for lr in (1e-4, 0.01)}
    best = min(means, key=lambda lr: (-means[lr], lr))  # the protocol: highest mean, then the smaller lr
    record = json.loads((out / "sweep.json").read_text())
    selection = record["selection"]["selections"][0]
    assert selection["selected"]["grid"] == {"optim.lr": best}
    assert selection["selected"]["val"]["mean"] == pytest.approx(means[best])
    assert selection["selected"]["seeds"] == [0, 1] and selection["compared"] == 2
    assert record["selection"]["grid_keys"] == ["optim.lr", "train.seed"]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"sweep {out}: 4 runs of 1 recipe(s), 0 finished, 4 to train, 1 at a time")
    for i, (lr, seed) in enumerate(POINTS, 1):
        assert f"[{i}/4] start sgd-freeze-embed optim.lr={lr!r},train.seed={seed}" in lines
        assert any(
            line.startswith(f"[{i}/4] finished sgd-freeze-embed optim.lr={lr!r},train.seed={seed}: val ")
            for line in lines
        )
    assert "Selection: per recipe" in result.stdout and "4 runs: 4 finished" in result.stdout


@pytest.mark.slow
def test_sweep_json_is_complete(swept: tuple[Path, Any], data: Path) -> None:
    out, _ = swept
    record = json.loads((out / "sweep.json").read_text())
    assert record["format"] == 1 and record["state"] == "finished" and record["out"] == str(out)
    assert record["data"] == str(data.resolve()) and record["jobs"] == 1
    assert record["counts"] == {
        "pending": 0,
        "queued": 0,
        "running": 0,
        "finished": 4,
        "failed": 0,
        "interrupted": 0,
    }
    (entry,) = record["recipes"]
    assert entry["name"] == "sgd-freeze-embed" and entry["grid"] == {
        "optim.lr": [1e-4, 0.01],
        "train.seed": [0, 1],
    }
    assert entry["recipe"]["train.epochs"] == 2 and "optim.lr" not in entry["recipe"]
    assert [(r["grid"]["optim.lr"], r["grid"]["train.seed"]) for r in record["runs"]] == POINTS
    for run in record["runs"]:
        summary = json.loads((Path(run["path"]) / "summary.json").read_text())
        assert run["status"] == "finished" and run["exit_code"] == 0 and run["error"] is None
        assert run["metrics"]["accuracy"] == {k: v["accuracy"] for k, v in summary["best"].items()}
        assert run["metrics"]["best_epoch"] == summary["best_epoch"]
        assert run["metrics"]["peak_memory_bytes"] == summary["peak_memory_bytes"]
        assert Path(run["log"]).read_text().startswith("=== ")
    assert record["outside_grid"] == [] and record["selection"]["problems"] == []


@pytest.mark.slow
def test_each_run_is_the_run_ftsgd_train_makes_with_its_command_line(
    swept: tuple[Path, Any], data: Path
) -> None:
    out, _ = swept
    record = json.loads((out / "sweep.json").read_text())
    for run in record["runs"]:
        args = shlex.split(run["command"])
        assert args[:2] == ["ftsgd", "train"] and args[-2:] == ["--resume", "--quiet"]
        assert args[args.index("--out") + 1] == run["path"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        lr, seed = run["grid"]["optim.lr"], run["grid"]["train.seed"]
        assert sets[-2:] == [f"optim.lr={lr!r}", f"train.seed={seed}"]
        expected = resolve_train_recipe("sgd-freeze-embed", [*sets, 'model.name="test_vit"'], data)
        assert (Path(run["path"]) / "recipe.toml").read_text() == recipe_to_toml(expected)


@pytest.mark.slow
def test_rerunning_the_same_command_trains_nothing(swept: tuple[Path, Any], data: Path) -> None:
    out, _ = swept
    files = sorted(out.glob("*/*/summary.json")) + sorted(out.glob("*/*/model.safetensors"))
    before = stats(files)
    result = sweep(data, out, *GRID)
    assert result.exit_code == 0, result.output
    assert "4 finished, 0 to train" in result.stdout and "start" not in result.stdout
    assert stats(files) == before


@pytest.mark.slow
def test_a_changed_sweep_into_the_same_out_is_refused_naming_what_changed(
    swept: tuple[Path, Any], data: Path
) -> None:
    out, _ = swept
    record = (out / "sweep.json").read_bytes()
    result = sweep(data, out, "--grid", "optim.lr=1e-4,0.02", "--grid", "train.seed=0,1")
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "grid of sgd-freeze-embed: optim.lr: [0.0001, 0.01] -> [0.0001, 0.02]" in text
    assert "--allow-changed-grid" in text
    result = sweep(
        data, out, *GRID, "--set", "train.epochs=3", "--recipe", "sgd-freeze-embed", "--recipe", "adamw"
    )
    assert result.exit_code == 2
    text = " ".join(result.stderr.split())
    assert "recipe sgd-freeze-embed: train.epochs: 2 -> 3" in text and "--recipe: added adamw" in text
    assert (out / "sweep.json").read_bytes() == record


@pytest.mark.slow
def test_allow_changed_grid_keeps_and_lists_runs_outside_the_grid(
    swept: tuple[Path, Any], data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    result = sweep(
        data, out, "--grid", "optim.lr=1e-4", "--grid", "train.seed=0,1", "--allow-changed-grid", "--json"
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record == json.loads((out / "sweep.json").read_text())
    assert record["outside_grid"] == [str(point_dir(out, 0.01, s)) for s in (0, 1)]
    assert all(Path(p, "summary.json").is_file() for p in record["outside_grid"])
    assert [p["grid"] for p in record["selection"]["grid_points"]] == [{}]
    assert "2 run(s) under" in result.stderr and "not in this grid" in result.stderr
    # a run directory holds one recipe: changing what the runs train is refused even when allowed
    result = sweep(
        data,
        out,
        "--grid",
        "optim.lr=1e-4",
        "--grid",
        "train.seed=0,1",
        "--allow-changed-grid",
        "--set",
        "train.epochs=3",
    )
    assert result.exit_code == 2 and "hold other recipes" in result.stderr
    assert "train.epochs: 2 -> 3" in result.stderr


@pytest.mark.slow
def test_print_commands_run_as_is_and_report_collects_them(
    swept: tuple[Path, Any], data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "printed"
    result = sweep(data, out, *GRID, "--print-commands")
    assert result.exit_code == 0, result.output
    commands = result.stdout.splitlines()
    assert len(commands) == 4 and not out.exists()
    entry = f"{shlex.quote(os.path.abspath(sys.executable))} -m ftsgd"  # runs where ftsgd is not on PATH
    assert all(c.startswith(f"{entry} train --data {data.resolve()} --out ") for c in commands)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # the stand-in ftsgd
    for pair in (commands[:2], commands[2:]):  # two at a time, as GNU parallel -j 2 would
        procs = [subprocess.Popen(["bash", "-c", c], env={**os.environ, "PATH": path}) for c in pair]
        assert [p.wait(timeout=600) for p in procs] == [0, 0]
    report = runner.invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.output
    ours = json.loads(report.stdout)["selections"]
    theirs = json.loads((swept[0] / "sweep.json").read_text())["selection"]["selections"]
    assert [s["selected"]["grid"] for s in ours] == [s["selected"]["grid"] for s in theirs]
    assert [s["selected"]["val"] for s in ours] == [s["selected"]["val"] for s in theirs]
    for lr, seed in POINTS:
        same_results(point_dir(out, lr, seed), point_dir(swept[0], lr, seed))
    assert sweep(data, out, *GRID, "--print-commands").stdout == ""  # nothing left to run
    result = sweep(data, out, *GRID)
    assert result.exit_code == 0 and "4 finished, 0 to train" in result.stdout


@pytest.mark.slow
def test_jobs_2_gives_the_results_of_jobs_1(swept: tuple[Path, Any], data: Path, tmp_path: Path) -> None:
    out = tmp_path / "jobs2"
    result = sweep(data, out, *GRID, "--jobs", "2", "--json", "--png", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["jobs"] == 2 and record["counts"]["finished"] == 4
    assert record == json.loads((out / "sweep.json").read_text())  # --json prints sweep.json's content
    starts = [line for line in result.stderr.splitlines() if " start " in line]
    assert len(starts) == 4 and all("thread(s))" in line for line in starts)
    for lr, seed in POINTS:
        same_results(point_dir(out, lr, seed), point_dir(swept[0], lr, seed))
    theirs = json.loads((swept[0] / "sweep.json").read_text())["selection"]["selections"]
    assert record["selection"]["selections"][0]["selected"]["val"] == theirs[0]["selected"]["val"]
    assert sorted(Path(p).name for p in record["plots"]) == [
        "accuracy_vs_memory.png",
        "id_vs_ood.png",
        "learning_curves.png",
        "learning_curves_all_runs.png",
    ]


def test_a_run_made_before_sweep_tables_still_resumes_and_pools(
    swept: tuple[Path, Any], data: Path, tmp_path: Path
) -> None:
    """recipe.toml without a [sweep] table (written before it existed) is the same recipe to --resume and report."""
    old = tmp_path / "old"
    shutil.copytree(point_dir(swept[0], 1e-4, 0), old)
    text = (old / "recipe.toml").read_text()
    (old / "recipe.toml").write_text(text[: text.index("[sweep]")])
    args = ["train", "--data", str(data), "--out", str(old), "--recipe", "sgd-freeze-embed", *FLAGS]
    result = runner.invoke(app, [*args, "--set", "optim.lr=1e-4", "--set", "train.seed=0", "--resume"])
    assert result.exit_code == 0, result.output
    assert "is finished" in result.stdout
    report = collect_report([old, point_dir(swept[0], 1e-4, 1)])
    assert report.grid_keys == ["train.seed"] and report.ignored_keys == ["sweep.grid"]
    assert len(report.points) == 1 and report.points[0].seeds == [0, 1]


@pytest.mark.slow
def test_a_second_sweep_on_the_same_out_exits_2(swept: tuple[Path, Any], data: Path) -> None:
    out, _ = swept
    with locked(out, "sweep directory"):  # as a running sweep holds it
        result = sweep(data, out, *GRID)
    assert (
        result.exit_code == 2
        and "the sweep directory" in result.stderr
        and "is in use by PID" in result.stderr
    )


# --------------------------------------------------------------------------- failures and interruptions


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on_then_exits_1(
    env: Any, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fails"
    grid = ["--grid", "optim.lr=1e30,1e-4", "--grid", "train.seed=0", "--jobs", "2"]
    result = sweep(data, out, *grid)
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "1 of 2 runs failed" in text and "exit 1: training loss became nan" in text
    record = json.loads((out / "sweep.json").read_text())
    failed, finished = record["runs"]
    assert record["state"] == "failed" and failed["status"] == "failed" and failed["exit_code"] == 1
    assert failed["error"].startswith("training loss became nan") and finished["status"] == "finished"
    assert record["selection"]["selections"][0]["selected"]["grid"] == {"optim.lr": 1e-4}
    # rerunning skips the failure (it would diverge again), still exits 1; --retry-failed trains it again
    result = sweep(data, out, *grid)
    assert result.exit_code == 1 and " start " not in result.stdout
    assert "1 failed before, not retried" in result.stdout
    result = sweep(data, out, *grid, "--retry-failed")
    assert result.exit_code == 1 and "[1/2] start" in result.stdout
    assert Path(failed["log"]).read_text().count("=== ") == 2


def test_in_process_runs_train_as_the_subprocesses_do_and_a_failure_is_recorded(
    swept: tuple[Path, Any], one_torch_thread: None, data: Path, tmp_path: Path
) -> None:
    """``ftsgd demo --compare``'s executor: the run directories ``ftsgd sweep``'s subprocesses write, bitwise;
    a failed run recorded with its error and log while the sweep goes on, then RunError (exit 1)."""
    out = tmp_path / "inprocess"
    opts = SweepOptions(
        data=data,
        out=out,
        recipes=["sgd-freeze-embed"],
        grids=["train.seed=0"],
        recipe_grids={"sgd-freeze-embed": ["optim.lr=1e30,1e-4"]},
        sets=FLAGS[3::2],
        model="test_vit",
    )
    with locked(out, "sweep directory"), pytest.raises(RunError, match="1 of 2 runs failed"):
        sweep = open_sweep(plan_sweep(opts), opts)
        conclude(sweep, execute_in_process(sweep), show=False)
    record = json.loads((out / "sweep.json").read_text())
    failed, finished = record["runs"]
    assert record["state"] == "failed" and failed["status"] == "failed" and failed["exit_code"] == 1
    assert failed["error"].startswith("training loss became nan") and finished["status"] == "finished"
    assert "error: training loss became nan" in Path(failed["log"]).read_text()
    assert record["recipes"][0]["grid"] == {"optim.lr": [1e30, 1e-4], "train.seed": [0]}
    assert record["selection"]["selections"][0]["selected"]["grid"] == {"optim.lr": 1e-4}
    same_results(point_dir(out, 1e-4, 0), point_dir(swept[0], 1e-4, 0))


def wait_for(condition: Any, what: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def running_pid(out: Path, index: int) -> int | None:
    """The pid sweep.json records for run ``index`` while it runs."""
    try:
        run = json.loads((out / "sweep.json").read_text())["runs"][index]
    except (OSError, ValueError):
        return None
    return run["pid"] if run["status"] == "running" else None


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
    except OSError:
        return True
    return state in "ZX"


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(
    swept: tuple[Path, Any], data: Path, tmp_path: Path
) -> None:
    """SIGTERM, then kill -9 of the sweep; the same command then finishes with the uninterrupted results."""
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "ftsgd", "sweep", "--data", str(data), "--out", str(out), *FLAGS]
    command += ["--grid", "optim.lr=1e-4", "--grid", "train.seed=0,1"]
    first = point_dir(out, 1e-4, 0)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: running_pid(out, 1) is not None, "the second run to start")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr
    assert "SIGTERM: stopping 1 running run(s)" in stdout and "sweep interrupted by SIGTERM" in stderr
    record = json.loads((out / "sweep.json").read_text())
    assert record["state"] == "interrupted" and record["command"] == shlex.join(["ftsgd", *command[3:]])
    assert [r["status"] for r in record["runs"]] == ["finished", "interrupted"]
    before = stats([first / "summary.json", first / "model.safetensors"])

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: running_pid(out, 1) is not None, "the second run to start again")
    child = running_pid(out, 1)
    proc.kill()  # kill -9: the run is told by the kernel (SIGTERM) and stops on its own
    proc.wait()
    wait_for(lambda: gone(child), "the orphaned run to stop")
    wait_for(lambda: lock_holder(point_dir(out, 1e-4, 1)) is None, "the orphaned run to release its lock")

    result = sweep(data, out, "--grid", "optim.lr=1e-4", "--grid", "train.seed=0,1")
    assert result.exit_code == 0, result.output
    assert "1 finished, 1 to train" in result.stdout and "[1/2] start" not in result.stdout
    assert stats([first / "summary.json", first / "model.safetensors"]) == before
    for seed in (0, 1):
        same_results(point_dir(out, 1e-4, seed), point_dir(swept[0], 1e-4, seed))
    log = (out / "logs" / "sgd-freeze-embed" / "optim.lr=0.0001,train.seed=1.log").read_text()
    assert log.count("=== ") == 3 and log.count("--resume --quiet") == 3


@pytest.mark.slow
def test_runs_stopped_from_outside_are_resumable_not_failed(env: Any, data: Path, tmp_path: Path) -> None:
    """A run's process SIGTERMed (checkpoint saved, 143) or SIGKILLed (the OOM killer) by someone else is
    "interrupted": the sweep exits 1 saying it is incomplete, and the same command continues both."""
    out = tmp_path / "stopped"
    flags = [a if a != "train.epochs=2" else "train.epochs=8" for a in FLAGS]
    args = ["sweep", "--data", str(data), "--out", str(out), *flags, "--grid", "optim.lr=1e-4,0.01"]
    args += ["--grid", "train.seed=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftsgd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for index, sig in ((0, signal.SIGTERM), (1, signal.SIGKILL)):
        wait_for(lambda i=index: running_pid(out, i) is not None, f"run {index} to start")
        os.kill(running_pid(out, index), sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    text = " ".join(err.decode().split())
    assert "sweep incomplete: 2 of 2 runs are not finished (none failed)" in text
    record = json.loads((out / "sweep.json").read_text())
    assert record["state"] == "incomplete"
    assert [r["status"] for r in record["runs"]] == ["interrupted", "interrupted"]
    assert record["runs"][1]["error"].startswith("stopped from outside (killed by SIGKILL)")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0 finished, 2 to train" in result.stdout
    assert [r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ["finished"] * 2


@pytest.mark.slow
def test_a_run_held_by_another_process_leaves_the_sweep_incomplete_not_failed(
    env: Any, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "held"
    grid = ["--grid", "optim.lr=1e-4", "--grid", "train.seed=0"]
    with locked(point_dir(out, 1e-4, 0)):  # e.g. a user's `ftsgd train --resume` of that run
        result = sweep(data, out, *grid)
    assert result.exit_code == 1, result.output
    assert "skipped sgd-freeze-embed optim.lr=0.0001,train.seed=0: in use by PID" in result.stdout
    assert "sweep incomplete: 1 of 1 runs are not finished (none failed)" in " ".join(result.stderr.split())
    assert json.loads((out / "sweep.json").read_text())["state"] == "incomplete"
    again = sweep(data, out, *grid)
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(
    ("exit_code", "printed", "status", "error"),
    [
        (143, "interrupted by SIGTERM; checkpoint saved.", "interrupted", "stopped from outside (SIGTERM,"),
        (-9, "", "interrupted", "stopped from outside (killed by SIGKILL)"),
        (
            2,
            "error: the run directory R is in use by PID 7 on h; wait",
            "pending",
            "left to another process:",
        ),
        (1, "error: training loss became nan at step 3", "failed", "training loss became nan at step 3"),
        (2, "error: data.val: split folder x does not exist", "failed", "data.val: split folder x"),
    ],
)
def test_how_a_run_s_end_is_recorded(
    tmp_path: Path, exit_code: int, printed: str, status: str, error: str
) -> None:
    """Failed is the run's own failure; a stop from outside or a lock held by another process is not."""
    from ftsgd.sweep.jobs import Active, Slot, run_result
    from ftsgd.sweep.record import RunRecord

    log = tmp_path / "run.log"
    log.write_text(printed + "\n")
    code = (
        f"import os, signal; os.kill(os.getpid(), {-exit_code})"
        if exit_code < 0
        else f"raise SystemExit({exit_code})"
    )
    process = subprocess.Popen([zygote.PYTHON, "-c", code])
    process.wait()
    run = type("Run", (), {"path": tmp_path / "run"})()
    handle = open(log, "ab")  # noqa: SIM115 - run_result closes it, as for a real run
    active = Active(run, Slot(0, None, (), 1), process, log, handle, 0)  # type: ignore[arg-type]
    record = run_result(active, RunRecord("running"), stopping=False)
    assert record.status == status and (record.error or "").startswith(error), record
