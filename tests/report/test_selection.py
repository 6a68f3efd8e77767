"""The paper's selection protocol, pinned on run directories with known results (see tests/_runs.py)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from _runs import write_run
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.errors import UsageError
from ftsgd.report.selection import Report, collect_report
from ftsgd.run.collect import BROKEN, FINISHED, UNFINISHED, find_run_dirs, read_run

runner = CliRunner()


def report_json(*args: str) -> dict:
    result = runner.invoke(app, ["report", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def grid_2x2(root: Path, data: Path, vals: dict[tuple[float, int], float]) -> None:
    """Runs ``root/lr=X,seed=S`` with ID-val accuracy ``vals[(X, S)]`` and OOD = val - 0.3."""
    for (lr, seed), val in vals.items():
        write_run(root / f"lr={lr},seed={seed}", data=data, lr=lr, seed=seed, val=val, ood=val - 0.3)


def only_selection(report: Report):
    (selection,) = report.selections
    return selection


def test_2x2_grid_selects_the_best_mean_over_seeds_not_the_best_run(tmp_path: Path) -> None:
    # lr 1e-2 has the single best run (0.95) but the lower mean (0.825 < 0.85)
    vals = {(1e-3, 0): 0.80, (1e-3, 1): 0.90, (1e-2, 0): 0.70, (1e-2, 1): 0.95}
    grid_2x2(tmp_path / "sweep", tmp_path / "data", vals)
    report = collect_report([tmp_path / "sweep"])
    assert report.grid_keys == ["optim.lr", "train.seed"]
    s = only_selection(report)
    assert s.point is not None and s.point.values == {"optim.lr": 1e-3}
    assert not s.tie and s.excluded == [] and len(s.compared) == 2
    assert s.point.seeds == [0, 1]
    assert s.point.val.mean == pytest.approx(0.85)
    assert s.point.val.std == pytest.approx(statistics.stdev([0.80, 0.90]))
    assert s.point.val.ci90 == pytest.approx(1.645 * statistics.stdev([0.80, 0.90]) / math.sqrt(2))
    # OOD is read at each run's best epoch (epoch 1), not at the last epoch
    assert s.point.splits["ood"].mean == pytest.approx(0.55)
    assert s.point.peak_memory_bytes == 700 * 2**20 and s.point.train_time_s == pytest.approx(30.0)

    data = report_json(str(tmp_path / "sweep"))
    (sel,) = data["selections"]
    assert sel["selected"]["grid"] == {"optim.lr": 0.001} and sel["tie"] is False
    assert sel["selected"]["val"]["mean"] == pytest.approx(0.85)
    assert sel["selected"]["splits"]["ood"]["std"] == pytest.approx(statistics.stdev([0.50, 0.60]))
    points = {p["grid"]["optim.lr"]: p for p in data["grid_points"]}
    assert points[0.01]["val"]["mean"] == pytest.approx(0.825) and points[0.01]["selected"] is False
    assert {r["grid"]["train.seed"] for r in data["runs"]} == {0, 1}
    assert all(r["best_epoch"] == 1 and r["status"] == "finished" for r in data["runs"])


def test_a_tie_keeps_the_smaller_learning_rate_and_says_so(tmp_path: Path) -> None:
    # 0.8 and 0.9 average to 0.8500000000000001 in floating point: still a tie with 0.85
    vals = {(1e-3, 0): 0.80, (1e-3, 1): 0.90, (1e-2, 0): 0.85, (1e-2, 1): 0.85}
    grid_2x2(tmp_path / "sweep", tmp_path / "data", vals)
    for order in (["sweep"], ["sweep/lr=0.01,seed=1", "sweep"]):  # input order does not matter
        s = only_selection(collect_report([tmp_path / p for p in order]))
        assert s.tie and s.point is not None and s.point.values == {"optim.lr": 1e-3}
        assert [p.values["optim.lr"] for p in s.tied] == [1e-3, 1e-2]
        assert "tie" in s.reason and "smallest optim.lr" in s.reason

    data = report_json(str(tmp_path / "sweep"))
    (sel,) = data["selections"]
    assert sel["tie"] is True and sel["tied_with"] == [{"optim.lr": 0.01}]
    md = runner.invoke(app, ["report", str(tmp_path / "sweep"), "--markdown", "--table", "selection"]).stdout
    assert "| sgd-freeze-embed | 0.001 | 2/2 | 85.00 ± 7.07 | 55.00 ± 7.07 | 700 MiB | 30.0 s |" in md
    assert "tie with optim.lr=0.01 |" in md
    points = runner.invoke(app, ["report", str(tmp_path / "sweep"), "--csv", "--table", "points"]).stdout
    assert "selected (tie)" in points and ",tie," in points


def test_with_allow_missing_a_tie_goes_to_the_point_with_more_seeds(tmp_path: Path) -> None:
    vals = {(1e-3, 0): 0.80, (1e-3, 1): 0.90, (1e-2, 0): 0.85, (1e-2, 1): 0.80, (1e-2, 2): 0.90}
    grid_2x2(tmp_path / "sweep", tmp_path / "data", vals)
    s = only_selection(collect_report([tmp_path / "sweep"], allow_missing=True))
    assert s.tie and s.point is not None and s.point.values == {"optim.lr": 1e-2}
    assert s.point.seeds == [0, 1, 2]
    # without --allow-missing the 2-seed point is not compared at all: no tie
    s = only_selection(collect_report([tmp_path / "sweep"]))
    assert not s.tie and s.point is not None and s.point.values == {"optim.lr": 1e-2}
    assert [p.values for p in s.excluded] == [{"optim.lr": 1e-3}]


def test_a_missing_seed_is_left_out_unless_allowed_and_unfinished_runs_are_listed(tmp_path: Path) -> None:
    sweep, data = tmp_path / "sweep", tmp_path / "data"
    # lr 1e-3 has the best run but only seed 0 finished; its seed 1 is still running
    grid_2x2(sweep, data, {(1e-3, 0): 0.99, (1e-2, 0): 0.80, (1e-2, 1): 0.90})
    write_run(sweep / "lr=0.001,seed=1", data=data, lr=1e-3, seed=1, val=0.2, finished=False)

    s = only_selection(collect_report([sweep]))
    assert s.point is not None and s.point.values == {"optim.lr": 1e-2}
    (left_out,) = s.excluded
    assert left_out.values == {"optim.lr": 1e-3} and not left_out.complete
    assert left_out.seeds == [0] and left_out.expected_seeds == [0, 1] and len(left_out.unfinished) == 1
    assert "left out" in s.reason and "--allow-missing" in s.reason

    s = only_selection(collect_report([sweep], allow_missing=True))
    assert s.point is not None and s.point.values == {"optim.lr": 1e-3} and s.excluded == []

    data_json = report_json(str(sweep))
    assert data_json["unfinished"] == [str((sweep / "lr=0.001,seed=1").resolve())]
    (unfinished,) = [r for r in data_json["runs"] if r["status"] == "unfinished"]
    assert unfinished["epochs_done"] == 1 and unfinished["accuracy"]["val"] == pytest.approx(0.2)
    plain = runner.invoke(app, ["report", str(sweep)]).stdout
    assert "1/2 (1 unfinished)" in plain and "left out: missing seeds" in plain
    assert "unfinished 1/2 epochs" in plain and "1 unfinished run(s), not in any mean" in plain
    md = runner.invoke(
        app, ["report", str(sweep), "--markdown", "--allow-missing", "--table", "selection"]
    ).stdout
    assert "| sgd-freeze-embed | 0.001 | 1/2 (1 unfinished) | 99.00 |" in md and "missing seeds |" in md


def test_no_complete_grid_point_selects_nothing_and_says_why(tmp_path: Path) -> None:
    sweep, data = tmp_path / "sweep", tmp_path / "data"
    grid_2x2(sweep, data, {(1e-3, 0): 0.8, (1e-2, 1): 0.9})  # each point misses one seed
    s = only_selection(collect_report([sweep]))
    assert s.point is None and len(s.excluded) == 2
    assert "no grid point has all 2 seeds finished" in s.reason
    result = runner.invoke(app, ["report", str(sweep), "--csv"])
    assert result.exit_code == 0
    assert "no grid point has all 2 seeds finished" in result.stdout


def test_broken_runs_are_listed_with_their_problem_not_a_traceback(tmp_path: Path) -> None:
    sweep, data = tmp_path / "sweep", tmp_path / "data"
    grid_2x2(sweep, data, {(1e-3, 0): 0.8, (1e-3, 1): 0.9})
    bad_json = write_run(sweep / "bad-json", data=data, lr=1e-2, seed=0, val=0.99)
    (bad_json / "summary.json").write_text('{"best": {"val": ')
    (bad_json / "metrics.jsonl").write_text("not json\n")
    no_acc = write_run(sweep / "no-acc", data=data, lr=1e-2, seed=1, val=0.99)
    (no_acc / "summary.json").write_text(json.dumps({"best": {"ood": {"accuracy": 0.5}}}))
    bad_toml = write_run(sweep / "bad-toml", data=data, lr=1e-2, seed=0, val=0.99)
    (bad_toml / "recipe.toml").write_text("[optim\nlr = ")

    result = runner.invoke(app, ["report", str(sweep), "--json"])
    assert result.exit_code == 0 and "Traceback" not in result.stderr
    data_json = json.loads(result.stdout)
    status = {Path(r["path"]).name: r["status"] for r in data_json["runs"]}
    assert status == {"bad-json": BROKEN, "bad-toml": BROKEN, "no-acc": BROKEN} | {
        "lr=0.001,seed=0": FINISHED,
        "lr=0.001,seed=1": FINISHED,
    }
    problems = "\n".join(data_json["problems"])
    assert f"{(bad_json / 'summary.json').resolve()} cannot be read" in problems
    assert f"{(bad_json / 'metrics.jsonl').resolve()} line 1 is not an epoch record" in problems
    assert f"{(bad_toml / 'recipe.toml').resolve()} cannot be read" in problems
    assert "has no best-epoch accuracy for its ID-val split 'val'" in problems
    for line in data_json["problems"]:
        assert f"warning: {line}" in result.stderr
    # a broken run with a readable recipe keeps its grid point (0/2 seeds, 2 broken); one without a
    # recipe has no place in the grid; the selection is made from the good runs only
    points = {p["grid"]["optim.lr"]: p for p in data_json["grid_points"]}
    assert points[0.01]["seeds"] == [] and len(points[0.01]["broken"]) == 2 and points[0.01]["val"] is None
    (sel,) = data_json["selections"]
    assert sel["selected"]["grid"] == {"optim.lr": 0.001} and sel["selected"]["val"]["n"] == 2
    plain = runner.invoke(app, ["report", str(sweep), "--table", "points"]).stdout
    assert "0/2 (2 broken)" in plain and "no result" in plain


def test_execution_keys_pool_seeds_but_data_folders_and_recipes_never_do(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    a, b = tmp_path / "data-a", tmp_path / "data-b"
    write_run(sweep / "a0", data=a, seed=0, val=0.8, sets=["data.num_workers=0"])
    write_run(sweep / "a1", data=a, seed=1, val=0.9, sets=["data.num_workers=4", 'train.device="cpu"'])
    write_run(sweep / "b0", data=b, seed=0, val=0.5)
    write_run(sweep / "adamw", data=a, recipe="adamw", lr=1e-5, val=0.7)
    report = collect_report([sweep])
    assert report.grid_keys == ["optim.lr", "train.seed"]  # optim.name, betas... differ only by recipe
    assert report.ignored_keys == ["data.num_workers", "train.device"]
    units = [(s.recipe, Path(s.data).name, s.point.seeds if s.point else None) for s in report.selections]
    assert units == [
        ("adamw", "data-a", [0]),
        ("sgd-freeze-embed", "data-a", [0, 1]),
        ("sgd-freeze-embed", "data-b", [0]),
    ]
    plain = runner.invoke(app, ["report", str(sweep)]).stdout
    assert "data.num_workers, train.device" in plain
    assert str(b) in plain  # a data column appears when the runs used several data folders


def test_a_repeated_seed_is_counted_once(tmp_path: Path) -> None:
    sweep, data = tmp_path / "sweep", tmp_path / "data"
    write_run(sweep / "a", data=data, seed=0, val=0.8)
    write_run(sweep / "b", data=data, seed=1, val=0.6)
    shutil.copytree(sweep / "a", sweep / "a-copy")
    report = collect_report([sweep])
    s = only_selection(report)
    assert s.point is not None and s.point.seeds == [0, 1] and s.point.val.mean == pytest.approx(0.7)
    assert any("a-copy repeats seed 0" in p and "left out of the mean" in p for p in report.problems)


def test_finding_runs_and_clear_errors_for_paths_without_runs(tmp_path: Path) -> None:
    sweep, data = tmp_path / "sweep", tmp_path / "data"
    one = write_run(sweep / "sgd" / "deep" / "r0", data=data, seed=0)
    write_run(sweep / ".trash" / "r9", data=data, seed=9)  # hidden folders are not searched
    assert find_run_dirs([sweep]) == [one.resolve()]
    assert find_run_dirs([one / "summary.json", one, sweep]) == [one.resolve()]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as err:
        find_run_dirs([tmp_path / "empty", tmp_path / "nope", one / "recipe.toml", data])
    message = str(err.value)
    assert f"{tmp_path / 'empty'} holds no run directory" in message
    assert f"{tmp_path / 'nope'} does not exist" in message and f"{data} holds no run" in message

    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no run directory" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_a_run_without_recipe_or_summary_is_still_shown(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = write_run(tmp_path / "r", data=data, finished=False)
    (run / "recipe.toml").unlink()
    got = read_run(run)
    assert got.status == UNFINISHED and got.recipe == "?" and got.best_epoch == 1
    finished = write_run(tmp_path / "f", data=data)
    (finished / "recipe.toml").unlink()
    got = read_run(finished)
    assert got.status == BROKEN and "grid values are unknown" in got.problems[0]


def test_the_dict_form_is_plain_json(tmp_path: Path) -> None:
    grid_2x2(tmp_path / "s", tmp_path / "data", {(1e-3, 0): 0.8, (1e-3, 1): 0.9})
    report = collect_report([tmp_path / "s"])
    text = json.dumps(report.to_dict())  # no custom encoder needed: a sweep can store it as is
    assert json.loads(text)["protocol"]["tie_break"][0] == "more finished seeds"


@pytest.mark.parametrize(
    "bad_recipe",
    ["this is [not toml", "x = " + "[" * 2000 + "]" * 2000, "[train]\nstarted = 2026-12-03T10:00:00"],
)
def test_an_unreadable_recipe_is_listed_and_the_other_runs_are_selected_as_before(
    tmp_path: Path, bad_recipe: str
) -> None:
    vals = {(1e-3, 0): 0.80, (1e-3, 1): 0.90, (1e-2, 0): 0.70, (1e-2, 1): 0.95}
    grid_2x2(tmp_path / "sweep", tmp_path / "data", vals)
    before = collect_report([tmp_path / "sweep"])
    write_run(tmp_path / "sweep" / "bad", data=tmp_path / "data", lr=1e-3, seed=2, val=0.1)
    (tmp_path / "sweep" / "bad" / "recipe.toml").write_text(bad_recipe)
    report = collect_report([tmp_path / "sweep"])
    assert report.grid_keys == before.grid_keys == ["optim.lr", "train.seed"]
    chosen = [s.point.values for s in report.selections if s.point is not None and s.recipe != "?"]
    assert chosen == [only_selection(before).point.values]
    assert read_run(tmp_path / "sweep" / "bad").status == BROKEN


def test_linked_run_folders_are_followed_once(tmp_path: Path) -> None:
    write_run(tmp_path / "real" / "a", data=tmp_path / "data")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a").symlink_to(tmp_path / "real" / "a")
    (tmp_path / "links" / "loop").symlink_to(tmp_path / "links")
    assert find_run_dirs([tmp_path / "links"]) == [(tmp_path / "real" / "a").resolve()]


@pytest.mark.parametrize(
    "record", ['{"format": 1, "recipes": 5}', '{"format": 1, "runs": [1]}', "[" * 100000 + "]" * 100000]
)
def test_a_sweep_json_of_the_wrong_shape_is_a_clear_error(tmp_path: Path, record: str) -> None:
    from ftsgd.sweep.record import read_previous

    (tmp_path / "sweep.json").write_text(record)
    with pytest.raises(UsageError, match=r"sweep\.json (is not a sweep record|nests too deeply)"):
        read_previous(tmp_path)
