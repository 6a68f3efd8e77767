"""The README and docs/ document what the code offers (keys, recipes, commands), so they cannot drift silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftsgd.recipe.dump import describe_keys
from ftsgd.recipe.load import builtin_recipes

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = {page.name: page.read_text() for page in sorted((ROOT / "docs").glob("*.md"))}
ALL_DOCS = README + "".join(DOCS.values())


@pytest.mark.parametrize("key", [row[0] for row in describe_keys()])
def test_every_recipe_key_is_documented(key: str) -> None:
    assert f"`{key}`" in ALL_DOCS


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_is_documented(name: str) -> None:
    assert f"`{name}`" in ALL_DOCS


def test_readme_names_the_two_setup_commands_and_ci_calls_one() -> None:
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves() -> None:
    for name in DOCS:
        assert f"(docs/{name})" in README, f"docs/{name} is not linked from the README"
    for source, text in {"README.md": README, **{f"docs/{n}": t for n, t in DOCS.items()}}.items():
        base = (ROOT / source).parent
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (base / target).is_file(), f"{source} links to {target}, which does not exist"


@pytest.mark.slow
def test_the_python_blocks_of_the_architecture_page_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs' ``Trainer`` snippet is run as written (in a scratch folder), so it cannot rot."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS["architecture.md"], flags=re.S)
    assert blocks, "docs/architecture.md shows how to drive the Trainer"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/architecture.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "runs" / "api-fit" / "summary.json").is_file()


def _shell_commands(text: str) -> list[str]:
    """The ``ftsgd ...`` command lines of the ``bash`` blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r" #| 2?>>? ", line, maxsplit=1)[0].strip()  # comments and redirections
            if line.startswith("ftsgd ") and "[" not in line and "..." not in line and "|" not in line:
                commands.append(line)
    return commands


def test_every_documented_ftsgd_command_line_parses() -> None:
    """Each example in the README and docs names a real sub-command with real options (nothing is run)."""
    import shlex

    import typer.main

    from ftsgd.cli.app import app

    root = typer.main.get_command(app)
    commands = [c for text in [README, *DOCS.values()] for c in _shell_commands(text)]
    assert len(commands) > 20
    problems = []
    for line in commands:
        args = shlex.split(line.replace("~", "/home/u"))[1:]
        command = root
        while args and args[0] in getattr(command, "commands", {}):
            command, args = command.commands[args[0]], args[1:]
        try:
            command.make_context(command.name or "ftsgd", list(args))
        except Exception as exc:  # typer's own click: its UsageError and Exit classes, by name
            names = {cls.__name__ for cls in type(exc).__mro__}
            if "UsageError" in names:
                problems.append(f"{line}: {exc.format_message()}")  # type: ignore[attr-defined]
            elif "Exit" not in names:
                raise
    assert problems == []
