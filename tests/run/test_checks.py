"""The refusals that need the job, the device or the built model, checked without them (no GPU, no job)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftsgd.errors import ModelError, RecipeError
from ftsgd.recipe.load import load_recipe
from ftsgd.run.checks import check_device, check_job, check_model_named, check_parallel_model

IN_BACKWARD = ["train.micro_batch_size=0", "optim.step_in_backward=true"]


def test_a_recipe_without_a_model_is_refused_before_anything_else() -> None:
    with pytest.raises(ModelError, match=r"^no model given: pass --model NAME \(a timm model name\)"):
        check_model_named(load_recipe("sgd"))
    check_model_named(load_recipe("sgd", ['model.name="test_vit"']))


def test_step_in_backward_is_refused_for_a_job_of_several_processes_only() -> None:
    recipe = load_recipe("sgd-freeze-embed", IN_BACKWARD)
    check_job(recipe, 1)
    with pytest.raises(RecipeError) as err:
        check_job(recipe, 2)
    assert err.value.problems == [
        "optim.step_in_backward: not under torchrun: DDP keeps every gradient in its communication buckets "
        "until they are all-reduced, so updating inside backward would save no memory; set "
        "optim.step_in_backward = false (train.shard = true divides the gradients and optimizer state by the "
        "number of processes instead)"
    ]
    check_job(load_recipe("sgd-freeze-embed"), 4)


def test_fp16_from_an_older_auto_is_refused_for_step_in_backward() -> None:
    recipe = load_recipe("sgd-freeze-embed", IN_BACKWARD)
    check_device(recipe, torch.bfloat16, sharded=False)
    check_device(recipe, None, sharded=False)
    with pytest.raises(RecipeError) as err:
        check_device(recipe, torch.float16, sharded=False)
    assert err.value.problems == [
        'train.amp: the run computes in fp16 autocast (what an older ftsgd\'s "auto" chose on a GPU without '
        "bf16), which optim.step_in_backward cannot use: an overflow is only known after some parameters were "
        'updated; set train.amp = "none"'
    ]


def test_fsdp_refuses_an_ema_and_fp16_in_one_error() -> None:
    ema = load_recipe("sgd", ["train.ema_decay=0.999"])
    check_device(ema, torch.float16, sharded=False)  # DDP keeps both
    check_device(load_recipe("sgd"), torch.bfloat16, sharded=True)
    with pytest.raises(RecipeError) as err:
        check_device(ema, torch.float16, sharded=True)
    assert [p.split(":")[0] for p in err.value.problems] == ["train.ema_decay", "train.amp"]
    assert "not supported with train.shard = true (FSDP2)" in err.value.problems[0]
    assert "which train.shard cannot use" in err.value.problems[1]


def test_a_cumulative_batchnorm_cannot_be_trained_by_a_job() -> None:
    check_parallel_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "m")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    with pytest.raises(
        ModelError, match=r"^m: BatchNorm layer\(s\) 1 use momentum=None \(a cumulative average\)"
    ):
        check_parallel_model(model, "m")


def test_an_input_size_a_fixed_size_vit_cannot_take_is_refused_before_the_data_scan(
    image_folder, tmp_path
) -> None:
    from typer.testing import CliRunner

    from ftsgd.cli.app import app
    from ftsgd.run.checks import environment_problems

    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--out", str(out), "--model", "test_vit", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--set", "data.img_size=40"])
    assert result.exit_code == 2, result.output
    assert "data.img_size: test_vit cannot take 40x40 px input" in result.output
    assert "divisible by patch size" in result.output and not out.exists()
    ok = load_recipe("sgd", ['model.name="test_vit"', "data.img_size=48", "model.kwargs={img_size=48}"])
    assert [p for p in environment_problems(ok) if "img_size" in p] == []
    cnn = load_recipe("sgd", ['model.name="test_resnet"', "data.img_size=40"])
    assert [p for p in environment_problems(cnn) if "img_size" in p] == []
