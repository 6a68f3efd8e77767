"""Recipe values: type names, coercion with a problem per mismatch, TOML spelling, ``--set`` parsing."""

from __future__ import annotations

import math
import tomllib
import types
import typing
from typing import Any

from ftsgd.errors import RecipeError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {type_name(arg)}"
    if origin is dict:
        return "table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected {article(type_name(tp))}, got {value!r}")
            return None
        return [coerce(v, arg, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table (e.g. {{ img_size = 224 }}), got {value!r}")
            return None
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) > 1:
            return coerce_either(value, options, path, problems)
        tp = options[0]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{path}: must be a finite number, got {value!r}")
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{path}: expected {article(type_name(tp))}, got {value!r} ({type(value).__name__})")
        return None
    return value


def coerce_either(value: Any, options: list[Any], path: str, problems: list[str]) -> Any:
    """A value of a key that takes one of several types (``model.reset_head``: a boolean or "auto")."""
    for option in options:
        scratch: list[str] = []
        coerced = coerce(value, option, path, scratch)
        if not scratch:
            return coerced
    names = " or ".join(type_name(o) for o in options)
    problems.append(f"{path}: expected a {names}, got {value!r} ({type(value).__name__})")
    return None


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return toml_value(key)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key.path=value``; the value is read as TOML, else taken as a plain string.

    ``--set optim.lr=3e-4`` gives a float, ``--set train.amp=bf16`` the string ``"bf16"``,
    ``--set model.kwargs={img_size=64}`` an inline table.
    """
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=3e-4"], "--set")
    if any(c in text for c in "\n\r\x00"):  # TOML would read the first line and drop the rest unseen
        raise RecipeError(
            [f"--set {text!r}: one KEY.PATH=VALUE per --set, on one line (give each key its own --set)"],
            "--set",
        )
    key, _, value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError([f"--set {text!r}: empty key path"], "--set")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal, the form ``--set key=VALUE`` reads back to the same value."""
    return toml_value(value)
