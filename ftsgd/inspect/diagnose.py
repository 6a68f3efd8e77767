"""Should the embedding be frozen? The paper's gradient diagnostic.

Kumar et al. explain when SGD falls behind AdamW by one measurement: the L2 norm of each layer's
gradient at the pretrained weights, before any update, averaged over the minibatches of an epoch.
Where the first "embedding" layer's norm towers over the middle layers' (CLIP ViT-B/16 on Living-17:
~7.8 against at most ~2.5; ConvNeXt-B ~3.4 against at most ~1.1), SGD falls behind AdamW out of
distribution unless the embedding is frozen; where it does not (BiT ResNet-50: ~6 against middle
layers up to ~22), SGD and AdamW match without freezing.

What is measured, exactly:

- The model as ``ftsgd train`` would start it: the recipe's weights, a freshly initialised
  classifier sized for the dataset's classes (seeded by ``train.seed`` as training seeds it -- its
  gradient is part of the measurement, since that is the gradient the first steps follow), training
  mode (dropout, stochastic depth, BatchNorm batch statistics), float32, and **nothing frozen**: the
  diagnostic is what tells you whether to freeze.
- The first ``K`` batches of training epoch 0: the train split, ``train.batch_size`` images per
  batch (summed over ``train.micro_batch_size`` micro-batches as training does), in the run's
  shuffled order with the recipe's augmentation -- the very batches the run would start with.
- The loss training uses (cross-entropy with ``train.label_smoothing``, mean over the batch), one
  backward pass per batch, no update (learning rate 0): weights, BatchNorm statistics, gradients
  and RNG state are restored afterwards.
- Per layer group ``g`` (:func:`ftsgd.layers.layer_groups`: the embedding as ``ftsgd`` freezes it,
  one group per block or stage unit from timm's ``group_matcher(coarse=False)``, the classifier) and
  batch ``b``: ``norm[g, b] = sqrt(sum over parameters p in g of ||grad_b(p)||_2^2)``, the L2 norm of
  the group's whole gradient. The reported norm is the mean over batches of ``norm[g, b]`` (the mean
  of the norms, not the norm of the mean gradient, as the paper averages), with its standard
  deviation across batches.
- The ratio: embedding norm / median of the middle groups (everything between embedding and
  classifier). The median rather than the maximum, so one unusual block (a ViT's position
  embedding, a downsampling layer) does not decide.

The threshold, :data:`FREEZE_RATIO` = 2: in the paper's examples where freezing mattered the
embedding's norm is >= 3.1x even the *largest* middle layer's (7.8/2.5, 3.4/1.1), so >= 3.1x the
median; where it did not, the embedding is below the largest middle layer (6 vs 22). 2 sits between
with a margin on both sides. Freezing never hurt in the paper (SGD freeze-embed matched or beat SGD
on every model), so below the threshold the advice is "not needed", not "do not".
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftsgd.data.loader import build_loader
from ftsgd.data.split import find_splits, split_lines
from ftsgd.data.transforms import build_transform, small_image_warnings
from ftsgd.errors import ModelError, UsageError
from ftsgd.model.build import build_model, classifier_modules, model_name
from ftsgd.model.data_config import data_config_for
from ftsgd.model.embedding import find_embedding
from ftsgd.model.freeze import train_mode
from ftsgd.model.layers import layer_groups
from ftsgd.recipe.schema import Recipe
from ftsgd.utils import console
from ftsgd.utils.device import resolve_device
from ftsgd.utils.fileio import atomic_write_bytes

__all__ = [
    "DEFAULT_BATCHES",
    "FREEZE_RATIO",
    "GradientDiagnostic",
    "GroupNorm",
    "check_png_path",
    "diagnose_from_recipe",
    "diagnostic_to_dict",
    "gradient_diagnostic",
    "plot_diagnostic",
    "print_diagnostic",
    "recommend",
    "text_bars",
]

FREEZE_RATIO = 2.0
"""Freeze the embedding when its gradient norm is at least this many times the median middle group's."""

DEFAULT_BATCHES = 8
"""Training batches averaged over when ``--batches`` is not given."""

_BAR_WIDTH = 40
_COLOURS = {"embedding": "#d62728", "middle": "#1f77b4", "head": "#7f7f7f"}


@dataclass(frozen=True)
class GroupNorm:
    """The gradient norm of one layer group.

    Attributes:
        name: Layer group label, e.g. ``"patch_embed"``, ``"blocks.3"``, ``"head"``.
        kind: ``"embedding"``, ``"middle"`` or ``"head"``.
        params: Parameter elements measured (those with ``requires_grad``).
        norm: Mean over batches of the group's gradient L2 norm.
        std: Standard deviation of that norm across batches (0 for one batch).
        batch_norms: The norm for each batch, in batch order.
    """

    name: str
    kind: str
    params: int
    norm: float
    std: float
    batch_norms: tuple[float, ...]


@dataclass(frozen=True)
class GradientDiagnostic:
    """The per-layer-group gradient norms and what they say about freezing the embedding.

    Attributes:
        model: Model name.
        groups: One entry per layer group, embedding first, classifier last.
        batches: Batches measured.
        images: Images in those batches.
        num_classes: Classifier size the model was built with.
        embedding_norm: The embedding group's norm.
        median_middle_norm: Median norm of the middle groups.
        max_middle_norm: Largest middle-group norm.
        head_norm: The classifier's norm (``None`` without a classifier).
        ratio: ``embedding_norm / median_middle_norm`` (``inf`` when the median is 0).
        threshold: The ratio from which freezing is recommended (:data:`FREEZE_RATIO`).
        freeze_embedding: The recommendation; ``None`` when the gradients are all zero.
        reason: Why, in one paragraph, with the paper's numbers.
        not_measured: Parameters left out because they do not require gradients (fixed buffers
            such as sin-cos position embeddings).
        data_splits: The dataset's layout and each split's images per class, as ``ftsgd train`` would use them.
        data_warnings: Warnings about the training images and the augmentation (images much smaller
            than the input, random crops of a few pixels), as ``ftsgd train`` prints them.
    """

    model: str
    groups: tuple[GroupNorm, ...]
    batches: int
    images: int
    num_classes: int
    embedding_norm: float
    median_middle_norm: float
    max_middle_norm: float
    head_norm: float | None
    ratio: float
    threshold: float
    freeze_embedding: bool | None
    reason: str
    not_measured: tuple[str, ...] = ()
    data_warnings: tuple[str, ...] = ()
    data_splits: tuple[str, ...] = ()
    """The dataset's layout and each split's images per class (a drawn split: as a run would draw it)."""


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def _left_as_found(model: nn.Module) -> Iterator[None]:
    """Restore module modes, buffers (BatchNorm statistics), gradients and the RNG afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g


def _batch_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: list[list[nn.Parameter]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    micro_batch_size: int,
) -> list[float]:
    """One batch's gradient, as training computes it, and the L2 norm of each group's part of it.

    Micro-batch losses are weighted by their share of the batch, so the summed gradient is the
    gradient of the batch-mean loss (as :meth:`ftsgd.trainer.Trainer.step` does). Squares are summed
    in float64 so a large group's norm does not lose precision.
    """
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    micro = micro_batch_size or len(y)
    for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
        logits = model(xs.to(device))
        loss = loss_fn(logits.float(), ys.to(device))
        (loss * (len(ys) / len(y))).backward()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    squares = [
        sum((p.grad.detach().double().square().sum() for p in group if p.grad is not None), zero)
        for group in params
    ]
    return torch.stack(squares).sqrt().tolist()


def gradient_diagnostic(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    embedding: Sequence[str],
    classifier: Sequence[str] = (),
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    micro_batch_size: int = 0,
    seed: int = 0,
    num_classes: int | None = None,
) -> GradientDiagnostic:
    """Measure each layer group's gradient norm on ``batches`` without changing the model.

    Args:
        model: The model at the weights to diagnose, on its device, with nothing frozen (parameters
            with ``requires_grad=False`` are left out and listed in ``not_measured``).
        batches: ``(images, labels)`` pairs; each is one gradient (see the module docstring).
        embedding: Module names of the embedding (``Embedding.modules``).
        classifier: Module names of the classifier (``ftsgd.model.build.classifier_modules``).
        loss_fn: Loss on ``(logits, labels)``; cross-entropy (batch mean) by default.
        micro_batch_size: Split each batch into micro-batches of this size (0 = whole batches).
        seed: Seeds dropout and stochastic depth for the measurement (the global RNG is restored).
        num_classes: Recorded in the result; defaults to ``model.num_classes`` when present.

    Returns:
        The :class:`GradientDiagnostic`.

    Raises:
        ValueError: No batches, or no trainable embedding parameter to measure.
    """
    groups = layer_groups(model, embedding, classifier)
    named = dict(model.named_parameters())
    measured = [[named[n] for n in g.parameters if named[n].requires_grad] for g in groups]
    if not any(g.kind == "embedding" and p for g, p in zip(groups, measured, strict=True)):
        raise ValueError(f"the embedding {list(embedding)} has no parameter that requires a gradient")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    per_batch: list[list[float]] = []
    images = 0
    with _left_as_found(model):
        torch.manual_seed(seed)
        train_mode(model)
        for x, y in batches:
            per_batch.append(_batch_norms(model, x, y, measured, loss_fn, micro_batch_size))
            images += len(y)
    if not per_batch:
        raise ValueError("no batches to measure")
    rows = [
        GroupNorm(
            name=g.name,
            kind=g.kind,
            params=sum(p.numel() for p in params),
            norm=statistics.fmean(column),
            std=statistics.pstdev(column),
            batch_norms=tuple(column),
        )
        for g, params, column in zip(groups, measured, zip(*per_batch, strict=True), strict=True)
        if params
    ]
    left_out = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    classes = num_classes if num_classes is not None else int(getattr(model, "num_classes", 0) or 0)
    return _summarise(model_name(model), rows, len(per_batch), images, classes, left_out)


def _summarise(
    model: str, rows: list[GroupNorm], batches: int, images: int, num_classes: int, left_out: tuple[str, ...]
) -> GradientDiagnostic:
    """The result: the norms plus the embedding/median ratio and the recommendation."""
    embedding = next(r.norm for r in rows if r.kind == "embedding")
    middle = [r.norm for r in rows if r.kind == "middle"]
    head = next((r.norm for r in rows if r.kind == "head"), None)
    median = statistics.median(middle) if middle else 0.0
    ratio, freeze, reason = recommend(embedding, middle)
    return GradientDiagnostic(
        model=model,
        groups=tuple(rows),
        batches=batches,
        images=images,
        num_classes=num_classes,
        embedding_norm=embedding,
        median_middle_norm=median,
        max_middle_norm=max(middle, default=0.0),
        head_norm=head,
        ratio=ratio,
        threshold=FREEZE_RATIO,
        freeze_embedding=freeze,
        reason=reason,
        not_measured=left_out,
    )


def recommend(
    embedding_norm: float, middle_norms: Sequence[float], threshold: float = FREEZE_RATIO
) -> tuple[float, bool | None, str]:
    """``(ratio, freeze, reason)`` from the embedding's norm and the middle groups' norms.

    ``freeze`` is ``None`` when there is nothing to compare (no middle group, or every gradient is
    zero, e.g. a dataset with a single class).
    """
    median = statistics.median(middle_norms) if middle_norms else 0.0
    if not middle_norms or (median == 0 and embedding_norm == 0):
        return float("nan"), None, "no middle-layer gradient to compare with (all zero or no layers)"
    ratio = embedding_norm / median if median > 0 else float("inf")
    if ratio >= threshold:
        return (
            ratio,
            True,
            (
                f"the embedding's gradient norm is {ratio:.1f}x the median middle layer's (threshold "
                f"{threshold:g}x): the gap the paper found in CLIP ViTs (~7.8 vs <=2.5) and ConvNeXt (~3.4 vs "
                "<=1.1), where SGD fell behind AdamW out of distribution unless the embedding was frozen. "
                'Use freeze.policy = "embed" (recipe sgd-freeze-embed).'
            ),
        )
    return (
        ratio,
        False,
        (
            f"the embedding's gradient norm is {ratio:.1f}x the median middle layer's, below the "
            f"{threshold:g}x threshold: no gap, as for BiT ResNet-50 in the paper (~6 vs middle layers up "
            "to ~22), where SGD matched AdamW without freezing. Freezing the embedding is not needed; it "
            "did not hurt in the paper and saves a little memory."
        ),
    )


def diagnose_from_recipe(
    recipe: Recipe, data_dir: Path | str, batches: int = DEFAULT_BATCHES, num_classes: int | None = None
) -> GradientDiagnostic:
    """Run the diagnostic for a recipe's model on the first ``batches`` training batches of a dataset.

    Builds the model as ``ftsgd train`` would (weights, a classifier for the dataset's classes,
    seeded by ``train.seed``), but freezes nothing; see the module docstring for what is measured.

    Args:
        recipe: A validated recipe naming the model (and its weights).
        data_dir: Image-folder dataset; its train split is measured.
        batches: How many training batches to average over (fewer if the split is smaller).
        num_classes: The classifier size the caller expects (``--num-classes``); it must match the
            dataset's class count, because the head is sized by the data as in training.

    Raises:
        UsageError: ``batches < 1`` or a ``num_classes`` that is not the dataset's; ModelError: no
        model name; DataError: an unusable dataset; WeightsError: unusable weights.
    """
    if batches < 1:
        raise UsageError(f"--batches must be at least 1, got {batches}")
    if not recipe.model.name:
        raise ModelError("no model given: pass a timm model name, e.g. `ftsgd inspect resnet50 --data DIR`")
    recipe = replace(recipe, data=replace(recipe.data, root=str(data_dir)))
    classes, splits = find_splits(recipe.data)
    if num_classes is not None and num_classes != len(classes):
        raise UsageError(
            f"--num-classes {num_classes} does not match the {len(classes)} classes of {data_dir}; "
            "with --data the classifier is sized by the dataset, so leave --num-classes out"
        )
    t = recipe.train
    torch.manual_seed(t.seed)  # the same fresh head training would start from
    model, _ = build_model(recipe.model, num_classes=len(classes))
    data_config = data_config_for(model, recipe.data)
    embedding = find_embedding(model, data_config["input_size"])
    warnings = tuple(small_image_warnings(splits["train"], data_config, recipe.data))
    loader = build_loader(
        splits["train"],
        build_transform(data_config, recipe.data.augment, training=True, data=recipe.data),
        batch_size=t.batch_size,
        training=True,
        seed=t.seed,
        drop_last=recipe.data.drop_last,
        balanced=recipe.data.sampler == "balanced",
    )
    model.to(resolve_device(t.device))
    result = gradient_diagnostic(
        model,
        itertools.islice(loader, batches),
        embedding.modules,
        classifier_modules(model, embedding.execution_order),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        num_classes=len(classes),
    )
    return dataclasses.replace(
        result, data_warnings=warnings, data_splits=tuple(split_lines(classes, splits, recipe.data))
    )


# --------------------------------------------------------------------------- reporting


def diagnostic_to_dict(result: GradientDiagnostic) -> dict[str, Any]:
    """A JSON-ready dict (non-finite ratios become ``null`` in ``console.print_json``)."""
    return dataclasses.asdict(result)


def text_bars(result: GradientDiagnostic, width: int = _BAR_WIDTH) -> list[str]:
    """One ``#`` bar per group, scaled so the largest norm fills ``width`` characters."""
    top = max((g.norm for g in result.groups), default=0.0)
    return ["#" * (round(width * g.norm / top) if top > 0 else 0) for g in result.groups]


def _verdict(result: GradientDiagnostic) -> str:
    if result.freeze_embedding is None:
        return "none"
    return "freeze the embedding" if result.freeze_embedding else "freezing the embedding is not needed"


def print_diagnostic(result: GradientDiagnostic) -> None:
    """The bar chart (rich bars on a terminal, ``#`` bars otherwise) and the recommendation."""
    title = (
        f"Gradient norm per layer group: mean over {result.batches} training batch(es), "
        f"{result.images} images, nothing frozen, no update"
    )
    if console.stdout_is_tty():
        _print_rich_bars(result, title)
    else:
        rows = [
            [g.name, g.kind, f"{g.params:,}", f"{g.norm:.4g}", f"{g.std:.2g}", bar]
            for g, bar in zip(result.groups, text_bars(result), strict=True)
        ]
        console.print_table(title, ["group", "kind", "params", "norm", "std", ""], rows)
    head = f"{result.head_norm:.4g}" if result.head_norm is not None else "-"
    console.print_kv(
        [
            ("embedding norm", f"{result.embedding_norm:.4g}"),
            ("middle layers", f"median {result.median_middle_norm:.4g}, max {result.max_middle_norm:.4g}"),
            ("head norm", head),
            ("ratio", f"{result.ratio:.2f}x the median middle layer (threshold {result.threshold:g}x)"),
            ("recommendation", _verdict(result)),
            ("why", result.reason),
        ]
    )


def _print_rich_bars(result: GradientDiagnostic, title: str) -> None:
    """A rich table whose last column is a bar; the bar shrinks before any text column wraps."""
    from rich.bar import Bar
    from rich.table import Table

    out = console.console()
    top = max((g.norm for g in result.groups), default=0.0) or 1.0
    cells = [(g.name, g.kind, f"{g.params:,}", f"{g.norm:.4g} ± {g.std:.2g}") for g in result.groups]
    text_width = sum(max(len(row[i]) for row in cells) for i in range(4)) + 16  # borders and padding
    width = max(8, min(_BAR_WIDTH, out.width - text_width))
    table = Table(title=title, title_justify="left")
    for col, justify in (("group", "left"), ("kind", "left"), ("params", "right"), ("norm", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("", width=width, no_wrap=True)
    for g, row in zip(result.groups, cells, strict=True):
        table.add_row(*row, Bar(size=top, begin=0, end=g.norm, width=width, color=_COLOURS[g.kind]))
    out.print(table)


DIAGNOSTIC_PNG = "gradient_diagnostic.png"
"""The file ``inspect --data ... --png DIR`` writes into ``DIR``."""


def check_png_path(folder: Path | str) -> Path:
    """The plot's path in the ``--png`` folder, refused before any work when that cannot be a folder.

    ``--png`` means a folder in every command (``eval``, ``report``, ``sweep``, ``inspect``), so a
    name that looks like a file (``grads.png``) is refused rather than turned into a folder of that name.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--png {folder} exists and is not a folder; --png takes a folder for the plots")
    if not folder.exists() and folder.suffix.lower() == ".png":
        raise UsageError(
            f"--png {folder}: --png takes a folder (the plot is written into it as {DIAGNOSTIC_PNG}), "
            f"not a file name; e.g. --png {folder.parent / 'plots'}"
        )
    return folder / DIAGNOSTIC_PNG


def plot_diagnostic(result: GradientDiagnostic, png_path: Path | str) -> Path:
    """Draw the norms as horizontal bars with the median and threshold lines; write the PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(png_path)
    groups = result.groups
    fig = Figure(figsize=(8, 1.5 + 0.28 * len(groups)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(
        range(len(groups)),
        [g.norm for g in groups],
        xerr=[g.std for g in groups],
        color=[_COLOURS[g.kind] for g in groups],
    )
    ax.set_yticks(range(len(groups)), [g.name for g in groups], fontsize=8)
    ax.invert_yaxis()  # embedding on top, classifier at the bottom
    median = result.median_middle_norm
    ax.axvline(median, color="black", linestyle=":", label=f"median middle layer ({median:.3g})")
    ax.axvline(
        result.threshold * median,
        color="black",
        linestyle="--",
        label=f"freeze threshold ({result.threshold:g}x)",
    )
    ax.set_xlabel(f"gradient L2 norm, mean over {result.batches} batches ({result.images} images)")
    ax.set_title(
        f"{result.model}: embedding / median = {result.ratio:.2f}x -> {_verdict(result)}", fontsize=10
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path
