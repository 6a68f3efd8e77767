"""Declarative TOML recipes: schema, loading and ``--set``, checks, dumping, sweep grids.

Torch-free: the CLI's help and ``ftsgd recipes`` read recipes without loading torch or timm.
"""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Recipe": "schema",
        "DEFAULT_RECIPE": "schema",
        "load_recipe": "load",
        "builtin_recipes": "load",
        "builtin_recipe_dir": "load",
        "list_recipes": "load",
        "recipe_from_dict": "build",
        "recipe_to_toml": "dump",
        "recipe_to_dict": "dump",
        "describe_keys": "dump",
    },
)
