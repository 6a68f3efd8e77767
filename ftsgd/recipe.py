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
import itertools
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ftsgd.collect import STAGE_KEY, flatten_recipe
from ftsgd.errors import RecipeError

Checks = Callable[["Recipe"], list[str]]
"""A check run on a built recipe, returning one problem line per violation."""

DEFAULT_RECIPE = "sgd-freeze-embed"
"""The recipe `ftsgd train` and `ftsgd inspect` use when --recipe is not given."""

FREEZE_POLICIES = ("none", "embed", "embed+stage1", "stem", "head")
SCHEDULES = ("cosine", "constant", "step")
SCHEDULE_INTERVALS = ("epoch", "step")
AUGMENTS = ("rrc_flip", "flip", "none")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "bf16", "fp16", "none")
BAD_IMAGE_ACTIONS = ("error", "skip")
MIXUP_MODES = ("batch", "pair", "elem")
SELECT_METRICS = ("accuracy", "loss")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
"""``data.interpolation`` values (PIL's resampling filters, as timm names them)."""
ERASE_MODES = ("const", "rand", "pixel")
RESET_HEAD = "auto"
"""The default ``model.reset_head``: re-initialise the classifier only when it does not fit the task."""
MAX_BASE_DEPTH = 8
"""How many ``base`` recipes may stand behind a recipe (a longer chain is refused as a likely mistake)."""


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
    drop_path_rate: float = 0.0
    """Stochastic depth: timm's ``drop_path_rate`` (0 = off, the paper's setting); training only, not exported."""
    drop_rate: float = 0.0
    """Dropout before the classifier: timm's ``drop_rate`` (0 = off); training only, not exported."""
    reset_head: bool | str = RESET_HEAD
    """auto: re-initialise the classifier when the weights' class count is not the task's; true: always
    start a fresh classifier (the paper's protocol); false: keep the weights' classifier and refuse weights
    whose classifier does not fit."""


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
    """Peak learning rate (paper grids: SGD 3e-5..1e-2, AdamW 3e-7..1e-4)."""
    momentum: float = 0.9
    """SGD momentum in [0, 1); 0 keeps no optimizer state (8 bytes/parameter)."""
    nesterov: bool = False
    """Nesterov momentum (SGD)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay; the paper uses 0."""
    decay_bias_and_norm: bool = False
    """Apply weight decay to biases and normalisation parameters too (timm's default is to skip them)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Moment coefficients: Adam/AdamW always; other timm optimizers that take betas only when changed
    (else their own defaults, e.g. Lion's [0.9, 0.99]; Adan takes three). Refused for optimizers without."""
    eps: float = 1e-8
    """Denominator epsilon: Adam/AdamW always; other timm optimizers that take eps only when changed (else
    their own, e.g. LAMB's 1e-6). Refused for optimizers without."""
    step_in_backward: bool = False
    """Apply each parameter's update as soon as its gradient is ready and free the gradient: no full set
    of gradients ever exists (SGD without momentum then keeps ~4 bytes/parameter). Same weights as the
    normal step; not with gradient accumulation, train.grad_clip or train.amp = "fp16"."""
    layer_decay: float = 0.0
    """Layer-wise learning-rate decay in [0, 1]; 0 or 1 = off. The top trained layer (the classifier)
    keeps optim.lr, each layer below gets this factor once more (timm's group_matcher layers: one per
    block); frozen layers are not counted."""
    embed_lr_scale: float = 1.0
    """Multiplier on the embedding layer's learning rate (the paper's "0.2x LR on the embedding"
    baseline is 0.2); the embedding must be trainable (freeze.policy = "none")."""
    head_lr_scale: float = 1.0
    """Multiplier on the classifier's learning rate (e.g. 10 for a freshly initialised head)."""


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
    """step schedule: the factor applied every ``decay_epochs``."""


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
    """Pin host memory for faster copies to the GPU (ignored on CPU)."""
    on_bad_image: str = "error"
    """error | skip: what the pre-flight scan does with unreadable images."""
    mixup: float = 0.0
    """Mixup alpha for ``timm.data.Mixup`` (0 = off, the paper's setting; e.g. 0.8). Soft-target loss."""
    cutmix: float = 0.0
    """CutMix alpha for ``timm.data.Mixup`` (0 = off; e.g. 1.0). Soft-target loss."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch (or element, see ``mixup_mode``) when mixup or cutmix is on."""
    mixup_switch_prob: float = 0.5
    """With both mixup and cutmix on: probability of CutMix instead of Mixup."""
    mixup_mode: str = "batch"
    """batch | pair | elem: draw the mixing parameters per batch, per pair of images or per image."""
    mean: list[float] = field(default_factory=list)
    """Normalisation mean per RGB channel (e.g. [0.5, 0.5, 0.5]); [] = the model's own."""
    std: list[float] = field(default_factory=list)
    """Normalisation standard deviation per RGB channel; [] = the model's own."""
    crop_pct: float = 0.0
    """Evaluation centre crop: resize to input size / crop_pct, then crop (1.0 = no crop); 0 = the model's own."""
    interpolation: str = ""
    """Resize filter: nearest | bilinear | bicubic | box | hamming | lanczos; "" = the model's own."""
    rrc_scale: list[float] = field(default_factory=list)
    """rrc_flip: range of the random crop's area as a fraction of the image, e.g. [0.5, 1.0]; [] = timm's
    [0.08, 1.0]."""
    rrc_ratio: list[float] = field(default_factory=list)
    """rrc_flip: range of the random crop's aspect ratio; [] = timm's [0.75, 1.3333]."""
    hflip: float = 0.5
    """Probability of a horizontal flip in training (rrc_flip and flip); 0 for images whose mirror image means
    something else (digits, text)."""
    auto_augment: str = ""
    """rrc_flip: timm's RandAugment/AutoAugment/AugMix policy string ("rand-m9-mstd0.5", "augmix-m5-w4-d2",
    "original", ...) or "trivialaugment"; "" = off (the paper's setting)."""
    color_jitter: float = 0.0
    """rrc_flip: colour jitter strength (brightness, contrast and saturation, timm's color_jitter; e.g. 0.4);
    0 = off."""
    re_prob: float = 0.0
    """rrc_flip: random erasing probability per image (timm's RandomErasing; e.g. 0.25); 0 = off."""
    re_mode: str = "pixel"
    """Random erasing fill: const (zeros) | rand (one random colour per box) | pixel (random per pixel)."""
    re_count: int = 1
    """Random erasing: the most boxes erased per image."""
    drop_last: bool = False
    """Drop the last training batch of each epoch when it is smaller than train.batch_size."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    epochs: int = 10
    """Training epochs; the best epoch by ``select_by`` (default ID-validation accuracy) is exported."""
    batch_size: int = 32
    """Images per optimizer step."""
    micro_batch_size: int = 0
    """Images per forward/backward pass; 0 = batch_size. batch_size must be a multiple of it."""
    seed: int = 0
    """Seeds initialisation, data order, augmentation and dropout (the paper used 0, 1, 2)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    amp: str = "auto"
    """auto (CUDA: bf16 where supported, else fp16; CPU: bf16 where the CPU has it in hardware, else fp32) |
    bf16 | fp16 (CUDA only) | none (fp32)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""
    channels_last: bool = False
    """Channels-last memory format (faster convolutions with AMP on recent GPUs)."""
    grad_checkpointing: bool = False
    """timm's ``set_grad_checkpointing``: recompute activations in backward to save memory."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many optimizer steps; 0 = at the end of each epoch only."""
    select_by: str = "val.accuracy"
    """Metric that picks the exported epoch: SPLIT.accuracy (higher is better) or SPLIT.loss (lower), for
    val or any evaluation split (another split's is the paper's OOD-oracle ablation)."""
    patience: int = 0
    """Stop after this many epochs without improvement of ``select_by``; 0 = off (train every epoch)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (``timm.utils.ModelEmaV3``; e.g. 0.999) and
    evaluate, select and export it instead of the raw weights; 0 = off. Costs one more copy of the weights."""
    ema_warmup: bool = False
    """ModelEmaV3's decay warmup: the decay is min(ema_decay, 1 - (1 + step)^(-2/3)), i.e. 0.9 at step 31,
    0.99 at step 999, so early weights fade out faster."""
    tensorboard: bool = False
    """Write TensorBoard event files into the run directory (needs the ``tensorboard`` package)."""
    tensorboard_every: int = 10
    """Log the per-step TensorBoard scalars (train loss/accuracy, lr) every this many optimizer steps."""
    shard: bool = False
    """Under torchrun: shard weights, gradients and optimizer state over the processes with FSDP2
    (``fully_shard``) instead of replicating them with DDP; for models that don't fit one GPU."""


@dataclass(frozen=True)
class SweepConfig:
    """What ``ftsgd sweep`` tries for this recipe; ``ftsgd train`` ignores it (it never changes a run)."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    """``ftsgd sweep``'s grid: recipe key -> the values to try, one run per combination, e.g.
    { "optim.lr" = [1e-4, 1e-3], "train.seed" = [0, 1, 2] }; ``--grid KEY=V1,V2`` replaces one key's values.
    The built-in recipes carry the paper's learning rates for their optimizer and seeds 0, 1, 2."""

    def __post_init__(self) -> None:
        # `{ optim.lr = [...] }` (unquoted) is a nested table in TOML: one spelling, dotted keys, from here on
        object.__setattr__(self, "grid", flatten_grid(self.grid))


@dataclass(frozen=True)
class StageConfig:
    """One ``[[stage]]`` of a staged recipe (LP-FT: a linear probe, then fine-tuning), resolved.

    A stage states only what it changes; every key it does not give is the recipe's own (the top-level
    ``[freeze]``, ``[optim]``, ``[schedule]`` and ``train.epochs``), never the previous stage's, so each
    stage reads on its own. Stages run back to back in one run directory.
    """

    name: str = ""
    """Label in progress lines, metrics.jsonl and summary.json (default "stage N"); letters, digits, - and _,
    not a number, unique. ``--set stage.NAME.optim.lr=...`` may use it instead of the number."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """``[stage.freeze]``: what this stage freezes. Parameters frozen by an earlier stage but not by this
    one train again."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """``[stage.optim]``: this stage's optimizer, built anew with fresh state (no momentum carried over)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """``[stage.schedule]``: this stage's schedule; it restarts at the stage's first epoch and spans its epochs."""
    epochs: int = 10
    """``[stage.train] epochs``: this stage's epochs; the run trains the sum of all stages' epochs."""


@dataclass(frozen=True)
class Recipe:
    """A whole fine-tuning recipe."""

    name: str = "custom"
    description: str = ""
    base: str = ""
    """Recipe this one starts from: a built-in name, or a recipe file (a path relative to the including
    file's folder; recorded as an absolute path); empty: the defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    stages: tuple[StageConfig, ...] = ()
    """The ``[[stage]]`` tables, in order; empty: one stage, the recipe itself."""

    @property
    def grad_accum_steps(self) -> int:
        """Number of micro-batches per optimizer step."""
        micro = self.train.micro_batch_size or self.train.batch_size
        return max(1, self.train.batch_size // micro)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "freeze": FreezeConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sweep": SweepConfig,
}
TOP_LEVEL_KEYS = ("name", "description", "base")
STAGE_SECTIONS: dict[str, type] = {"freeze": FreezeConfig, "optim": OptimConfig, "schedule": ScheduleConfig}
"""Sections a stage may override as a whole; of ``[train]`` a stage sets only ``epochs``."""
_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------- built-in recipes


def builtin_recipe_dir() -> Path:
    """Folder holding the shipped recipes.

    A wheel carries them inside the package (``ftsgd/recipes``); a source checkout or an editable
    install keeps them in the repository's top-level ``recipes/``.
    """
    packaged = resources.files("ftsgd") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """Map each built-in recipe name to its file."""
    folder = builtin_recipe_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def list_recipes() -> list[tuple[str, str]]:
    """Built-in recipes as ``(name, description)`` pairs, sorted by name."""
    out = []
    for name, path in builtin_recipes().items():
        raw = _read_toml(path, name)
        out.append((name, str(raw.get("description", ""))))
    return out


# --------------------------------------------------------------------------- loading


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{label}: not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise RecipeError([f"{label}: cannot read {path}: {exc.strerror}"]) from None


def resolve_recipe_source(name_or_path: str) -> tuple[str, Path]:
    """Turn ``--recipe`` into ``(name, file)``: a built-in name, or a path to a TOML file."""
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return name_or_path, builtins[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.stem, path
    hint = ""
    close = difflib.get_close_matches(name_or_path, list(builtins), n=3)
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    raise RecipeError(
        [
            f"recipe '{name_or_path}' is neither a built-in recipe nor an existing file{hint} "
            f"(built-ins: {', '.join(builtins)}; `ftsgd recipes` lists them)"
        ]
    )


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key.path=value``; the value is read as TOML, else taken as a plain string.

    ``--set optim.lr=3e-4`` gives a float, ``--set train.amp=bf16`` the string ``"bf16"``,
    ``--set model.kwargs={img_size=64}`` an inline table.
    """
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=3e-4"], "--set")
    key, _, value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError([f"--set {text!r}: empty key path"], "--set")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw recipe dict (before validation, so they are checked too).

    ``stage.N.section.key`` (``N`` counted from 1, or the stage's ``name``) sets a key inside the N-th
    ``[[stage]]`` table; ``stage=[...]`` replaces the whole list.
    """
    out = _deep_merge({}, raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        if parts[0] == STAGE_KEY and len(parts) > 1:
            node, parts = _stage_table(out, parts, text), parts[2:]
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            else:
                child = dict(child)
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _stage_table(raw: dict[str, Any], parts: list[str], text: str) -> dict[str, Any]:
    """A copy of the ``[[stage]]`` table ``--set stage.N...`` addresses, put in place of the original."""
    stages = raw.get(STAGE_KEY)
    if not isinstance(stages, list) or not stages:
        raise RecipeError(
            [f"--set {text!r}: the recipe has no [[stage]] tables (stages: `ftsgd recipes show NAME`)"],
            "--set",
        )
    if len(parts) < 3:
        raise RecipeError(
            [f"--set {text!r}: name a key inside the stage, e.g. --set {STAGE_KEY}.{parts[1]}.optim.lr=1e-4"],
            "--set",
        )
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    key = parts[1]
    index = int(key) - 1 if key.isdigit() else names.index(key) if key in names else -1
    if not 0 <= index < len(stages) or not isinstance(stages[index], dict):
        known = ", ".join(f"{i}" + (f" ({n})" if n else "") for i, n in enumerate(names, 1))
        raise RecipeError([f"--set {text!r}: no stage {key!r}; the recipe's stages: {known}"], "--set")
    stages = list(stages)
    stages[index] = _deep_merge({}, stages[index])
    raw[STAGE_KEY] = stages
    return stages[index]


def _shadowed_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """``--set`` values of top-level keys that every stage sets itself, so they would change nothing."""
    stages = raw.get(STAGE_KEY)
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        return []
    problems = []
    for text in overrides:
        parts, _ = parse_override(text)
        if len(parts) != 2 or not (parts[0] in STAGE_SECTIONS or parts == ["train", "epochs"]):
            continue
        if all(isinstance(s.get(parts[0]), dict) and parts[1] in s[parts[0]] for s in stages):
            problems.append(
                f"--set {text}: every [[stage]] sets {parts[0]}.{parts[1]} itself, so this would change "
                f"nothing; set it per stage, e.g. --set {STAGE_KEY}.1.{parts[0]}.{parts[1]}=..."
            )
    return problems


def load_raw(name_or_path: str | None, _chain: tuple[Path, ...] = ()) -> tuple[str, dict[str, Any]]:
    """Read a recipe, and the recipes behind it through ``base``, into one raw dict.

    ``base`` names a built-in recipe, or another recipe file by a path relative to the including
    file's folder. ``_chain`` holds the files already being read, to report a cycle instead of
    recursing forever.
    """
    if not name_or_path:
        return "custom", {}
    name, path = resolve_recipe_source(name_or_path)
    raw = _read_toml(path, str(path))
    base = raw.get("base")
    if isinstance(base, str) and base:
        chain = (*_chain, path.resolve())
        source = _base_source(base, path, chain)
        _, base_raw = load_raw(source, chain)
        base_raw.pop("description", None)
        base_raw.pop("name", None)
        raw = _deep_merge(base_raw, raw)
        raw["base"] = source
    raw.setdefault("name", name)
    return name, raw


def _base_source(base: str, including: Path, chain: tuple[Path, ...]) -> str:
    """What ``base = "..."`` in ``including`` refers to: a built-in name, or an absolute file path.

    Raises:
        RecipeError: the file does not exist, it is already in ``chain`` (a cycle), or the chain of
            bases is longer than :data:`MAX_BASE_DEPTH`.
    """
    builtins = builtin_recipes()
    target = builtins.get(base)
    if target is None:
        target = (including.parent / Path(base).expanduser()).resolve()
        if not target.is_file():
            close = difflib.get_close_matches(base, list(builtins), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RecipeError(
                [
                    f"base: '{base}' is not a built-in recipe{hint or '.'} Nor is it a recipe file: {target} "
                    f"does not exist (a path in base is relative to the folder of {including})"
                ]
            )
    shown = " -> ".join(str(p) for p in (*chain, target.resolve()))
    if target.resolve() in chain:
        raise RecipeError([f"base: recipe cycle: {shown}"])
    if len(chain) > MAX_BASE_DEPTH:
        raise RecipeError([f"base: more than {MAX_BASE_DEPTH} recipes behind one another: {shown}"])
    return base if base in builtins else str(target)


def load_recipe(
    name_or_path: str | None = None, overrides: list[str] | None = None, extra_checks: Checks | None = None
) -> Recipe:
    """Load, merge, override and validate a recipe.

    Args:
        name_or_path: a built-in recipe name, a path to a TOML file, or None for the defaults.
        overrides: ``key.path=value`` strings from ``--set`` (and shorthands like ``--model``).
        extra_checks: see :func:`recipe_from_dict`.

    Raises:
        RecipeError: listing every problem found, each naming its key path.
    """
    _, raw = load_raw(name_or_path)
    raw = apply_overrides(raw, overrides or [])
    shadowed = _shadowed_overrides(raw, overrides or [])
    try:
        recipe = recipe_from_dict(raw, extra_checks)
    except RecipeError as exc:
        raise RecipeError([*shadowed, *exc.problems]) from None
    if shadowed:
        raise RecipeError(shadowed)
    return recipe


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_article(_type_name(tp))}, got {value!r}")
            return None
        return [_coerce(v, arg, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table (e.g. {{ img_size = 224 }}), got {value!r}")
            return None
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) > 1:
            return _coerce_either(value, options, path, problems)
        tp = options[0]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{path}: must be a finite number, got {value!r}")
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(
            f"{path}: expected {_article(_type_name(tp))}, got {value!r} ({type(value).__name__})"
        )
        return None
    return value


def _coerce_either(value: Any, options: list[Any], path: str, problems: list[str]) -> Any:
    """A value of a key that takes one of several types (``model.reset_head``: a boolean or "auto")."""
    for option in options:
        scratch: list[str] = []
        coerced = _coerce(value, option, path, scratch)
        if not scratch:
            return coerced
    names = " or ".join(_type_name(o) for o in options)
    problems.append(f"{path}: expected a {names}, got {value!r} ({type(value).__name__})")
    return None


def _build_section(cls: type, raw: Any, section: str, problems: list[str], base: Any = None) -> Any:
    """The section ``raw`` describes: its keys checked and set on ``base`` (default: the defaults)."""
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a table [{section}], got {raw!r}")
        return cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{section}.{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"{path}: unknown key{hint}")
            continue
        before = len(problems)
        coerced = _coerce(value, hints[key], path, problems)
        if len(problems) == before:
            values[key] = coerced
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _build_stages(raw: Any, base: Recipe, problems: list[str]) -> tuple[StageConfig, ...]:
    """The ``[[stage]]`` tables, each resolved against the recipe's own sections (``base``)."""
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        problems.append(f"{STAGE_KEY}: expected [[{STAGE_KEY}]] tables (an array of tables), got {raw!r}")
        return ()
    return tuple(_build_stage(table, f"{STAGE_KEY}.{n}", base, problems) for n, table in enumerate(raw, 1))


def _build_stage(raw: dict[str, Any], path: str, base: Recipe, problems: list[str]) -> StageConfig:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STAGE_SECTIONS:
            values[key] = _build_section(
                STAGE_SECTIONS[key], value, f"{path}.{key}", problems, getattr(base, key)
            )
        elif key == "train" and isinstance(value, dict):
            for extra in sorted(set(value) - {"epochs"}):
                problems.append(
                    f"{path}.train.{extra}: a stage sets only train.epochs; the other train.* keys apply to "
                    "the whole run (set them in [train])"
                )
            if "epochs" in value:
                before = len(problems)
                epochs = _coerce(value["epochs"], int, f"{path}.train.epochs", problems)
                values.update({"epochs": epochs} if len(problems) == before else {})
        elif key == "name" and isinstance(value, str):
            values["name"] = value
        else:
            what = (
                "expected a string"
                if key == "name"
                else "expected a table"
                if key == "train"
                else "unknown key"
            )
            problems.append(
                f"{path}.{key}: {what}; a stage may set name, freeze.*, optim.*, schedule.* and train.epochs"
            )
    return StageConfig(
        **{"freeze": base.freeze, "optim": base.optim, "schedule": base.schedule, "epochs": base.train.epochs}
        | values
    )


def stage_recipe(recipe: Recipe, index: int) -> Recipe:
    """The recipe stage ``index`` (0-based) trains with: the stage's sections and epochs, no stages."""
    stage = recipe.stages[index]
    return dataclasses.replace(
        recipe,
        freeze=stage.freeze,
        optim=stage.optim,
        schedule=stage.schedule,
        train=dataclasses.replace(recipe.train, epochs=stage.epochs),
        stages=(),
    )


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """What each stage trains with, in order; a recipe without ``[[stage]]`` tables is its one stage."""
    return [stage_recipe(recipe, i) for i in range(len(recipe.stages))] or [recipe]


def stage_label(recipe: Recipe, index: int) -> str:
    """A stage's name, or ``stage N`` (numbered from 1) when it has none."""
    name = recipe.stages[index].name if index < len(recipe.stages) else ""
    return name or f"stage {index + 1}"


def recipe_from_dict(raw: dict[str, Any], extra_checks: Checks | None = None) -> Recipe:
    """Validate a raw (merged) recipe dict into a :class:`Recipe`, reporting all problems at once.

    Args:
        raw: The merged recipe (defaults are filled in for absent keys).
        extra_checks: More checks on the built recipe whose problems join this module's own in one
            error; :mod:`ftsgd.validate` passes the ones that need timm or the file system, which this
            module deliberately does not import.
    """
    problems: list[str] = []
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key == STAGE_KEY:
            continue  # built below, on top of the finished sections
        if key in SECTIONS:
            sections[key] = _build_section(SECTIONS[key], value, key, problems)
        elif key in TOP_LEVEL_KEYS:
            if isinstance(value, str):
                top[key] = value
            else:
                problems.append(f"{key}: expected a string, got {value!r}")
        else:
            known = [*SECTIONS, *TOP_LEVEL_KEYS, STAGE_KEY]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            problems.append(f"{key}: unknown key{hint}")
    recipe = Recipe(**top, **sections)
    if STAGE_KEY in raw:
        recipe = dataclasses.replace(recipe, stages=_build_stages(raw[STAGE_KEY], recipe, problems))
    problems.extend(check_values(recipe))
    if extra_checks is not None:
        problems.extend(extra_checks(recipe))
    if problems:
        raise RecipeError(problems)
    return recipe


def check_values(r: Recipe) -> list[str]:
    """Value and cross-field checks that need nothing but the recipe; one problem line per violation."""
    p: list[str] = []
    _check_model_and_freeze(r, p)
    _check_optim(r, p)
    _check_schedule(r, p)
    _check_data(r.data, p)
    p.extend(preprocessing_problems(r.data))
    p.extend(augmentation_problems(r.data))
    p.extend(head_problems(r.model))
    _check_train(r.train, p)
    _check_regularisation(r, p)
    p.extend(grid_problems(r.sweep.grid))
    if r.optim.step_in_backward:
        _check_step_in_backward(r, p)
    _check_stages(r, p)
    return p


def _check_stages(r: Recipe, p: list[str]) -> None:
    """Each stage's recipe checked as a whole; its own problems named ``stage.N.key``, not repeated."""
    names = [s.name for s in r.stages if s.name]
    own = set(p)
    if r.stages and r.train.shard:
        p.append(
            f"train.shard: cannot be combined with [[{STAGE_KEY}]] tables: FSDP2 fixes which parameters train "
            "when it shards the model, and a stage changes that; train a staged recipe with DDP "
            "(train.shard = false)"
        )
    for n, stage in enumerate(r.stages, 1):
        if stage.name and (not _STAGE_NAME.fullmatch(stage.name) or stage.name.isdigit()):
            p.append(
                f"{STAGE_KEY}.{n}.name: {stage.name!r} must be letters, digits, '-' and '_', and not a number "
                f"(--set {STAGE_KEY}.NAME.key=... addresses a stage by it)"
            )
        if stage.name and names.count(stage.name) > 1:
            p.append(
                f"{STAGE_KEY}.{n}.name: {stage.name!r} names another stage too; stage names must be unique"
            )
        p.extend(
            f"{STAGE_KEY}.{n}.{line}" for line in check_values(stage_recipe(r, n - 1)) if line not in own
        )


def _choice(p: list[str], path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        p.append(f"{path}: unknown value {value!r}; {hint}expected one of: {', '.join(allowed)}")


def _at_least(p: list[str], path: str, value: float, low: float, what: str = "") -> None:
    if value < low:
        p.append(f"{path}: must be >= {low}{what}, got {value!r}")


def _check_model_and_freeze(r: Recipe, p: list[str]) -> None:
    m, f = r.model, r.freeze
    if m.weights and m.pretrained:
        p.append(
            "model.pretrained: set either model.pretrained = true (hub download) or model.weights "
            "(local file), not both"
        )
    _choice(p, "freeze.policy", f.policy, FREEZE_POLICIES)
    for i, pattern in enumerate([*f.patterns, *f.trainable]):
        key = "freeze.patterns" if i < len(f.patterns) else "freeze.trainable"
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                p.append(f"{key}: invalid regular expression {pattern!r}: {exc}")


def _check_optim(r: Recipe, p: list[str]) -> None:
    o = r.optim
    if o.lr <= 0:
        p.append(f"optim.lr: must be > 0, got {o.lr!r} (the paper's grids: SGD 3e-5..1e-2, AdamW 3e-7..1e-4)")
    if not 0 <= o.momentum < 1:
        p.append(f"optim.momentum: must be in [0, 1), got {o.momentum!r}")
    if o.nesterov and o.momentum == 0:
        p.append("optim.nesterov: Nesterov momentum needs optim.momentum > 0")
    if o.nesterov and o.name.lower() in ("adamw", "adam"):
        p.append(f"optim.nesterov: only applies to SGD, not optim.name = {o.name!r}; remove it")
    _at_least(p, "optim.weight_decay", o.weight_decay, 0)
    if len(o.betas) not in (2, 3) or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas!r} (Adan takes three)")
    if o.eps <= 0:
        p.append(f"optim.eps: must be > 0, got {o.eps!r}")
    p.extend(_lr_scale_problems(o, r.freeze))


def _lr_scale_problems(o: OptimConfig, f: FreezeConfig) -> list[str]:
    """Per-layer learning-rate keys: ranges, and a scale on an embedding the policy freezes."""
    p: list[str] = []
    if not 0 <= o.layer_decay <= 1:
        p.append(
            f"optim.layer_decay: must be in [0, 1] (0 or 1 = off; e.g. 0.75 gives each layer below the "
            f"top 0.75x the learning rate of the one above), got {o.layer_decay!r}"
        )
    for key, value in (("optim.embed_lr_scale", o.embed_lr_scale), ("optim.head_lr_scale", o.head_lr_scale)):
        if value <= 0:
            p.append(
                f"{key}: must be > 0, got {value!r} (to keep a layer fixed, freeze it with freeze.policy "
                "or freeze.patterns: that also saves its gradient and optimizer state)"
            )
    if o.embed_lr_scale != 1 and f.policy in ("embed", "embed+stage1", "stem", "head"):
        p.append(
            f"optim.embed_lr_scale: {o.embed_lr_scale!r} scales the embedding's learning rate, but "
            f"freeze.policy = {f.policy!r} freezes the embedding, so the scale would do nothing; set "
            'optim.embed_lr_scale = 1 (freezing) or freeze.policy = "none" (a smaller embedding LR)'
        )
    return p


def _check_schedule(r: Recipe, p: list[str]) -> None:
    s, lr, epochs = r.schedule, r.optim.lr, r.train.epochs
    _choice(p, "schedule.name", s.name, SCHEDULES)
    _choice(p, "schedule.interval", s.interval, SCHEDULE_INTERVALS)
    _at_least(p, "schedule.warmup_epochs", s.warmup_epochs, 0)
    _at_least(p, "schedule.min_lr", s.min_lr, 0)
    if s.min_lr >= lr and s.name == "cosine" and lr > 0:
        p.append(f"schedule.min_lr: must be below optim.lr ({lr}), got {s.min_lr!r}")
    if s.warmup_epochs >= epochs > 0:
        p.append(
            f"schedule.warmup_epochs: must be shorter than train.epochs ({epochs}), got {s.warmup_epochs!r}"
        )
    if s.interval == "epoch" and s.warmup_epochs != int(s.warmup_epochs):
        p.append('schedule.warmup_epochs: fractional warmup needs schedule.interval = "step"')
    _at_least(p, "schedule.decay_epochs", s.decay_epochs, 1)
    if not 0 < s.decay_rate <= 1:
        p.append(f"schedule.decay_rate: must be in (0, 1], got {s.decay_rate!r}")


def _check_data(d: DataConfig, p: list[str]) -> None:
    _choice(p, "data.augment", d.augment, AUGMENTS)
    _choice(p, "data.on_bad_image", d.on_bad_image, BAD_IMAGE_ACTIONS)
    _at_least(p, "data.img_size", d.img_size, 0, " (0 = the model's own input size)")
    _at_least(p, "data.num_workers", d.num_workers, -1, " (-1 = automatic)")
    _at_least(p, "data.mixup", d.mixup, 0, " (0 = off)")
    _at_least(p, "data.cutmix", d.cutmix, 0, " (0 = off)")
    for key in ("mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(d, key) <= 1:
            p.append(f"data.{key}: must be in [0, 1], got {getattr(d, key)!r}")
    _choice(p, "data.mixup_mode", d.mixup_mode, MIXUP_MODES)


def preprocessing_problems(d: DataConfig) -> list[str]:
    """``data.mean``/``std``/``crop_pct``/``interpolation``: empty or zero means the model's own."""
    p: list[str] = []
    for key in ("mean", "std"):
        values = getattr(d, key)
        if values and len(values) != 3:
            p.append(
                f"data.{key}: expected 3 numbers (one per RGB channel) or [] for the model's own, got {values!r}"
            )
    if any(v <= 0 for v in d.std):
        p.append(f"data.std: every value must be > 0, got {d.std!r}")
    if not 0 <= d.crop_pct <= 1:
        p.append(
            f"data.crop_pct: must be in (0, 1] (1 = no crop), or 0 for the model's own, got {d.crop_pct!r}"
        )
    if d.interpolation:
        _choice(p, "data.interpolation", d.interpolation, INTERPOLATIONS)
    return p


def augmentation_problems(d: DataConfig) -> list[str]:
    """The augmentation knobs: ranges, and knobs that the chosen ``data.augment`` preset would not use."""
    p: list[str] = []
    for key, low in (("rrc_scale", 0.0), ("rrc_ratio", 0.0)):
        values = getattr(d, key)
        if values and (len(values) != 2 or not low < values[0] <= values[1]):
            p.append(
                f"data.{key}: expected [min, max] with 0 < min <= max, or [] for timm's default, got {values!r}"
            )
    if d.rrc_scale and d.rrc_scale[-1] > 1:
        p.append(f"data.rrc_scale: the crop cannot be larger than the image (max <= 1), got {d.rrc_scale!r}")
    for key in ("hflip", "re_prob"):
        if not 0 <= getattr(d, key) <= 1:
            p.append(f"data.{key}: a probability in [0, 1], got {getattr(d, key)!r}")
    _at_least(p, "data.color_jitter", d.color_jitter, 0, " (0 = off)")
    _choice(p, "data.re_mode", d.re_mode, ERASE_MODES)
    _at_least(p, "data.re_count", d.re_count, 1)
    if d.color_jitter and d.auto_augment and "3a" not in d.auto_augment:
        p.append(
            "data.color_jitter: timm leaves colour jitter out when data.auto_augment is set (its policies "
            "change colours themselves); set one of them"
        )
    p.extend(_preset_problems(d))
    return p


def _preset_problems(d: DataConfig) -> list[str]:
    """Knobs that refine ``rrc_flip`` (timm's training transform) set with another ``data.augment``."""
    if d.augment == "rrc_flip":
        return []
    defaults = DataConfig()
    refine = ("rrc_scale", "rrc_ratio", "auto_augment", "color_jitter", "re_prob")
    changed = [k for k in refine if getattr(d, k) != getattr(defaults, k)]
    if d.augment == "none" and d.hflip != defaults.hflip:
        changed.append("hflip")
    if not changed:
        return []
    keys = ", ".join(f"data.{k}" for k in changed)
    return [
        f"{keys}: refine(s) timm's training transform, which data.augment = {d.augment!r} does not use; set "
        'data.augment = "rrc_flip" (with data.rrc_scale = [1.0, 1.0] for no random cropping)'
        + (', or data.augment = "flip"' if changed == ["hflip"] else "")
    ]


def head_problems(m: ModelConfig) -> list[str]:
    """``model.reset_head`` is true, false or "auto"."""
    if isinstance(m.reset_head, str) and m.reset_head != RESET_HEAD:
        return [f'model.reset_head: expected true, false or "auto", got {m.reset_head!r}']
    return []


def _check_train(t: TrainConfig, p: list[str]) -> None:
    _at_least(p, "train.epochs", t.epochs, 1)
    _at_least(p, "train.batch_size", t.batch_size, 1)
    _at_least(p, "train.micro_batch_size", t.micro_batch_size, 0, " (0 = train.batch_size)")
    if t.micro_batch_size > 0 and t.batch_size % t.micro_batch_size:
        p.append(
            f"train.micro_batch_size: train.batch_size ({t.batch_size}) must be a multiple of it, "
            f"got {t.micro_batch_size}"
        )
    _choice(p, "train.device", t.device, DEVICES)
    _choice(p, "train.amp", t.amp, AMP_MODES)
    if t.device == "cpu" and t.amp == "fp16":
        p.append(
            f'train.amp: {t.amp!r} mixed precision needs a CUDA GPU, but train.device = "cpu"; use train.amp '
            '= "bf16" or "none" (or "auto": bf16/fp16 on a GPU; bf16 on a CPU with hardware bf16, else fp32)'
        )
    _at_least(p, "train.grad_clip", t.grad_clip, 0, " (0 = off)")
    if not 0 <= t.label_smoothing < 1:
        p.append(f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing!r}")
    _at_least(p, "train.checkpoint_every", t.checkpoint_every, 0, " (0 = every epoch end)")
    if t.shard and t.amp == "fp16":
        p.append(
            'train.shard: cannot be combined with train.amp = "fp16": the gradient scaler would see only this '
            'process\'s slice of the gradients; use train.amp = "bf16" (or "auto")'
        )


def _check_regularisation(r: Recipe, p: list[str]) -> None:
    """Selection, stopping, EMA, mixup and the first-class drop rates."""
    t, m = r.train, r.model
    try:
        select_metric(t.select_by)
    except ValueError as exc:
        p.append(f"train.select_by: {exc}")
    _at_least(p, "train.patience", t.patience, 0, " (0 = off)")
    if not 0 <= t.ema_decay < 1:
        p.append(f"train.ema_decay: must be in [0, 1) (0 = off), got {t.ema_decay!r}")
    _at_least(p, "train.tensorboard_every", t.tensorboard_every, 1)
    if mixes(r) and t.batch_size % 2:
        p.append(
            f"train.batch_size: data.mixup/data.cutmix mix each image with another of its batch and need "
            f"an even batch size, got {t.batch_size}"
        )
    for key in ("drop_path_rate", "drop_rate"):
        if not 0 <= getattr(m, key) < 1:
            p.append(f"model.{key}: must be in [0, 1) (0 = off), got {getattr(m, key)!r}")
        if getattr(m, key) and key in m.kwargs:
            p.append(f"model.{key}: also given in model.kwargs; set it in one place")


def select_metric(select_by: str) -> tuple[str, str]:
    """Split ``train.select_by`` into ``(split, metric)``: ``"ood.loss"`` -> ``("ood", "loss")``.

    The metric is after the last dot, so a split folder may have dots in its name. Whether the split
    exists is only known once the dataset is scanned (the trainer checks it then).

    Raises:
        ValueError: Not of the form SPLIT.accuracy or SPLIT.loss, or the training split.
    """
    split, _, metric = select_by.rpartition(".")
    if not split or metric not in SELECT_METRICS:
        raise ValueError(
            f"expected SPLIT.accuracy or SPLIT.loss (e.g. val.accuracy, val.loss, ood.accuracy), got {select_by!r}"
        )
    if split == "train":
        raise ValueError(
            "the training split is not evaluated each epoch; use val or another evaluation split"
        )
    return split, metric


def mixes(r: Recipe) -> bool:
    """Whether the recipe mixes training images (data.mixup or data.cutmix on)."""
    return r.data.mixup > 0 or r.data.cutmix > 0


def _check_step_in_backward(r: Recipe, p: list[str]) -> None:
    t = r.train
    if r.grad_accum_steps > 1:
        p.append(
            "optim.step_in_backward: cannot be combined with gradient accumulation "
            f"(train.micro_batch_size {t.micro_batch_size} < train.batch_size {t.batch_size}): each "
            "parameter is updated as soon as its gradient exists, so gradients are never summed; "
            "set train.micro_batch_size = 0"
        )
    if t.grad_clip > 0:
        p.append(
            "optim.step_in_backward: cannot be combined with train.grad_clip: global-norm clipping "
            "needs every gradient at once, which step-in-backward never keeps; set train.grad_clip = 0"
        )
    if t.shard:
        p.append(
            "optim.step_in_backward: cannot be combined with train.shard: FSDP reduces gradients across "
            "processes after backward, not parameter by parameter; set optim.step_in_backward = false"
        )
    if t.amp == "fp16":
        p.append(
            'optim.step_in_backward: cannot be combined with train.amp = "fp16": an overflow is only '
            'known after some parameters were already updated; use train.amp = "bf16" (or "auto")'
        )


# --------------------------------------------------------------------------- dumping


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return _toml_value(key)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain-data copy of a recipe in the shape of its TOML (for JSON and TOML output).

    Stages become a ``stage`` list of tables (``[stage.train] epochs``), present only when there are any,
    so :func:`recipe_from_dict` reads the result back into an equal recipe.
    """
    data = dataclasses.asdict(recipe)
    stages = data.pop("stages")
    if stages:
        data[STAGE_KEY] = [
            {"name": st["name"], **{k: st[k] for k in STAGE_SECTIONS}, "train": {"epochs": st["epochs"]}}
            for st in stages
        ]
    return data


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML; loading it back gives an equal :class:`Recipe`."""
    data = recipe_to_dict(recipe)
    lines = []
    for key in TOP_LEVEL_KEYS:
        lines.append(f"{key} = {_toml_value(data[key])}")
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in data[section].items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for stage in data.get(STAGE_KEY, []):
        lines += ["", f"[[{STAGE_KEY}]]", f"name = {_toml_value(stage['name'])}"]
        for section in (*STAGE_SECTIONS, "train"):
            lines += ["", f"[{STAGE_KEY}.{section}]"]
            lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in stage[section].items()]
    return "\n".join(lines) + "\n"


def recipe_differences(old: Recipe, new: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every key whose value differs, as ``"key.path: old -> new"`` lines, in recipe order.

    ``description`` is never a difference: it changes no run (a reworded built-in recipe must not stop
    ``--resume``).
    """
    ignore = ("description", *ignore)
    a, b = flatten_recipe(recipe_to_dict(old)), flatten_recipe(recipe_to_dict(new))
    return [
        f"{key}: {_toml_value(a[key]) if key in a else '(unset)'} -> {_toml_value(b[key]) if key in b else '(unset)'}"
        for key in dict.fromkeys([*a, *b])
        if key not in ignore and a.get(key) != b.get(key)
    ]


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Every recipe key as ``(key path, type, default, description)`` for docs and ``recipes keys``."""
    rows = []
    for section, cls in SECTIONS.items():
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    _type_name(hints[f.name]),
                    _toml_value(getattr(default, f.name)),
                    docs.get(f.name, ""),
                )
            )
    return rows + _stage_key_rows()


def _stage_key_rows() -> list[tuple[str, str, str, str]]:
    """The ``[[stage]]`` keys, documented once for every stage N (numbered from 1)."""
    docs, prefix = _field_docs(StageConfig), f"{STAGE_KEY}.N"
    return [
        (f"{prefix}.name", "string", '""', docs["name"]),
        *[(f"{prefix}.{s}.*", "table", f"the recipe's [{s}]", docs[s]) for s in STAGE_SECTIONS],
        (f"{prefix}.train.epochs", "integer", "train.epochs", docs["epochs"]),
    ]


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) read from the source."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - no source available
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


# --------------------------------------------------------------------------- sweep grids

SWEEP_KEYS = ("sweep.grid",)
"""Recipe keys that never change what a run trains: ignored when a run's recipe is compared with another."""
GRID_FORBIDDEN = {"data.root": "a sweep trains on one dataset (--data)"}


def flatten_grid(grid: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": [...]}}`` -> ``{"optim.lr": [...]}``; a later spelling of a key wins."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten_grid(value).items()})
        else:
            flat[str(key)] = value
    return flat


def _grid_label(where: str, key: str) -> str:
    """How a problem names a grid key: ``sweep.grid."optim.lr"`` in a recipe, ``--grid optim.lr`` on the CLI."""
    return f"{where} {key}" if where.startswith("-") else f"{where}.{_toml_key(key)}"


def grid_problems(grid: dict[str, Any], where: str = "sweep.grid") -> list[str]:
    """Every problem of a grid: unknown keys, empty or non-list values, wrongly typed or repeated values.

    Each value is checked against its key's type here; the full recipe of each combination is checked
    when a sweep resolves it (cross-key rules such as ``schedule.min_lr < optim.lr``).
    """
    problems: list[str] = []
    for key, values in grid.items():
        label = _grid_label(where, key)
        hint = _grid_key_problem(key)
        if hint:
            problems.append(f"{label}: {hint}")
        elif not isinstance(values, list) or not values:
            problems.append(f"{label}: expected a non-empty list of values, got {values!r}")
        else:
            tp = _grid_key_type(key)
            coerced = [_coerce(v, tp, f"{label}[{i}]", problems) for i, v in enumerate(values)]
            seen = [_toml_value(v) for v in coerced if v is not None]
            repeated = sorted({v for v in seen if seen.count(v) > 1})
            if repeated:
                problems.append(f"{label}: {', '.join(repeated)} given more than once")
    return problems


def _grid_key_type(key: str) -> Any:
    """The type of a valid grid key's values (``stage.N.section.key`` as its section's key)."""
    if key.startswith(f"{STAGE_KEY}."):
        section, name = key.split(".")[2:]
        return int if section == "train" else typing.get_type_hints(STAGE_SECTIONS[section])[name]
    section, _, name = key.partition(".")
    return typing.get_type_hints(SECTIONS[section])[name]


def _stage_grid_key_problem(key: str) -> str:
    """Why ``stage.N.section.key`` cannot be a grid key (empty when it can); stage names are not taken,
    as the run directories and ``ftsgd report`` spell stage keys by number."""
    parts = key.split(".")
    if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) < 1:
        return f"a stage key is stage.N.SECTION.KEY with N the stage's number from 1, e.g. {STAGE_KEY}.2.optim.lr"
    section, name = parts[2:]
    if section == "train":
        return "" if name == "epochs" else "of [stage.train] a stage sets only epochs"
    if section not in STAGE_SECTIONS:
        return f"a stage overrides only {', '.join(STAGE_SECTIONS)} and train.epochs"
    names = [f.name for f in dataclasses.fields(STAGE_SECTIONS[section])]
    return "" if name in names else f"unknown recipe key {section}.{name}"


def _grid_key_problem(key: str) -> str:
    """Why ``key`` cannot be a grid key (empty when it can)."""
    if key in GRID_FORBIDDEN:
        return f"cannot be a grid key: {GRID_FORBIDDEN[key]}"
    if key.startswith(f"{STAGE_KEY}."):
        return _stage_grid_key_problem(key)
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section) if section != "sweep" else None
    names = [f.name for f in dataclasses.fields(cls)] if cls else []
    if name in names:
        return ""
    known = [f"{s}.{f.name}" for s, c in SECTIONS.items() if s != "sweep" for f in dataclasses.fields(c)]
    close = difflib.get_close_matches(key, known, n=1)
    return "unknown recipe key" + (
        f" (did you mean {close[0]}?)" if close else " (`ftsgd recipes keys` lists them)"
    )


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """Parse one ``--grid KEY.PATH=V1,V2,...``: values are read as TOML where they can be, else as strings.

    ``optim.lr=1e-4,3e-4`` gives floats, ``data.augment=flip,none`` strings, and lists or tables are
    written as TOML: ``optim.betas=[0.9,0.999],[0.9,0.99]``, ``model.kwargs={img_size=32},{img_size=64}``.
    """
    key, sep, rhs = text.partition("=")
    key = key.strip()
    if not sep or not key or not rhs.strip():
        raise RecipeError(
            [f"--grid {text!r}: expected KEY.PATH=V1,V2,..., e.g. --grid optim.lr=1e-4,3e-4"], "--grid"
        )
    try:
        values = tomllib.loads(f"v = [{rhs}]")["v"]
    except tomllib.TOMLDecodeError:
        values = [parse_override(f"v={item}")[1] for item in rhs.split(",")]
    return key, values


def recipe_grid(name_or_path: str) -> dict[str, list[Any]]:
    """The ``[sweep]`` grid a recipe (or the built-in it names as ``base``) carries, checked.

    Raises:
        RecipeError: the recipe cannot be read, or its grid has problems (each with its key path).
    """
    _, raw = load_raw(name_or_path)
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise RecipeError([f"sweep: expected a table [sweep], got {sweep!r}"], name_or_path)
    grid = sweep.get("grid", {})
    if not isinstance(grid, dict):
        raise RecipeError([f"sweep.grid: expected a table of key = [values], got {grid!r}"], name_or_path)
    flat = flatten_grid(grid)
    problems = grid_problems(flat)
    if problems:
        raise RecipeError(problems, name_or_path)
    return flat


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal, the form ``--set key=VALUE`` reads back to the same value."""
    return _toml_value(value)
