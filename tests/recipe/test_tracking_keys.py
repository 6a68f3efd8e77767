"""``train.tracking``: its spellings, the older ``train.tensorboard``, and the checks (no torch, no training)."""

from __future__ import annotations

import tomllib

import pytest

from ftsgd.errors import RecipeError
from ftsgd.recipe.build import recipe_from_dict
from ftsgd.recipe.dump import recipe_to_toml
from ftsgd.recipe.load import load_recipe


def tracking(*sets: str) -> list[str]:
    return load_recipe("sgd-freeze-embed", list(sets)).train.tracking


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ((), []),
        (('train.tracking="none"',), []),
        (("train.tracking=tensorboard",), ["tensorboard"]),
        (("train.tracking=mlflow,wandb",), ["mlflow", "wandb"]),
        (('train.tracking=["wandb", "none", "wandb", "mlflow"]',), ["wandb", "mlflow"]),
        (("train.tensorboard=true",), ["tensorboard"]),  # the older spelling
        (("train.tensorboard=false",), []),
        (('train.tracking=["mlflow"]', "train.tensorboard=true"), ["mlflow", "tensorboard"]),
        (('train.tracking="tensorboard"', "train.tensorboard=true"), ["tensorboard"]),
    ],
)
def test_every_spelling_becomes_a_list_of_names(sets: tuple[str, ...], expected: list[str]) -> None:
    assert tracking(*sets) == expected


def test_the_list_is_what_recipe_toml_holds_and_reads_back() -> None:
    recipe = load_recipe("sgd-freeze-embed", ["train.tensorboard=true", "train.tracking_project=birds"])
    text = recipe_to_toml(recipe)
    assert 'tracking = ["tensorboard"]' in text and 'tracking_project = "birds"' in text
    assert "tensorboard =" not in text  # one spelling from here on
    assert recipe_from_dict(tomllib.loads(text)) == recipe


def test_a_run_directory_from_before_train_tracking_still_loads() -> None:
    """Its recipe.toml has ``tensorboard = true|false`` and no ``tracking`` keys."""
    old = tomllib.loads(recipe_to_toml(load_recipe("sgd-freeze-embed")))
    del old["train"]["tracking"], old["train"]["tracking_project"]
    assert recipe_from_dict({**old, "train": {**old["train"], "tensorboard": True}}).train.tracking == [
        "tensorboard"
    ]
    assert recipe_from_dict({**old, "train": {**old["train"], "tensorboard": False}}) == load_recipe(
        "sgd-freeze-embed"
    )


def test_bad_values_name_the_key() -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe("sgd-freeze-embed", ["train.tracking=[1]", "train.tensorboard=1"])
    assert sorted(exc.value.problems) == [
        'train.tensorboard: expected a boolean (the older spelling of train.tracking = ["tensorboard"]), got 1',
        "train.tracking: expected a list of string or string, got [1] (list)",
    ]
    with pytest.raises(RecipeError) as exc:
        load_recipe("sgd-freeze-embed", ["train.tracking=tensorbord,comet"])
    assert exc.value.exit_code == 2 and exc.value.problems == [
        "train.tracking: unknown value 'tensorbord'; did you mean 'tensorboard'? expected one of: tensorboard, "
        "mlflow, wandb",
        "train.tracking: unknown value 'comet'; expected one of: tensorboard, mlflow, wandb",
    ]
