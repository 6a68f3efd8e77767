"""The ``ftsgd`` command line: Typer parses, each command module delegates and prints.

Importing this package imports no torch: ``ftsgd --help`` and ``ftsgd report`` stay fast.
"""

from ftsgd.cli.app import app
from ftsgd.cli.main import main

__all__ = ["app", "main"]
