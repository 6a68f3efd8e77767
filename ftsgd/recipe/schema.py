"""The recipe schema: frozen dataclasses, one per TOML section, a docstring per key."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Checks = Callable[["Recipe"], list[str]]
"""A check run on a built recipe, returning one problem line per violation."""


DEFAULT_RECIPE = "sgd-freeze-embed"

STAGE_KEY = "stage"
"""The key of the ``[[stage]]`` tables, and of their ``stage.N.section.key`` spelling."""
"""The recipe `ftsgd train` and `ftsgd inspect` use when --recipe is not given."""


FREEZE_POLICIES = ("none", "embed", "embed+stage1", "stem", "head")


SCHEDULES = ("cosine", "constant", "step")


SCHEDULE_INTERVALS = ("epoch", "step")


AUGMENTS = ("rrc_flip", "flip", "none")


DEVICES = ("auto", "cpu", "cuda")


AMP_MODES = ("auto", "bf16", "fp16", "none")


WEIGHT_DTYPES = ("fp32", "bf16")
"""``train.weight_dtype`` values: what the parameters (and so the gradients) are held in."""


UPDATE_ROUNDINGS = ("stochastic", "kahan", "nearest")
"""``optim.update_rounding`` values: how an update is written back into bf16 weights."""


ROUNDED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw", "adam")
"""``optim.name`` values with a rounded update for bf16 weights (:mod:`ftsgd.model.rounding`)."""


BAD_IMAGE_ACTIONS = ("error", "skip")


MIXUP_MODES = ("batch", "pair", "elem")


SELECT_METRICS = ("accuracy", "loss", "macro_f1", "balanced_accuracy")
"""What ``train.select_by`` may name after the split; only ``loss`` is lower-is-better."""


AGGREGATE_SPLITS = ("worst", "mean")
"""Aggregates over the evaluation splits other than val, recorded like splits (``worst.accuracy``)."""


SAMPLERS = ("shuffle", "balanced")
"""``data.sampler`` values."""


BALANCED = "balanced"
"""``train.class_weights`` / ``data.sampler`` value for inverse-frequency weighting / class-balanced sampling."""


TRACKERS = ("tensorboard", "mlflow", "wandb")
"""``train.tracking`` values: the experiment trackers a run can log to (each an optional extra of ftsgd)."""


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
    update_rounding: str = "stochastic"
    """With train.weight_dtype = "bf16": how each update (computed in fp32) is written back to the bf16
    weights. stochastic: round up or down at random, right in expectation | kahan: round to nearest and
    carry the lost part in a bf16 buffer (2 more bytes/parameter) | nearest: plain rounding, which loses
    updates smaller than half a bf16 step (for comparison). SGD's momentum buffer is bf16 too, rounded the
    same way (kahan: float32); AdamW's moments are float32. sgd, momentum, nesterov, adam, adamw only."""


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
    allow_split_overlap: bool = False
    """Train even when an evaluation split shares images with the training split (warned; off: refused)."""
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
    val_fraction: float = 0.1
    """One folder of class folders (no train/): the fraction of each class held out for validation (at
    least one image per class). Ignored for split folders."""
    test_fraction: float = 0.0
    """One folder of class folders: the fraction of each class held out as a "test" evaluation split; 0 = none."""
    split_seed: int = 0
    """One folder of class folders: seeds which images are held out (independent of train.seed, so every run
    of a sweep gets the same split)."""
    sampler: str = "shuffle"
    """shuffle (each image once per epoch) | balanced (every class drawn equally often: small classes'
    images are repeated, large ones subsampled; an epoch keeps its number of images and steps)."""


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
    """auto (the measured default: fp32 on a CPU and, until benchmarks/gpu_check.sh measures parity, on CUDA) |
    none (fp32) | bf16 (autocast; opt-in, faster where bf16 is in hardware; caveat: on a held-out task on a CPU it
    moved SGD freeze-embed's OOD accuracy and selected learning rate beyond the seed spread: compare it with fp32
    on your task, docs/precision.md) | fp16 (CUDA only). --resume keeps the precision the run started in;
    evaluation and ftsgd eval use it too."""
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
    """Metric that picks the exported epoch: SPLIT.accuracy, SPLIT.macro_f1, SPLIT.balanced_accuracy (higher
    is better) or SPLIT.loss (lower), for val, any evaluation split (another split's is the paper's OOD-oracle
    ablation), or worst/mean over the evaluation splits other than val."""
    class_weights: list[float] | str = ""
    """Cross-entropy weight per class: "balanced" (n_images / (n_classes * n_class), inverse frequency), a
    list with one positive number per class (in class order), or "" for none."""
    patience: int = 0
    """Stop after this many epochs without improvement of ``select_by``; 0 = off (train every epoch)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (``timm.utils.ModelEmaV3``; e.g. 0.999) and
    evaluate, select and export it instead of the raw weights; 0 = off. Costs one more copy of the weights."""
    ema_warmup: bool = False
    """ModelEmaV3's decay warmup: the decay is min(ema_decay, 1 - (1 + step)^(-2/3)), i.e. 0.9 at step 31,
    0.99 at step 999, so early weights fade out faster."""
    tracking: list[str] | str = field(default_factory=list)
    """Experiment trackers to log to: any of "tensorboard", "mlflow", "wandb" (extras ftsgd[NAME]); [] or
    "none" = metrics.jsonl only. A string is one name or several joined by commas. The older
    ``train.tensorboard = true`` still means "tensorboard"."""
    tracking_project: str = "ftsgd"
    """MLflow experiment / W&B project of the run; MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID and
    WANDB_PROJECT win when set."""
    tensorboard_every: int = 10
    """Log the per-step TensorBoard scalars (train loss/accuracy, lr) every this many optimizer steps."""
    weight_dtype: str = "fp32"
    """fp32 | bf16: what the weights (and gradients) are held in for the whole run. bf16 halves them, computes
    in bf16 autocast (train.amp auto or bf16) and applies each update with optim.update_rounding; the
    export is float32 all the same."""
    shard: bool = False
    """Under torchrun: shard weights, gradients and optimizer state over the processes with FSDP2
    (``fully_shard``) instead of replicating them with DDP; for models that don't fit one GPU."""

    def __post_init__(self) -> None:
        # one spelling from here on: "none", "tensorboard" or "mlflow,wandb" become lists of names
        object.__setattr__(self, "tracking", tracking_names(self.tracking))


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
class SlurmConfig:
    """Defaults for ``ftsgd sweep --slurm``'s job array (``--slurm-opt KEY=VALUE`` overrides each); ``ftsgd
    train`` ignores them (they never change a run). Empty or 0: left to the cluster's defaults."""

    partition: str = ""
    """sbatch ``--partition``, e.g. "gpu"."""
    gres: str = ""
    """sbatch ``--gres`` of each task, e.g. "gpu:1" (``--gpus-per-run N`` makes it "gpu:N" when unset)."""
    time: str = ""
    """sbatch ``--time``: each task's time limit, e.g. "04:00:00" or "1-00:00:00"."""
    account: str = ""
    """sbatch ``--account``."""
    qos: str = ""
    """sbatch ``--qos``."""
    cpus_per_task: int = 0
    """sbatch ``--cpus-per-task``."""
    mem: str = ""
    """sbatch ``--mem`` per task, e.g. "32G"."""
    signal_before_s: int = 300
    """Seconds before a task's time limit at which Slurm sends it SIGUSR1: the run saves a checkpoint and
    requeues itself (sbatch ``--signal=B:USR1@N``); long enough to finish a step and write a checkpoint."""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, via the ``peft`` package: ``pip install 'ftsgd[lora]'``) instead of training the
    backbone's weights: every backbone weight stays fixed, small adapters train beside the targeted layers and
    the classifier trains fully. The export merges the adapters in (a plain timm model) and also writes them
    in PEFT's own format (``lora/`` beside ``model.safetensors``). Applies to the whole run (every stage)."""

    enabled: bool = False
    """Train LoRA adapters (the built-in ``lora`` and ``lora-sgd-freeze-embed`` recipes turn it on)."""
    r: int = 16
    """Rank of each adapter (>= 1): each targeted layer W (out x in) gets B (out x r) @ A (r x in)."""
    alpha: float = 16.0
    """Scaling (> 0): the adapter's output is multiplied by alpha / r (PEFT's ``lora_alpha``)."""
    dropout: float = 0.1
    """Dropout on the adapters' input in [0, 1) (PEFT's ``lora_dropout``); training only."""
    targets: list[str] = field(default_factory=list)
    """Layers that get adapters: module names, as PEFT reads them (``qkv`` matches every module named
    ``qkv`` or ending in ``.qkv``), globs over whole names (``blocks.*.attn.qkv``) or regexes prefixed
    ``re:``; Linear and Conv layers (ungrouped) only, never the classifier (it trains fully). [] = the
    family's defaults, outside the embedding: ViT qkv, proj, fc1, fc2; ConvNeXt the MLP's fc1, fc2; ResNet
    the blocks' conv1, conv2, conv3; other models every Linear layer."""


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
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
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
    "slurm": SlurmConfig,
    "lora": LoraConfig,
}


TOP_LEVEL_KEYS = ("name", "description", "base")


STAGE_SECTIONS: dict[str, type] = {"freeze": FreezeConfig, "optim": OptimConfig, "schedule": ScheduleConfig}
"""Sections a stage may override as a whole; of ``[train]`` a stage sets only ``epochs``."""


_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")


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


def flatten_grid(grid: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": [...]}}`` -> ``{"optim.lr": [...]}``; a later spelling of a key wins."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten_grid(value).items()})
        else:
            flat[str(key)] = value
    return flat


def tracking_names(value: Any) -> Any:
    """``train.tracking`` as a list of names: a string is split at commas, "none" and repeats dropped.

    Anything else (a value of the wrong type, still to be reported by the recipe checks) is returned as is.
    """
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        return value
    names = [v.strip() for v in value]
    return list(dict.fromkeys(n for n in names if n and n != "none"))
