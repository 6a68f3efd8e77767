"""What a run was trained on, recorded so that ``--resume`` can refuse to continue on other data.

A resumed run that silently reads another dataset ends with a ``summary.json`` describing data it was
only partly trained on, or dies on a classifier of the wrong size. The fingerprint is what
:func:`ftsgd.data.discover_splits` found: the class names in label order and, per split, its folder and
every file with its size and modification time (a stat per file, no reading). Comparing two fingerprints
says exactly what changed: classes added, removed or renamed, files added, removed or changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ftsgd.data.folders import Split

__all__ = ["DataChanges", "compare_fingerprints", "fingerprint"]

FINGERPRINT_FORMAT = 1


def fingerprint(class_names: list[str], splits: Mapping[str, Split]) -> dict[str, Any]:
    """The dataset as found: classes in label order; per split its folder and ``[path, size, mtime_ns]`` rows.

    Paths are relative to the split's folder, so a dataset that was moved (``--data`` elsewhere) still
    matches; a file that cannot be stat'ed gets size and time -1 (it will fail the pre-flight scan anyway).
    """
    out: dict[str, Any] = {"format": FINGERPRINT_FORMAT, "classes": list(class_names), "splits": {}}
    for name, split in splits.items():
        rows = []
        for path, _label in split.samples:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            rows.append([str(path.relative_to(split.root)), size, mtime])
        out["splits"][name] = {"root": str(split.root), "files": rows}
    return out


@dataclass(frozen=True)
class DataChanges:
    """How a dataset differs from the one a run recorded."""

    classes_added: tuple[str, ...] = ()
    classes_removed: tuple[str, ...] = ()
    classes_reordered: bool = False
    splits_added: tuple[str, ...] = ()
    splits_removed: tuple[str, ...] = ()
    files_added: dict[str, int] | None = None
    files_removed: dict[str, int] | None = None
    files_changed: dict[str, int] | None = None
    files_touched: int = 0
    """How many of the changed files kept their size and only have a new modification time."""

    @property
    def any(self) -> bool:
        return bool(self.lines())

    @property
    def only_grew(self) -> bool:
        """Only new images in existing splits and classes: the one change a resumed run may accept."""
        return bool(self.files_added) and self.lines() == self._added_lines()

    def _added_lines(self) -> list[str]:
        return [f"{n} file(s) added to {s}" for s, n in (self.files_added or {}).items()]

    def lines(self) -> list[str]:
        """One human-readable line per kind of change."""
        out = []
        if self.classes_added:
            out.append(f"classes added: {', '.join(self.classes_added)}")
        if self.classes_removed:
            out.append(f"classes removed or renamed: {', '.join(self.classes_removed)}")
        if self.classes_reordered:
            out.append("the classes are the same but in another order (labels would change meaning)")
        if self.splits_added:
            out.append(f"splits added: {', '.join(self.splits_added)}")
        if self.splits_removed:
            out.append(f"splits removed: {', '.join(self.splits_removed)}")
        out += self._added_lines()
        out += [f"{n} file(s) removed from {s}" for s, n in (self.files_removed or {}).items()]
        out += [
            f"{n} file(s) changed (size or modification time) in {s}"
            for s, n in (self.files_changed or {}).items()
        ]
        if self.files_touched:
            out.append(
                f"{self.files_touched} of the changed files have their old size and only a new modification "
                "time, as after a copy that did not keep times (cp -a and rsync -a keep them)"
            )
        return out


def compare_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> DataChanges:
    """What changed from the recorded fingerprint ``old`` to the dataset as found now, ``new``."""
    old_classes, new_classes = list(old["classes"]), list(new["classes"])
    added, removed, changed = {}, {}, {}
    touched = 0
    for name in sorted(set(old["splits"]) & set(new["splits"])):
        before = {row[0]: tuple(row[1:]) for row in old["splits"][name]["files"]}
        after = {row[0]: tuple(row[1:]) for row in new["splits"][name]["files"]}
        counts = (len(after.keys() - before.keys()), len(before.keys() - after.keys()))
        differ = [k for k in before.keys() & after.keys() if before[k] != after[k]]
        n_changed = len(differ)
        touched += sum(1 for k in differ if before[k][0] == after[k][0])
        for target, n in zip((added, removed, changed), (*counts, n_changed), strict=True):
            if n:
                target[name] = n
    return DataChanges(
        classes_added=tuple(c for c in new_classes if c not in old_classes),
        classes_removed=tuple(c for c in old_classes if c not in new_classes),
        classes_reordered=set(old_classes) == set(new_classes) and old_classes != new_classes,
        splits_added=tuple(sorted(set(new["splits"]) - set(old["splits"]))),
        splits_removed=tuple(sorted(set(old["splits"]) - set(new["splits"]))),
        files_added=added,
        files_removed=removed,
        files_changed=changed,
        files_touched=touched,
    )
