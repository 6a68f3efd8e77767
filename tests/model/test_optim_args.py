"""optim.betas / optim.eps reach timm's optimizers; optimizers that lack them, or whose package is missing, are refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ftsgd.errors import RecipeError
from ftsgd.model.optim import create_optimizer
from ftsgd.recipe.schema import OptimConfig
from ftsgd.run.checks import load_checked_recipe


def group_of(name: str, **options: object) -> dict:
    param = torch.nn.Parameter(torch.zeros(3))
    return create_optimizer([param], OptimConfig(name=name, **options)).param_groups[0]


def test_changed_betas_and_eps_reach_timm_optimizers() -> None:
    assert group_of("lion", betas=[0.8, 0.95])["betas"] == (0.8, 0.95)  # was silently (0.9, 0.99)
    assert group_of("lamb", betas=[0.85, 0.98], eps=1e-4)["betas"] == (0.85, 0.98)
    assert group_of("lamb", eps=1e-4)["eps"] == 1e-4
    assert group_of("adan", betas=[0.9, 0.9, 0.9])["betas"] == (0.9, 0.9, 0.9)
    assert group_of("nadamw", eps=1e-6)["eps"] == 1e-6


def test_unchanged_keys_leave_each_optimizer_its_own_defaults() -> None:
    assert group_of("lion")["betas"] == (0.9, 0.99)
    assert group_of("lamb")["eps"] == 1e-6
    assert group_of("adan")["betas"] == (0.98, 0.92, 0.99)
    assert group_of("adamw", betas=[0.8, 0.9], eps=1e-6)["betas"] == (0.8, 0.9)  # torch's, as before


def test_betas_or_eps_for_an_optimizer_without_them_are_refused() -> None:
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe(None, ['optim.name="sgd"', "optim.betas=[0.8, 0.99]", "optim.eps=1e-6"])
    text = "\n".join(exc.value.problems)
    assert "optim.betas: the 'sgd' optimizer has no betas argument, so (0.8, 0.99) would be ignored" in text
    assert "optim.eps: the 'sgd' optimizer has no eps argument, so 1e-06 would be ignored" in text
    with pytest.raises(RecipeError, match=r"optim\.eps: the 'lion' optimizer has no eps argument"):
        load_checked_recipe(None, ['optim.name="lion"', "optim.eps=1e-6"])
    with pytest.raises(RecipeError, match=r"optim.betas: the 'adan' optimizer takes 3 betas, got 2"):
        load_checked_recipe(None, ['optim.name="adan"', "optim.betas=[0.9, 0.95]"])
    with pytest.raises(RecipeError, match=r"optim.betas: the 'adamw' optimizer takes 2 betas, got 3"):
        load_checked_recipe(None, ['optim.name="adamw"', "optim.betas=[0.9, 0.95, 0.99]"])
    assert load_checked_recipe(None, ['optim.name="lion"', "optim.betas=[0.9, 0.95]"]).optim.betas == [
        0.9,
        0.95,
    ]


@pytest.mark.parametrize(("name", "package"), [("bnbadamw8bit", "bitsandbytes"), ("fusedlamb", "apex")])
def test_optimizers_of_a_missing_package_are_refused_at_validation(name: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe(None, [f'optim.name="{name}"'])
    assert exc.value.exit_code == 2
    (problem,) = exc.value.problems
    assert problem.startswith(
        f"optim.name: '{name}' is an optimizer of the {package} package, which is not installed"
    )
