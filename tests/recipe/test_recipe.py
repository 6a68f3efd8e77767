"""Recipe parsing, merging, overrides, validation and dumping."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ftsgd.errors import RecipeError
from ftsgd.recipe.build import recipe_from_dict
from ftsgd.recipe.dump import describe_keys, recipe_to_toml
from ftsgd.recipe.grid import parse_grid_option
from ftsgd.recipe.load import builtin_recipes, list_recipes, load_recipe
from ftsgd.recipe.schema import Recipe
from ftsgd.recipe.values import parse_override
from ftsgd.run.checks import load_checked_recipe

SHIPPED = ["adamw", "sgd", "sgd-freeze-embed", "sgd-freeze-embed-nomomentum"]


def problems_of(exc: pytest.ExceptionInfo[RecipeError]) -> list[str]:
    return exc.value.problems


def test_shipped_recipes_are_listed_with_descriptions() -> None:
    names = dict(list_recipes())
    for name in SHIPPED:
        assert name in names
        assert names[name], f"{name} has no description"


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_shipped_recipe_parses_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe


def test_paper_protocol_defaults() -> None:
    r = load_recipe("sgd-freeze-embed")
    assert (r.optim.name, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.9, 0.0)
    assert (r.schedule.name, r.schedule.interval, r.schedule.warmup_epochs) == ("cosine", "epoch", 0.0)
    assert r.train.batch_size == 32
    assert r.freeze.policy == "embed"
    assert 3e-5 <= r.optim.lr <= 1e-2

    nomom = load_recipe("sgd-freeze-embed-nomomentum")
    assert nomom.optim.momentum == 0.0
    assert nomom.freeze.policy == "embed"
    assert nomom.name == "sgd-freeze-embed-nomomentum"

    adamw = load_recipe("adamw")
    assert adamw.optim.name == "adamw" and adamw.freeze.policy == "none"
    assert 3e-7 <= adamw.optim.lr <= 1e-4
    assert load_recipe("sgd").freeze.policy == "none"


def test_set_overrides_parse_toml_values() -> None:
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("train.amp=bf16") == (["train", "amp"], "bf16")
    assert parse_override("model.kwargs={img_size=64}") == (["model", "kwargs"], {"img_size": 64})
    assert parse_override("freeze.patterns=['blocks.0.*']") == (["freeze", "patterns"], ["blocks.0.*"])
    r = load_recipe("sgd-freeze-embed", ["optim.lr=3e-4", "train.epochs=3", 'model.name="test_vit"'])
    assert (r.optim.lr, r.train.epochs, r.model.name) == (3e-4, 3, "test_vit")


def test_int_accepted_for_float_keys() -> None:
    assert load_recipe("sgd", ["optim.lr=1"]).optim.lr == 1.0


def test_all_problems_reported_at_once_with_key_paths() -> None:
    """The recipe's own problems and those needing timm (optim.name) come in one error."""
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe(
            "sgd",
            [
                "optim.lr=-1",
                "optim.momentum=1",
                "optim.name=sgdd",
                "freeze.policy=emb",
                "train.foo=1",
                "train.epochs=x",
                "bogus.key=1",
            ],
        )
    text = str(exc.value)
    p = problems_of(exc)
    assert len(p) == 7, p
    for key in (
        "optim.lr",
        "optim.momentum",
        "optim.name",
        "freeze.policy",
        "train.foo",
        "train.epochs",
        "bogus",
    ):
        assert any(line.startswith(key) for line in p), (key, p)
    assert "did you mean 'embed'" in text
    assert "must be in [0, 1)" in text
    assert exc.value.exit_code == 2


def test_unknown_key_suggests_close_name(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text("[optim]\nmomentun = 0.5\n[train]\nbatchsize = 8\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(str(f))
    assert "optim.momentun: unknown key (did you mean optim.momentum?)" in problems_of(exc)
    assert "train.batchsize: unknown key (did you mean train.batch_size?)" in problems_of(exc)


def test_user_file_with_base_and_partial_keys(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        'base = "sgd-freeze-embed"\ndescription = "mine"\n[optim]\nlr = 3e-3\n[freeze]\npolicy = "embed+stage1"\n'
    )
    r = load_recipe(str(f))
    assert r.name == "mine"
    assert r.optim.lr == 3e-3 and r.optim.momentum == 0.9
    assert r.freeze.policy == "embed+stage1"
    assert r.description == "mine"


def test_bad_base_and_unknown_recipe(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('base = "sgd-freez-embed"\n')
    with pytest.raises(RecipeError, match="did you mean sgd-freeze-embed"):
        load_recipe(str(f))
    with pytest.raises(RecipeError, match="neither a built-in recipe nor an existing file"):
        load_recipe("no-such-recipe")


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[optim\nlr = 1\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(str(f))


def test_wrong_types_and_sections() -> None:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict({"optim": 3, "train": {"channels_last": "yes", "batch_size": 1.5}, "name": 4})
    p = problems_of(exc)
    assert "optim: expected a table [optim], got 3" in p
    assert any(x.startswith("train.channels_last: expected a boolean") for x in p)
    assert any(x.startswith("train.batch_size: expected an integer") for x in p)
    assert any(x.startswith("name: expected a string") for x in p)


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["train.batch_size=32", "train.micro_batch_size=12"], "train.micro_batch_size", "multiple"),
        (
            ["optim.step_in_backward=true", "train.micro_batch_size=16"],
            "optim.step_in_backward",
            "accumulation",
        ),
        (["optim.step_in_backward=true", "train.grad_clip=1.0"], "optim.step_in_backward", "grad_clip"),
        (["optim.step_in_backward=true", "train.amp=fp16"], "optim.step_in_backward", "fp16"),
        (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov", "momentum > 0"),
        (["schedule.warmup_epochs=0.5"], "schedule.warmup_epochs", "interval"),
        (["schedule.warmup_epochs=20", "train.epochs=10"], "schedule.warmup_epochs", "shorter"),
        (["train.device=tpu"], "train.device", "expected one of"),
        (["train.amp=fp8"], "train.amp", "expected one of"),
        (["data.augment=randaug"], "data.augment", "expected one of"),
        (["freeze.patterns=['re:(']"], "freeze.patterns", "regular expression"),
        (["optim.betas=[0.9]"], "optim.betas", "two numbers"),
        (["train.label_smoothing=1.0"], "train.label_smoothing", "[0, 1)"),
        (["optim.lr=nan"], "optim.lr", "finite"),
        (["train.weight_dtype=fp16"], "train.weight_dtype", "expected one of: fp32, bf16"),
        (["optim.update_rounding=kahan"], "optim.update_rounding", "only applies to bf16 weights"),
        (["train.weight_dtype=bf16", "train.amp=fp16"], "train.weight_dtype", "not with train.amp = 'fp16'"),
        (["train.weight_dtype=bf16", "train.amp=none"], "train.weight_dtype", "fp32 compute"),
        (["train.weight_dtype=bf16", "optim.name=lamb"], "optim.name", "'lamb' has no stochastic-rounding"),
        (["train.weight_dtype=bf16", "train.ema_decay=0.99"], "train.ema_decay", "held in bf16"),
        (["train.weight_dtype=bf16", "train.shard=true"], "train.shard", "FSDP2 slices"),
    ],
)
def test_value_checks(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe("sgd-freeze-embed", overrides)
    assert any(p.startswith(key) and fragment in p for p in problems_of(exc)), problems_of(exc)


def test_timm_optimizer_names_accepted() -> None:
    assert load_checked_recipe("sgd", ["optim.name=lamb"]).optim.name == "lamb"
    assert load_checked_recipe("sgd", ["optim.name=lion"]).optim.name == "lion"


def test_recipe_checks_need_neither_timm_nor_the_file_system() -> None:
    """Parsing and checking a recipe imports no timm and looks at no path it names."""
    import subprocess
    import sys

    code = (
        "import sys; from ftsgd.recipe.load import load_recipe; "
        "r = load_recipe('sgd', ['model.name=\"no_such_model\"', 'model.weights=\"/nope\"', "
        "'data.root=\"/nope\"', 'optim.name=\"sgdd\"']); "
        "assert r.model.name == 'no_such_model'; "
        "assert 'timm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_set_without_equals_is_an_error() -> None:
    with pytest.raises(RecipeError, match=r"expected KEY\.PATH=VALUE"):
        load_recipe("sgd", ["optim.lr"])


def test_describe_keys_documents_every_key() -> None:
    rows = describe_keys()
    keys = {r[0] for r in rows}
    for key in (
        "model.name",
        "model.weights",
        "model.kwargs",
        "freeze.policy",
        "optim.name",
        "optim.lr",
        "optim.momentum",
        "optim.weight_decay",
        "train.epochs",
        "train.batch_size",
        "train.seed",
    ):
        assert key in keys
    documented = {r[0]: r[3] for r in rows}
    assert "Apply each parameter's update" in documented["optim.step_in_backward"]


def test_defaults_recipe() -> None:
    assert load_recipe(None) == Recipe()


def test_recipe_differences_ignore_the_description() -> None:
    from ftsgd.recipe.dump import recipe_differences

    old = load_recipe("sgd")
    new = load_recipe("sgd", ['description="reworded"', "optim.lr=0.5"])
    assert recipe_differences(old, new) == [f"optim.lr: {old.optim.lr} -> 0.5"]
    assert recipe_differences(old, new, ignore=("optim.lr",)) == []


def test_bf16_is_a_cpu_precision_and_fp16_is_not() -> None:
    recipe = load_recipe("sgd", ['train.device="cpu"', 'train.amp="bf16"'])
    assert recipe.train.amp == "bf16"
    with pytest.raises(RecipeError, match="'fp16' mixed precision needs a CUDA GPU"):
        load_recipe("sgd", ['train.device="cpu"', 'train.amp="fp16"'])


def test_a_set_spanning_lines_is_refused_instead_of_dropping_the_rest() -> None:
    with pytest.raises(RecipeError, match=r"one KEY\.PATH=VALUE per --set, on one line"):
        load_recipe("sgd", ["optim.lr=0.1\ntrain.epochs=3"])
    with pytest.raises(RecipeError, match=r"expected KEY\.PATH=V1,V2"):
        parse_grid_option("optim.lr=0.1\ntrain.epochs=3")


def test_numbers_no_run_can_use_are_refused_naming_their_keys() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(
            "sgd",
            [
                "train.seed=100000000000000000000",
                "train.batch_size=100000000000000000000",
                "data.img_size=100000",
            ],
        )
    text = str(err.value)
    assert "train.seed: must be <= 9223372036854775807, got 100000000000000000000" in text
    assert (
        "train.batch_size: must be <= 1048576" in text
        and "data.img_size: must be <= 8192, got 100000" in text
    )


def test_a_recipe_that_is_not_utf8_is_refused_also_as_a_base(tmp_path) -> None:
    (tmp_path / "u16.toml").write_text('base = "sgd"\n[train]\nepochs = 2\n', encoding="utf-16")
    (tmp_path / "child.toml").write_text(f'base = "{tmp_path / "u16.toml"}"\n')
    for name in ("u16.toml", "child.toml"):
        with pytest.raises(RecipeError, match=r"is not UTF-8 text .*iconv -f UTF-16 -t UTF-8"):
            load_recipe(str(tmp_path / name))
