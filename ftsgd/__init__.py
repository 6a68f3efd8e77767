"""ftsgd: fine-tune pretrained vision models with SGD and a frozen embedding layer."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("ftsgd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def lazy_exports(package: str, names: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and a module ``__getattr__`` (PEP 562) for a folder's public names.

    A folder's ``__init__`` names its public surface without importing it: ``ftsgd.data.discover_splits``
    imports ``ftsgd.data.folders`` (and torch) on first use, so ``ftsgd --help`` and ``ftsgd report``,
    which import folders but not those names, never load torch.

    Args:
        package: The folder's ``__name__``.
        names: ``{public name: module in the folder that defines it}``.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(names), __getattr__


__all__ = ["__version__", "lazy_exports"]
