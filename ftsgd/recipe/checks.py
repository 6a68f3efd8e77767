"""Value and cross-field checks that need nothing but the recipe itself."""

from __future__ import annotations

import dataclasses
import difflib
import re

from ftsgd.recipe.grid import grid_problems
from ftsgd.recipe.schema import (
    _STAGE_NAME,
    AGGREGATE_SPLITS,
    AMP_MODES,
    AUGMENTS,
    BAD_IMAGE_ACTIONS,
    BALANCED,
    DEVICES,
    ERASE_MODES,
    FREEZE_POLICIES,
    INTERPOLATIONS,
    MIXUP_MODES,
    RESET_HEAD,
    ROUNDED_OPTIMIZERS,
    SAMPLERS,
    SCHEDULE_INTERVALS,
    SCHEDULES,
    SELECT_METRICS,
    STAGE_KEY,
    TRACKERS,
    UPDATE_ROUNDINGS,
    WEIGHT_DTYPES,
    DataConfig,
    FreezeConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    SlurmConfig,
    TrainConfig,
    stage_recipe,
)


def check_values(r: Recipe, stage: bool = False) -> list[str]:
    """Value and cross-field checks that need nothing but the recipe; one problem line per violation.

    ``stage``: ``r`` is one stage of a staged recipe (what only the whole run must satisfy is not asked).
    """
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
    p.extend(split_problems(r.data))
    p.extend(skew_problems(r))
    p.extend(grid_problems(r.sweep.grid))
    if r.optim.step_in_backward:
        _check_step_in_backward(r, p)
    p.extend(weight_dtype_problems(r))
    p.extend(_range_problems(r))
    p.extend(slurm_problems(r.slurm))
    p.extend(lora_problems(r))
    if not stage:
        p.extend(lora_probe_problems(r))
    _check_stages(r, p)
    return p


def slurm_problems(s: SlurmConfig) -> list[str]:
    """``[slurm]`` values sbatch could not take, or that would break the job script's ``#SBATCH`` lines."""
    p: list[str] = []
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if isinstance(value, str) and any(c in value for c in "\n\r\0"):
            p.append(f"slurm.{f.name}: must be one line, got {value!r}")
    if not 0 <= s.cpus_per_task <= 4096:
        p.append(
            f"slurm.cpus_per_task: must be between 0 (the cluster's default) and 4096, got {s.cpus_per_task}"
        )
    if not 0 <= s.signal_before_s <= 86400:
        p.append(f"slurm.signal_before_s: must be between 0 (no signal) and 86400, got {s.signal_before_s}")
    return p


def lora_problems(r: Recipe) -> list[str]:
    """``[lora]`` values, and what adapters cannot be combined with (checked whether or not LoRA is on)."""
    lo: LoraConfig = r.lora
    p: list[str] = []
    if lo.r < 1:
        p.append(f"lora.r: the adapters' rank must be >= 1 (PEFT's guide uses 16), got {lo.r!r}")
    if lo.alpha <= 0:
        p.append(f"lora.alpha: must be > 0 (the adapters' output is scaled by alpha / r), got {lo.alpha!r}")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout: must be in [0, 1) (0 = off), got {lo.dropout!r}")
    for pattern in lo.targets:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                p.append(f"lora.targets: invalid regular expression {pattern!r}: {exc}")
        elif not pattern.strip():
            p.append(
                "lora.targets: an empty name matches every layer; remove it ([] = the family's defaults)"
            )
    if not lo.enabled:
        return p
    if r.train.shard:
        p.append(
            "lora.enabled: cannot be combined with train.shard: FSDP2 would shard the frozen weights and the "
            "adapters alike and the export merges whole weights; train LoRA with DDP (train.shard = false), "
            "its frozen weights need no optimizer state to shard"
        )
    if r.train.weight_dtype == "bf16":
        p.append(
            'lora.enabled: cannot be combined with train.weight_dtype = "bf16": PEFT keeps the adapters in '
            'fp32 beside bf16 layers, which the rounded bf16 update does not handle; set train.weight_dtype = "fp32"'
        )
    return p


def lora_probe_problems(r: Recipe) -> list[str]:
    """LoRA with a last stage (or one recipe) that probes linearly: the adapters would never train.

    An earlier stage may probe (LP, then LoRA): the adapters start as a no-op (B = 0) and wait for theirs.
    """
    last = r.stages[-1].freeze if r.stages else r.freeze
    if not r.lora.enabled or last.policy != "head":
        return []
    key = f"{STAGE_KEY}.{len(r.stages)}.freeze.policy" if r.stages else "freeze.policy"
    return [
        f'{key}: "head" freezes everything but the classifier, the LoRA adapters too, so they would never '
        'train; use freeze.policy = "none" or "embed" with lora.enabled = true (a linear probe may come '
        "first, as an earlier [[stage]]), or lora.enabled = false for a plain linear probe"
    ]


_UPPER_BOUNDS = {
    "train.seed": ("seed", 2**63 - 1),
    "train.batch_size": ("batch_size", 2**20),
    "train.micro_batch_size": ("micro_batch_size", 2**20),
    "train.epochs": ("epochs", 10**6),
    "data.img_size": ("img_size", 8192),
}
"""Integer keys with a ceiling: far above any real run, low enough that torch, numpy and the OS can take them
(a seed of 1e20 or a batch of 1e20 otherwise fails deep inside them with a traceback)."""


def _range_problems(r: Recipe) -> list[str]:
    """Numbers beyond what any run can use, named by key (their lower bounds are checked with each section)."""
    problems = []
    for key, (field, ceiling) in _UPPER_BOUNDS.items():
        section = r.train if key.startswith("train.") else r.data
        value = getattr(section, field, None)
        if isinstance(value, int) and value > ceiling:
            problems.append(f"{key}: must be <= {ceiling}, got {value}")
    if r.train.seed < 0:
        problems.append(f"train.seed: must be >= 0, got {r.train.seed}")
    return problems


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
            f"{STAGE_KEY}.{n}.{line}"
            for line in check_values(stage_recipe(r, n - 1), stage=True)
            if line not in own
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
            '= "none" (fp32, also what "auto" means) or "bf16" (autocast, see docs/precision.md)'
        )
    _at_least(p, "train.grad_clip", t.grad_clip, 0, " (0 = off)")
    if not 0 <= t.label_smoothing < 1:
        p.append(f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing!r}")
    _at_least(p, "train.checkpoint_every", t.checkpoint_every, 0, " (0 = every epoch end)")
    for name in t.tracking if isinstance(t.tracking, list) else []:
        _choice(p, "train.tracking", name, TRACKERS)
    if t.shard and t.amp == "fp16":
        p.append(
            'train.shard: cannot be combined with train.amp = "fp16": the gradient scaler would see only this '
            'process\'s slice of the gradients; use train.amp = "none" (or "auto", also fp32) or "bf16"'
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
        ValueError: Not of the form SPLIT.METRIC (:data:`SELECT_METRICS`), or the training split.
    """
    split, _, metric = select_by.rpartition(".")
    if not split or metric not in SELECT_METRICS:
        raise ValueError(
            f"expected SPLIT.METRIC with METRIC one of {', '.join(SELECT_METRICS)} and SPLIT val, an evaluation "
            f"split or {' or '.join(AGGREGATE_SPLITS)} (e.g. val.accuracy, val.macro_f1, worst.accuracy), got "
            f"{select_by!r}"
        )
    if split == "train":
        raise ValueError(
            "the training split is not evaluated each epoch; use val or another evaluation split"
        )
    return split, metric


def split_problems(d: DataConfig) -> list[str]:
    """The fractions of a split drawn from one folder of class folders (``data.val_fraction``...)."""
    p: list[str] = []
    if not 0 < d.val_fraction < 1:
        p.append(
            f"data.val_fraction: must be in (0, 1) (e.g. 0.1 holds out 10% of each class), got {d.val_fraction!r}"
        )
    if d.test_fraction and not 0 < d.test_fraction < 1:
        p.append(f"data.test_fraction: must be in (0, 1), or 0 for no test split, got {d.test_fraction!r}")
    if 0 < d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction >= 1:
        p.append(
            f"data.test_fraction: data.val_fraction + data.test_fraction = {d.val_fraction + d.test_fraction:g} "
            "leaves nothing to train on; their sum must be below 1"
        )
    _at_least(p, "data.split_seed", d.split_seed, 0)
    _choice(p, "data.sampler", d.sampler, SAMPLERS)
    return p


def skew_problems(r: Recipe) -> list[str]:
    """``train.class_weights``: "balanced", "" or positive numbers, and not with mixed (two-class) images."""
    w = r.train.class_weights
    p: list[str] = []
    if isinstance(w, str) and w not in ("", BALANCED):
        p.append(
            f'train.class_weights: expected "balanced", a list of numbers (one per class) or "", got {w!r}'
        )
    if isinstance(w, list) and (not w or any(v is None or v <= 0 for v in w)):
        p.append(f"train.class_weights: every class weight must be a number > 0, got {w!r}")
    if w and mixes(r):
        p.append(
            "train.class_weights: cannot be combined with data.mixup/data.cutmix: a mixed image has two classes, "
            'so there is no one class to weight its loss by; use data.sampler = "balanced" instead (it '
            "combines with mixing)"
        )
    return p


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
            'known after some parameters were already updated; use train.amp = "none" (or "auto", also fp32) or "bf16"'
        )


def weight_dtype_problems(r: Recipe) -> list[str]:
    """``train.weight_dtype`` and ``optim.update_rounding``: values, and what bf16 weights cannot be combined with."""
    t, o = r.train, r.optim
    p: list[str] = []
    _choice(p, "train.weight_dtype", t.weight_dtype, WEIGHT_DTYPES)
    _choice(p, "optim.update_rounding", o.update_rounding, UPDATE_ROUNDINGS)
    if t.weight_dtype != "bf16":
        if o.update_rounding != "stochastic" and o.update_rounding in UPDATE_ROUNDINGS:
            p.append(
                f"optim.update_rounding: {o.update_rounding!r} only applies to bf16 weights, but "
                f'train.weight_dtype = {t.weight_dtype!r}; set train.weight_dtype = "bf16" or remove it'
            )
        return p
    if o.name.lower() not in ROUNDED_OPTIMIZERS:
        p.append(
            f"optim.name: {o.name!r} has no stochastic-rounding update for bf16 weights "
            f'(train.weight_dtype = "bf16"); use one of {", ".join(ROUNDED_OPTIMIZERS)}, or '
            'train.weight_dtype = "fp32"'
        )
    if t.amp in ("fp16", "none"):
        what = "fp16 autocast" if t.amp == "fp16" else "fp32 compute"
        p.append(
            f'train.weight_dtype: "bf16" weights compute in bf16, not with train.amp = {t.amp!r} ({what}); '
            'set train.amp = "bf16" (or "auto")'
        )
    if t.ema_decay > 0:
        p.append(
            'train.ema_decay: not with train.weight_dtype = "bf16": the average would be held in bf16, where '
            'each (1 - decay) x step is rounded away; set train.ema_decay = 0 or train.weight_dtype = "fp32"'
        )
    if t.shard:
        p.append(
            'train.shard: not with train.weight_dtype = "bf16" (the rounded updates work on whole tensors, '
            'not FSDP2 slices); train with DDP (train.shard = false) or train.weight_dtype = "fp32"'
        )
    return p
