"""The fine-tuning loop as one concrete class whose methods are the loop's steps.

:class:`Trainer` follows the shape of torchtune's recipe classes: :meth:`Trainer.setup` is a list of
small builders (data, model, optimizer, the checkpoint to resume from), :meth:`Trainer.fit` runs the
epochs, :meth:`Trainer.train_epoch` the steps of one epoch, :meth:`Trainer.step` one optimizer step
and :meth:`Trainer.evaluate` every evaluation split. Each can be called on its own, which is how the
tests check micro-batching, clipping and label smoothing without running whole trainings.

Everything a resumed run needs lives in ``checkpoint.pt`` and is otherwise a pure function of the recipe
and the step counters (the data order and augmentations are seeded per epoch and per sample, the
learning rate is computed from epoch/step), which is what makes a resumed run end with exactly the
weights of an uninterrupted one.

This file is the loop; what it calls lives beside it, so the story stays readable: the stage plan
(:mod:`.stages`), the checkpoint's contents (:mod:`.state`), how a stopped or failed run ends
(:mod:`.exits`), DDP/FSDP (:mod:`.parallel`). Every refusal of a recipe, including those that need the
device or the built model, is in :mod:`ftsgd.run.checks`, called here as soon as what it needs exists.
"""

from __future__ import annotations

import functools
import math
import random
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ftsgd.data.dataset import batch_shard
from ftsgd.data.fingerprint import fingerprint
from ftsgd.data.folders import Split
from ftsgd.data.ignored import ignored_warnings
from ftsgd.data.loader import RunLoader, epoch_steps, resolve_num_workers
from ftsgd.data.overlap import check_split_overlap
from ftsgd.data.scan import preflight_scan
from ftsgd.data.split import find_splits, split_record
from ftsgd.data.transforms import build_transform, small_image_warnings
from ftsgd.errors import FtsgdError, Interrupted, RunError
from ftsgd.infer.evaluate import evaluate
from ftsgd.infer.export import export_model
from ftsgd.infer.metrics import aggregate_splits, selection_value
from ftsgd.model.build import classifier_modules
from ftsgd.model.freeze import train_mode
from ftsgd.model.optim import StepInBackward, build_optimizer, set_lr
from ftsgd.model.prepare import PreparedModel, lora_message, prepare_model, refreeze
from ftsgd.model.rounding import RoundingStream
from ftsgd.recipe.checks import select_metric
from ftsgd.recipe.schema import Recipe
from ftsgd.run.checks import (
    check_device,
    check_evaluated,
    check_model_named,
    check_parallel_model,
    check_stages,
)
from ftsgd.run.resume import check_same_data, join_job_with
from ftsgd.run.rundir import RunDir
from ftsgd.train.collapse import collapse_warning
from ftsgd.train.exits import StopSignals, compile_error, diverged_error, job_error, oom_error
from ftsgd.train.parallel import (
    full_model_state,
    merge_running_stats,
    no_sync,
    shard_model,
    snapshot_running_stats,
    wrap_ddp,
)
from ftsgd.train.precision import precision_words, started_amp
from ftsgd.train.regularisation import build_ema, build_loss, build_mixup, hard_labels, mix_batch, mix_seed
from ftsgd.train.requeue import requeue_task
from ftsgd.train.skew import class_counts, class_weights, skew_warnings
from ftsgd.train.stages import Stages
from ftsgd.train.state import RunState, checkpoint_payload, restore_rng, restore_weights, versions
from ftsgd.train.tracking import Trackers
from ftsgd.utils.console import TrainingProgress, training_progress, warn
from ftsgd.utils.device import (
    amp_name,
    autocast,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_amp,
)
from ftsgd.utils.distributed import (
    World,
    all_ranks,
    all_reduce_sum,
    barrier,
    local_tensor,
    max_over_ranks,
    seed_rank,
)

__all__ = ["Trainer"]


class Trainer:
    """Fine-tune ``recipe.model`` on ``recipe.data`` into the run directory ``out``.

    Args:
        recipe: A validated recipe with ``model.name`` and ``data.root`` set.
        out: The run directory (must be new unless ``resume``; the caller checks).
        resume: Continue from ``out/checkpoint.pt``.
        quiet: Print nothing but warnings and errors.
        argv: The command line, recorded in summary.json.
        max_steps: Stop once this many optimizer steps are done in total (0: no limit), after writing a
            checkpoint; ``--resume`` continues from there. Lets a cron job train in bounded slices.
        allow_new_images: When resuming, accept a dataset that only gained images since the run
            started (any other change to the data is refused).
    """

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        *,
        resume: bool = False,
        quiet: bool = False,
        argv: list[str] | None = None,
        max_steps: int = 0,
        allow_new_images: bool = False,
    ) -> None:
        check_model_named(recipe)
        self.recipe, self.run, self.resume = recipe, RunDir(out), resume
        self.argv = list(argv if argv is not None else sys.argv)
        self.max_steps, self.allow_new_images = max_steps, allow_new_images
        self._join_job()
        self.quiet = quiet or not self.world.is_main  # only rank 0 prints
        self.stages = Stages.plan(recipe)
        self.state = RunState()
        self.signals = StopSignals(self.world.distributed)
        self.tracker = Trackers(recipe.train, quiet=self.quiet)
        self._saved_step: int | None = None
        self._data_changed = False
        self._progress: TrainingProgress | None = None
        self._is_setup = False

    # ------------------------------------------------------------------------------------ set-up

    def _join_job(self) -> None:
        """Join the ``torchrun`` job this process belongs to (a plain one-process World without one),
        and settle where and in what precision it computes.

        What a job cannot do is refused before any process group exists, what the device's precision
        or FSDP cannot do as soon as they are known (:mod:`ftsgd.run.checks`).
        """
        t = self.recipe.train
        self.world: World = join_job_with(self.recipe)
        self.sharded = t.shard and self.world.distributed
        self.device = self.world.device
        # evaluation, the export and the checkpoint use it too; a resumed run continues in its own (setup)
        self.amp_dtype = resolve_amp(t.amp, self.device, t.weight_dtype)
        check_device(self.recipe, self.amp_dtype, self.sharded)

    def setup(self) -> None:
        """Scan the data, build the model and the optimizer, and restore the checkpoint when resuming.

        The checkpoint is opened first and the images are decoded before the model is built, so a
        missing checkpoint or a bad file fails in seconds, not after minutes of model building.
        """
        ckpt = self.run.read_checkpoint() if self.resume else None
        if ckpt is not None:  # the precision the run started with, before anything computes or scales
            self.amp_dtype = started_amp(ckpt, self.recipe.train.amp, self.device, self.run.checkpoint)
            check_device(self.recipe, self.amp_dtype, self.sharded)
        self.state.stage = int(ckpt["state"].get("stage", 0)) if ckpt is not None else 0
        self._setup_data()
        self._setup_model(from_checkpoint=ckpt is not None)
        self._setup_regularisation()
        self._setup_optimizer()
        check_stages(self.prepared, self.recipe, self.state.stage)  # every stage works, before any step
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            self._saved_step = self.state.global_step
        self._is_setup = True

    def _setup_data(self) -> None:
        recipe, t = self.recipe, self.recipe.train
        # a split drawn from one folder of class folders is read back from the run's record, never redrawn
        recorded = self.run.read_split() if self.resume else None
        self.class_names, splits = find_splits(recipe.data, recorded=recorded)
        self.split_record = split_record(recipe.data, self.class_names, splits)
        for message in ignored_warnings(splits, recipe.data.root):
            warn(message)
        check_evaluated(recipe, [name for name in splits if name != "train"], self.class_names)
        check_split_overlap(splits, allowed=recipe.data.allow_split_overlap)
        self.fingerprint = fingerprint(self.class_names, splits)
        if self.resume:
            root, grown = recipe.data.root, self.allow_new_images
            self._data_changed = check_same_data(self.run, self.fingerprint, root, allow_new_images=grown)
        # "skip" must drop bad files before the epoch order (a function of the sample list) exists.
        splits, self.skipped = preflight_scan(
            splits,
            on_bad_image=recipe.data.on_bad_image,
            root=recipe.data.root,
            train_split="train",
            shard=(self.world.rank, self.world.size) if self.world.distributed else None,
        )
        self.splits = splits
        self.train_split = splits["train"]
        self.eval_splits = {name: s for name, s in splits.items() if name != "train"}
        self.class_counts = class_counts(self.train_split, len(self.class_names))
        for message in skew_warnings(recipe, self.class_names, self.class_counts):
            warn(message)
        self.steps_per_epoch = epoch_steps(len(self.train_split), t.batch_size, recipe.data.drop_last)
        self.eval_batch = t.micro_batch_size or t.batch_size
        # images per forward pass; several processes share each global batch (data.batch_shard)
        self.micro = min(self.eval_batch, math.ceil(t.batch_size / self.world.size))
        self.workers = resolve_num_workers(recipe.data.num_workers)
        self.pin_memory = recipe.data.pin_memory and self.device.type == "cuda"

    def _setup_model(self, *, from_checkpoint: bool) -> None:
        t = self.recipe.train
        torch.manual_seed(t.seed)  # seeds the new head's (and a random init's) weights too
        random.seed(t.seed)
        self.prepared: PreparedModel = prepare_model(
            self.stage_recipe, len(self.class_names), from_checkpoint=from_checkpoint
        )
        self.model = self.prepared.model
        self.sync_bn = self._use_sync_batchnorm()
        self.place_model()
        self.wrapped = self._parallelize()
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        data_config, data = self.prepared.data_config, self.recipe.data
        self.train_transform = build_transform(data_config, data.augment, training=True, data=data)
        self.eval_transform = build_transform(data_config, "none", training=False)
        for message in small_image_warnings(self.train_split, data_config, data):
            warn(message)

    def place_model(self) -> None:
        """Move the model to the training device (and memory format); out of memory is a clear error."""
        try:
            if not self.sharded:  # fully_shard moves one block at a time, keeping only this process's slice
                self.model.to(self.device)
        except torch.OutOfMemoryError as exc:  # the weights alone do not fit
            raise oom_error(exc, self.recipe, self.run.checkpoint) from None
        if self.recipe.train.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _setup_regularisation(self) -> None:
        """Mixup/CutMix with its soft-target loss (else cross-entropy), and the weights' EMA when on."""
        self.mixup = build_mixup(self.recipe, len(self.class_names))
        weights = class_weights(self.recipe, self.class_counts)
        self.loss_fn = build_loss(self.recipe, self.mixup, weights).to(self.device)
        self.ema = build_ema(self.model, self.recipe)

    def _use_sync_batchnorm(self) -> bool:
        """SyncBatchNorm when it gives the statistics one process computes: on CUDA, with BatchNorm layers,
        when the micro-batch is the whole global batch (``train.micro_batch_size`` 0) spread over the processes.

        Otherwise every micro-batch is on one process and plain BatchNorm already normalises it exactly
        as one process does (running statistics are recombined by :func:`ftsgd.parallel.merge_running_stats`).
        """
        spread = self.micro < self.eval_batch == self.recipe.train.batch_size
        return self.world.distributed and self.device.type == "cuda" and self._has_batchnorm() and spread

    def _has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    def _parallelize(self) -> nn.Module:
        """The module the steps call: the model itself, the model under DDP, or the model sharded by FSDP2."""
        if not self.world.distributed:
            return self.model
        check_parallel_model(self.model, self.recipe.model.name)
        if self.world.rank:  # rank 0 keeps a one-process run's stream (dropout, drop-path)
            seed_rank(self.recipe.train.seed, self.world.rank)
        if self.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.sharded:
            shard_model(self.model, self.world)
            return self.model
        return wrap_ddp(self.model, self.world)

    def _setup_optimizer(self) -> None:
        """The optimizer, and with bf16 weights the stream its rounding draws from (a function of the step)."""
        bf16 = self.recipe.train.weight_dtype == "bf16"
        self.rounding = RoundingStream.for_model(self.model, self.recipe.train.seed) if bf16 else None
        self._build_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_optimizer(self) -> None:
        """A fresh optimizer over what the current stage trains (replacing, and unhooking, any earlier one)."""
        if isinstance(getattr(self, "optimizer", None), StepInBackward):
            self.optimizer.remove_hooks()
        embedding = self.prepared.embedding
        self.optimizer = build_optimizer(
            self.model,
            self.stage_recipe.optim,
            embedding=embedding.modules,
            classifier=classifier_modules(self.model, embedding.execution_order),
            stream=self.rounding,
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------ stages

    @property
    def stage_recipe(self) -> Recipe:
        """The recipe of the stage in effect (the recipe itself when it has no [[stage]] tables)."""
        return self.stages.recipes[self.state.stage]

    def _enter_stage(self, index: int) -> None:
        """Switch to stage ``index``: its freeze, a fresh optimizer over what it trains, its schedule.

        Parameters frozen by the previous stage but not by this one train again; the optimizer starts
        with fresh state (no momentum or Adam moments carried over), as the paper's LP-FT starts its
        fine-tuning; the learning rate follows the stage's own schedule from its first epoch
        (:meth:`current_lr`). Nothing here draws random numbers, so a resumed run enters alike.
        """
        self.model.zero_grad(set_to_none=True)  # no stale gradient on a parameter this stage freezes
        self.state.stage = index
        self.prepared = refreeze(self.prepared, self.stage_recipe.freeze)
        if self.world.distributed:  # DDP all-reduces only what trained when it was built: build it anew
            self.wrapped = wrap_ddp(self.model, self.world)
            self.forward = torch.compile(self.wrapped) if self.recipe.train.compile else self.wrapped
        self._build_optimizer()
        self._progress_or_quiet().message(self.stages.message(index, self.prepared))

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Write everything a resumed run needs; a no-op when this very state is already on disk."""
        if self._saved_step == self.state.global_step:
            return
        self.check_finite()
        self.tracker.flush()  # the trackers hold at least what the checkpoint has seen
        payload = checkpoint_payload(
            self.model,
            self.optimizer,
            self.scaler,
            self.state,
            self.ema,
            sharded=self.sharded,
            distributed=self.world.distributed,
            amp=amp_name(self.amp_dtype),
        )
        if self.world.is_main:  # the other processes write nothing
            self.run.save_checkpoint(payload)
        self._saved_step = self.state.global_step

    def load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Restore model, optimizer, scaler, counters and RNGs from a checkpoint (emptied as it is read)."""
        restore_weights(ckpt, self.model, self.optimizer, self.ema, self.run.checkpoint, sharded=self.sharded)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["state"])
        restore_rng(ckpt, self.world.rank, self.recipe.train.seed)

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any] | None:
        """Train the remaining epochs and write the summary.

        Returns:
            The summary (also written to ``summary.json``), or None when ``max_steps`` stopped the run
            before its end (a checkpoint is saved; ``--resume`` continues).
        """
        if not self._is_setup:
            self.setup()
        self._start_run()
        progress = training_progress(
            self.quiet,
            epochs=self.stages.total_epochs,
            steps_per_epoch=self.steps_per_epoch,
            select_by=self.recipe.train.select_by,
        )
        with progress, self.tracker, self.signals.caught(), self._run_errors():
            self._progress = progress
            progress.message(self._start_message())
            while not self.finished():
                if not self.train_epoch():
                    return None
                self.end_epoch(self.evaluate())
                if not self.finished() and (self.signals.pending() or self._max_steps_reached()):
                    if self.signals.pending():
                        raise self._interrupted()
                    return None
            if self.stopped_early():
                progress.message(self._stop_message())
            return self._write_summary()

    def _write_summary(self) -> dict[str, Any]:
        """``summary.json``, then the same summary and the run's files to the trackers (rank 0 writes)."""
        summary = self.summary()
        best = self.state.history[self.state.best_epoch - 1] if self.state.best_epoch else None
        collapsed = collapse_warning(best) if best is not None else None
        if collapsed:
            summary["warnings"] = [*summary.get("warnings", []), collapsed]
            if self.world.is_main:
                warn(collapsed)
        if self.world.is_main:
            self.run.write_summary(summary)
            self.tracker.finish(summary)
        return summary

    def _start_run(self) -> None:
        """Write what a run holds before its first step: recipe and data fingerprint, or tidy up a resumed run."""
        if not self.world.is_main:  # only rank 0 writes the run directory
            return
        if self.resume:
            self.run.remove_stale_temps()
            # drop the lines of an epoch the checkpoint never saw finish
            self.run.write_metrics(self.state.history)
        else:
            self.run.start(self.recipe)
            if self.split_record is not None:
                self.run.write_split(self.split_record)
        if self._data_changed or not self.resume:
            self.run.write_dataset(self.fingerprint)
        resume_step = self.state.global_step if self.resume else None
        self.tracker.open(self.run.path, self.recipe, resume_step=resume_step, history=self.state.history)
        self.run.write_skipped(self.skipped)
        if self.skipped:
            warn(
                f'skipped {len(self.skipped)} unreadable image(s) (data.on_bad_image = "skip"); '
                f"they are listed in {self.run.skipped}"
            )

    def train_epoch(self) -> bool:
        """Run the rest of the current epoch's steps.

        Returns:
            False when ``max_steps`` stopped the run mid-epoch (after saving a checkpoint).
        """
        epoch = self.state.epoch
        if self.stages.at(epoch) != self.state.stage:
            self._enter_stage(self.stages.at(epoch))
        self._progress_or_quiet().start_epoch(epoch, self.state.step_in_epoch, self.current_lr())
        train_mode(self.model)
        tick = time.perf_counter()
        for x, y in self.train_loader():
            lr = self.current_lr()
            set_lr([self.optimizer], lr)  # type: ignore[list-item]
            n = self.batch_len()
            loss_sum, correct = self.step(x, y, n)
            tick = self._record_step(loss_sum, correct, n, lr, tick)
            if self._pause_mid_epoch():
                return False
        self.check_finite()
        return True

    def step(self, x: torch.Tensor, y: torch.Tensor, n: int | None = None) -> tuple[float, int]:
        """One optimizer step over a batch, as micro-batches whose gradients add up to the batch mean.

        Args:
            x, y: The batch, or in a multi-process job this process's part of the global batch
                (:func:`ftsgd.data.batch_shard`; blank images without labels when it has none).
            n: Images in the global batch (default ``len(y)``).

        Returns:
            The summed loss over the (global) batch's images and the number predicted correctly.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.rounding is not None:  # this step's random bits, on every process alike
            self.rounding.step = self.state.global_step
        if self.mixup is not None and len(y):  # soft targets from here on: timm's SoftTargetCrossEntropy
            x, y = self.mix(x, y)
        n = len(y) if n is None else n
        loss_total = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        running = snapshot_running_stats(self.model) if self.world.distributed and not self.sync_bn else None
        chunks = list(zip(x.split(self.micro), y.split(self.micro), strict=True)) if len(y) else [(x, y)]
        for i, (xs, ys) in enumerate(chunks):
            xs, ys = self._to_device(xs), ys.to(self.device, non_blocking=True)
            with no_sync(self.wrapped, last=i == len(chunks) - 1):
                with autocast(self.device, self.amp_dtype):
                    logits = self.forward(xs[:0] if self.sync_bn and not len(ys) else xs)
                loss = self.loss_fn(logits.float(), ys) if len(ys) else logits.float().sum() * 0.0
                self.scaler.scale(loss * self._loss_weight(len(ys), n)).backward()
            loss_total += loss.detach() * len(ys)
            correct += (logits.detach()[: len(ys)].argmax(dim=1) == hard_labels(ys)).sum()
        if running is not None:
            part = batch_shard(n, self.micro, self.world.rank, self.world.size)
            merge_running_stats(running, part.first, part.count, part.total)
        if not isinstance(self.optimizer, StepInBackward):  # which already updated during backward
            if self.recipe.train.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, self.recipe.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step + 1)
        if self.world.distributed:
            return self._reduce_step_stats(loss_total, correct)
        # both statistics in one device-to-host copy: one GPU sync per step, not two
        loss_sum, hits = torch.stack([loss_total.double(), correct.double()]).tolist()
        return loss_sum, int(hits)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix of a batch, seeded by ``(train.seed, epoch, step)`` so a resumed run mixes alike."""
        assert self.mixup is not None
        seed = mix_seed(self.recipe.train.seed, self.state.epoch, self.state.step_in_epoch)
        return mix_batch(self.mixup, x, y, seed)

    def _loss_weight(self, images: int, n: int) -> float:
        """The factor on a micro-batch's mean loss that makes the step's gradient the global batch mean.

        DDP and FSDP average the processes' gradients (divide by their number), so in a job each
        process's share is scaled up by the number of processes: the all-reduced gradient is then the
        one-process gradient of the global batch mean.
        """
        weight = images / n
        return weight * self.world.size if self.world.distributed else weight

    def _reduce_step_stats(self, loss_total: torch.Tensor, correct: torch.Tensor) -> tuple[float, int]:
        """The global batch's summed loss and hits, and the stop signal every process agrees on.

        One small all-reduce per step carries both: a SIGINT/SIGTERM that reached any process stops all
        of them after the same step, so they save one consistent checkpoint.
        """
        packed = torch.cat(
            [
                torch.stack([loss_total.double(), correct.double()]),
                torch.tensor(self.signals.flags(), dtype=torch.float64, device=self.device),
            ]
        )
        loss_sum, hits, *summed = all_reduce_sum(packed).tolist()
        self.signals.agree(summed)
        return loss_sum, round(hits)

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Accuracy, loss and per-class accuracy of the current weights (their EMA when on) on every split."""
        results = {name: self.evaluate_split(split) for name, split in self.eval_splits.items()}
        return {**results, **aggregate_splits(results)}  # worst and mean over 2+ splits besides val

    def evaluate_split(self, split: Split) -> dict[str, Any]:
        """:func:`ftsgd.evaluate.evaluate` on one split, on the run's device in the run's precision (as ``ftsgd eval``)."""
        return evaluate(
            self.ema.module if self.ema is not None else self.forward,
            self.eval_loader(split),
            device=self.device,
            class_names=self.class_names,
            amp_dtype=self.amp_dtype,
            channels_last=self.recipe.train.channels_last,
        )

    def end_epoch(self, results: dict[str, dict[str, Any]]) -> None:
        """Record the finished epoch, export the weights when it is the best so far, and checkpoint."""
        state = self.state
        record = self._epoch_record(results)
        best = self.improves(results)
        if best:
            state.best_accuracy, state.best_epoch = results["val"]["accuracy"], state.epoch + 1
            self.export()
        # evaluation and export included; in a job the busiest process's
        record["peak_memory_bytes"] = max_over_ranks(peak_memory_bytes(self.device), self.device)
        state.history.append(record)
        self.tracker.epoch(record)
        state.next_epoch()
        self._saved_step = None  # the epoch's end is a new state even at the same global step
        self.save_checkpoint()
        if self.world.is_main:
            self.run.write_metrics(state.history)
        reset_peak_memory(self.device)
        self._progress_or_quiet().end_epoch(record, best)

    def export(self) -> None:
        """Write the current weights (their EMA when on) as ``model.safetensors`` + ``config.json``.

        Rank 0 writes; under FSDP every process first takes part in gathering the whole state.
        """
        state = full_model_state(self.model, sharded=True) if self.sharded else None
        if not self.world.is_main:
            return
        export_model(
            self.ema.module if self.ema is not None else self.model,
            self.run.weights,
            state_dict=state,
            architecture=self.recipe.model.name,
            class_names=self.class_names,
            data_config=self.prepared.data_config,
            recipe_name=self.recipe.name,
            model_kwargs=dict(self.recipe.model.kwargs),
            amp=amp_name(self.amp_dtype),
            training_weight_dtype=self.recipe.train.weight_dtype,
        )

    # ------------------------------------------------------------------------------------ selection

    def selected_value(self, splits: dict[str, dict[str, Any]]) -> float:
        """The ``train.select_by`` metric in one epoch's split results."""
        split, metric = select_metric(self.recipe.train.select_by)
        return float(selection_value(splits, split, metric))

    def improves(self, results: dict[str, dict[str, Any]]) -> bool:
        """Whether an epoch's results beat the best epoch so far (ties keep the earlier epoch).

        Only the last stage's epochs compete (earlier stages prepare the model it fine-tunes, e.g. a
        linear probe), so a staged run exports one of its last stage's epochs.
        """
        state = self.state
        if state.epoch < self.stages.last_start:
            return False
        if not state.best_epoch:
            return True
        value = self.selected_value(results)
        best = self.selected_value(state.history[state.best_epoch - 1]["splits"])
        return value < best if self.recipe.train.select_by.endswith(".loss") else value > best

    def stopped_early(self) -> bool:
        """Whether ``train.patience`` epochs passed without improvement before the last epoch."""
        state, t = self.state, self.recipe.train
        since = max(state.best_epoch, self.stages.last_start)  # counted within the last stage
        return (
            bool(t.patience) and state.epoch < self.stages.total_epochs and state.epoch - since >= t.patience
        )

    def finished(self) -> bool:
        """Every epoch trained, or stopped early by ``train.patience``."""
        return self.state.epoch >= self.stages.total_epochs or self.stopped_early()

    def _stop_message(self) -> str:
        t, state = self.recipe.train, self.state
        return (
            f"stopped early after epoch {state.epoch}/{self.stages.total_epochs}: {t.select_by} did not improve for "
            f"{t.patience} epoch(s) (train.patience); best epoch {state.best_epoch}"
        )

    # ------------------------------------------------------------------------------------ loop helpers

    def current_lr(self, step: int | None = None) -> float:
        """The learning rate at the current epoch and ``step`` (default: the current step): a pure function.

        Each stage has its own schedule over its own epochs, counted from the stage's first epoch.
        """
        step = self.state.step_in_epoch if step is None else step
        return self.stages.lr(self.state.epoch, step, self.steps_per_epoch)

    @functools.cached_property
    def loaders(self) -> RunLoader:
        """The run's one DataLoader, whose worker processes serve every epoch and evaluation split."""
        return RunLoader(
            (self.train_split, self.train_transform),
            self.eval_splits,
            self.eval_transform,
            seed=self.recipe.train.seed,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            input_size=tuple(self.prepared.data_config["input_size"]),
            balanced=self.recipe.data.sampler == "balanced",
        )

    def train_loader(self) -> DataLoader:
        """The current epoch's batches from the current step on (order and augmentation are seeded)."""
        return self.loaders.train_epoch(
            self.state.epoch,
            batch_size=self.recipe.train.batch_size,
            start_batch=self.state.step_in_epoch,
            drop_last=self.recipe.data.drop_last,
            shard=self._shard(self.micro),
        )

    def batch_len(self, step: int | None = None) -> int:
        """Images in the global batch of ``step`` of the current epoch (default: the current step)."""
        step = self.state.step_in_epoch if step is None else step
        return min(self.recipe.train.batch_size, len(self.train_split) - step * self.recipe.train.batch_size)

    def _shard(self, chunk: int) -> tuple[int, int, int] | None:
        """``build_loader``'s ``shard`` for this process of a job (None in a one-process run)."""
        return (chunk, self.world.rank, self.world.size) if self.world.distributed else None

    def eval_loader(self, split: Split) -> DataLoader:
        """One of ``eval_splits`` in file order, without augmentation (in a job: this process's part of each batch)."""
        batch = max(self.eval_batch, 1)
        name = next(n for n, s in self.eval_splits.items() if s is split)
        return self.loaders.evaluation(name, batch_size=batch * self.world.size, shard=self._shard(batch))

    def check_finite(self) -> None:
        """Refuse weights that became NaN/inf: they are never saved, evaluated or exported.

        Without a GradScaler an inf gradient is applied as is, so the weights are checked at every
        checkpoint and epoch end. Min and max are finite exactly when every value is (NaN propagates
        through both); unlike ``isfinite(p).all()``, ``aminmax`` allocates no parameter-sized
        temporaries (on ViT-L those raised the peak by ~0.3-0.6 GiB).
        """
        local = [local_tensor(p.detach()) for p in self.trainable]  # an FSDP process checks its slice
        extremes = [torch.stack(torch.aminmax(t)) for t in local if t.numel()]
        finite = not extremes or bool(torch.isfinite(torch.cat(extremes)).all().item())
        if not all_ranks(finite, self.device):
            where = f"at epoch {self.state.epoch + 1}, global step {self.state.global_step}"
            raise self._diverged_error("the weights became NaN or inf", where)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.recipe.train.channels_last else x

    def _record_step(self, loss_sum: float, correct: int, n: int, lr: float, tick: float) -> float:
        """Count a finished step into the epoch's sums and show progress; returns the new time mark."""
        state = self.state
        if not math.isfinite(loss_sum):
            where = f"at epoch {state.epoch + 1}, step {state.step_in_epoch + 1} (global step {state.global_step + 1})"
            raise self._diverged_error(f"training loss became {loss_sum / n}", where)
        now = time.perf_counter()
        state.epoch_seconds += now - tick
        state.step_in_epoch += 1
        state.global_step += 1
        state.epoch_loss_sum += loss_sum
        state.epoch_correct += correct
        state.epoch_seen += n
        ips = state.epoch_seen / max(state.epoch_seconds, 1e-9)
        self.tracker.step(state.global_step, loss_sum / n, correct / n, lr)
        self._progress_or_quiet().step(state.epoch, state.step_in_epoch, loss_sum / n, lr, ips)
        return now

    def _pause_mid_epoch(self) -> bool:
        """After a step inside an epoch: checkpoint when due; True when ``max_steps`` stops the run here.

        At an epoch's last step nothing happens here: :meth:`end_epoch` evaluates and checkpoints.
        """
        if self.state.step_in_epoch == self.steps_per_epoch:
            return False
        every = self.recipe.train.checkpoint_every
        stop = self._max_steps_reached()
        if stop or (every and self.state.global_step % every == 0):
            self.save_checkpoint()
        if self.signals.pending():
            raise self._interrupted()
        return stop

    def _max_steps_reached(self) -> bool:
        return bool(self.max_steps) and self.state.global_step >= self.max_steps

    def _epoch_record(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        state = self.state
        keep = ("accuracy", "top5", "loss", "n", "macro_f1", "balanced_accuracy")
        return {
            "epoch": state.epoch + 1,
            **self.stages.fields(self.state.stage),
            "step": state.global_step,
            "lr": self.current_lr(step=self.steps_per_epoch - 1),  # the epoch's last step's rate
            "train_loss": state.epoch_loss_sum / max(state.epoch_seen, 1),
            "train_accuracy": state.epoch_correct / max(state.epoch_seen, 1),
            "splits": {name: {k: r[k] for k in keep if k in r} for name, r in results.items()},
            # each class's accuracy, precision, recall, F1 and images, per split
            "per_class": {name: r["per_class"] for name, r in results.items() if "per_class" in r},
            "images_per_s": state.epoch_seen / max(state.epoch_seconds, 1e-9),
            "epoch_time_s": state.epoch_seconds,
        }

    def _progress_or_quiet(self) -> TrainingProgress:
        if self._progress is None:  # steps driven directly (tests, embedding code): print nothing
            self._progress = TrainingProgress("quiet", epochs=self.stages.total_epochs, steps_per_epoch=1)
        return self._progress

    def _start_message(self) -> str:
        if self.resume and self.state.epoch >= self.stages.total_epochs:
            return f"finishing {self.run.path}: every epoch was trained; writing the summary"
        if self.resume:
            return (
                f"resuming {self.run.path} at epoch {self.state.epoch + 1}, "
                f"step {self.state.step_in_epoch}/{self.steps_per_epoch}"
            )
        p = self.prepared
        amp = f", {precision_words(self.amp_dtype)}"
        notes = (f"\nclassifier: {p.head}" if p.head else "") + lora_message(self.recipe.lora, p.lora_targets)
        return (
            f"{self.recipe.model.name}: {len(self.class_names)} classes, {len(self.train_split)} training images, "
            f"frozen {len(p.frozen)} tensors ({p.frozen_params:,} of {p.total_params:,} parameters, policy "
            f"{self.stage_recipe.freeze.policy}), device {self.device.type}{amp}{self._job_message()}"
            + (f"\n{self.stages.message(self.state.stage, p)}" if self.recipe.stages else "")
        ) + notes

    def _job_message(self) -> str:
        """How a multi-process job splits the work ("" for one process), and what BatchNorm then computes."""
        if not self.world.distributed:
            return ""
        how = "FSDP2, sharded" if self.sharded else "DDP"
        text = f"; {self.world.size} processes ({how}, {self.world.backend}), {self.micro} images per forward pass"
        if self.sync_bn:
            text += "; SyncBatchNorm"
        elif self.micro < self.eval_batch and self._has_batchnorm():
            warn(
                f"BatchNorm statistics are computed over micro-batches of {self.micro} images (the batch shared "
                f"by {self.world.size} processes), as one process does with train.micro_batch_size = {self.micro}"
                + (" (SyncBatchNorm needs CUDA)" if self.device.type != "cuda" else "")
                + f"; set train.micro_batch_size to at most {self.micro} for the same results with any number "
                "of processes"
            )
        return text

    # ------------------------------------------------------------------------------------ results

    def summary(self) -> dict[str, Any]:
        """The run's results at its best epoch, its set-up and provenance (``summary.json``)."""
        recipe, state = self.recipe, self.state
        best = state.history[state.best_epoch - 1] if state.best_epoch else state.history[-1]
        return {
            "run_dir": str(self.run.path),
            "recipe": recipe.name,
            "model": recipe.model.name,
            "weights": recipe.model.weights or None,
            "data": recipe.data.root,
            "classes": self.class_names,
            "num_classes": len(self.class_names),
            "split_sizes": {name: len(s) for name, s in self.splits.items()},
            "epochs": self.stages.total_epochs,
            "steps": state.global_step,
            "best_epoch": state.best_epoch,
            "select_by": recipe.train.select_by,
            "best_value": self.selected_value(best["splits"]),
            "stopped_early": self.stopped_early(),
            "stop_epoch": state.epoch if self.stopped_early() else None,
            "weights_exported": "ema" if self.ema is not None else "raw",
            "val_split": "val",
            "val_accuracy": best["splits"]["val"]["accuracy"] if "val" in best["splits"] else None,
            "best": best["splits"],
            "final": state.history[-1]["splits"],
            "freeze_policy": self.stages.recipes[-1].freeze.policy,  # the stage the exported epoch is from
            **self.prepared.freeze_report(),
            "optimizer": self.stages.recipes[-1].optim.name,
            "lr": self.stages.recipes[-1].optim.lr,
            **(
                {"stages": self.stages.summaries(state.history, self.selected_value)} if recipe.stages else {}
            ),
            "device": str(self.device),
            "processes": self.world.size,
            "sharded": self.sharded,
            "amp": amp_name(self.amp_dtype),
            "weight_dtype": recipe.train.weight_dtype,
            **(
                {"update_rounding": recipe.optim.update_rounding}
                if recipe.train.weight_dtype == "bf16"
                else {}
            ),
            "input_size": list(self.prepared.data_config["input_size"]),
            "train_time_s": state.train_seconds,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in state.history),
            "model_file": self.run.weights.name,
            "command": shlex.join(["ftsgd", *self.argv[1:]]),  # as typed, whether via `python -m ftsgd`
            "versions": versions(),
            "skipped_images": len(self.skipped),
        }

    # ------------------------------------------------------------------------------------ errors

    @contextmanager
    def _run_errors(self) -> Iterator[None]:
        """The one place where failures of a running fine-tune become user-facing errors (:mod:`.exits`)."""
        try:
            yield
        except FtsgdError:
            raise
        except torch.OutOfMemoryError as exc:
            raise oom_error(exc, self.recipe, self.run.checkpoint) from None
        except Exception as exc:
            name = self.recipe.model.name
            if self.world.distributed:
                error = job_error(exc, name, self.run.checkpoint, self.resume_command())
                if error is not None:
                    raise error from exc
            elif self.signals.received:  # e.g. a DataLoader worker killed by the same Ctrl-C
                raise self._interrupted() from None
            if self.recipe.train.compile and (error := compile_error(exc, name)) is not None:
                raise error from exc
            raise

    def _interrupted(self) -> Interrupted:
        """Save a checkpoint and describe how to continue, for the first SIGINT/SIGTERM."""
        self.save_checkpoint()
        barrier()  # no process of a job exits (and makes torchrun stop the others) before the file is written
        signum = self.signals.pending() or self.signals.received
        name = signal.Signals(signum).name
        state = self.state
        self._progress_or_quiet().message(
            f"{name}: checkpoint saved at epoch {state.epoch + 1}, step {state.step_in_epoch}"
        )
        requeued = requeue_task(signum) if self.world.rank == 0 else ""
        return Interrupted(
            f"interrupted by {name}; checkpoint saved{'; ' + requeued if requeued else ''}. Resume with:\n"
            f"  {self.resume_command()}",
            signum,
        )

    def resume_command(self) -> str:
        """The command that continues this run (under torchrun with the job's own torchrun options)."""
        command = self.run.resume_command(self.recipe.data.root)
        if not self.world.distributed:
            return command
        return f"torchrun <the same torchrun options> -m {command}"

    def _diverged_error(self, what: str, where: str) -> RunError:
        """The message for a run whose loss or weights stopped being finite."""
        return diverged_error(what, where, self._saved_step, self.run.checkpoint)
