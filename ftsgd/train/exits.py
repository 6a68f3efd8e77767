"""How a fine-tune that does not finish ends: a signal turned into a clean stop, a failure into one message.

A run stopped early must leave what it did usable and say how to continue. The first SIGINT/SIGTERM/SIGUSR1
becomes a request to stop at the next step boundary, where the Trainer saves a checkpoint and exits
with 128 + the signal (:class:`StopSignals`); a failure becomes one :class:`~ftsgd.errors.RunError`
(exit 1) that says what happened, what was kept and what to try, never a traceback. The Trainer decides
*when* (its ``_run_errors`` and ``_interrupted``); this module says *what*, so the Trainer's file
stays the loop.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ftsgd.errors import RunError, first_line
from ftsgd.recipe.schema import Recipe
from ftsgd.utils.distributed import TIMEOUT_ENV, is_peer_failure

__all__ = ["StopSignals", "compile_error", "diverged_error", "job_error", "oom_error"]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""What stops a run cleanly (checkpoint, then exit 128 + the signal): Ctrl-C, a scheduler's or ``kill``'s
SIGTERM, and SIGUSR1, the signal Slurm sends before a time limit or preemption (``--signal=B:USR1@N``)."""

_URGENCY = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_AFTER_FIRST = {signal.SIGINT: signal.default_int_handler, signal.SIGUSR1: signal.SIG_IGN}
"""What a second signal does while the run saves: a second Ctrl-C gets the user out now (SIGTERM: as its
default); a second SIGUSR1 (a preemption notice after a time-limit notice) is ignored: it must never kill a
run half-way through writing the checkpoint it asked for."""


@dataclass
class StopSignals:
    """The SIGINT/SIGTERM/SIGUSR1 a run was asked to stop for (0: none).

    Attributes:
        distributed: The run is a job of several processes (they must all stop after the same step).
        received: The signal this process received.
        agreed: In a job, the signal any process received, as of the last step's all-reduce.
    """

    distributed: bool = False
    received: int = 0
    agreed: int = 0

    def pending(self) -> int:
        """The signal to stop for at this step boundary (0: none).

        In a job, the one all processes agreed on in the last step's all-reduce, not this process's own:
        a signal landing between that all-reduce and this check would otherwise stop some processes a
        step before the others.
        """
        return self.agreed if self.distributed else self.received

    def flags(self) -> list[float]:
        """This process's signal as the numbers a step's all-reduce adds up, one per :data:`STOP_SIGNALS`."""
        return [float(self.received == sig) for sig in STOP_SIGNALS]

    def agree(self, summed: list[float]) -> None:
        """Take the signal the job's summed :meth:`flags` name as the agreed one (SIGTERM first, then
        SIGUSR1, then SIGINT: the most urgent wins)."""
        given = {sig for sig, n in zip(STOP_SIGNALS, summed, strict=True) if n}
        self.agreed = next((sig for sig in _URGENCY if sig in given), 0)

    @contextmanager
    def caught(self) -> Iterator[None]:
        """Turn the first SIGINT/SIGTERM/SIGUSR1 into a request to stop at the next step boundary.

        The loop then saves a checkpoint and exits cleanly; a second SIGINT falls back to Python's
        default handling (KeyboardInterrupt) for a user who really wants out now. Handlers can only be
        installed from the main thread; elsewhere (an embedding application) signals are left alone.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: object) -> None:
            self.received = signum
            if not self.distributed:  # torchrun and Slurm may deliver a job's signal twice
                signal.signal(signum, _AFTER_FIRST.get(signum, signal.SIG_DFL))

        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                # a job that is stopping ignores torchrun's forwarded copy of the signal, so every
                # process ends with 128 + the signal instead of dying of it half-way through its exit
                stopping = self.distributed and self.received
                signal.signal(sig, signal.SIG_IGN if stopping else old)


def job_error(exc: Exception, model_name: str, checkpoint: Path, resume_command: str) -> RunError | None:
    """Failures only a multi-process job has, as user-facing errors (None for any other error).

    No checkpoint is attempted on any error of a job: it needs every process, and the others may be
    gone or somewhere else in the step.
    """
    if is_peer_failure(exc):
        return _peer_error(exc, checkpoint, resume_command)
    if "not used in producing loss" in str(exc):
        return RunError(
            f"{model_name} has trainable parameters that take no part in the forward pass, and "
            "DDP waits for a gradient of every trainable parameter; freeze them (freeze.patterns) or train "
            "on one process"
        )
    return None


def _peer_error(exc: BaseException, checkpoint: Path, resume_command: str) -> RunError:
    """A collective failed: another process of the job died, failed, or stopped answering.

    Nothing is saved here: the other processes are gone or in an unknown state, and a checkpoint needs
    all of them. The last checkpoint on disk is consistent (every process agreed on it).
    """
    return RunError(
        f"lost contact with the other processes of the job ({first_line(exc)}): one of them failed or was "
        f"killed (its own message, if any, comes first; torchrun names its rank), or none answered within "
        f"{TIMEOUT_ENV} seconds. The last checkpoint, if any, is in {checkpoint}; continue with:\n  "
        f"{resume_command}"
    )


def compile_error(exc: BaseException, model_name: str) -> RunError | None:
    """The message for a failure of torch.compile (Dynamo tracing or a backend compiler); None for another."""
    module = type(exc).__module__ or ""
    from_compile = (
        module.startswith(("torch._dynamo", "torch._inductor"))
        or "BackendCompilerFailed" in type(exc).__name__
    )
    if not from_compile:
        return None
    return RunError(
        f"torch.compile failed for {model_name} ({type(exc).__name__}: "
        f"{first_line(exc) if str(exc).strip() else 'no message'}); set train.compile = false "
        "to train without it (same results, slower steps). torch.compile needs a working C++ "
        "compiler on CPU and Triton on CUDA."
    )


def oom_error(exc: BaseException, recipe: Recipe, checkpoint: Path) -> RunError:
    """Out of GPU memory: the options that need less of it, most effective first."""
    return RunError(
        f"out of GPU memory while training {recipe.model.name} at train.batch_size = "
        f"{recipe.train.batch_size} ({first_line(exc)}). Options that help: a smaller micro-batch "
        "(--set train.micro_batch_size=8: same batch, less memory), --set train.grad_checkpointing=true, "
        "--set optim.step_in_backward=true, SGD without momentum, or the low-memory recipe "
        f"(--recipe sgd-freeze-embed-lowmem). The last checkpoint, if any, is in {checkpoint}."
    )


def diverged_error(what: str, where: str, saved_step: int | None, checkpoint: Path) -> RunError:
    """The message for a run whose loss or weights stopped being finite.

    Args:
        what, where: What stopped being finite, and at which step.
        saved_step: The global step of the checkpoint this process last saved (None: none yet).
        checkpoint: The run's checkpoint file.
    """
    if saved_step is not None and checkpoint.is_file():
        kept = (
            f"the last good checkpoint (global step {saved_step}) is kept in {checkpoint}, "
            "but --resume would diverge the same way"
        )
    else:
        kept = "no checkpoint was written before it"
    return RunError(
        f"{what} {where}; {kept}. Start a new run with a lower optim.lr, train.grad_clip > 0, "
        'or train.amp = "bf16"/"none"'
    )
