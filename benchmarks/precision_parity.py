"""Does bf16 autocast change what the paper's comparison finds? fp32 against bf16, on one backbone.

Runs ``ftsgd demo --compare`` (:func:`ftsgd.sweep.compare.run_comparison`: sgd, sgd-freeze-embed and adamw,
each over its learning-rate grid, 3 seeds, selection by mean ID-val accuracy) twice on the same cached
backbone, once with ``train.amp = "none"`` (fp32) and once with ``"bf16"``, or reads two ``comparison.json``
files written earlier, and prints per recipe the selected learning rate and ID/OOD accuracy (mean ± std over
seeds) in each precision, then the verdict by the rule of issue 19:

* a recipe **moves** when a selected point's ID or OOD mean differs between the precisions by more than its
  seed spread (the larger of the two sample standard deviations);
* the **ranking** changes when the recipes' order by OOD mean, or by ID mean, differs.

Either one means that device's ``train.amp = "auto"`` stays fp32 and bf16 is opt-in; neither means parity.
A changed selected learning rate is reported beside it.

Usage::

    python benchmarks/precision_parity.py FP32/comparison.json BF16/comparison.json     # compare two
    python benchmarks/precision_parity.py --measure --device cuda --out /tmp/parity     # run both, then compare
    python benchmarks/precision_parity.py --measure --device cpu --quick --out /tmp/p   # tiny (tests the script)

Exit status: 0 parity, 3 bf16 moved a recipe or the ranking (not a failure of the script), 1 an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MOVED_EXIT = 3


def measure(out: Path, device: str, quick: bool) -> tuple[Path, Path]:
    """Both comparisons, fp32 first, into ``out/fp32`` and ``out/bf16`` (their backbone cached in ``out``)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from ftsgd.sweep.compare import FULL, QUICK, RESULT_FILE, run_comparison

    base = QUICK if quick else FULL
    paths = []
    for name, amp in (("fp32", "none"), ("bf16", "bf16")):
        config = replace(base, amp=amp, device=device)
        run_comparison(out / name, config, force=True, cache=out / "cache", argv=sys.argv)
        paths.append(out / name / RESULT_FILE)
    return paths[0], paths[1]


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text())
    return {row["method"]: row for row in data["rows"]}


def _pct(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    std = f" ± {100 * stat['std']:.1f}" if stat.get("std") is not None else ""
    return f"{100 * stat['mean']:.1f}{std}"


def _moved(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[float, float, bool]:
    """``(difference of means, spread, beyond it)`` of one accuracy in the two precisions."""
    if a is None or b is None:
        return float("nan"), float("nan"), True
    spread = max(a.get("std") or 0.0, b.get("std") or 0.0)
    diff = b["mean"] - a["mean"]
    return diff, spread, abs(diff) > spread


def _order(rows: dict[str, dict[str, Any]], split: str) -> list[str]:
    return sorted(rows, key=lambda m: -(rows[m][split]["mean"] if rows[m][split] else -1.0))


def compare(fp32: Path, bf16: Path) -> tuple[str, bool, str]:
    """The markdown table, whether bf16 moved a recipe or the ranking, and the verdict line."""
    a, b = _rows(fp32), _rows(bf16)
    lines = [
        "| recipe | lr fp32 | lr bf16 | ID fp32 % | ID bf16 % | ΔID (spread) | OOD fp32 % | OOD bf16 % "
        "| ΔOOD (spread) | beyond spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    moved, lr_changed = [], []
    for method in a:
        ra, rb = a[method], b.get(method, {"lr": None, "val": None, "ood": None})
        did, sid, bid = _moved(ra["val"], rb["val"])
        dood, sood, bood = _moved(ra["ood"], rb["ood"])
        if bid or bood:
            moved.append(method)
        if ra["lr"] != rb["lr"]:
            lr_changed.append(f"{method} {ra['lr']:g} -> {rb['lr']:g}" if rb["lr"] else method)
        flag = ", ".join(w for w, on in (("ID", bid), ("OOD", bood)) if on) or "no"
        lines.append(
            f"| {method} | {ra['lr']:g} | {rb['lr'] if rb['lr'] is None else format(rb['lr'], 'g')} "
            f"| {_pct(ra['val'])} | {_pct(rb['val'])} | {100 * did:+.1f} ({100 * sid:.1f}) "
            f"| {_pct(ra['ood'])} | {_pct(rb['ood'])} | {100 * dood:+.1f} ({100 * sood:.1f}) | {flag} |"
        )
    ranking = {split: (_order(a, split), _order(b, split)) for split in ("ood", "val")}
    reordered = [split for split, (x, y) in ranking.items() if x != y]
    for split, (x, y) in ranking.items():
        name = "OOD" if split == "ood" else "ID"
        lines.append(f"\nRanking by {name} mean: fp32 {' > '.join(x)}; bf16 {' > '.join(y)}")
    verdict_moved = bool(moved or reordered)
    if verdict_moved:
        why = [f"beyond the seed spread: {', '.join(moved)}"] if moved else []
        why += [f"ranking by {'OOD' if s == 'ood' else 'ID'} changed" for s in reordered]
        verdict = f"**bf16 moves the comparison** ({'; '.join(why)}): keep fp32 as the default, bf16 opt-in."
    else:
        verdict = "**Parity**: every recipe within its seed spread and the same ranking."
    if lr_changed:
        verdict += f" Selected learning rate changed: {', '.join(lr_changed)}."
    return "\n".join(lines), verdict_moved, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files", nargs="*", type=Path, help="fp32 and bf16 comparison.json (without --measure)"
    )
    parser.add_argument("--measure", action="store_true", help="run both comparisons first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="with --measure")
    parser.add_argument("--quick", action="store_true", help="with --measure: the tiny configuration")
    parser.add_argument("--out", type=Path, default=Path("runs/precision-parity"), help="with --measure")
    parser.add_argument("--markdown-out", type=Path, default=None, help="also write the table here")
    opts = parser.parse_args(argv)
    if opts.measure:
        fp32, bf16 = measure(opts.out, opts.device, opts.quick)
    elif len(opts.files) == 2:
        fp32, bf16 = opts.files
    else:
        parser.error("give two comparison.json files (fp32 first), or --measure")
    table, moved, verdict = compare(fp32, bf16)
    text = f"{table}\n\n{verdict}\n"
    print(text)
    if opts.markdown_out is not None:
        opts.markdown_out.write_text(text)
    return MOVED_EXIT if moved else 0


if __name__ == "__main__":
    raise SystemExit(main())
