"""Declarative TOML recipes: schema, loading, ``--set`` overrides, validation and dumping.

A recipe is a TOML file with the sections ``[model]``, ``[freeze]``, ``[optim]``, ``[schedule]``,
``[data]`` and ``[train]``. Every key has a default, so a recipe only states what it changes; a
``base = "NAME"`` key at the top starts from a built-in recipe instead of the defaults.

Parsing goes raw TOML -> merged dict (defaults <- base <- file <- ``--set``) -> frozen dataclasses.
All problems (unknown keys, wrong types, impossible values, conflicting options) are collected and
reported together, each naming its TOML key path, because a user fixing a recipe should not have to
re-run once per mistake.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ftsgd.errors import RecipeError

FREEZE_POLICIES = ("none", "embed", "embed+stage1", "stem", "head")
SCHEDULES = ("cosine", "constant", "step")
SCHEDULE_INTERVALS = ("epoch", "step")
AUGMENTS = ("rrc_flip", "flip", "none")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "bf16", "fp16", "none")
BAD_IMAGE_ACTIONS = ("error", "skip")


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build and where its pretrained weights come from."""

    name: str = ""
    """timm model name (``--model``). Required by every command that builds a model."""
    weights: str = ""
    """Local weights file (``--weights``): .safetensors, or .pth/.pt/.bin read with weights_only=True."""
    pretrained: bool = False
    """Use timm's own hub download (needs internet); prefer ``weights`` offline."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``)."""


@dataclass(frozen=True)
class FreezeConfig:
    """Which parameters stay fixed during fine-tuning."""

    policy: str = "none"
    """none | embed | embed+stage1 | stem | head (see the README's freeze policy table)."""
    patterns: list[str] = field(default_factory=list)
    """Extra parameter names to freeze: globs (``blocks.0.*``) or regexes prefixed ``re:``."""
    trainable: list[str] = field(default_factory=list)
    """Parameter names kept trainable even when the policy or ``patterns`` would freeze them."""


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer; frozen parameters are never handed to it."""

    name: str = "sgd"
    """sgd | adamw | any optimizer name timm's ``create_optimizer_v2`` knows."""
    lr: float = 1e-3
    momentum: float = 0.9
    """SGD momentum in [0, 1); 0 keeps no optimizer state (8 bytes/parameter)."""
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_bias_and_norm: bool = False
    """Apply weight decay to biases and normalisation parameters too (timm's default is to skip them)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    step_in_backward: bool = False
    """Apply each parameter's update as soon as its gradient is ready and free the gradient."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule."""

    name: str = "cosine"
    """cosine | constant | step."""
    interval: str = "epoch"
    """epoch (as the paper did) | step: how often the learning rate changes."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (fractions allowed with interval = "step")."""
    min_lr: float = 0.0
    """Learning rate the cosine schedule ends at."""
    decay_epochs: int = 10
    """step schedule: multiply the learning rate by ``decay_rate`` every this many epochs."""
    decay_rate: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    """Image-folder dataset layout, transforms and loading."""

    root: str = ""
    """Dataset folder holding the splits (``--data``)."""
    train: str = "train"
    """Training split: a folder under ``root`` (or an absolute path) with one sub-folder per class."""
    val: str = "val"
    """ID-validation split used to pick the best epoch."""
    eval_splits: list[str] = field(default_factory=list)
    """Extra evaluation splits; empty = every other split folder found under ``root``."""
    augment: str = "rrc_flip"
    """rrc_flip (random-resized-crop + flip) | flip | none."""
    img_size: int = 0
    """Input resolution; 0 = the model's own data config."""
    num_workers: int = -1
    """DataLoader worker processes; -1 = min(8, CPU count - 1)."""
    pin_memory: bool = True
    on_bad_image: str = "error"
    """error | skip: what the pre-flight scan does with unreadable images."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    epochs: int = 10
    batch_size: int = 32
    """Images per optimizer step."""
    micro_batch_size: int = 0
    """Images per forward/backward pass; 0 = batch_size. batch_size must be a multiple of it."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda."""
    amp: str = "auto"
    """auto (bf16 where supported, else fp16 on CUDA; fp32 on CPU) | bf16 | fp16 | none."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    label_smoothing: float = 0.0
    channels_last: bool = False
    grad_checkpointing: bool = False
    """timm's ``set_grad_checkpointing``: recompute activations in backward to save memory."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many optimizer steps; 0 = at the end of each epoch only."""


@dataclass(frozen=True)
class Recipe:
    """A whole fine-tuning recipe."""

    name: str = "custom"
    description: str = ""
    base: str = ""
    """Built-in recipe this one starts from (empty: the defaults)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def grad_accum_steps(self) -> int:
        """Number of micro-batches per optimizer step."""
        micro = self.train.micro_batch_size or self.train.batch_size
        return max(1, self.train.batch_size // micro)
