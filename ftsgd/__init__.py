"""ftsgd: fine-tune pretrained vision models with SGD and a frozen embedding layer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ftsgd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
