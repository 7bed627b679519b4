"""Matrix builds: one recipe, several separately named variants.

    name: smollm2
    matrix:
      precision: [float16, bfloat16]          # labels: the values
      engines:                                 # labels: the keys
        portable: [tensorrt-rtx]
        turing: [{backend: tensorrt-rtx, compute_capabilities: [sm75]}]

expands into smollm2-float16-portable, smollm2-float16-turing, smollm2-bfloat16-portable
and smollm2-bfloat16-turing: the cartesian product, keys in the order written. A variant
is the recipe with those values set exactly as command-line overrides would set them
(`precision=bfloat16`), `matrix` removed and the name extended by the labels, and it is
validated in full; a problem in a variant points at the matrix value that caused it.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import TYPE_CHECKING, Any, Sequence

from llmbuild.recipe.axes import axis_labels
from llmbuild.recipe.problems import COMMAND_LINE, Problem, RecipeError

if TYPE_CHECKING:
    from llmbuild.recipe.schema import Recipe

MAX_VARIANTS = 64  # each variant is validated (and compiled) in full


def variant_names(recipe: Recipe) -> list[tuple[str, dict[str, tuple[str, Any]]]]:
    """(variant name, {key: (label, value)}) for every combination, in order."""
    axes = [(key, axis_labels(values)) for key, values in recipe.matrix.items()]
    out = []
    for combo in itertools.product(*(pairs for _, pairs in axes)):
        chosen = {key: pair for (key, _), pair in zip(axes, combo)}
        out.append(("-".join([recipe.name, *(label for label, _ in combo)]), chosen))
    return out


def load_variants(path: str | os.PathLike, overrides: Sequence[str] = (), *, check_model: bool = True,
                  check_build: bool = False) -> list[Recipe]:
    """The recipe's variants, each loaded and validated; [the recipe] without a matrix.

    Raises one RecipeError with the problems of every variant.
    """
    from llmbuild.recipe.loader import load_recipe
    from llmbuild.recipe.tree import Loc, apply_overrides, read_tree

    base = load_recipe(path, overrides, check_model=check_model, check_build=check_build)
    if not base.matrix:
        return [base]
    tree = read_tree(os.fspath(path), [])
    if tree is not None:
        apply_overrides(tree, overrides, [])
    count = 1
    for values in base.matrix.values():
        count *= len(values)
    if count > MAX_VARIANTS:
        sizes = " x ".join(str(len(v)) for v in base.matrix.values())
        where = tree.where(("matrix",), key=True) if tree is not None else Loc(os.fspath(path), 0, 0)
        raise RecipeError([Problem("matrix", f"the matrix has {count} variants ({sizes}); expected at most "
                                             f"{MAX_VARIANTS}: split it into several recipes", *where)])
    fixed = [*overrides, "~matrix"]
    variants, problems = [], []
    for name, chosen in variant_names(base):
        axis_overrides = [f"{key}={json.dumps(value)}" for key, (_, value) in chosen.items()]
        try:
            recipe = load_recipe(path, [*fixed, f"name={name}", *axis_overrides], check_model=check_model,
                                 check_build=check_build)
        except RecipeError as e:
            first_axis = len(fixed) + 2  # 1-based column of the first axis override
            for p in e.problems:
                loc = Loc(p.file, p.line, p.column)
                if p.file == COMMAND_LINE and p.column >= first_axis and tree is not None:
                    key = list(chosen)[p.column - first_axis]
                    label = chosen[key][0]
                    item = label if isinstance(base.matrix[key], dict) else [lbl for lbl, _ in
                                                                             axis_labels(base.matrix[key])].index(label)
                    loc = tree.where(("matrix", key, item))
                problems.append(Problem(p.path, f"matrix variant {name!r}: {p.message}", *loc))
            continue
        recipe._variant = {"of": base.name, "values": {key: label for key, (label, _) in chosen.items()}}
        variants.append(recipe)
    if problems:
        raise RecipeError(problems)
    return variants
