"""What a fine-tune that cannot go on says, for failures that are hard to cause on a CPU in a test."""

from __future__ import annotations

import signal
from pathlib import Path

from ftsgd.errors import RunError
from ftsgd.recipe.load import load_recipe
from ftsgd.train.exits import StopSignals, compile_error, diverged_error, job_error, oom_error


def test_a_torch_compile_failure_says_how_to_train_without_it() -> None:
    failure = type("BackendCompilerFailed", (RuntimeError,), {"__module__": "torch._dynamo.exc"})
    error = compile_error(failure("inductor: no C++ compiler\nmore"), "test_vit")
    assert isinstance(error, RunError) and error.exit_code == 1
    assert str(error).startswith(
        "torch.compile failed for test_vit (BackendCompilerFailed: inductor: no C++ compiler); "
        "set train.compile = false"
    )
    assert compile_error(ValueError("shape mismatch"), "test_vit") is None


def test_out_of_memory_names_the_options_and_the_checkpoint(tmp_path: Path) -> None:
    recipe = load_recipe("sgd", ['model.name="vit_large_patch16_224"', "train.batch_size=64"])
    message = str(oom_error(RuntimeError("CUDA out of memory"), recipe, tmp_path / "checkpoint.pt"))
    assert message.startswith(
        "out of GPU memory while training vit_large_patch16_224 at train.batch_size = 64 (CUDA out of memory)"
    )
    assert "--set train.micro_batch_size=8" in message and f"is in {tmp_path / 'checkpoint.pt'}." in message


def test_divergence_says_whether_a_good_checkpoint_is_kept(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    assert "no checkpoint was written before it" in str(
        diverged_error("loss became nan", "at step 3", 2, checkpoint)
    )
    checkpoint.write_bytes(b"x")
    message = str(diverged_error("loss became nan", "at step 3", 2, checkpoint))
    assert message.startswith(
        "loss became nan at step 3; the last good checkpoint (global step 2) is kept in"
    )
    assert "no checkpoint" in str(diverged_error("loss became nan", "at step 3", None, checkpoint))


def test_a_job_only_failure_becomes_a_message_and_any_other_is_left_alone(tmp_path: Path) -> None:
    unused = RuntimeError("Expected to have finished reduction ... not used in producing loss ...")
    error = job_error(unused, "test_vit", tmp_path / "checkpoint.pt", "ftsgd train --resume")
    assert error is not None and str(error).startswith("test_vit has trainable parameters that take no part")
    assert (
        job_error(ValueError("bad"), "test_vit", tmp_path / "checkpoint.pt", "ftsgd train --resume") is None
    )
    lost = job_error(
        RuntimeError("Connection closed by peer"), "m", tmp_path / "ckpt", "ftsgd train --resume"
    )
    assert lost is not None and str(lost).startswith(
        "lost contact with the other processes of the job (Connection closed by peer): one of them failed"
    )
    assert str(lost).endswith(f"is in {tmp_path / 'ckpt'}; continue with:\n  ftsgd train --resume")


def test_a_job_stops_for_the_signal_its_processes_agreed_on() -> None:
    alone, job = StopSignals(distributed=False), StopSignals(distributed=True)
    for signals in (alone, job):
        signals.received = signal.SIGINT
    assert alone.pending() == signal.SIGINT and alone.flags() == [1.0, 0.0, 0.0]
    assert job.pending() == 0  # not before the next step's all-reduce has agreed on it
    job.agree([2.0, 1.0, 0.0])  # two processes got SIGINT, one SIGTERM
    assert job.pending() == signal.SIGTERM
    job.agree([1.0, 0.0, 1.0])  # Slurm's SIGUSR1 (save and requeue) outranks a Ctrl-C
    assert job.pending() == signal.SIGUSR1
    job.agree([0.0, 0.0, 0.0])
    assert job.pending() == 0
