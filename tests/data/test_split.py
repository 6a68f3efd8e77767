"""One folder of class folders as a dataset: the drawn split, its record, the layouts and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftsgd.data.dataset import balanced_order, plan_batches
from ftsgd.data.split import find_splits, split_lines, split_record, splits_from_record
from ftsgd.errors import DataError, RecipeError
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import DataConfig
from ftsgd.run.checks import environment_problems

COUNTS = {"cat": 30, "dog": 10, "eel": 6}

VAL = {"cat": ["15", "21", "24"], "dog": ["03"], "eel": ["05"]}
"""The validation images of data.split_seed = 0, data.val_fraction = 0.1: round(30 / 10) = 3, then at least 1."""

TEST = {"cat": ["01", "03", "13", "18", "23", "26"], "dog": ["08", "09"], "eel": ["03"]}
"""With data.test_fraction = 0.2 too: 6, 2 and 1 (round(1.2)) test images; val is unchanged."""


@pytest.fixture
def photos(make_folder) -> Path:
    """30/10/6 images named 00.png, 01.png, ... in cat/, dog/, eel/ (no train/)."""
    root = make_folder({"": COUNTS}, size=8)
    for cls, n in COUNTS.items():  # zero-padded names, so the expected lists read in order
        for i in range(n):
            (root / cls / f"{i}.png").rename(root / cls / f"{i:02d}.png")
    return root


def members(split) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path, _ in split.samples:
        out.setdefault(path.parent.name, []).append(path.stem)
    return out


def test_a_stratified_split_with_exact_members(photos: Path) -> None:
    classes, splits = find_splits(DataConfig(root=str(photos), test_fraction=0.2))
    assert classes == ["cat", "dog", "eel"]
    assert list(splits) == ["train", "val", "test"]
    assert members(splits["val"]) == VAL
    assert members(splits["test"]) == TEST
    train = members(splits["train"])
    assert {c: len(v) for c, v in train.items()} == {"cat": 21, "dog": 7, "eel": 4}
    for cls, n in COUNTS.items():  # disjoint, and together every image
        every = train[cls] + VAL[cls] + TEST[cls]
        assert sorted(every) == [f"{i:02d}" for i in range(n)]
    assert all(s.root == photos and s.drawn for s in splits.values())
    assert splits["val"].samples[0] == (photos / "cat" / "15.png", 0)
    # val does not depend on whether a test split is drawn, nor on anything but data.split_seed
    _, plain = find_splits(DataConfig(root=str(photos)))
    assert list(plain) == ["train", "val"] and members(plain["val"]) == VAL
    _, other = find_splits(DataConfig(root=str(photos), split_seed=1))
    assert members(other["val"]) != VAL


def test_the_record_is_the_split(photos: Path) -> None:
    cfg = DataConfig(root=str(photos), test_fraction=0.2)
    classes, splits = find_splits(cfg)
    record = split_record(cfg, classes, splits)
    assert record is not None
    assert record["keys"] == {"val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0}
    row = record["splits"]["val"][0]
    st = (photos / "cat" / "15.png").stat()
    assert row == ["cat/15.png", st.st_size, st.st_mtime_ns]
    # images added later are in no split of the recorded run; the record is read, not redrawn
    (photos / "cat" / "99.png").write_bytes((photos / "cat" / "00.png").read_bytes())
    again_classes, again = find_splits(cfg, recorded=json.loads(json.dumps(record)))
    assert again_classes == classes
    assert {n: s.samples for n, s in again.items()} == {n: s.samples for n, s in splits.items()}
    # split keys that differ from the record's are refused, naming each key
    with pytest.raises(RecipeError) as exc:
        find_splits(DataConfig(root=str(photos), val_fraction=0.2, split_seed=3), recorded=record)
    named = [p.split(":")[0] for p in exc.value.problems]
    assert named[:3] == ["data.val_fraction", "data.test_fraction", "data.split_seed"]
    assert exc.value.exit_code == 2
    # ftsgd eval labels the record against the model's classes, which may be ordered differently
    _, labelled = splits_from_record(record, photos, ["eel", "dog", "cat"])
    assert labelled["val"].samples[0] == (photos / "cat" / "15.png", 2)


def test_split_folders_are_not_drawn(image_folder: Path) -> None:
    cfg = DataConfig(root=str(image_folder))
    classes, splits = find_splits(cfg)
    assert split_record(cfg, classes, splits) is None
    assert split_lines(classes, splits, cfg)[0] == "split folders"


def test_split_lines_describe_a_drawn_split(photos: Path) -> None:
    cfg = DataConfig(root=str(photos))
    classes, splits = find_splits(cfg)
    assert split_lines(classes, splits, cfg) == [
        "one folder of class folders, split by ftsgd (data.val_fraction = 0.1, data.test_fraction = 0.0, "
        "data.split_seed = 0)",
        "train: 41 images (cat 27, dog 9, eel 5)",
        "val: 5 images (cat 3, dog 1, eel 1)",
    ]


def test_too_small_and_empty_classes_are_named(make_folder) -> None:
    root = make_folder({"": {"big": 5, "one": 1, "two": 2}})
    with pytest.raises(DataError) as exc:
        find_splits(DataConfig(root=str(root), test_fraction=0.3))
    assert "each needs at least 3 images" in str(exc.value)
    assert "'one' (1 image), 'two' (2 images)" in str(exc.value)
    assert exc.value.exit_code == 2
    empty = make_folder({"": {"a": 3, "b": 3, "c": 0}})
    (empty / "c" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder\(s\) without images: c "):
        find_splits(DataConfig(root=str(empty)))


def test_a_folder_of_neither_layout_lists_the_layouts(make_folder, tmp_path: Path) -> None:
    nested = make_folder({"photos": {"cat": 2, "dog": 2}})  # split folder photos/, but no train/
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.png").write_bytes((nested / "photos" / "cat" / "0.png").read_bytes())
    for root, why in ((nested, "neither a train/ folder nor class folders"), (loose, "1 image(s) directly")):
        with pytest.raises(DataError) as exc:
            find_splits(DataConfig(root=str(root)))
        text = str(exc.value)
        assert why in text
        assert "1. split folders: <root>/train/<class>/<image>" in text
        assert "2. one folder of class folders: <root>/<class>/<image>" in text
        problems = environment_problems(load_recipe(None, [f'data.root="{root}"']))
        assert problems[0].startswith(f"data.root: dataset folder {root} is not a dataset")


def test_class_folders_beside_train_are_an_error(make_folder) -> None:
    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}, "": {"c": 2}})
    with pytest.raises(
        DataError, match=r"also folder\(s\) holding images directly: c\. They look like class"
    ):
        find_splits(DataConfig(root=str(root)))


def test_the_recipe_checks_take_a_one_folder_dataset(photos: Path) -> None:
    """No "data.train: split folder .../train does not exist" for one folder of class folders."""
    assert environment_problems(load_recipe(None, [f'data.root="{photos}"'])) == []


@pytest.mark.parametrize(
    ("sets", "problem"),
    [
        (["data.val_fraction=0"], "data.val_fraction: must be in (0, 1)"),
        (["data.val_fraction=1.5"], "data.val_fraction: must be in (0, 1)"),
        (["data.test_fraction=-0.1"], "data.test_fraction: must be in (0, 1), or 0"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], "their sum must be below 1"),
        (['data.sampler="weighted"'], "data.sampler: unknown value 'weighted'"),
        (["train.class_weights=[1, -2]"], "train.class_weights: every class weight must be a number > 0"),
        (['train.class_weights="inverse"'], 'train.class_weights: expected "balanced"'),
        (['train.class_weights="balanced"', "data.cutmix=1.0"], "a mixed image has two classes"),
        (['train.select_by="val.f1"'], "train.select_by: expected SPLIT.METRIC"),
        (['sweep.grid={"data.split_seed"=[0, 1]}'], "every run of a sweep validates on the same images"),
    ],
)
def test_bad_split_and_skew_keys_are_refused(sets: list[str], problem: str) -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(None, sets)
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_the_balanced_order_draws_classes_alike_and_repeats_small_ones_evenly() -> None:
    labels = [0] * 30 + [1] * 10 + [2] * 2
    order = balanced_order(labels, seed=0, epoch=0)
    assert len(order) == len(labels)
    assert order == balanced_order(labels, seed=0, epoch=0)  # a pure function: resumes and ranks agree
    assert order != balanced_order(labels, seed=0, epoch=1)
    per_class = [sum(1 for i in order if labels[i] == c) for c in range(3)]
    assert per_class == [14, 14, 14]
    small = [i for i in order if labels[i] == 2]  # 14 draws of 2 images: each 7 times
    assert [small.count(i) for i in (40, 41)] == [7, 7]
    big = [i for i in order if labels[i] == 0]  # 14 of 30: none twice
    assert len(set(big)) == len(big)


def test_a_balanced_epoch_is_shared_by_processes_as_one_process_runs_it() -> None:
    """Under torchrun every process computes the same order and trains its part of each global batch."""
    labels = [0] * 30 + [1] * 10 + [2] * 6
    order = balanced_order(labels, seed=3, epoch=2)
    whole = plan_batches(order, 8, start_batch=1)  # a run resumed at its second batch
    parts = [plan_batches(order, 8, start_batch=1, shard=(2, rank, 3)) for rank in range(3)]
    assert [[j for p in parts for j in p[i]] for i in range(len(whole))] == whole


def test_a_split_folder_cannot_be_named_like_an_aggregate(make_folder) -> None:
    root = make_folder({"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}, "worst": {"a": 1, "b": 1}})
    with pytest.raises(DataError, match=r"\('worst'\): worst and mean name the aggregates"):
        find_splits(DataConfig(root=str(root)))
