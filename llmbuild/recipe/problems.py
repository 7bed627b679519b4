"""`Problem` (one thing wrong with a recipe, with its position) and `RecipeError`.

Kept free of pydantic and ruamel so that importing `llmbuild.recipe` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmbuild.errors import UserError

COMMAND_LINE = "<command line>"
"""`Problem.file` of a problem caused by a command-line override. Such problems have
`line == 1` and `column ==` the 1-based position of the override in the list given to
`load_recipe` (the command line counts as one line, each override as one column)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe.

    `path` is the dotted YAML path (`limits.max_seq_len`, `engines[1]`; "" for the whole
    file). `line` and `column` are 1-based; `line == 0` means no position is known.
    """

    path: str
    message: str
    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        where = self.file if self.line <= 0 else f"{self.file}:{self.line}:{self.column}"
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where}: {what}"


class RecipeError(UserError):
    """Every problem found while loading a recipe, raised once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [f"recipe has {len(self.problems)} problem(s):"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def describe(value: object) -> str:
    """A found value as a message shows it: `'abc' (string)`, `3 (integer)`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    if isinstance(value, int):
        return f"{value} (integer)"
    if isinstance(value, float):
        return f"{value} (number)"
    if isinstance(value, str):  # at most 60 characters of it: never echo a whole file
        return f"{value[:57] + '...' if len(value) > 60 else value!r} (string{f', {len(value)} characters' if len(value) > 60 else ''})"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    return f"{value!r} ({type(value).__name__})"
