"""``ftsgd sweep``'s parsed flags as the :class:`~ftsgd.sweep.plan.SweepOptions` the sweep takes."""

from __future__ import annotations

from typing import Any

from ftsgd.sweep.plan import SweepOptions

_LISTS = ("recipes", "grids", "sets", "slurm_opts")
"""Repeatable flags: None (not given) becomes an empty list."""


def sweep_options(args: dict[str, Any], argv: list[str]) -> SweepOptions:
    """The options of ``ftsgd sweep``, from its parameters by name (the CLI names them as SweepOptions does)."""
    values = {k: (list(v or []) if k in _LISTS else v) for k, v in args.items()}
    return SweepOptions(**values, argv=argv)
