"""Recipes: the typed YAML schema, loaded in one step.

    recipe = load_recipe("recipes/smollm2-135m-instruct.yaml", ["limits.max_seq_len=4096"])

`load_recipe` reads the YAML keeping positions, applies `extends:` and the `a.b=value` /
`~a.b` overrides, validates everything, and raises one `RecipeError` listing every
problem with its YAML path, file, line and column. Importing this package is cheap:
pydantic and ruamel are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from llmbuild.recipe.problems import COMMAND_LINE, Problem, RecipeError

if TYPE_CHECKING:
    from llmbuild.recipe.schema import Recipe

__all__ = ["COMMAND_LINE", "Problem", "Recipe", "RecipeError", "load_recipe"]


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), *, check_model: bool = True,
                check_build: bool = False) -> Recipe:
    """Load, resolve and validate a recipe; see `llmbuild.recipe.loader.load_recipe`."""
    from llmbuild.recipe.loader import load_recipe as _load_recipe

    return _load_recipe(path, overrides, check_model=check_model, check_build=check_build)


def __getattr__(name: str):
    if name == "Recipe":
        from llmbuild.recipe.schema import Recipe

        return Recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
