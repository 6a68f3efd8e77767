"""``ftsgd demo --compare``'s output: the diagnostic, the grid points, the comparison table, the timing.

The comparison itself (pre-training, the sweep of fine-tuning runs, the selection) is
:mod:`ftsgd.sweep.compare`.
"""

from __future__ import annotations

from ftsgd.inspect.diagnose import print_diagnostic
from ftsgd.inspect.memory import format_bytes
from ftsgd.report.selection import Stat
from ftsgd.report.tables import build_table, display_rows
from ftsgd.sweep.compare import RESULT_FILE, Comparison
from ftsgd.utils import console


def print_comparison(c: Comparison) -> None:
    """The diagnostic, every grid point, the comparison table, and how long it took."""
    print_diagnostic(c.diagnostic)
    points = build_table(c.report, "points")
    keep = [i for i, col in enumerate(points.columns) if col.kind not in ("bytes", "seconds")]  # one process
    console.print_table(
        points.title,
        [points.columns[i].header for i in keep],
        [[r[i] for i in keep] for r in display_rows(points)],
    )
    rows = [
        [
            r.method,
            f"{r.lr:g}" if r.lr is not None else "-",
            f"{r.seeds}/{c.config.seeds}",
            _percent(r.val),
            _percent(r.ood),
            format_bytes(r.state_bytes),
            f"{r.bytes_per_param:.1f}",
            f"{r.vs_adamw:.2f}x",
            format_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else "-",
        ]
        for r in c.rows
    ]
    console.print_table(
        "Comparison: per method, the learning rate with the best mean ID-val accuracy (mean ± std over seeds)",
        [
            "method",
            "best lr",
            "seeds",
            "ID val %",
            "OOD %",
            "train-state memory",
            "bytes/param",
            "vs adamw",
            "peak (measured)",
        ],
        rows,
    )
    p, s = c.pretrain, c.seconds
    how = "cached" if p["cached"] else f"trained in {s['pretrain']:.0f} s"
    console.info(
        f"backbone: {c.config.model} {c.config.model_kwargs}, pre-trained {p['epochs']} epoch(s) on the source task "
        f"(val {100 * p['val_accuracy']:.1f}%; {how}: {p['path']})"
    )
    how_precise = "bf16 autocast" if c.precision == "bf16" else "fp32"
    console.info(f"fine-tuning precision: {how_precise} (train.amp = {c.config.amp!r}; demo --compare --amp)")
    console.info(
        f"time: {s['total']:.0f} s in all, fine-tuning {s['finetune']:.0f} s; results: {c.out / RESULT_FILE}"
    )


def _percent(value: Stat | None) -> str:
    if value is None:
        return "-"
    spread = f" ± {100 * value.std:.1f}" if value.std is not None else ""
    return f"{100 * value.mean:.1f}{spread}"
