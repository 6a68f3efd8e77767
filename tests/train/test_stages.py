"""Recipe stages (LP-FT as one run): parsing, --set, validation, and staged runs on real tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import _zygote as zygote
import pytest
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import RecipeError
from ftsgd.inspect.inspection import inspect_model
from ftsgd.recipe.build import recipe_from_dict
from ftsgd.recipe.dump import describe_keys, recipe_differences, recipe_to_dict, recipe_to_toml
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import stage_recipe
from ftsgd.run.collect import read_run
from ftsgd.train.trainer import Trainer

STEPS = 5  # 3 classes x 24 training images / batch 16


def staged(data: Path, model: str = "test_vit", *extra: str, weights: Path | None = None):
    """The shipped LP-FT recipe on a tiny model: 2 probe epochs at 0.05, 2 fine-tuning epochs at 0.01."""
    kwargs = "model.kwargs={img_size=32}" if model == "test_vit" else "model.kwargs={}"
    return load_recipe(
        "lp-ft-freeze-embed",
        [
            f'model.name="{model}"',
            kwargs,
            *([f'model.weights="{weights}"'] if weights else []),
            f'data.root="{data}"',
            "data.num_workers=0",
            'data.augment="rrc_flip"',
            "data.img_size=32",
            "train.batch_size=16",
            "stage.1.train.epochs=2",
            "stage.probe.optim.lr=0.05",
            "stage.2.train.epochs=2",
            "stage.finetune.optim.lr=0.01",
            *extra,
        ],
    )


def make_weights(tmp_path: Path, name: str, kwargs: dict) -> Path:
    """A stand-in for pretrained weights: a seeded random init saved as safetensors (1000 classes)."""
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / f"{name}-init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


# --------------------------------------------------------------------------- the recipe


def test_lp_ft_recipe_resolves_each_stage_against_the_top_level() -> None:
    r = load_recipe("lp-ft-freeze-embed")
    probe, finetune = r.stages
    assert (probe.name, probe.freeze.policy, probe.optim.lr, probe.epochs) == ("probe", "head", 1e-3, 3)
    assert (finetune.name, finetune.freeze.policy, finetune.optim.lr, finetune.epochs) == (
        "finetune",
        "embed",
        1e-4,
        10,
    )
    assert finetune.optim.lr == pytest.approx(probe.optim.lr / 10)  # LP-FT: fine-tune at 10x lower LR
    assert probe.optim.momentum == 0.9 and probe.optim.name == "sgd"  # not stated: the recipe's own
    first = stage_recipe(r, 0)
    assert first.freeze == probe.freeze and first.train.epochs == 3 and first.stages == ()
    assert first.train.batch_size == r.train.batch_size


def test_stages_round_trip_through_toml_and_dict() -> None:
    r = load_recipe("lp-ft-freeze-embed", ["stage.2.optim.layer_decay=0.75", 'stage.1.freeze.patterns=["x"]'])
    text = recipe_to_toml(r)
    assert text.count("[[stage]]") == 2 and "[stage.train]\nepochs = 3" in text
    assert recipe_from_dict(tomllib.loads(text)) == r
    assert recipe_from_dict(recipe_to_dict(r)) == r
    assert "stage" not in recipe_to_dict(load_recipe("sgd"))  # unstaged recipes dump as before


def test_set_addresses_a_stage_by_number_or_name() -> None:
    r = load_recipe("lp-ft-freeze-embed", ["stage.2.optim.lr=3e-4", "stage.probe.train.epochs=1"])
    assert r.stages[1].optim.lr == 3e-4 and r.stages[0].epochs == 1
    assert load_recipe("lp-ft-freeze-embed").stages[1].optim.lr == 1e-4  # the file is not changed
    top = load_recipe("lp-ft-freeze-embed", ["optim.momentum=0.5"])  # not set by a stage: inherited
    assert [s.optim.momentum for s in top.stages] == [0.5, 0.5]
    tuned = load_recipe("lp-ft-freeze-embed", ["optim.lr=3e-4"])  # the fine-tuning stage's, not the probe's
    assert [s.optim.lr for s in tuned.stages] == [1e-3, 3e-4]
    assert recipe_differences(load_recipe("lp-ft-freeze-embed"), r) == [
        "stage.1.train.epochs: 3 -> 1",
        "stage.2.optim.lr: 0.0001 -> 0.0003",
    ]
    replaced = load_recipe("lp-ft-freeze-embed", ['stage=[{name="only", train={epochs=2}}]'])
    assert [(s.name, s.epochs, s.optim.lr) for s in replaced.stages] == [("only", 2, 1e-4)]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["stage.3.optim.lr=1"], "no stage '3'; the recipe's stages: 1 (probe), 2 (finetune)"),
        (["stage.tune.optim.lr=1"], "no stage 'tune'"),
        (["stage.1=1"], "name a key inside the stage, e.g. --set stage.1.optim.lr=1e-4"),
        (
            ["stage.2.optim.lr=1e-4", "optim.lr=0.1"],
            "every [[stage]] sets optim.lr itself, so this would change nothing",
        ),
        (["train.epochs=4"], "set it per stage, e.g. --set stage.1.train.epochs=..."),
    ],
)
def test_set_refuses_what_would_not_apply(sets: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("lp-ft-freeze-embed", sets)
    assert message in str(err.value)
    with pytest.raises(RecipeError, match="the recipe has no \\[\\[stage\\]\\] tables"):
        load_recipe("sgd", ["stage.1.optim.lr=1"])


def test_every_stage_problem_is_reported_at_once_with_its_key_path() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(
            "lp-ft-freeze-embed",
            [
                "stage.1.optim.lr=-1",
                "stage.2.optim.momentum=2",
                'stage.2.freeze.polcy="embed"',
                "stage.1.train.patience=3",
                "stage.2.train.epochs=0",
                'stage.1.data={root="x"}',
                'stage.2.name="probe"',
                "optim.eps=0",  # a top-level problem: reported once, not once per stage
            ],
        )
    problems = err.value.problems
    expected = [
        "stage.1.optim.lr: must be > 0",
        "stage.2.optim.momentum: must be in [0, 1)",
        "stage.2.freeze.polcy: unknown key (did you mean stage.2.freeze.policy?)",
        "stage.1.train.patience: a stage sets only train.epochs",
        "stage.2.train.epochs: must be >= 1",
        "stage.1.data: unknown key; a stage may set name, freeze.*, optim.*, schedule.* and train.epochs",
        "stage.2.name: 'probe' names another stage too",
        "optim.eps: must be > 0",
    ]
    for line in expected:
        assert sum(p.startswith(line) for p in problems) == 1, (line, problems)
    assert not any(p.startswith("stage.") and "optim.eps" in p for p in problems)


def test_stage_names_and_tables_are_checked() -> None:
    raw = {"stage": [{"name": "2"}, {"name": "a.b", "optim": 3}]}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    assert "stage.1.name: '2' must be letters, digits, '-' and '_', and not a number" in text
    assert "stage.2.name: 'a.b' must be" in text and "stage.2.optim: expected a table" in text
    with pytest.raises(RecipeError, match="stage: expected \\[\\[stage\\]\\] tables"):
        recipe_from_dict({"stage": {"name": "x"}})


def test_stage_keys_are_documented_for_recipes_keys() -> None:
    keys = {row[0]: row for row in describe_keys()}
    for key in (
        "stage.N.name",
        "stage.N.freeze.*",
        "stage.N.optim.*",
        "stage.N.schedule.*",
        "stage.N.train.epochs",
    ):
        assert keys[key][3], key


# --------------------------------------------------------------------------- staged runs


def test_stages_run_in_order_with_their_own_schedules(image_folder: Path, tmp_path: Path) -> None:
    summary = Trainer(staged(image_folder), tmp_path / "run", quiet=True).fit()
    lines = records(tmp_path / "run")
    assert [(r["epoch"], r["stage"], r["stage_name"]) for r in lines] == [
        (1, 1, "probe"),
        (2, 1, "probe"),
        (3, 2, "finetune"),
        (4, 2, "finetune"),
    ]
    # cosine stepped per epoch, restarting over each stage's own 2 epochs
    assert [r["lr"] for r in lines] == pytest.approx([0.05, 0.025, 0.01, 0.005])
    assert [r["step"] for r in lines] == [STEPS, 2 * STEPS, 3 * STEPS, 4 * STEPS]
    assert summary is not None and summary["epochs"] == 4 and summary["steps"] == 4 * STEPS
    assert summary["best_epoch"] in (3, 4)  # only the last stage's epochs compete
    assert [
        (s["name"], s["first_epoch"], s["last_epoch"], s["freeze_policy"], s["lr"]) for s in summary["stages"]
    ] == [
        ("probe", 1, 2, "head", 0.05),
        ("finetune", 3, 4, "embed", 0.01),
    ]
    assert summary["freeze_policy"] == "embed" and summary["lr"] == 0.01
    val = [r["splits"]["val"]["accuracy"] for r in lines]
    assert summary["stages"][0]["best_value"] == max(val[:2])
    assert summary["stages"][0]["best_epoch"] == val[:2].index(max(val[:2])) + 1


def test_an_earlier_stage_never_becomes_the_exported_epoch(image_folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(staged(image_folder, "test_vit", "train.patience=1"), tmp_path / "x", quiet=True)
    perfect = {"val": {"accuracy": 1.0, "loss": 0.0}}
    trainer.state.epoch = 1  # the probe's last epoch
    assert not trainer.improves(perfect) and not trainer.stopped_early()
    trainer.state.epoch = 2  # the fine-tuning's first epoch: anything beats "none yet"
    assert trainer.improves({"val": {"accuracy": 0.0, "loss": 9.0}})
    trainer.state.epoch, trainer.state.best_epoch = 3, 3
    assert not trainer.stopped_early()  # patience counts within the last stage only


@pytest.mark.parametrize("model", ["test_vit", "test_resnet"])
def test_linear_probe_trains_only_the_head_then_fine_tuning_moves_the_rest(
    model: str, image_folder: Path, tmp_path: Path
) -> None:
    kwargs = {"img_size": 32} if model == "test_vit" else {}
    weights = make_weights(tmp_path, model, kwargs)
    recipe = staged(image_folder, model, weights=weights)
    start = Trainer(recipe, tmp_path / "unused", quiet=True)
    start.setup()
    before = weights_of(start)
    head = {n for n in before if n.startswith(("head", "fc"))}
    embedding = {n for n in before if n.startswith(start.prepared.embedding.modules)}
    assert head and embedding

    run = tmp_path / "run"
    assert Trainer(recipe, run, quiet=True, max_steps=2 * STEPS).fit() is None  # stops after the probe
    probe = checkpoint(run)
    assert probe["state"]["stage"] == 0 and probe["state"]["epoch"] == 2
    for name, value in before.items():  # weights and BatchNorm statistics alike
        moved = not torch.equal(value, probe["model"][name])
        assert moved == (name in head and value.is_floating_point()), name

    Trainer(load_recipe(str(run / "recipe.toml")), run, resume=True, quiet=True).fit()
    final = checkpoint(run)
    assert final["state"]["stage"] == 1
    for name, value in probe["model"].items():
        if name in embedding:  # frozen in both stages
            assert torch.equal(value, final["model"][name]), name
    trained = [n for n in before if n not in head and n not in embedding and before[n].is_floating_point()]
    assert trained and all(not torch.equal(probe["model"][n], final["model"][n]) for n in trained)
    best = json.loads((run / "summary.json").read_text())["best_epoch"]
    assert best in (3, 4) and set(load_file(str(run / "model.safetensors"))) == set(before)


@pytest.mark.slow
def test_resume_anywhere_in_a_staged_run_is_bitwise_identical(image_folder: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    Trainer(staged(image_folder, "test_vit", "train.checkpoint_every=2"), full, quiet=True).fit()
    reference = checkpoint(full)
    # mid-probe, the probe's very end (stage boundary), mid-fine-tuning
    for stop, stage in ((3, 0), (2 * STEPS, 0), (3 * STEPS + 2, 1)):
        part = tmp_path / f"part{stop}"
        assert (
            Trainer(
                staged(image_folder, "test_vit", "train.checkpoint_every=2"), part, quiet=True, max_steps=stop
            ).fit()
            is None
        )
        assert checkpoint(part)["state"]["stage"] == stage
        Trainer(load_recipe(str(part / "recipe.toml")), part, resume=True, quiet=True).fit()
        resumed = checkpoint(part)
        for key, value in reference["model"].items():
            assert torch.equal(value, resumed["model"][key]), (stop, key)
        for i, state in reference["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, resumed["optimizer"]["state"][i][key]), (stop, i, key)
        strip = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
        assert [{k: v for k, v in r.items() if k not in strip} for r in records(full)] == [
            {k: v for k, v in r.items() if k not in strip} for r in records(part)
        ]
        exported = load_file(str(part / "model.safetensors"))
        for key, value in load_file(str(full / "model.safetensors")).items():
            assert torch.equal(value, exported[key]), (stop, key)


def test_step_in_backward_hooks_follow_the_stages(image_folder: Path, tmp_path: Path) -> None:
    """Each stage's per-parameter optimizers replace the last's: the same weights as the normal step."""
    normal = tmp_path / "normal"
    Trainer(staged(image_folder, "test_vit", "optim.momentum=0"), normal, quiet=True).fit()
    hooked = tmp_path / "hooked"
    Trainer(
        staged(image_folder, "test_vit", "optim.momentum=0", "optim.step_in_backward=true"),
        hooked,
        quiet=True,
    ).fit()
    a, b = checkpoint(normal)["model"], checkpoint(hooked)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_inspect_lists_what_each_stage_freezes(tmp_path: Path) -> None:
    recipe = load_recipe("lp-ft-freeze-embed", ['model.name="test_vit"', "model.kwargs={img_size=32}"])
    report = inspect_model(recipe, 4, activations=False)
    probe, finetune = report["stages"]
    total = report["total_params"]
    assert (probe["name"], probe["policy"], probe["trainable_params"]) == ("probe", "head", 64 * 4 + 4)
    assert probe["frozen_params"] == total - probe["trainable_params"]
    assert (finetune["policy"], finetune["frozen_params"]) == ("embed", report["frozen_params"])
    assert finetune["frozen_tensors"] == len(report["frozen"]) == 2  # patch_embed.proj weight and bias
    assert report["policy"] == "embed"  # the other tables describe the last stage


def test_reports_pick_an_unfinished_staged_run_s_best_epoch_from_its_last_stage(
    image_folder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    Trainer(staged(image_folder), run, quiet=True, max_steps=3 * STEPS).fit()  # probe + 1 fine-tuning epoch
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["splits"]["val"]["accuracy"] = 1.0  # a probe epoch better than any other
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    found = read_run(run)
    assert found.epochs == 4 and found.best_epoch == 3
    assert found.values["stage.2.optim.lr"] == 0.01


# --------------------------------------------------------------------------- a real kill -9


def _driver(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    """The real CLI in a subprocess through tests/_fault_driver.py (one thread, as the reference)."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "FTSGD_FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("FTSGD_DEBUG", None)
    driver = [sys.executable, str(repo / "tests" / "_fault_driver.py")]
    return zygote.run([*driver, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kill_9_around_the_stage_boundary_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """6 steps per epoch, 2 + 2 epochs, a checkpoint every 4 steps: killed while writing the boundary's
    checkpoint (resumes in the probe and crosses the boundary), then while writing the one after the
    fine-tuning's first epoch (resumes mid-fine-tuning)."""
    data = make_image_folder(
        tmp_path / "data", classes=3, size=32, per_class={"train": 8, "val": 2, "ood": 2}
    )
    sets = [
        "model.kwargs={img_size=32}",
        "data.img_size=32",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.checkpoint_every=4",
        "stage.1.train.epochs=2",
        "stage.probe.optim.lr=0.05",
        "stage.2.train.epochs=2",
        "stage.finetune.optim.lr=0.01",
    ]
    args = ["train", "--data", str(data), "--model", "test_vit", "--recipe", "lp-ft-freeze-embed", "--quiet"]
    args += [a for s in sets for a in ("--set", s)]
    assert _driver([*args, "--out", str(tmp_path / "ref")]).returncode == 0
    out = tmp_path / "killed"
    resume = ["train", "--data", str(data), "--out", str(out), "--resume", "--quiet"]
    killed = _driver([*args, "--out", str(out)], "kill_in_write=checkpoint.pt:4:partial")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (checkpoint(out)["state"]["global_step"], checkpoint(out)["state"]["stage"]) == (8, 0)
    killed = _driver(resume, "kill_in_write=checkpoint.pt:3:partial")  # steps 12 (boundary), 16, 18
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (checkpoint(out)["state"]["global_step"], checkpoint(out)["state"]["stage"]) == (16, 1)
    finished = _driver(resume)
    assert finished.returncode == 0, finished.stderr
    a, b = checkpoint(tmp_path / "ref"), checkpoint(out)
    assert a["state"]["global_step"] == b["state"]["global_step"] == 24
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    strip = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "ref")] == [
        {k: v for k, v in r.items() if k not in strip} for r in records(out)
    ]


def test_a_later_stage_that_cannot_work_on_the_model_fails_before_the_first_step(
    image_folder: Path, tmp_path: Path
) -> None:
    recipe = staged(image_folder, "test_vit", 'stage.2.freeze.patterns=["blocks.9.*"]')
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    with pytest.raises(RecipeError) as err:
        trainer.fit()
    assert err.value.problems[0].startswith("stage.2.freeze.patterns: 'blocks.9.*' matches no parameter")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    ok = Trainer(staged(image_folder), tmp_path / "ok", quiet=True)
    ok.setup()  # the check leaves the first stage's freeze in place
    assert [n for n, p in ok.model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32" or not dist.is_gloo_available(), reason="torchrun with Gloo")
def test_a_staged_run_on_two_processes_trains_the_weights_of_one(tmp_path: Path) -> None:
    """DDP is rebuilt at the boundary: what the probe froze and the fine-tuning trains is all-reduced too."""
    data = make_image_folder(
        tmp_path / "data", classes=3, size=32, per_class={"train": 9, "val": 7, "ood": 1}
    )
    sets = [
        "model.kwargs={img_size=32}",
        "data.img_size=32",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "stage.1.train.epochs=1",
        "stage.probe.optim.lr=0.05",
        "stage.2.train.epochs=2",
        "stage.finetune.optim.lr=0.05",
    ]
    args = ["train", "--data", str(data), "--model", "test_vit", "--recipe", "lp-ft-freeze-embed", "--quiet"]
    args += [a for s in sets for a in ("--set", s)]
    assert _driver([*args, "--out", str(tmp_path / "one")]).returncode == 0
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--no-python",
    ]
    job = zygote.run(
        [*launcher, zygote.launcher(), "-m", "ftsgd", *args, "--out", str(tmp_path / "two")],
        env={**env, "FTSGD_TEST_ZYGOTE": os.environ["FTSGD_TEST_ZYGOTE"]},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["state"]["stage"] == two["state"]["stage"] == 1
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-5, msg=key)
    assert [r["stage"] for r in records(tmp_path / "two")] == [1, 2, 2]


def test_staged_recipes_are_refused_with_fsdp() -> None:
    with pytest.raises(RecipeError, match=r"train.shard: cannot be combined with \[\[stage\]\] tables"):
        load_recipe("lp-ft-freeze-embed", ["train.shard=true"])
