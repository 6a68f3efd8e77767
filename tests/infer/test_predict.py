"""ftsgd predict end to end: files, folders, stdin, bad inputs, output formats, streaming, closed pipes,
and the same predictions as ftsgd eval."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _zygote as zygote
import pytest
from typer.testing import CliRunner

from ftsgd.cli.app import app

runner = CliRunner()
GUARD_S = 600
"""Only keeps a broken pipe test from hanging the suite; nothing here measures time."""


def predict(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    return runner.invoke(app, ["predict", *args], input=stdin, env=env)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def images(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*.png"))]


def test_predictions_equal_eval_on_the_same_images(trained_run: Path, image_folder: Path) -> None:
    result = predict(str(trained_run), str(image_folder / "val"), str(image_folder / "ood"))
    assert result.exit_code == 0, result.stderr
    got = records(result.stdout)  # JSON Lines: stdout is not a terminal
    evaluated = runner.invoke(app, ["eval", str(trained_run), "--data", str(image_folder), "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    results = json.loads(evaluated.stdout)
    classes = list(results["val"]["per_class"])
    for split in ("val", "ood"):
        mine = [r for r in got if Path(r["path"]).parts[-3] == split]
        assert [r["path"] for r in mine] == images(image_folder / split)  # each image once, sorted
        confusion = [[0] * len(classes) for _ in classes]
        for r in mine:
            confusion[classes.index(Path(r["path"]).parent.name)][classes.index(r["class"])] += 1
        assert confusion == results[split]["confusion"]
    assert len({r["class"] for r in got}) > 1  # a model that predicts one class would prove little


def test_records_rank_classes_by_probability(trained_run: Path, image_folder: Path) -> None:
    two = records(predict(str(trained_run), str(image_folder / "val"), "--top-k", "2", "--json").stdout)
    every = records(predict(str(trained_run), str(image_folder / "val"), "--top-k", "10").stdout)
    assert len(two) == len(every) == 24
    for short, full in zip(two, every, strict=True):
        assert set(short) == {"path", "class", "probability", "top_k"}
        assert len(short["top_k"]) == 2 and len(full["top_k"]) == 3  # capped at the 3 classes
        probs = [t["probability"] for t in full["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        assert full["top_k"][0] == {"class": full["class"], "probability": full["probability"]}
        assert short["top_k"] == full["top_k"][:2]


def test_folders_follow_the_image_rules_and_named_files_are_always_tried(
    trained_run: Path, image_folder: Path, tmp_path: Path
) -> None:
    src = images(image_folder / "val")
    layout = {
        "b.png": src[0],
        "a/x.png": src[1],
        "a/sub/y.PNG": src[2],  # extensions compare case-insensitively
        "a-z.png": src[3],
        ".hidden.png": src[4],  # hidden files and folders are skipped
        ".cache/z.png": src[5],
        "notes.txt": None,  # not an image extension: skipped inside a folder
    }
    root = tmp_path / "new"
    for rel, origin in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if origin is None:
            (root / rel).write_text("not an image")
        else:
            shutil.copy(origin, root / rel)
    result = predict(str(trained_run), str(root), str(root / "notes.txt"))
    assert result.exit_code == 1
    paths = [r["path"] for r in records(result.stdout)]
    expected = sorted([root / "b.png", root / "a/x.png", root / "a/sub/y.PNG", root / "a-z.png"])
    assert paths == [*map(str, expected), str(root / "notes.txt")]
    assert records(result.stdout)[-1]["error"].startswith("not an image")
    # what a folder leaves out is said on stderr, as train and eval do (never dropped silently)
    assert "ignored 1 file(s) that are not images in the folders given" in result.stderr
    assert ".txt files (1): not an image type; e.g. " + str(root / "notes.txt") in result.stderr


def _bad_inputs(tmp_path: Path, image_folder: Path) -> tuple[str, list[str]]:
    """stdin text naming a good file, a folder, a corrupt file, a truncated file and a missing one."""
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"<html>not a jpeg</html>")
    good = images(image_folder / "ood")[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(good).read_bytes()[:200])
    lines = [
        good,
        str(image_folder / "val" / "circle"),
        str(corrupt),
        "",
        str(truncated),
        str(tmp_path / "gone.png"),
    ]
    order = [
        good,
        *images(image_folder / "val" / "circle"),
        str(corrupt),
        str(truncated),
        str(tmp_path / "gone.png"),
    ]
    return "\n".join(lines) + "\n", order


def test_stdin_with_bad_inputs_gives_error_records_and_exit_1(
    trained_run: Path, image_folder: Path, tmp_path: Path
) -> None:
    stdin, order = _bad_inputs(tmp_path, image_folder)
    result = predict(str(trained_run), "-", stdin=stdin)
    assert result.exit_code == 1
    got = records(result.stdout)
    assert [r["path"] for r in got] == order  # in input order, error records in their place
    errors = {Path(r["path"]).name: r["error"] for r in got if "error" in r}
    assert set(errors) == {"corrupt.jpg", "truncated.png", "gone.png"}
    assert errors["corrupt.jpg"].startswith("not an image") and "<html>" in errors["corrupt.jpg"]
    assert errors["gone.png"] == "unreadable: No such file or directory"
    assert all("class" in r for r in got if "error" not in r)
    assert "3 of 12 input(s) could not be classified" in result.stderr and "Traceback" not in result.stderr

    skipped = predict(str(trained_run), "-", "--on-bad-image", "skip", stdin=stdin)
    assert skipped.exit_code == 0
    assert [r["path"] for r in records(skipped.stdout)] == [p for p in order if Path(p).name not in errors]
    assert "skipped 3 of 12 input(s)" in skipped.stderr and "gone.png" in skipped.stderr


def test_workers_and_batch_size_do_not_change_the_output(
    trained_run: Path, image_folder: Path, tmp_path: Path
) -> None:
    stdin, _ = _bad_inputs(tmp_path, image_folder)
    args = [str(trained_run), str(image_folder / "ood"), "-"]
    inline = predict(*args, "--workers", "0", "--batch-size", "64", stdin=stdin)
    threaded = predict(*args, "--workers", "2", "--batch-size", "5", stdin=stdin)
    assert inline.exit_code == threaded.exit_code == 1
    assert inline.stdout == threaded.stdout and len(inline.stdout.splitlines()) == 24 + 12


def test_csv_and_terminal_output(trained_run: Path, image_folder: Path, tmp_path: Path) -> None:
    stdin, order = _bad_inputs(tmp_path, image_folder)
    result = predict(str(trained_run), "-", "--csv", "-k", "2", stdin=stdin)
    assert result.exit_code == 1
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "top1_class", "top1_probability", "top2_class", "top2_probability", "error"]
    assert [r[0] for r in rows[1:]] == order
    by_path = {r[0]: r for r in rows[1:]}
    assert by_path[order[0]][1] in ("circle", "square", "triangle") and by_path[order[0]][5] == ""
    assert float(by_path[order[0]][2]) >= float(by_path[order[0]][4])
    assert by_path[str(tmp_path / "gone.png")][1:] == [
        "",
        "",
        "",
        "",
        "unreadable: No such file or directory",
    ]

    tty = predict(str(trained_run), images(image_folder / "val")[0], "-k", "2", env={"FTSGD_FORCE_TTY": "1"})
    assert tty.exit_code == 0
    line = tty.stdout.strip()
    assert line.startswith(images(image_folder / "val")[0] + "  ") and line.endswith("%)") and "{" not in line


def test_bad_usage_exits_2_before_any_work(trained_run: Path, image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    val = str(image_folder / "val")
    cases = {
        (str(tmp_path / "no-run"), val): "no exported model",
        (str(trained_run), str(tmp_path / "missing.jpg")): "missing.jpg: no such file or folder",
        (str(trained_run), str(tmp_path / "empty")): "a folder without image files",
        (str(trained_run), "-", "-"): "only once",
        (str(trained_run), val, "--json", "--csv"): "--json and --csv",
        (str(trained_run), val, "--on-bad-image", "ignore"): "--on-bad-image must be error or skip",
    }
    for args, message in cases.items():
        result = predict(*args)
        assert result.exit_code == 2, args
        assert message in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    assert predict(str(trained_run)).exit_code == 2  # no PATH at all

    nothing = predict(str(trained_run), "-", stdin="")
    assert nothing.exit_code == 0 and nothing.stdout == "" and "no images to classify" in nothing.stderr


def _cli(run: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ftsgd", "predict", str(run), *args]


@pytest.mark.slow
def test_results_stream_before_stdin_closes(trained_run: Path, image_folder: Path) -> None:
    first, second = images(image_folder / "val")[:2]
    proc = zygote.Popen(
        _cli(trained_run, "-"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with ThreadPoolExecutor(1) as reader:
            proc.stdin.write(f"{first}\n".encode())
            proc.stdin.flush()
            line = reader.submit(proc.stdout.readline).result(timeout=GUARD_S)
            assert json.loads(line)["path"] == first
            assert proc.poll() is None  # answered while stdin is still open
            proc.stdin.write(f"{second}\n".encode())
            proc.stdin.flush()
            assert json.loads(reader.submit(proc.stdout.readline).result(timeout=GUARD_S))["path"] == second
        proc.stdin.close()
        assert proc.stdout.read() == b""
        assert proc.wait(timeout=GUARD_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_closed_stdout_stops_quietly(trained_run: Path, image_folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{image_folder / 'val'}\n" * 300)  # 7,200 images: far more than one pipe buffer
    with listing.open("rb") as stdin:
        proc = zygote.Popen(
            _cli(trained_run, "-"), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert json.loads(proc.stdout.readline())["class"]
            proc.stdout.close()  # what `| head -1` does
            assert proc.wait(timeout=GUARD_S) == 141  # 128 + SIGPIPE, as a shell reports it
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err


@pytest.mark.slow
def test_file_names_that_are_not_utf8(trained_run: Path, image_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = os.fsencode(folder / "caf") + b"\xe9.png"  # Latin-1 e-acute: not UTF-8
    with open(raw, "wb") as fh:
        fh.write(Path(images(image_folder / "val")[0]).read_bytes())
    ran = zygote.run(_cli(trained_run, str(folder)), capture_output=True, check=False, timeout=GUARD_S)
    assert ran.returncode == 0, ran.stderr
    (record,) = [json.loads(line) for line in ran.stdout.decode("utf-8").splitlines()]  # valid UTF-8 JSON
    assert os.fsencode(record["path"]) == raw and record["class"]
    as_csv = zygote.run(_cli(trained_run, str(folder), "--csv"), capture_output=True, check=False)
    assert as_csv.returncode == 0, as_csv.stderr
    assert len(as_csv.stdout.splitlines()) == 2 and b"caf" in as_csv.stdout


def test_help_of_predict_and_export() -> None:
    for command in ("predict", "export"):
        result = runner.invoke(app, [command, "-h"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        text = " ".join(result.stdout.split())
        assert "Examples" in text and "Exit codes: 0 done; 1 the run failed; 2 bad usage" in text, command
        assert "<bool>" not in result.stdout


@pytest.mark.slow
def test_a_named_pipe_among_the_images_is_skipped_not_read(
    trained_run: Path, image_folder: Path, tmp_path: Path
) -> None:
    """Opening a FIFO blocks until someone writes to it: it is reported as skipped and never opened."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = images(image_folder / "val")[0]
    (folder / "a.png").write_bytes(Path(good).read_bytes())
    os.mkfifo(folder / "b.png")
    ran = zygote.run(_cli(trained_run, str(folder)), capture_output=True, timeout=GUARD_S)
    assert ran.returncode == 0, ran.stderr
    (record,) = [json.loads(line) for line in ran.stdout.decode().splitlines()]
    assert record["path"] == str(folder / "a.png")
    assert "not a regular file" in ran.stderr.decode()


def test_listings_leave_special_files_out(make_folder) -> None:
    from ftsgd.data.folders import NOT_REGULAR, discover_splits, iter_image_files
    from ftsgd.recipe.load import load_recipe

    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    os.mkfifo(root / "train" / "a" / "pipe.png")
    ignored = []
    listed = list(iter_image_files(root / "train" / "a", on_ignored=ignored.append))
    assert len(listed) == 2 and [(i.path.name, i.reason) for i in ignored] == [("pipe.png", NOT_REGULAR)]
    _, splits = discover_splits(load_recipe("sgd", [f'data.root="{root}"']).data)
    assert all(p.name != "pipe.png" for p, _ in splits["train"].samples) and len(splits["train"]) == 4
