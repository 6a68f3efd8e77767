"""The fine-tuning loop: data, model, freezing, optimizer, AMP, evaluation, checkpoints and export.

One plain function (:func:`train`) runs a whole fine-tune from a validated recipe into a run
directory. Everything a resumed run needs lives in ``checkpoint.pt`` and is a pure function of the
recipe and the step counters otherwise (the data order and augmentations are seeded per epoch and
per sample, the learning rate is computed from epoch/step), which is what makes a resumed run end
with exactly the weights of an uninterrupted one.

Run directory layout::

    recipe.toml        the resolved recipe (written first)
    checkpoint.pt      last resumable state (model, optimizer, scaler, RNG, counters, history)
    metrics.jsonl      one JSON object per finished epoch
    model.safetensors  best weights by ID-validation accuracy, with metadata, + config.json
    summary.json       best epoch, each split's metrics at it, frozen parameters, command, versions
"""

from __future__ import annotations

import json
import math
import platform
import random
import resource
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftsgd import __version__
from ftsgd.console import print_table, training_progress, warn
from ftsgd.data import (
    SKIPPED_FILE,
    Split,
    build_loader,
    build_transform,
    discover_splits,
    preflight_scan,
    resolve_num_workers,
    skipped_lines,
)
from ftsgd.errors import FtsgdError, Interrupted, ModelError, RecipeError, RunError, UsageError
from ftsgd.evaluate import evaluate
from ftsgd.export import export_model
from ftsgd.fileio import atomic_torch_save, atomic_write_text, remove_stale_temps
from ftsgd.freeze import (
    apply_freeze,
    classifier_modules,
    find_embedding,
    frozen_parameter_names,
    train_mode,
)
from ftsgd.models import build_model, copy_off_file, load_checkpoint_state, model_data_config
from ftsgd.optim import StepInBackward, build_optimizer, lr_at, set_lr
from ftsgd.recipe import DEFAULT_RECIPE, Recipe, load_recipe, recipe_from_dict, recipe_to_toml

CHECKPOINT = "checkpoint.pt"
RECIPE_FILE = "recipe.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "model.safetensors"
CHECKPOINT_FORMAT = 1


@dataclass
class RunState:
    """Counters and results a resumed run continues from (saved inside every checkpoint)."""

    epoch: int = 0
    """Current epoch (0-based); equals ``train.epochs`` once the run is complete."""
    step_in_epoch: int = 0
    """Optimizer steps already done in ``epoch``."""
    global_step: int = 0
    best_epoch: int = 0
    """1-based epoch of the best ID-validation accuracy so far (0: none yet)."""
    best_accuracy: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per finished epoch (what metrics.jsonl holds)."""
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0


# --------------------------------------------------------------------------- set-up helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is a usage error."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError('train.device = "cuda" but no CUDA device is available; use "auto" or "cpu"')
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: bf16 where supported, fp16 otherwise on CUDA; none on CPU."""
    if device.type != "cuda" or mode == "none":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def input_config(model: nn.Module, recipe: Recipe) -> dict[str, Any]:
    """The model's data config (mean, std, crop, interpolation), at ``data.img_size`` when set."""
    cfg = dict(model_data_config(model))
    if recipe.data.img_size:
        cfg["input_size"] = (3, recipe.data.img_size, recipe.data.img_size)
    return cfg


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last :func:`reset_peak_memory`: CUDA max allocated; CPU peak resident set size.

    On Linux the CPU figure is ``VmHWM`` (the resettable high-water mark); elsewhere, or if
    ``/proc`` is unreadable, the process-lifetime ``ru_maxrss``.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (called after each epoch so each record is that epoch's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the resident-set high-water mark (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """timm's ``set_grad_checkpointing(True)``, or a RecipeError saying the architecture lacks it."""
    setter = getattr(model, "set_grad_checkpointing", None)
    try:
        if setter is None:
            raise NotImplementedError
        setter(True)
    except (AssertionError, NotImplementedError):
        raise RecipeError(
            [
                f"train.grad_checkpointing: {name} does not support gradient checkpointing (timm implements "
                "it per architecture); set train.grad_checkpointing = false, or lower memory another way "
                "(a smaller train.micro_batch_size, optim.step_in_backward = true)"
            ]
        ) from None


def _is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from torch.compile (Dynamo tracing or a backend compiler)."""
    module = type(exc).__module__ or ""
    return (
        module.startswith(("torch._dynamo", "torch._inductor"))
        or "BackendCompilerFailed" in type(exc).__name__
    )


def _versions() -> dict[str, str]:
    import timm

    return {
        "ftsgd": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- run directory


def _check_new_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        hint = " (it holds a run: add --resume to continue it)" if (out / RECIPE_FILE).exists() else ""
        raise UsageError(f"run directory {out} already exists and is not empty{hint}; choose another --out")


def _read_checkpoint(out: Path) -> dict[str, Any]:
    path = out / CHECKPOINT
    if not path.is_file():
        raise UsageError(
            f"cannot resume: {path} does not exist (the run wrote no checkpoint yet); start it again "
            f"without --resume into a new --out"
        )
    try:
        # memory-mapped: the weights are copied into the model page by page (load_checkpoint_state)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise UsageError(f"cannot resume: {path} is corrupt or not an ftsgd checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"cannot resume: {path} is not an ftsgd checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _load_run_recipe(out: Path, data: Path) -> Recipe:
    import tomllib

    path = out / RECIPE_FILE
    if not path.is_file():
        raise UsageError(f"cannot resume: {out} is not an ftsgd run directory (no {RECIPE_FILE})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot resume: {path} is corrupt ({exc})") from None
    raw.setdefault("data", {})["root"] = str(data.expanduser().resolve())
    model = raw.get("model")
    if isinstance(model, dict) and model.get("weights") and not Path(model["weights"]).expanduser().is_file():
        # The checkpoint holds every weight: a starting-weights file moved or deleted since doesn't matter.
        model["weights"] = ""
    try:
        return recipe_from_dict(raw)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(path)) from None


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))


@dataclass
class _StopRequest:
    signum: int = 0


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next step boundary.

    The loop then saves a checkpoint and exits cleanly; a second SIGINT falls back to Python's
    default handling (KeyboardInterrupt) for a user who really wants out now. Handlers can only be
    installed from the main thread; elsewhere (an embedding application) signals are left alone.
    """
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, _frame: object) -> None:
        request.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _oom_error(exc: BaseException, recipe: Recipe, out: Path) -> RunError:
    return RunError(
        f"out of GPU memory while training {recipe.model.name} at train.batch_size = "
        f"{recipe.train.batch_size} ({str(exc).splitlines()[0]}). Options that help: a smaller micro-batch "
        "(--set train.micro_batch_size=8: same batch, less memory), --set train.grad_checkpointing=true, "
        "--set optim.step_in_backward=true, SGD without momentum, or the low-memory recipe "
        f"(--recipe sgd-freeze-embed-lowmem). The last checkpoint, if any, is in {out / CHECKPOINT}."
    )


def _all_finite(params: list[nn.Parameter]) -> bool:
    """Whether every value of ``params`` is finite (one reduction per tensor, a single host sync).

    Min and max are finite exactly when every value is (NaN propagates through both). Unlike
    ``isfinite(p).all()``, ``aminmax`` allocates no parameter-sized temporaries: on ViT-L those
    raised the process's peak memory by ~0.3-0.6 GiB (and took 4x longer).
    """
    extremes = [torch.stack(torch.aminmax(p.detach())) for p in params if p.numel()]
    if not extremes:
        return True
    return bool(torch.isfinite(torch.cat(extremes)).all().item())


def _diverged_error(what: str, where: str, out: Path, saved_step: int | None) -> RunError:
    """The message for a run whose loss or weights stopped being finite."""
    if saved_step is not None and (out / CHECKPOINT).is_file():
        kept = (
            f"the last good checkpoint (global step {saved_step}) is kept in {out / CHECKPOINT}, "
            "but --resume would diverge the same way"
        )
    else:
        kept = "no checkpoint was written before it"
    return RunError(
        f"{what} {where}; {kept}. Start a new run with a lower optim.lr, train.grad_clip > 0, "
        'or train.amp = "bf16"/"none"'
    )


# --------------------------------------------------------------------------- entry points


def train_from_cli(
    *,
    data: Path,
    out: Path,
    recipe: str | None,
    overrides: list[str],
    resume: bool,
    quiet: bool,
    argv: list[str],
) -> dict[str, Any]:
    """``ftsgd train``: resolve the recipe (or the run's own, with ``--resume``) and train."""
    if resume:
        if recipe is not None or overrides:
            raise UsageError(
                "--resume continues with the run's own recipe.toml; drop --recipe, --set, --model and "
                "--weights (start a new --out to change the recipe)"
            )
        resolved = _load_run_recipe(out, data)
    else:
        _check_new_run_dir(out)
        root = f"data.root={json.dumps(str(data.expanduser().resolve()))}"
        resolved = load_recipe(recipe or DEFAULT_RECIPE, [*overrides, root])
        if resolved.model.weights:  # recipe.toml must still find it from another working directory
            weights = str(Path(resolved.model.weights).expanduser().resolve())
            resolved = replace(resolved, model=replace(resolved.model, weights=weights))
    return train(resolved, out, resume=resume, quiet=quiet, argv=argv)


def train(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    argv: list[str] | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``recipe.model`` on ``recipe.data`` into the run directory ``out``.

    Args:
        recipe: A validated recipe with ``model.name`` and ``data.root`` set.
        out: The run directory (created; must be new unless ``resume``).
        resume: Continue from ``out/checkpoint.pt``.
        quiet: Print nothing but errors.
        argv: The command line, recorded in summary.json.
        stop_after_steps: Stop (after writing a checkpoint) once this many optimizer steps are done
            in total; used to test interruption and resume.

    Returns:
        The summary (also written to ``out/summary.json``).
    """
    if not recipe.model.name:
        raise ModelError(
            "no model given: pass --model NAME (a timm model name) or set model.name in the recipe"
        )
    t = recipe.train
    device = resolve_device(t.device)
    amp_dtype = resolve_amp(t.amp, device)
    if recipe.optim.step_in_backward and amp_dtype == torch.float16:
        raise RecipeError(
            [
                'train.amp: "auto" picked fp16 on this GPU (no bf16), which optim.step_in_backward cannot '
                'use: an overflow is only known after some parameters were updated; set train.amp = "none"'
            ]
        )
    ckpt = _read_checkpoint(out) if resume else None

    class_names, splits = discover_splits(recipe.data)
    # Decode every image now, before the model is built: a bad file must fail the run in seconds,
    # not hours in, and "skip" must drop it before the epoch order (a function of the sample list) exists.
    splits, skipped = preflight_scan(
        splits, on_bad_image=recipe.data.on_bad_image, root=recipe.data.root, train_split="train"
    )
    torch.manual_seed(t.seed)  # seeds the new head's (and a random init's) weights too
    random.seed(t.seed)
    # Resuming: the checkpoint holds every weight, so neither the starting file nor the hub is read again.
    start = replace(recipe.model, weights="", pretrained=False) if ckpt is not None else recipe.model
    model, weights_report = build_model(start, num_classes=len(class_names))
    data_config = input_config(model, recipe)
    embedding = find_embedding(model, data_config["input_size"])
    frozen = frozen_parameter_names(model, recipe.freeze, embedding)
    apply_freeze(model, frozen)
    if t.grad_checkpointing:
        enable_grad_checkpointing(model, recipe.model.name)
    try:
        model.to(device)
    except torch.OutOfMemoryError as exc:  # the weights alone do not fit
        raise _oom_error(exc, recipe, out) from None
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model, recipe.optim, embedding=embedding.modules, classifier=classifier_modules(model, embedding)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    forward = torch.compile(model) if t.compile else model

    state = RunState()
    if ckpt is not None:
        load_checkpoint_state(model, ckpt.pop("model"), out / CHECKPOINT)
        optimizer.load_state_dict(copy_off_file(ckpt.pop("optimizer"), out / CHECKPOINT))
        scaler.load_state_dict(ckpt["scaler"])
        state = RunState(**ckpt["state"])
        _set_rng_state(ckpt["rng"])
        del ckpt  # a second copy of the weights and optimizer state must not live for the whole run
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RECIPE_FILE, recipe_to_toml(recipe))
    if skipped:
        atomic_write_text(out / SKIPPED_FILE, skipped_lines(skipped))
        warn(
            f'skipped {len(skipped)} unreadable image(s) (data.on_bad_image = "skip"); '
            f"they are listed in {out / SKIPPED_FILE}"
        )
    elif (out / SKIPPED_FILE).exists():  # a resumed run whose bad files were fixed meanwhile
        (out / SKIPPED_FILE).unlink()

    train_split = splits[recipe.data.train if recipe.data.train in splits else "train"]
    eval_splits = {name: s for name, s in splits.items() if s is not train_split}
    steps_per_epoch = math.ceil(len(train_split.samples) / t.batch_size)
    micro = t.micro_batch_size or t.batch_size
    workers = resolve_num_workers(recipe.data.num_workers)
    pin = recipe.data.pin_memory and device.type == "cuda"
    train_tf = build_transform(data_config, recipe.data.augment, training=True)
    eval_tf = build_transform(data_config, "none", training=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_set = set(frozen)
    n_total = sum(p.numel() for p in model.parameters())
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n in frozen_set)

    saved_step: list[int | None] = [state.global_step if resume else None]

    def check_finite() -> None:
        # Without a GradScaler an inf gradient is applied as is; never save, evaluate or export such weights.
        if not _all_finite(trainable):
            raise _diverged_error(
                "the weights became NaN or inf",
                f"at epoch {state.epoch + 1}, global step {state.global_step}",
                out,
                saved_step[0],
            )

    def current_lr() -> float:
        return lr_at(
            recipe.schedule,
            recipe.optim.lr,
            epochs=t.epochs,
            steps_per_epoch=steps_per_epoch,
            epoch=state.epoch,
            step=state.step_in_epoch,
        )

    def save_checkpoint() -> None:
        if saved_step[0] == state.global_step:
            return  # this very state is already on disk (e.g. a signal right after a periodic save)
        check_finite()
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "state": asdict(state),
                "rng": _rng_state(),
            },
            out / CHECKPOINT,
        )
        saved_step[0] = state.global_step

    def export_best() -> None:
        export_model(
            model,
            out / WEIGHTS,
            architecture=recipe.model.name,
            class_names=class_names,
            data_config=data_config,
            recipe_name=recipe.name,
            model_kwargs=dict(recipe.model.kwargs),
        )

    def evaluate_all() -> dict[str, dict[str, Any]]:
        results = {}
        for name, split in eval_splits.items():
            loader = build_loader(
                split,
                eval_tf,
                batch_size=max(micro, 1),
                training=False,
                seed=t.seed,
                num_workers=workers,
                pin_memory=pin,
            )
            results[name] = evaluate(
                forward,
                loader,
                device=device,
                class_names=class_names,
                amp_dtype=amp_dtype,
                channels_last=t.channels_last,
            )
        return results

    if resume:
        # temporaries of writes a kill -9 interrupted (a checkpoint-sized file each)
        remove_stale_temps(out, [CHECKPOINT, WEIGHTS, METRICS, SUMMARY, SKIPPED_FILE, "config.json"])
        _write_metrics(out, state.history)  # drop lines of an epoch the checkpoint never saw finish
    progress = training_progress(quiet, epochs=t.epochs, steps_per_epoch=steps_per_epoch)

    def interrupted(signum: int) -> Interrupted:
        save_checkpoint()
        name = signal.Signals(signum).name
        command = shlex.join(["ftsgd", "train", "--data", recipe.data.root, "--out", str(out), "--resume"])
        progress.message(f"{name}: checkpoint saved at epoch {state.epoch + 1}, step {state.step_in_epoch}")
        return Interrupted(f"interrupted by {name}; checkpoint saved. Resume with:\n  {command}", signum)

    with progress, _stop_on_signals() as stop_request:
        try:
            if resume:
                progress.message(
                    f"resuming {out} at epoch {state.epoch + 1}, step {state.step_in_epoch}/{steps_per_epoch}"
                )
            else:
                progress.message(
                    f"{recipe.model.name}: {len(class_names)} classes, {len(train_split.samples)} training images, "
                    f"frozen {len(frozen)} tensors ({n_frozen:,} of {n_total:,} parameters, policy "
                    f"{recipe.freeze.policy}), device {device.type}"
                    f"{', amp ' + str(amp_dtype).removeprefix('torch.') if amp_dtype else ''}"
                )
            while state.epoch < t.epochs:
                epoch = state.epoch
                lr = current_lr()
                progress.start_epoch(epoch, state.step_in_epoch, lr)
                loader = build_loader(
                    train_split,
                    train_tf,
                    batch_size=t.batch_size,
                    training=True,
                    seed=t.seed,
                    epoch=epoch,
                    start_batch=state.step_in_epoch,
                    num_workers=workers,
                    pin_memory=pin,
                )
                train_mode(model)
                tick = time.perf_counter()
                for x, y in loader:
                    lr = current_lr()
                    set_lr([optimizer], lr)  # type: ignore[list-item]
                    loss_sum, correct = _train_step(
                        forward,
                        x,
                        y,
                        micro=micro,
                        loss_fn=loss_fn,
                        optimizer=optimizer,
                        scaler=scaler,
                        trainable=trainable,
                        grad_clip=t.grad_clip,
                        device=device,
                        amp_dtype=amp_dtype,
                        channels_last=t.channels_last,
                    )
                    if not math.isfinite(loss_sum):
                        raise _diverged_error(
                            f"training loss became {loss_sum / len(y)}",
                            f"at epoch {epoch + 1}, step {state.step_in_epoch + 1} "
                            f"(global step {state.global_step + 1})",
                            out,
                            saved_step[0],
                        )
                    now = time.perf_counter()
                    state.epoch_seconds += now - tick
                    tick = now
                    state.step_in_epoch += 1
                    state.global_step += 1
                    state.epoch_loss_sum += loss_sum
                    state.epoch_correct += correct
                    state.epoch_seen += len(y)
                    progress.step(
                        epoch,
                        state.step_in_epoch,
                        loss_sum / len(y),
                        lr,
                        state.epoch_seen / max(state.epoch_seconds, 1e-9),
                    )
                    at_end = state.step_in_epoch == steps_per_epoch
                    stop = stop_after_steps is not None and state.global_step >= stop_after_steps
                    if not at_end and (
                        stop or (t.checkpoint_every and state.global_step % t.checkpoint_every == 0)
                    ):
                        save_checkpoint()
                    if stop and not at_end:
                        return {"stopped_at_step": state.global_step}
                    if stop_request.signum and not at_end:
                        raise interrupted(stop_request.signum)
                check_finite()
                results = evaluate_all()
                record = {
                    "epoch": epoch + 1,
                    "step": state.global_step,
                    "lr": lr,
                    "train_loss": state.epoch_loss_sum / max(state.epoch_seen, 1),
                    "train_accuracy": state.epoch_correct / max(state.epoch_seen, 1),
                    "splits": {name: _split_metrics(r) for name, r in results.items()},
                    "images_per_s": state.epoch_seen / max(state.epoch_seconds, 1e-9),
                    "epoch_time_s": state.epoch_seconds,
                }
                val_acc = results["val"]["accuracy"]
                best = val_acc > state.best_accuracy
                if best:
                    state.best_accuracy, state.best_epoch = val_acc, epoch + 1
                    export_best()
                record["peak_memory_bytes"] = peak_memory_bytes(device)  # evaluation and export included
                state.history.append(record)
                state.train_seconds += state.epoch_seconds
                state = replace(
                    state,
                    epoch=epoch + 1,
                    step_in_epoch=0,
                    epoch_loss_sum=0.0,
                    epoch_correct=0,
                    epoch_seen=0,
                    epoch_seconds=0.0,
                )
                saved_step[0] = None  # the epoch's end is a new state even at the same global step
                save_checkpoint()
                _write_metrics(out, state.history)
                reset_peak_memory(device)
                progress.end_epoch(record, best)
                if stop_request.signum and state.epoch < t.epochs:
                    raise interrupted(stop_request.signum)
                if (
                    stop_after_steps is not None
                    and state.global_step >= stop_after_steps
                    and state.epoch < t.epochs
                ):
                    return {"stopped_at_step": state.global_step}
        except FtsgdError:
            raise
        except torch.OutOfMemoryError as exc:
            raise _oom_error(exc, recipe, out) from None
        except Exception as exc:
            if stop_request.signum:  # e.g. a DataLoader worker killed by the same Ctrl-C
                raise interrupted(stop_request.signum) from None
            if t.compile and _is_compile_error(exc):
                raise RunError(
                    f"torch.compile failed for {recipe.model.name} ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); "
                    "set train.compile = false to train without it (same results, slower steps). "
                    "torch.compile needs a working C++ compiler on CPU and Triton on CUDA."
                ) from exc
            raise

    summary = _summary(
        recipe,
        out,
        state,
        class_names=class_names,
        splits=splits,
        val_name="val",
        n_trainable=sum(p.numel() for p in trainable),
        frozen=frozen,
        embedding=list(embedding.modules),
        n_total=n_total,
        n_frozen=n_frozen,
        weights_report=asdict(weights_report) if weights_report else None,
        device=device,
        amp_dtype=amp_dtype,
        argv=argv or sys.argv,
        data_config=data_config,
    )
    summary["skipped_images"] = len(skipped)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if not quiet:
        _print_results(summary)
    return summary


def _train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    micro: int,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer | StepInBackward,
    scaler: torch.amp.GradScaler,
    trainable: list[nn.Parameter],
    grad_clip: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[float, int]:
    """One optimizer step over a batch, as micro-batches whose gradients add up to the batch mean.

    Returns the summed loss over the batch's images and the number predicted correctly.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(y)
    loss_total = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
        xs = xs.to(device, non_blocking=True)
        ys = ys.to(device, non_blocking=True)
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(xs)
        loss = loss_fn(logits.float(), ys)
        scaler.scale(loss * (len(ys) / n)).backward()
        loss_total += loss.detach() * len(ys)
        correct += (logits.detach().argmax(dim=1) == ys).sum()
    if isinstance(optimizer, StepInBackward):
        return _read_back(loss_total, correct)  # already updated during backward
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return _read_back(loss_total, correct)


def _read_back(loss_total: torch.Tensor, correct: torch.Tensor) -> tuple[float, int]:
    """Both step statistics in one device-to-host copy (one GPU sync per step, not two)."""
    loss, hits = torch.stack([loss_total.double(), correct.double()]).tolist()
    return loss, int(hits)


def _split_metrics(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("accuracy", "top5", "loss", "n")
    return {k: result[k] for k in keep if k in result}


def _summary(
    recipe: Recipe,
    out: Path,
    state: RunState,
    *,
    class_names: list[str],
    splits: dict[str, Split],
    val_name: str,
    n_trainable: int,
    frozen: list[str],
    embedding: list[str],
    n_total: int,
    n_frozen: int,
    weights_report: dict[str, Any] | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    argv: list[str],
    data_config: dict[str, Any],
) -> dict[str, Any]:
    best = state.history[state.best_epoch - 1] if state.best_epoch else state.history[-1]
    return {
        "run_dir": str(out),
        "recipe": recipe.name,
        "model": recipe.model.name,
        "weights": recipe.model.weights or None,
        "weights_report": weights_report,
        "data": recipe.data.root,
        "classes": class_names,
        "num_classes": len(class_names),
        "split_sizes": {name: len(s.samples) for name, s in splits.items()},
        "epochs": recipe.train.epochs,
        "steps": state.global_step,
        "best_epoch": state.best_epoch,
        "val_split": val_name,
        "val_accuracy": best["splits"][val_name]["accuracy"] if val_name in best["splits"] else None,
        "best": best["splits"],
        "final": state.history[-1]["splits"],
        "freeze_policy": recipe.freeze.policy,
        "embedding": embedding,
        "frozen": frozen,
        "frozen_params": n_frozen,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "optimizer": recipe.optim.name,
        "lr": recipe.optim.lr,
        "device": str(device),
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
        "input_size": list(data_config["input_size"]),
        "train_time_s": state.train_seconds,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in state.history),
        "model_file": WEIGHTS,
        "command": shlex.join(argv),
        "versions": _versions(),
    }


def _print_results(summary: dict[str, Any]) -> None:
    rows = []
    for name, m in summary["best"].items():
        role = "ID" if name == summary["val_split"] else "eval"
        rows.append([name, role, f"{100 * m['accuracy']:.2f}%", f"{m['loss']:.4f}", m["n"]])
    print_table(
        f"Best epoch {summary['best_epoch']}/{summary['epochs']} (by {summary['val_split']} accuracy)",
        ["split", "", "accuracy", "loss", "images"],
        rows,
    )
    from ftsgd.console import info

    info(f"weights: {Path(summary['run_dir']) / summary['model_file']}")


# --------------------------------------------------------------------------- demo


def run_demo(*, out: Path, epochs: int, force: bool, argv: list[str]) -> dict[str, Any]:
    """Generate a small shifted dataset and fine-tune a tiny ViT on it with ``sgd-freeze-embed``."""
    import shutil

    from ftsgd.synthetic import make_image_folder

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
        # --force deletes only what an earlier demo wrote: never a folder that holds anything else.
        entries = {p.name for p in out.iterdir()}
        if not entries <= {"data", "run", "run-adamw"} or not (out / "data" / "train").is_dir():
            raise UsageError(
                f"{out} is not a demo directory (it holds {', '.join(sorted(entries)[:5])}); --force only "
                "replaces an earlier `ftsgd demo` output. Choose another --out"
            )
        shutil.rmtree(out)
    data = make_image_folder(
        out / "data", classes=4, size=32, seed=0, per_class={"train": 48, "val": 16, "ood": 16}
    )
    recipe = load_recipe(
        DEFAULT_RECIPE,
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            f"train.epochs={epochs}",
            "train.batch_size=16",
            "optim.lr=0.01",
            'data.augment="flip"',
            "data.num_workers=0",
            f"data.root={json.dumps(str(data.resolve()))}",
        ],
    )
    summary = train(recipe, out / "run", argv=argv)
    from ftsgd.console import info

    info("try next:")
    info(f"  ftsgd eval {out / 'run'} --data {data}")
    info(
        f"  ftsgd train --data {data} --out {out / 'run-adamw'} --recipe adamw --model test_vit "
        "--set 'model.kwargs={img_size=32}' --set optim.lr=1e-3"
    )
    return summary
